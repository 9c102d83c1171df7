import json
import re
import os
import subprocess
import sys

import pytest
import torch

import mae
from lib.checkpoints import load_checkpoint
from lib.common import UserError
from lib.config import parse_overrides
from tests.conftest import MAE_ARGS, ROOT, evaluate_again, run
from train import TrainConfig, build_configs



def test_overrides_are_typed():
    o = parse_overrides(["--lr=1", "--compile=TRUE", "--max_iters=7", "--masking=grid", "--norm_pix_loss=0"],
                        TrainConfig, mae.Config)
    assert o == {"lr": 1.0, "compile": True, "max_iters": 7, "masking": "grid", "norm_pix_loss": False}
    assert type(o["lr"]) is float
    assert parse_overrides(["--compile"], TrainConfig) == {"compile": True}
    for bad, msg in (["--max_iters=1.5", "expected int"], ["--compile=maybe", "expected bool"],
                     ["--lr=fast", "expected float"], ["--max_iters", "--key=value"]):
        with pytest.raises(UserError, match=msg):
            parse_overrides([bad], TrainConfig)
    with pytest.raises(UserError, match="did you mean --max_iters"):
        parse_overrides(["--max_iter=5"], TrainConfig)


def test_config_file_is_parsed_not_executed(tmp_path):
    f = tmp_path / "c.conf"
    f.write_text("# a comment\nlr = 3e-4   # inline\nout_dir = 'runs/x'\n\ncompile = false\n")
    overrides = parse_overrides([str(f), "--lr=1e-3"], TrainConfig)
    assert overrides == {"lr": 1e-3, "out_dir": "runs/x", "compile": False}
    f.write_text("import os\n")
    with pytest.raises(UserError, match="key = value"):
        parse_overrides([str(f)], TrainConfig)
    tc, mc = build_configs(mae, {"n_layer": 2})
    assert tc.batch_size == mae.train_defaults["batch_size"] and mc.n_layer == 2


@pytest.mark.parametrize("idea, tiny", [
    ("mae", ["--n_train=16", "--n_val=8", "--n_layer=2"]),
    ("mlm", ["--corpus=pydoc", "--tokenizer=char", "--n_layer=2", "--block_size=16"]),
    ("vlm", ["--n_train=16", "--n_eval=4", "--vision_n_layer=1", "--n_layer=1", "--init_vision=none"]),
])
def test_gpu_config_runs_two_tiny_iterations_on_cpu(tmp_path, idea, tiny):
    import mlm
    import vlm
    module = {"mae": mae, "mlm": mlm, "vlm": vlm}[idea]
    overrides = parse_overrides([str(ROOT / f"config/{idea}_gpu.conf")], TrainConfig, module.Config)
    tc, mc = build_configs(module, overrides)
    assert tc.compile and tc.batch_size >= 256 and mc.n_embd >= 384
    run("train.py", idea, f"config/{idea}_gpu.conf", "--device=cpu", "--compile=false", "--max_iters=2",
        "--batch_size=2", "--eval_iters=1", *tiny, f"--out_dir={tmp_path}")
    assert load_checkpoint(tmp_path / "ckpt.pt", idea)["config"]["model"]["n_embd"] == mc.n_embd


def test_train_end_to_end_then_sample(tmp_path):
    p = run("train.py", "mae", *MAE_ARGS, "--max_iters=6", "--eval_interval=3", "--log_interval=2",
            f"--out_dir={tmp_path}")
    assert "iter 6/6" in p.stdout and "images/s" in p.stdout and "MFU" in p.stdout and "ETA" in p.stdout
    for f in ("ckpt.pt", "ckpt_best.pt", "loss.png", "metrics.json"):
        assert (tmp_path / f).exists(), f
    ckpt = load_checkpoint(tmp_path / "ckpt.pt", "mae")
    assert ckpt["iter"] == 6 and ckpt["config"]["train"]["max_iters"] == 6
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    probes = {f"probe_{w}_{k}" for w in ("shape", "colour", "size", "position", "count")
              for k in ("mae", "random_init", "pixels")} | {"best_constant_loss"}
    assert probes <= set(metrics)
    p = run("sample.py", "mae", f"--out_dir={tmp_path}", "--n=3")
    assert p.stdout.count("masked-patch loss") == 4 and (tmp_path / "sample_mae.png").exists()


def test_resume_gives_identical_losses(tmp_path):
    common = [*MAE_ARGS, "--log_interval=1", "--eval_interval=3", "--lr_decay_iters=8"]
    run("train.py", "mae", *common, "--max_iters=8", f"--out_dir={tmp_path / 'once'}")
    run("train.py", "mae", *common, "--max_iters=4", f"--out_dir={tmp_path / 'twice'}")
    run("train.py", "mae", "--init_from=resume", "--max_iters=8", f"--out_dir={tmp_path / 'twice'}")
    once = load_checkpoint(tmp_path / "once/ckpt.pt", "mae")
    twice = load_checkpoint(tmp_path / "twice/ckpt.pt", "mae")
    assert [i for i, _ in twice["history"]["train"]] == list(range(1, 9))
    assert once["history"]["train"] == twice["history"]["train"]  # bit for bit
    for k, v in once["model"].items():
        assert torch.equal(v, twice["model"][k]), k


