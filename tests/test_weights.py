"""Trained weights a class can start from (weights/NAME.pt): half precision, no optimizer, their words
kept, read by name, and each one still giving the figure it was shipped with."""
import pytest
import torch

from lib import checkpoints
from lib.checkpoints import WEIGHTS, check_weights, export_weights, load_checkpoint, load_model
from tests.conftest import run


def test_exported_weights_are_small_half_and_give_their_figure_again(tmp_path, tiny_vlm_ckpt, monkeypatch):
    dst = tmp_path / "tiny.pt"
    figures = export_weights("vlm", tiny_vlm_ckpt, dst)
    saved = torch.load(dst, weights_only=True)
    assert saved["weights_only"] and "optimizer" not in saved and saved["tokenizer"] is not None
    assert {v.dtype for v in saved["model"].values() if v.is_floating_point()} == {torch.float16}
    assert dst.stat().st_size < 0.6 * tiny_vlm_ckpt.stat().st_size
    assert set(figures) == {"ood_exist"} and check_weights("vlm", saved) == figures
    full = load_model("vlm", tiny_vlm_ckpt)[1].state_dict()
    half = load_model("vlm", dst)[1].state_dict()  # read back into float32, within half's rounding
    assert all(torch.allclose(full[k].float(), half[k], rtol=1e-3, atol=1e-4) for k in full)
    monkeypatch.setattr(checkpoints, "WEIGHTS", tmp_path)  # by name, where no file has that name
    assert load_checkpoint("tiny", "vlm")["weights_only"] and checkpoints.weights_path("tiny") == dst
    with pytest.raises(checkpoints.UserError, match="no checkpoint at nothing"):
        load_checkpoint("nothing", "vlm")


def test_the_exporter_and_sample_by_path(tmp_path, tiny_vlm_ckpt):
    dst = tmp_path / "w.pt"
    p = run("-m", "lib.checkpoints", "vlm", str(tiny_vlm_ckpt), str(dst))
    assert "wrote" in p.stdout and "ood_exist" in p.stdout and dst.is_file()
    bad = run("-m", "lib.checkpoints", "vlm", str(tiny_vlm_ckpt), str(tmp_path / "nowhere/w.pt"), check=False)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    p = run("sample.py", "vlm", f"--out_dir={tmp_path / 'pictures'}", f"--ckpt={dst}", "--n=2")
    assert (tmp_path / "pictures/sample_vlm.png").is_file()


@pytest.mark.parametrize("path", sorted(WEIGHTS.glob("*.pt")), ids=lambda p: p.stem)
def test_shipped_weights_give_their_figure(path):
    saved = load_checkpoint(path, torch.load(path, weights_only=True)["idea"])
    again = check_weights(saved["idea"], saved)
    for k, v in saved["check"].items():  # greedy answers on 200 scenes: another machine's arithmetic
        assert abs(again[k] - v) <= 1 / 200 + 1e-9, (k, v, again[k])  # may flip one near-tie
