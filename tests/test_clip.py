"""clip.py: InfoNCE against a hand computation, FLIP's patch dropping keeps exactly its share and only in
training, each hard negative differs from the truth exactly as it claims (read back with the world's own
parser), retrieval and the per-object score by hand, and a tiny model learns a batch."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

import clip
from data.shapes import NEGATIVES, PARTNER, ShapesSplit, World, caption, negative, parse_caption
from tests.conftest import as_args, overfit, run

TINY = dict(img_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32, text_n_layer=1, text_n_head=2,
            text_n_embd=32, embed_dim=32, n_train=64, n_eval=32)


def tiny(**overrides):
    torch.manual_seed(0)
    cfg = clip.Config(**{**TINY, **overrides})
    return clip.CLIP(cfg), clip.Data(cfg, seed=0, verbose=False)


def test_infonce_by_hand_on_three_pairs():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [1.5, -0.5, 0.2]])
    same = torch.eye(3, dtype=torch.bool)

    def xent(rows):  # -log softmax at the diagonal, averaged over rows
        return sum(-(r[i] - math.log(sum(math.exp(v) for v in r))) for i, r in enumerate(rows)) / 3
    rows = logits.tolist()
    cols = logits.T.tolist()
    expect = (xent(rows) + xent(cols)) / 2
    assert clip.clip_loss(logits, same).item() == pytest.approx(expect, rel=1e-6)


def test_identical_captions_share_the_target():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 1.0], [0.0, 0.0, 3.0]])
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)  # texts 0 and 1 read the same

    def row_loss(r, targets):  # cross-entropy against an even target over `targets`
        lse = math.log(sum(math.exp(v) for v in r))
        return -sum(r[t] - lse for t in targets) / len(targets)
    rows, cols = logits.tolist(), logits.T.tolist()
    targets = [[0, 1], [0, 1], [2]]
    expect = (sum(row_loss(r, t) for r, t in zip(rows, targets)) / 3
              + sum(row_loss(c, t) for c, t in zip(cols, targets)) / 3) / 2
    assert clip.clip_loss(logits, same).item() == pytest.approx(expect, rel=1e-6)


def seen_tokens(model, images):
    """How many tokens the image tower's first block reads."""
    seen = []
    hook = model.encoder.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    model.encode_image(images)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("ratio, kept", [(0.0, 16), (0.5, 8), (0.75, 4)])
def test_flip_drops_exactly_its_share_and_only_in_training(ratio, kept):
    model, _ = tiny(image_mask_ratio=ratio)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert seen_tokens(model.train(), images) == 1 + kept  # cls + kept patches of 16
    assert seen_tokens(model.eval(), images) == 1 + 16


def test_unmasked_tuning_sees_every_patch_from_its_step():
    model, data = tiny(image_mask_ratio=0.75, unmasked_from=2)
    batch = data.batch("train", 0, 4, "cpu")
    model.train()
    assert seen_tokens(model, batch["images"]) == 5
    model(batch)
    model(batch)  # two training steps taken
    assert model.step.item() == 2 and seen_tokens(model, batch["images"]) == 17


def test_text_vector_ignores_padding():
    model, _ = tiny()
    model.eval()
    short, long = "a small red circle", "a large blue square, a small green star and a large red cross"
    alone = model.encode_text(clip.encode_captions(model.tok, [short]))
    padded = model.encode_text(clip.encode_captions(model.tok, [short, long]))[:1]
    assert clip.encode_captions(model.tok, [short, long]).shape[1] > len(model.tok.encode(" " + short)) + 1
    assert torch.allclose(alone, padded, atol=1e-6)


def test_retrieval_by_hand_counts_identical_captions_as_found():
    img = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = ["a", "b", "b"]  # pair i is (img[i], txt[i]); texts 1 and 2 read the same
    # image -> text cosines: [0.8, 0.6, 0.96], [0, 1, 0.8], [1, 0, 0.6]: best "b", "b", "a" (1 of 3 right);
    # text -> image cosines: [0.8, 0, 1], [0.6, 1, 0], [0.96, 0.8, 0.6]: best image 2, 1, 0 (1 of 3 right)
    out = clip.retrieval(img, txt, texts, ks=(1, 2))
    assert out["i2t_r1"] == pytest.approx(1 / 3) and out["t2i_r1"] == pytest.approx(1 / 3)
    assert out["i2t_r2"] == pytest.approx(1.0) and out["t2i_r2"] == pytest.approx(1.0)


def test_per_object_score_is_the_mean_of_caption_and_phrases():
    model, _ = tiny()
    model.eval()
    scene = np.array([[0, 0, 0, 1], [1, 2, 1, 5]])  # a small red circle, a large blue square
    img = torch.nn.functional.normalize(torch.randn(1, 32), dim=-1)
    texts = [caption(scene), "a small red circle", "a large blue square"]
    cos = (img * clip.text_vectors(model, texts, "cpu")).sum(1)  # (3,)
    assert clip.scores(model, img, [scene], "cpu")[0].item() == pytest.approx(cos[0].item(), abs=1e-6)
    got = clip.scores(model, img, [scene], "cpu", per_object=True)[0].item()
    assert got == pytest.approx(cos.mean().item(), abs=1e-6)