def test_ddp_two_cpu_processes(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", "mae", *MAE_ARGS, "--max_iters=4", "--eval_interval=2",
                        "--log_interval=2",
                        "--device=cpu", f"--out_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "world size 2" in p.stdout and p.stdout.count("iter 4/4") == 1  # logging on rank 0 only
    ckpt = load_checkpoint(tmp_path / "ckpt.pt", "mae")
    assert len(ckpt["rng"]["torch"]) == 2 and ckpt["data_position"] == 8


@pytest.mark.parametrize("args, message", [
    (["mae", "--img_size=60"], "not divisible by patch_size"),
    (["mae", "--mask_ration=0.5"], "did you mean --mask_ratio"),
    (["mae", "--init_from=resume", "--out_dir=/nonexistent/run"], "no checkpoint"),
    (["mea"], "did you mean mae"),
    (["mae", "missing.conf"], "config file not found"),
    (["mae", "--dataset=folder", "--data_path=/nonexistent"], "image folder not found"),
])
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    out = [] if any(a.startswith("--out_dir") for a in args) else [f"--out_dir={tmp_path / 'out'}"]
    p = run("train.py", *args, *out, check=False)
    assert p.returncode != 0 and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    p = run("train.py", "mae", *MAE_ARGS, "--lr=1e30", "--warmup_iters=0", "--max_iters=50",
            f"--out_dir={tmp_path}",
            check=False)
    assert p.returncode != 0 and "loss is nan" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    ckpt = load_checkpoint(tmp_path / "ckpt.pt", "mae")
    assert ckpt["iter"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_wrong_kind_or_corrupt_checkpoint_and_corrupt_image(tmp_path):
    torch.save({"idea": "mlm", "model": {}}, tmp_path / "ckpt.pt")
    p = run("train.py", "mae", "--init_from=resume", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "'mlm' checkpoint, not 'mae'" in p.stderr
    (tmp_path / "ckpt_best.pt").write_bytes(b"garbage")
    p = run("sample.py", "mae", f"--out_dir={tmp_path}", check=False)
    assert p.returncode != 0 and "cannot read checkpoint" in p.stderr and len(p.stderr.splitlines()) == 1
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    from data.images import load_image
    with pytest.raises(UserError, match="bad.png"):
        load_image(tmp_path / "bad.png", 32)


def test_every_script_has_help():
    for script in ("train.py", "sample.py", "bench.py"):
        p = run(script, "--help")
        assert "usage" in p.stdout and "--" in p.stdout
    assert "--mask_ratio" in run("train.py", "mae", "--help").stdout


def test_train_mlm_then_sample(tmp_path):
    p = run("train.py", "mlm", "--corpus=pydoc", "--tokenizer=char", "--n_layer=1", "--n_embd=32",
            "--n_head=2",
            "--block_size=32", "--batch_size=8", "--max_iters=4", "--eval_iters=2", "--log_interval=2",
            f"--out_dir={tmp_path}")
    assert "tokens/s" in p.stdout and "acc" in p.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    again = evaluate_again(tmp_path, "mlm")
    assert {k: metrics[k] for k in again} == pytest.approx(again) and metrics["val_masked_ce"] > 0
    p = run("sample.py", "mlm", f"--out_dir={tmp_path}", "--prompt=The [MASK]ssert statement")
    assert p.stdout.startswith("[MASK] #1:") and "most likely" in p.stdout
    p = run("sample.py", "mlm", f"--out_dir={tmp_path}", "--generate", "--steps=4")
    assert "step  4:" in p.stdout and "░" not in p.stdout.splitlines()[-1] and "░" in p.stdout
    p = run("sample.py", "mae", f"--out_dir={tmp_path}", check=False)  # wrong kind of checkpoint
    assert p.returncode != 0 and "'mlm' checkpoint, not 'mae'" in p.stderr


def test_a_figure_is_saved_whole_and_quietly(tmp_path):
    import warnings
    from lib.common import pyplot, savefig
    fig, ax = pyplot().subplots()
    ax.set_title("an untrained model says \u0768\u2e80 ")  # glyphs the default font lacks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        savefig(fig, tmp_path / "a.png")
    assert [str(w.message) for w in caught] == []
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG" and os.listdir(tmp_path) == ["a.png"]


def test_mfu_is_a_fraction_of_the_fastest_rate_seen(tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setattr(train, "peak_flops", lambda device_type: 1.0)  # a peak far below training's rate
    train.main(["mae", *MAE_ARGS, "--max_iters=4", "--log_interval=1", "--eval_iters=1",
                f"--out_dir={tmp_path}"])
    shares = [float(x) for x in re.findall(r"MFU ([\d.]+)%", capsys.readouterr().out)]
    assert len(shares) == 4 and max(shares) == 100.0  # raised to training's own rate, never above
