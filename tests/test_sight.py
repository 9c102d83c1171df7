"""A VLM that sees: the default path that trains (or finds) its MAE first, the joint objective, the
encoder-free setting, and the length grouping that spares the fused stack its padding."""
import json

import pytest
import torch

import mae
import vlm
from lib.checkpoints import load_checkpoint
from tests.conftest import VLM_ARGS, VLM_TINY, as_args, evaluate_again, overfit, run

AUTO = [a for a in VLM_ARGS if not a.startswith("--init_vision")]  # the default: --init_vision=auto
SHORT = ["--batch_size=4", "--max_iters=2", "--eval_iters=1"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = vlm.Config(**VLM_TINY)
    data = vlm.Data(cfg, seed=0, verbose=False)
    return cfg, data


def test_the_default_trains_its_mae_first_then_finds_it(tmp_path):
    p = run("train.py", "vlm", *AUTO, *SHORT, f"--out_dir={tmp_path / 'vlm'}", "--mae_max_iters=3")
    first = [line for line in p.stdout.splitlines() if line.startswith("first, ")]
    assert len(first) == 1 and f"--out_dir={tmp_path / 'out-mae'}" in first[0], p.stdout[:2000]
    mae_ckpt = load_checkpoint(tmp_path / "out-mae/ckpt.pt", "mae")
    assert mae_ckpt["iter"] == 3 and mae_ckpt["config"]["model"]["n_embd"] == VLM_TINY["vision_n_embd"]
    ckpt = load_checkpoint(tmp_path / "vlm/ckpt.pt", "vlm")
    assert ckpt["config"]["model"]["init_vision"] == str(tmp_path / "out-mae/ckpt.pt")
    assert [m["iter"] for m in ckpt["history"]["monitor"]] == [0, 2]  # sight, logged at each evaluation
    metrics = json.loads((tmp_path / "vlm/metrics.json").read_text())
    again = evaluate_again(tmp_path / "vlm")  # the saved model's figures, recomputed here
    assert {k: metrics[k] for k in again} == pytest.approx(again)
    p = run("train.py", "vlm", *AUTO, *SHORT, f"--out_dir={tmp_path / 'again'}", "--mae_max_iters=3")
    assert "first, " not in p.stdout  # found, not trained again
    p = run("train.py", "vlm", *AUTO, *SHORT, "--vision_n_embd=64", "--vision_n_head=2", "--mae_max_iters=3",
            f"--out_dir={tmp_path / 'wider'}")
    assert f"--out_dir={tmp_path / 'out-mae-32-8-1-2-64-4.0'}" in p.stdout  # out-mae holds other shapes


def test_the_default_recipe_is_encoder_free_with_four_texts_and_trains_no_mae(tmp_path):
    sizes = {k: v for k, v in VLM_TINY.items() if not k.startswith("vision_") and k != "init_vision"}
    p = run("train.py", "vlm", *as_args(sizes), *SHORT, f"--out_dir={tmp_path / 'vlm'}")
    assert "first, " not in p.stdout and not (tmp_path / "out-mae").exists()  # no tower, no MAE
    model = load_checkpoint(tmp_path / "vlm/ckpt.pt", "vlm")["config"]["model"]
    assert (model["vision_n_layer"], model["texts_per_image"], model["init_vision"]) == (0, 4, "none")
    cfg = vlm.Config(**sizes)
    b = vlm.Data(cfg, seed=0, verbose=False).batch("train", 0, 4, "cpu")
    assert len(b["images"]) == 4 and len(b["prompt"]) == 16  # each image: its caption and 3 questions
    assert torch.bincount(b["image_index"]).tolist() == [4, 4, 4, 4]


def test_joint_objective_is_the_vlm_loss_plus_the_mae_loss(tiny):
    cfg, data = tiny
    torch.manual_seed(0)
    model = vlm.VLM(vlm.Config(**{**VLM_TINY, "mae_weight": 0.5, "loss_mean": "token"}), data.tok)
    b = data.batch("train", 0, 4, "cpu")
    torch.manual_seed(1)
    joint, _ = model(b)
    logits, labels, _ = vlm.answer_targets(model, b["images"], b["prompt"], b["answer"], b["image_index"])
    vlm_loss = torch.nn.functional.cross_entropy(logits[0], labels[0])
    reference = mae.MAE(vlm.mae_config(model.cfg))  # MAE's own loss, computed by its own code
    reference.load_state_dict({**reference.state_dict(), **{f"encoder.{k}": v for k, v in
                                                            model.vision.state_dict().items()},
                               **model.mae.state_dict()})
    torch.manual_seed(1)  # the same random masking
    mae_loss = reference(b["images"])[0]
    assert torch.allclose(joint, vlm_loss + 0.5 * mae_loss, atol=1e-5)
    assert "mae.encoder.cls_token" not in model.state_dict()  # the tower is not kept twice


def test_encoder_free_reads_embedded_patches_and_overfits(tiny):
    _, data = tiny
    torch.manual_seed(0)
    cfg = vlm.Config(**{**VLM_TINY, "vision_n_layer": 0, "n_layer": 3, "init_vision": "auto"})
    resolved, first = vlm.requires(cfg, "out-vlm")
    assert first == [] and resolved.init_vision == "none"  # no tower: no MAE first
    assert cfg.init_vision == "auto"  # the given config is left as it was
    model = vlm.VLM(cfg, data.tok)
    assert len(model.vision.blocks) == 0
    b = data.batch("train", 0, 8, "cpu")
    assert model.image_tokens(b["images"]).shape == (len(b["images"]), data.image_len(), cfg.n_embd)
    loss, metrics = overfit(model, b, 150)
    assert loss.item() < 0.1 and metrics["acc"] > 0.98


def test_length_groups_pad_least_and_keep_every_row(tiny):
    _, data = tiny
    b = data.batch("train", 3, 8, "cpu")
    pad = data.tok.pad_id
    groups = vlm.length_groups(b["prompt"], b["answer"], pad)
    rows = torch.cat([g[0] for g in groups]).sort().values
    assert torch.equal(rows, torch.arange(len(b["prompt"])))
    P, A = (b["prompt"] != pad).sum(1), (b["answer"] != pad).sum(1)
    for g, p, a in groups:
        assert p == P[g].max() and a == A[g].max()
    padded = sum(len(g) * (p + a) for g, p, a in groups)
    assert padded < len(P) * (b["prompt"].shape[1] + b["answer"].shape[1])  # captions and questions apart
    order = (P + A).argsort(stable=True)  # no other cut of the sorted rows pads less
    for cut in range(1, len(order)):
        lo, hi = order[:cut], order[cut:]
        other = len(lo) * (P[lo].max() + A[lo].max()) + len(hi) * (P[hi].max() + A[hi].max())
        assert padded <= other