@pytest.fixture(scope="module")
def scenes():
    split = ShapesSplit(World(img_size=32), "val", 300, verbose=False)
    return [split.scene(i) for i in range(len(split))]


@pytest.mark.parametrize("kind", NEGATIVES)
def test_each_negative_differs_exactly_as_it_claims(scenes, kind):
    popular = [3, 0, 1, 2, 4, 5]
    made = 0
    for i, objs in enumerate(scenes):
        edited = negative(kind, objs, np.random.default_rng(i), popular)
        if edited is None:
            continue
        made += 1
        true, neg = parse_caption(caption(objs)), parse_caption(caption(edited))
        gained, lost = Counter(neg) - Counter(true), Counter(true) - Counter(neg)
        present = {s for _, _, s in true}
        if kind.startswith("add_"):
            assert not lost and sum(gained.values()) == 1
            (_, _, shape), = gained
            assert shape not in present
            if kind == "add_popular":
                assert shape == next(s for s in popular if s not in present)
            if kind == "add_partner":
                assert any(PARTNER[s] == shape for s in present)
        elif kind == "remove":
            assert not gained and sum(lost.values()) == 1
        elif kind == "swap_colours":  # the same shapes and sizes, the same colours, two of them exchanged
            assert sorted(c for _, c, _ in neg) == sorted(c for _, c, _ in true)
            assert [(z, s) for z, _, s in neg] == [(z, s) for z, _, s in true]
            assert sum(a != b for a, b in zip(neg, true)) == 2
        else:  # swap_positions: the same words, another order
            assert not gained and not lost and neg != true
    assert made >= 100  # most scenes allow each edit


def test_edits_that_cannot_be_made_are_none():
    one = np.array([[0, 0, 0, 4]])
    rng = np.random.default_rng(0)
    assert negative("remove", one, rng, list(range(6))) is None
    assert negative("swap_colours", one, rng, list(range(6))) is None
    full = np.array([[s, 0, 0, s] for s in range(6)])  # every shape present: nothing to add
    assert negative("add_random", full, rng, list(range(6))) is None
    with pytest.raises(ValueError, match="unknown negative"):
        negative("add_nothing", one, rng, [])


def test_a_tiny_model_learns_a_batch():
    model, data = tiny()
    batch = data.batch("train", 0, 16, "cpu")
    start = model(batch)[0].item()
    loss, _ = overfit(model, batch, 150)
    assert start > 2.0 and loss.item() < 0.2 * start
    model.eval()
    with torch.no_grad():
        img, txt = model.encode_image(batch["images"]), model.encode_text(batch["text"])
    texts = [tuple(row) for row in batch["text"].tolist()]  # identical captions, identical ids
    assert clip.retrieval(img, txt, texts, ks=(1,))["i2t_r1"] >= 0.9


def test_train_and_its_tower_starts_a_vlm(tmp_path):
    out = tmp_path / "clip"
    run("train.py", "clip", *as_args(TINY), "--batch_size=8", "--max_iters=4", "--eval_interval=4",
        "--eval_iters=1", "--image_mask_ratio=0.5", f"--out_dir={out}")
    metrics = (out / "metrics.json").read_text()
    for key in ("val_i2t_r1", "ood_t2i_r5", "val_zero_shot_shape", "ood_neg_add_partner",
                "ood_neg_per_object_swap_positions"):
        assert f'"{key}"' in metrics
    import vlm
    from lib.checkpoints import load_encoder
    tower = vlm.ViTEncoder(32, 8, 1, 2, 32)
    load_encoder(tower, out / "ckpt.pt", "--init_vision")
    state = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert torch.equal(tower.patch_embed.weight, state["encoder.patch_embed.weight"])


def test_a_folder_of_captioned_images_trains_clip(tmp_path):
    from tests.test_captioned import metadata_folder
    metadata_folder(tmp_path / "photos", n=20)
    out = tmp_path / "clip"
    args = {k: v for k, v in TINY.items() if k not in ("n_train", "n_eval")}
    run("train.py", "clip", *as_args(args), "--dataset=folder", f"--data_path={tmp_path / 'photos'}",
        "--batch_size=8", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", f"--out_dir={out}")
    metrics = (out / "metrics.json").read_text()
    assert '"val_i2t_r1"' in metrics and "ood" not in metrics and "zero_shot" not in metrics


def test_partial_training_captions_name_a_part_and_held_out_ones_all():
    _, data = tiny(caption_share=0.5)
    rows = np.arange(32)
    rng = np.random.default_rng(0)
    named, total = 0, 0
    for i, text in zip(rows, data.texts("train", rows, rng)):
        truth = [(z, c, s) for s, c, z in data.shapes["train"].scene(i)[:, :3].tolist()]
        said = parse_caption(text)
        assert said and all(o in truth for o in said) and said == [o for o in truth if o in said]
        named, total = named + len(said), total + len(truth)
    assert named < total  # some objects left out
    held_out = data.texts("val", np.arange(16), rng)
    assert held_out == [caption(data.shapes["val"].scene(i)) for i in range(16)]
