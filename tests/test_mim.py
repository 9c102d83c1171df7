"""mim.py: each target's loss against a hand computation, each mask hides exactly its ratio and picks
what it claims, the defaults are the MAE bit for bit, and a tiny model learns with every target."""
import math

import pytest
import torch

import mim
from lib.common import UserError
from mae import MAE, Config as MAEConfig, patchify, random_masking
from tests.conftest import MAE_ARGS, MAE_TINY, run

TINY = dict(MAE_TINY, n_train=64, n_val=16)


def test_defaults_are_the_mae_bit_for_bit():
    torch.manual_seed(0)
    reference = MAE(MAEConfig(**TINY))
    torch.manual_seed(0)
    model = mim.MIM(mim.Config(**TINY))
    pairs = zip(reference.state_dict().values(), model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    imgs = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    expected = reference(imgs)[0]
    torch.manual_seed(1)
    assert torch.equal(model(imgs)[0], expected)


def test_pixels_target_is_plain_mse_by_hand():
    model = mim.MIM(mim.Config(**TINY, target="pixels"))
    imgs = torch.randn(1, 3, 32, 32)
    pred = torch.zeros(1, 16, 192)
    per_patch = model.patch_loss(imgs, pred)  # (1, 16)
    t = patchify(imgs, 8)[0]
    assert per_patch[0, 5].item() == pytest.approx(sum(v * v for v in t[5].tolist()) / 192, rel=1e-5)


def test_tokens_target_is_cross_entropy_over_nearest_codes():
    model = mim.MIM(mim.Config(**TINY, target="tokens", codebook_size=3, init_codebook=""))
    model.codebook.copy_(torch.stack([torch.full((192,), v) for v in (-1.0, 0.0, 1.0)]))
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[:, :, :8, :8] = 0.9  # patch 0: nearest code 2
    imgs[:, :, :8, 8:16] = -0.7  # patch 1: nearest code 0; the rest: code 1
    assert mim.nearest_code(patchify(imgs, 8), model.codebook)[0, :3].tolist() == [2, 0, 1]
    logits = torch.zeros(1, 16, 3)
    logits[0, 0] = torch.tensor([0.0, 1.0, 2.0])
    per_patch = model.patch_loss(imgs, logits)
    expect = -math.log(math.exp(2) / (1 + math.e + math.exp(2)))  # code 2's share of softmax(0, 1, 2)
    assert per_patch[0, 0].item() == pytest.approx(expect, rel=1e-5)
    assert per_patch[0, 1].item() == pytest.approx(math.log(3), rel=1e-5)  # uniform logits


def test_features_target_is_smooth_l1_on_layer_normed_teacher_features():
    torch.manual_seed(0)
    model = mim.MIM(mim.Config(**TINY, target="features"))
    with torch.no_grad():  # a trained teacher's last norm has a scale and shift: the target removes them
        model.teacher.norm.weight.uniform_(0.5, 2.0)
        model.teacher.norm.bias.uniform_(-1.0, 1.0)
    imgs = torch.randn(2, 3, 32, 32)
    z = model.teacher(imgs)[0][:, 1:]  # (2, 16, 32)
    pred = torch.randn(2, 16, 32) * 2
    k = 7
    v = z[1, k].tolist()
    mean = sum(v) / len(v)
    std = math.sqrt(sum((a - mean) ** 2 for a in v) / len(v) + 1e-5)  # biased variance, LayerNorm's eps
    d = [p - (a - mean) / std for p, a in zip(pred[1, k].tolist(), v)]
    expect = sum(0.5 * e * e if abs(e) < 1 else abs(e) - 0.5 for e in d) / len(d)
    assert model.patch_loss(imgs, pred)[1, k].item() == pytest.approx(expect, rel=1e-4)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_kmeans_finds_three_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    blobs = [c + 0.1 * torch.randn(200, 2, generator=g) for c in centres]
    x = torch.cat(blobs + [centres[:1].repeat(600, 1)])  # and many copies of one point, as backgrounds are
    codes = mim.kmeans(x, 3)
    found = sorted(codes.tolist())
    assert all(math.dist(a, b) < 0.1 for a, b in zip(found, sorted(centres.tolist()))), found


def test_rank_loss_by_hand():
    predicted = torch.tensor([[0.0, 1.0, 3.0, 9.0]])
    loss = torch.tensor([[0.5, 0.2, 0.9, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the fourth patch is visible: no pair of it counts
    total, pairs = 0.0, 0
    for i in range(3):
        for j in range(3):
            s = 1 / (1 + math.exp(-(predicted[0, i] - predicted[0, j]).item()))
            y = float(loss[0, i] > loss[0, j])
            total += -(y * math.log(s) + (1 - y) * math.log(1 - s))
            pairs += 1
    assert mim.rank_loss(predicted, loss, mask).item() == pytest.approx(total / pairs, rel=1e-5)


def hidden(noise, ratio=0.75):
    x = torch.zeros(noise.shape[0], noise.shape[1], 1)
    return random_masking(x, ratio, noise)[1]  # (N, L), 1 = hidden


def test_colour_noise_hides_the_ratio_is_band_pass_and_a_function_of_its_seed():
    torch.manual_seed(3)
    a = mim.colour_noise(5, 8, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, mim.colour_noise(5, 8, "cpu"))
    assert not torch.equal(a, mim.colour_noise(5, 8, "cpu"))
    assert torch.all(hidden(a).sum(1) == 48)
    spectrum = torch.fft.fft2(a.view(5, 8, 8)).abs()
    f = torch.fft.fftfreq(8) * 8
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    outside = (radius < 1.5) | (radius > 3.0)
    assert spectrum[:, outside].max() < 1e-4 and spectrum[:, ~outside].max() > 0.1


def test_hard_noise_hides_the_hardest_share_and_the_rest_at_random():
    torch.manual_seed(0)
    predicted = torch.randn(6, 16)
    noise = mim.hard_noise(predicted, 0.75, 0.5)  # 12 hidden, 6 of them the hardest
    mask = hidden(noise)
    assert torch.all(mask.sum(1) == 12)
    hardest = predicted.topk(6, dim=1).indices
    assert torch.all(mask.gather(1, hardest) == 1)
    assert torch.equal(hidden(mim.hard_noise(predicted, 0.75, 0.0)).sum(1), mask.sum(1))


def test_hard_masking_share_rises_with_steps():
    torch.manual_seed(0)
    model = mim.MIM(mim.Config(**TINY, masking="hard", hard_ramp=4, hard_share=1.0))
    imgs = torch.rand(2, 3, 32, 32) * 2 - 1
    for step in range(5):
        assert model.step.item() == step
        model(imgs)
    model.eval()
    model(imgs)
    assert model.step.item() == 5  # evaluation does not count


def test_attention_masking_hides_what_the_teacher_attends_to_most():
    torch.manual_seed(0)
    model = mim.MIM(mim.Config(**TINY, masking="attention"))
    imgs = torch.rand(3, 3, 32, 32) * 2 - 1
    seen = {}
    last = model.teacher.blocks[-1]
    handle = last.norm1.register_forward_hook(lambda m, i, o: seen.update(x=o))
    model.teacher(imgs)  # the encoder's own forward, every patch seen
    handle.remove()
    everything = torch.ones(1, 1, 17, 17, dtype=torch.bool)
    expect = last.attn.weights(seen["x"], everything)[:, :, 0, 1:].mean(1)  # (3, 16)
    scores = mim.attention_scores(model.teacher, imgs)
    assert torch.allclose(scores, expect, atol=1e-6)
    mask = hidden(model.mask_scores(imgs))
    assert torch.all(mask.sum(1) == 12)
    assert torch.all(mask.gather(1, scores.topk(12, dim=1).indices) == 1)


@pytest.mark.parametrize("target,masking", [("pixels", "colour"), ("tokens", "random"),
                                            ("features", "attention"), ("norm_pix", "hard")])
def test_tiny_model_learns_with_each_target(target, masking):
    torch.manual_seed(0)
    model = mim.MIM(mim.Config(**{**TINY, "n_embd": 64, "decoder_n_embd": 64}, target=target, masking=masking,
                               codebook_size=16, hard_share=0.0))  # hard: the loss head, the same mask
    imgs = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(150):
        torch.manual_seed(0)  # the same mask every step: memorisable
        loss, metrics = model(imgs)
        reconstruction = loss.item() - metrics.get("rank_loss", 0.0)  # hard: the loss head's own loss apart
        if step == 0:
            first = reconstruction
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert reconstruction < 0.5 * first, (first, reconstruction)


def test_config_errors():
    with pytest.raises(UserError, match="choose pixels, norm_pix, tokens or features"):
        mim.Config(target="edges")
    with pytest.raises(UserError, match="does nothing"):
        mim.Config(target="pixels", init_teacher="out-mae/ckpt.pt")
    with pytest.raises(UserError, match="--target=pixels"):
        mim.Config(norm_pix_loss=False)
    assert not mim.Config(target="pixels").norm_pix_loss


def test_train_a_stage_then_bootstrap_the_next(tmp_path):
    """train.py mim end to end: a student of a random teacher, then the next stage taught by it (dBOT),
    its teacher carried in the checkpoint; then what sample.py draws of them."""
    args = [*MAE_ARGS, "--max_iters=4", "--eval_interval=2", "--target=features"]
    run("train.py", "mim", *args, f"--out_dir={tmp_path / 'stage1'}")
    p = run("train.py", "mim", *args, f"--init_teacher={tmp_path / 'stage1/ckpt.pt'}",
            f"--out_dir={tmp_path / 'stage2'}")
    assert "probe_shape_mim" in p.stdout
    from lib.checkpoints import load_checkpoint
    first = load_checkpoint(tmp_path / "stage1/ckpt.pt", "mim")["model"]
    second = load_checkpoint(tmp_path / "stage2/ckpt.pt", "mim")["model"]
    assert all(torch.equal(first[f"encoder.{k}"], second[f"teacher.{k}"]) for k in ("patch_embed.weight",
                                                                                 "blocks.0.attn.qkv.weight"))
    import sample
    sample.main(["mim", f"--out_dir={tmp_path / 'stage2'}", "--n=2"])
    sample.main(["masks", str(tmp_path / "stage1"), str(tmp_path / "stage2"), str(tmp_path / "m.png")])
    assert (tmp_path / "stage2/sample_mim.png").exists() and (tmp_path / "m.png").exists()


def test_probe_labels_by_hand():
    """What the five probes ask, for two scenes written out: one small red circle in the centre; a
    large blue star top left, a small red circle bottom right and a large red square top right."""
    import numpy as np
    from data.shapes import ShapesSplit, World
    from mae import probe_labels
    split = object.__new__(ShapesSplit)
    split.world, split.n = World(), 2
    split.objects = np.full((2, 4, 4), -1, np.int16)
    split.objects[0, 0] = (0, 0, 0, 4)
    split.objects[1, :3] = [(4, 2, 1, 0), (0, 0, 0, 8), (1, 0, 1, 2)]
    labels = probe_labels(split)
    assert labels["shape"].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 0]]
    assert labels["colour"][:, :3].tolist() == [[1, 0, 0], [1, 0, 1]] and labels["colour"][:, 3:].sum() == 0
    assert labels["size"].tolist() == [[1, 0], [1, 1]]
    assert labels["position"].tolist() == [[0, 0, 0, 0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0, 1]]
    assert labels["count"].tolist() == [[0, 0, 0], [1, 1, 0]]  # at least 2, 3, 4 objects
