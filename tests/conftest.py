"""What the tests share: the tiny configs every test trains or builds, and the subprocess helper."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's modules, whatever folder pytest is started from
# Ctrl-C as in a terminal, even when the suite runs in the background (`cmd &` starts with SIGINT ignored,
# and its children inherit that): the interrupt tests send SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)


def as_args(config):
    """{'n_layer': 1} -> ['--n_layer=1']"""
    return [f"--{k}={v}" for k, v in config.items()]


# the smallest models that still do what the full ones do: one or two layers of width 32 on 32 px
MAE_TINY = dict(img_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32,
                decoder_n_layer=1, decoder_n_head=2, decoder_n_embd=32)
MAE_ARGS = as_args(MAE_TINY) + ["--n_train=256", "--n_val=64", "--batch_size=8", "--eval_iters=2",
                                "--warmup_iters=2"]
MLM_ARGS = ["--corpus=pydoc", "--tokenizer=char", "--n_layer=1", "--n_embd=32", "--n_head=2",
            "--block_size=16"]
VLM_TINY = dict(img_size=32, patch_size=8, merge=2, n_train=64, n_eval=16, vision_n_layer=1, vision_n_head=2,
                vision_n_embd=32, n_layer=2, n_head=2, n_embd=32, init_vision="none")  # no MAE first
VLM_ARGS = as_args(VLM_TINY)
FOLDER_TINY = {k: v for k, v in VLM_TINY.items() if k not in ("n_train", "n_eval")}  # a folder has its own


def overfit(model, batch, steps, lr=3e-3):
    """AdamW on one batch for `steps` steps -> the last (loss, metrics)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss, metrics = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss, metrics


def run(*args, check=True, env=None, timeout=300):
    """Run a script of the repo in a fresh process, one thread; -> CompletedProcess with text output."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and p.returncode:
        raise AssertionError(f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def tiny_vlm(**overrides):
    """A tiny untrained VLM (seeded) of VLM_TINY's shapes and its data -> (model in eval mode, data)."""
    import vlm
    torch.manual_seed(0)
    cfg = vlm.Config(**{**VLM_TINY, **overrides})
    data = vlm.Data(cfg, seed=0, verbose=False)
    return vlm.VLM(cfg, data.tok).eval(), data


def evaluate_again(out_dir, idea="vlm"):
    """What the idea's evaluate() says of the checkpoint in out_dir, recomputed here on one thread as
    train.py's subprocess ran -> the figures metrics.json must hold."""
    from lib.checkpoints import load_model
    module, model, cfg, ckpt = load_model(idea, Path(out_dir) / "ckpt.pt")
    data = module.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False)
    if hasattr(data, "read_with"):
        data.read_with(ckpt)  # the words the model was trained with
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return module.evaluate(model, data, "cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vlm_ckpt(tmp_path_factory):
    """A tiny VLM trained for two iterations by train.py, shared by the tests that only read one."""
    out = tmp_path_factory.mktemp("tiny-vlm")
    run("train.py", "vlm", *VLM_ARGS, "--batch_size=4", "--max_iters=2", "--eval_iters=1", f"--out_dir={out}")
    return out / "ckpt.pt"
