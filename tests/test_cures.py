import math

import numpy as np
import pytest
import torch

import cures
import vlm
from tests.conftest import VLM_TINY


def test_dpo_loss_by_hand():
    z = torch.zeros(3)
    assert cures.dpo_loss(z, z, z, z).item() == pytest.approx(cures.LOG2)  # pi = ref: log 2
    pi_w, pi_l, ref_w, ref_l = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    margin = (-1 + 2) - (-3 + 2)  # 2
    assert cures.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-0.5 * margin))))
    assert cures.dpo_loss(pi_l, pi_w, ref_w, ref_l).item() > cures.LOG2  # preferring the loser costs


def test_answer_logprob_sums_the_answer_tokens():
    torch.manual_seed(0)
    cfg = vlm.Config(**VLM_TINY)
    data = vlm.Data(cfg, seed=0, verbose=False)
    model = vlm.VLM(cfg, data.tok).eval()
    pairs = [("is there a star?", "yes"), ("describe the image.", "a red circle")]
    b = data.make_batch("val", np.arange(2), pairs, "cpu")
    images = vlm.row_images(b)
    with torch.no_grad():
        got = cures.answer_logprob(model, images, b["prompt"], b["answer"])
        logits = model.answer_logits(images, b["prompt"], b["answer"]).log_softmax(-1)
    for row in range(2):
        ids = [t for t in b["answer"][row].tolist() if t != data.tok.pad_id]
        by_hand = sum(logits[row, j, t].item() for j, t in enumerate(ids))
        assert got[row].item() == pytest.approx(by_hand, rel=1e-5)


def test_steering_keeps_norms_and_follows_the_direction():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(5, 8, generator=g), torch.randn(8, generator=g)
    assert torch.equal(cures.steer(x, d, 0.0), x)
    y = cures.steer(x, d, 0.5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert ((y @ d) > (x @ d)).all() and ((cures.steer(x, -d, 0.5) @ d) < (x @ d)).all()
    diffs = d + 0.1 * torch.randn(200, 8, generator=g)
    mean = cures.principal_direction(diffs)
    assert torch.nn.functional.cosine_similarity(mean, d, dim=0) > 0.99
    flipped = cures.principal_direction(torch.cat([diffs, -diffs[:50]]), pca=True)
    assert torch.dot(flipped, diffs.mean(0)) > 0  # the component's sign agrees with the mean
    randoms = cures.random_like([d, 2 * d], g)
    assert [r.norm().item() for r in randoms] == pytest.approx([d.norm().item(), 2 * d.norm().item()])
    assert torch.nn.functional.cosine_similarity(randoms[0], d, dim=0).abs() < 0.9
