"""gen.py: the tokenizer's round trip, MAGE's mask ratios, MaskGIT's schedule and its most-confident
rule against hand computations, the world's reader exact on rendered scenes, the judge's figures by
hand, and a tiny model that learns a batch."""
import copy
import math

import numpy as np
import pytest
import torch

import gen
from data import to_tensor
from data.shapes import ShapesSplit, World, caption, read_scene, render
from mae import features
from mlm import most_confident, unmask
from tests.conftest import as_args, overfit, run

TINY = dict(img_size=32, patch_size=8, codebook_size=16, n_layer=1, n_head=2, n_embd=32, n_train=64,
            n_eval=16)


def tiny(**overrides):
    torch.manual_seed(0)
    cfg = gen.Config(**{**TINY, **overrides})
    return gen.GEN(cfg), gen.Data(cfg, seed=0, verbose=False)


def test_tokenizer_round_trip_puts_each_code_back():
    model, _ = tiny(init_codebook="")
    codes = torch.rand(16, 192) * 2 - 1
    model.codebook.copy_(codes)
    ids = torch.randint(0, 16, (2, 16)) + model.text_vocab  # two 32 px images, 16 patches each
    images = model.pixels(ids)  # (2, 32, 32, 3) uint8
    back = model.codes(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1))
    assert torch.equal(back, ids)  # each patch nearest its own code: codes differ far more than rounding


def test_mage_ratios_lie_in_their_range_and_centre_where_they_should():
    r = gen.mage_ratio(20000, 0.5, torch.Generator().manual_seed(0))
    assert r.min() >= 0.5 and r.max() <= 1.0 and len(r) == 20000
    # a N(0.55, 0.25) truncated to [0.5, 1]: mean 0.55 + 0.25 * (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    a, b = (0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25
    phi = [math.exp(-x * x / 2) / math.sqrt(2 * math.pi) for x in (a, b)]
    Phi = [0.5 * (1 + math.erf(x / math.sqrt(2))) for x in (a, b)]
    assert r.mean().item() == pytest.approx(0.55 + 0.25 * (phi[0] - phi[1]) / (Phi[1] - Phi[0]), abs=0.005)


def test_training_hides_a_mage_share_and_scores_only_hidden_codes(monkeypatch):
    model, data = tiny(p_uncond=0.0)
    batch = data.batch("train", 0, 4, "cpu")
    monkeypatch.setattr(gen, "mage_ratio", lambda n, lo: torch.tensor([0.5, 0.75, 1.0, 0.6]))
    seen = {}

    def masked_loss(logits, labels):
        seen["labels"] = labels
        return None, logits.sum() * 0, torch.tensor(0.0)
    monkeypatch.setattr(gen, "masked_loss", masked_loss)
    model(batch)
    scored = (seen["labels"] != -100).sum(1).tolist()
    assert scored == [8, 12, 16, 10]  # ceil(ratio * 16) of the 16 codes; the caption never
    assert (seen["labels"][:, :gen.MAX_CAPTION] == -100).all()


class Stub:
    """A model for mlm.unmask whose logits are fixed: position t prefers code 3 with confidence conf[t]."""
    mask_id = 0

    def __init__(self, conf):
        self.conf = torch.tensor(conf)

    def logits(self, ids):
        out = torch.full((*ids.shape, 5), -30.0)
        out[..., 3] = self.conf * 10
        out[..., 4] = 0.0
        return out


def test_maskgit_keeps_the_schedule():
    ids = torch.zeros(1, 8, dtype=torch.long)  # every position hidden
    states = []
    unmask(Stub([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6]), ids, steps=4,
           callback=lambda k, x: states.append(x.clone()))
    hidden = [int((s == 0).sum()) for s in states]
    assert hidden == [math.floor(8 * math.cos(math.pi / 2 * k / 4)) for k in range(1, 5)]  # 7, 5, 3, 0
    assert all(((a != 0) <= (b != 0)).all() for a, b in zip(states, states[1:]))  # revealed stays revealed


