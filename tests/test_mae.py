import math

import pytest
import torch

import mae
from lib.common import UserError
from mae import MAE, Config, get_2d_sincos_pos_embed, patchify, random_masking, unpatchify
from tests.conftest import MAE_TINY



def test_patchify_golden_index_and_round_trip():
    imgs = torch.randn(2, 3, 16, 24)[..., :16]  # (N, C, H, W) = (2, 3, 16, 16)
    p, W = 4, 16
    x = patchify(imgs, p)
    assert x.shape == (2, 16, 48)
    for n, c, h, w, i, j in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 2, 3), (0, 1, 2, 3, 3, 0), (1, 0, 1, 2, 1, 1)]:
        assert x[n, h * W // p + w, (i * p + j) * 3 + c] == imgs[n, c, h * p + i, w * p + j]
    assert torch.equal(unpatchify(x, p), imgs)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3, 0.9])
def test_random_masking_keeps_count_and_restores_order(ratio):
    N, L, D = 4, 49, 3
    x = torch.arange(N * L * D, dtype=torch.float).view(N, L, D)
    x_masked, mask, ids_restore = random_masking(x, ratio)
    keep = int(L * (1 - ratio))
    assert x_masked.shape == (N, keep, D)
    assert torch.all(mask.sum(1) == L - keep)
    for n in range(N):  # the kept rows are exactly those with mask 0, in shuffled order
        kept = set(x_masked[n, :, 0].long().tolist())
        assert kept == set(x[n, mask[n] == 0, 0].long().tolist())
    # ids_restore inverts the shuffle: unshuffling [kept, removed-placeholders] puts kept rows home
    full = torch.cat([x_masked, torch.full((N, L - keep, D), -1.0)], dim=1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.all(restored[mask == 1] == -1)


@pytest.mark.parametrize("noise_fn", ["block", "grid"])
def test_other_maskings_keep_exact_count(noise_fn):
    N, grid = 5, 8
    noise = mae.block_noise(N, grid, 0.75, "cpu") if noise_fn == "block" else mae.grid_noise(N, grid, "cpu")
    x = torch.randn(N, grid * grid, 4)
    x_masked, mask, _ = random_masking(x, 0.75, noise)
    assert x_masked.shape == (N, 16, 4) and torch.all(mask.sum(1) == 48)
    if noise_fn == "grid":  # exactly one kept patch in each 2x2 cell
        kept = (1 - mask).view(N, 4, 2, 4, 2).sum(dim=(2, 4))
        assert torch.all(kept == 1)


def test_norm_pix_loss_by_hand():
    model = MAE(Config(**MAE_TINY))
    imgs = torch.randn(1, 3, 32, 32)
    pred = torch.zeros(1, 16, 192)
    mask = torch.zeros(1, 16)
    mask[0, [2, 5]] = 1
    t = patchify(imgs, 8)[0]
    expect = []
    for k in (2, 5):  # zeros against (t - mean)/sqrt(unbiased var + 1e-6), averaged over the patch
        v = t[k].tolist()
        mean = sum(v) / len(v)
        var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
        expect.append(sum(((a - mean) / math.sqrt(var + 1e-6)) ** 2 for a in v) / len(v))
    loss = model.forward_loss(imgs, pred, mask)
    assert loss.item() == pytest.approx(sum(expect) / 2, rel=1e-5)
    model.cfg.norm_pix_loss = False  # plain MSE on masked patches
    expected = (t[[2, 5]] ** 2).mean().item()
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(expected, rel=1e-5)


def test_sincos_golden_values():
    emb = get_2d_sincos_pos_embed(8, 2, cls_token=True)  # omega = [1, 1/100]
    assert emb.shape == (5, 8)
    assert torch.all(emb[0] == 0)
    # patch 1 is row 0, column 1: first half encodes the column, second half the row
    expect = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1]
    assert emb[2].tolist() == pytest.approx(expect, abs=1e-6)
    expect = [0, 0, 1, 1, math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]  # row 1, column 0
    assert emb[3].tolist() == pytest.approx(expect, abs=1e-6)


def test_encoder_without_masking_returns_every_patch_in_order():
    model = MAE(Config(**MAE_TINY)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = model.encoder(imgs, 0.0)
    assert latent.shape == (2, 17, 32) and mask.sum() == 0
    # order: swapping two images' patch 3 changes only token 3's input; outputs stay per-image
    with torch.no_grad():
        a = model.encoder(imgs[:1])[0]
        assert torch.allclose(a, latent[:1], atol=1e-5)


def test_init_follows_the_paper():
    model = MAE(Config(**MAE_TINY))
    w = model.encoder.patch_embed.weight
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # xavier_uniform
    assert torch.all(model.decoder_pred.bias == 0)
    assert 0.005 < model.mask_token.std() < 0.05


def test_tiny_mae_overfits_one_batch():
    torch.manual_seed(0)
    model = MAE(Config(**{**MAE_TINY, "n_embd": 64, "decoder_n_embd": 64}))
    imgs = torch.rand(4, 3, 32, 32) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(200):
        torch.manual_seed(0)  # the same mask every step: memorisable
        loss, _ = model(imgs)
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_config_errors():
    with pytest.raises(UserError, match="not divisible"):
        Config(img_size=60, patch_size=8)
    with pytest.raises(UserError, match="masking"):
        Config(masking="checkers")


def test_attention_weights_are_the_ones_forward_uses():
    torch.manual_seed(0)
    attn = mae.Attention(16, 2)
    x = torch.randn(3, 5, 16)
    mask = torch.rand(3, 1, 5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)  # every query sees at least itself
    w = attn.weights(x, mask)  # (B, h, T, T)
    v = attn.qkv(x).view(3, 5, 3, 2, 8)[:, :, 2].transpose(1, 2)  # (B, h, T, hd)
    expect = attn.proj((w @ v).transpose(1, 2).reshape(3, 5, 16))
    assert torch.allclose(attn(x, attn_mask=mask), expect, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(3, 2, 5)) and (w[~mask.expand_as(w)] == 0).all()