def test_one_step_reveals_exactly_the_most_confident():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6]])
    masked = torch.tensor([[True, True, True, True, True, False, True, True]])  # position 5 is given
    reveal = most_confident(conf, masked, torch.tensor([[4]]))  # of 7 hidden, keep the 4 least confident
    assert reveal[0].nonzero().flatten().tolist() == [1, 3, 7]  # 0.9, 0.7, 0.6; never the given one


def test_the_worlds_reader_reads_rendered_scenes_exactly():
    for noise in (0.0, 0.1):
        world = World(img_size=64, noise=noise)
        split = ShapesSplit(world, "val", 100, verbose=False)
        read = [read_scene(world, split.images[i])[0] for i in range(100)]
        assert all(np.array_equal(r, split.scene(i)) for i, r in enumerate(read)), noise


def test_judge_figures_by_hand():
    world = World(img_size=64)
    asked = np.array([[0, 0, 1, 0]])  # a large red circle, top left
    drawn_right = render(world, asked)
    # drawn: the circle and, unasked, its partner (a square) and a star: extra objects
    drawn_extra = render(world, np.array([[0, 0, 1, 0], [1, 2, 0, 4], [4, 3, 1, 8]]))
    drawn_instead = render(world, np.array([[1, 0, 1, 0]]))  # a square where the circle should be
    out = gen.judge(world, [drawn_right, drawn_extra, drawn_instead], [asked, asked, asked])
    assert out["recall"] == pytest.approx(2 / 3) and out["precision"] == pytest.approx(2 / 5)
    assert out["exact"] == pytest.approx(1 / 3)
    assert out["partner"] == pytest.approx(2 / 3)  # the square: drawn unasked in two of three scenes
    assert out["partner_added"] == pytest.approx(1 / 3)  # ... once beside the circle, once instead of it
    assert out["other"] == pytest.approx(1 / 12)  # of 4 other absent shapes per scene, the star once
    assert out["other_added"] == pytest.approx(1 / 12)
    assert out["distance"] == pytest.approx(0.0)


def test_a_tiny_model_learns_a_batch_and_draws_only_codes():
    model, data = tiny(p_uncond=0.0, mask_min=1.0)
    batch = data.batch("train", 0, 8, "cpu")
    torch.manual_seed(0)
    start = model(batch)[0].item()
    loss, _ = overfit(model, batch, 200)
    assert loss.item() < 0.3 * start
    for method in ("maskgit", "mdlm"):
        drawn = gen.draw(model, [caption(data.shapes["train"].scene(0)), ""], steps=4, method=method)
        assert drawn.shape == (2, 32, 32, 3) and drawn.dtype == np.uint8


def test_mage_encoder_pools_the_image_codes_and_its_control_keeps_the_codebook():
    model, data = tiny()
    images = data.shapes["val"].images[:4]
    encoder = gen.Encoder(model)
    states = encoder(to_tensor(images, "cpu"))[0]
    assert states.shape == (4, 16, 32)  # the 16 image positions only: no caption slot, no cls token
    assert torch.allclose(features(encoder, images, "cpu"), states.mean(1), atol=1e-6)  # all 16 pooled
    hidden_once = encoder(to_tensor(images[:1], "cpu"))[0]
    assert torch.allclose(hidden_once, states[:1], atol=1e-5)  # nothing hidden at random: it reads the same
    control = copy.deepcopy(encoder)
    control.reinit()
    assert torch.equal(control.model.codebook, model.codebook)  # the tokenizer is not what is controlled
    assert not torch.equal(control.model.wte.weight, model.wte.weight)
    assert not torch.equal(control.model.head.weight, model.head.weight)


def test_train_gen_end_to_end(tmp_path):
    out = tmp_path / "gen"
    run("train.py", "gen", *as_args(TINY), "--batch_size=8", "--max_iters=4", "--eval_interval=4",
        "--eval_iters=1", f"--out_dir={out}")
    metrics = (out / "metrics.json").read_text()
    for key in ("round_trip_exact", "val_f1", "ood_partner", "ood_other", "uncond_distance",
                "probe_shape_gen", "probe_shape_random_init"):
        assert f'"{key}"' in metrics
