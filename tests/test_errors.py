"""Bad input and faults: one line on stderr, a known exit status, and nothing the user had is lost."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import struct
import time
import types
import zlib
from functools import partial
from pathlib import Path

import pytest
import torch

import bench
import data.images
import hallucination
import mae
import sample
import study.negatives
import train
from lib import config
from lib.checkpoints import load_checkpoint, lock_out_dir, save_atomic
from lib.config import parse_overrides
from tests.conftest import FOLDER_TINY, MAE_ARGS, MLM_ARGS, ROOT, VLM_ARGS, as_args, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained MAE run: the out_dir that no bad input may touch."""
    out = tmp_path_factory.mktemp("trained")
    run("train.py", "mae", *MAE_ARGS, "--max_iters=2", "--eval_interval=2", f"--out_dir={out}")
    return out


@pytest.fixture(scope="module")
def trained_vlm(tiny_vlm_ckpt):
    """A tiny trained VLM run (16 val scenes): its folder."""
    return tiny_vlm_ckpt.parent


def snapshot(path):
    """Everything at `path`, by content: None if absent, bytes' digest for a file, a dict for a folder."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha1(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*"))}


def make_out_dir(kind, trained, trained_vlm, tmp_path):
    out = tmp_path / "out"
    if kind == "trained":
        shutil.copytree(trained, out)
    elif kind in ("vlm", "vlm_readonly"):
        shutil.copytree(trained_vlm, out)
    elif kind == "readonly":
        out.mkdir()
    elif kind == "dangling":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "loop":
        out.symlink_to(out)
    elif kind == "file":
        out.write_text("I am a file")
    elif kind == "under_file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "out"
    elif kind in ("partial", "garbage"):
        out.mkdir()
        if kind == "partial":
            torch.save({"idea": "mae", "model": {}}, out / "ckpt.pt")
        else:
            (out / "ckpt.pt").write_bytes(b"not a checkpoint")
        shutil.copy(out / "ckpt.pt", out / "ckpt_best.pt")
    return out


def files(tmp_path):
    """Inputs the rows refer to as {name}."""
    (tmp_path / "latin1.conf").write_bytes("lr = 1e-3 # caf\xe9\n".encode("latin-1"))
    (tmp_path / "quote.conf").write_text("out_dir = 'runs/#1\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "notar.tar.gz").write_bytes(b"just text")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    bad_lines = {"cap": None, "cap_json": "{x", "cap_missing": '{"file_name": "nope.png", "caption": "x"}',
                 "cap_objects": '{"file_name": "2.png", "objects": "dog"}', "cap_broken": None}
    folders = {name: captioned(tmp_path / name, 12, third) for name, third in bad_lines.items()}
    folders.update(cap_notext=captioned(tmp_path / "cap_notext", 12, text=False),
                   cap_few=captioned(tmp_path / "cap_few", 9))
    (tmp_path / "cap_broken" / "5.png").write_bytes(b"\x89PNG broken")
    pope = {"question_id": 1, "image": "elsewhere.jpg", "text": "is there a dog?", "label": "no"}
    (tmp_path / "pope.jsonl").write_text(json.dumps(pope) + "\n")
    named = (("latin1", "latin1.conf"), ("quote", "quote.conf"), ("binary", "binary.txt"),
             ("notar", "notar.tar.gz"), ("imgs", "imgs"), ("garbage", "notar.tar.gz"), ("bomb", "bomb.png"),
             ("pope", "pope.jsonl"))
    return {**folders, **{k: str(tmp_path / v) for k, v in named}}


def captioned(folder, n, third=None, text=True):
    """A folder of n tiny images with metadata.jsonl (its third line replaced by `third`) -> its path."""
    from PIL import Image
    folder.mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", **({"caption": "a red square"} if text else {}),
                                 "objects": ["square"]}))
    lines[2] = third or lines[2]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def png_header(width, height):
    """A PNG that claims width x height pixels (a decompression bomb, as far as its header goes)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


SCRIPTS = {"train": train.main, "sample": sample.main, "bench": bench.main,
           "hallucination": hallucination.main, "images": data.images.main, "negatives": study.negatives.main}
TAKES_OUT_DIR = ("train", "sample", "hallucination")
T = ["mae", *MAE_ARGS]  # a valid tiny MAE run, which each row breaks in one way
M = ["mlm", *MLM_ARGS, "--batch_size=4", "--eval_iters=1"]
V = ["vlm", *VLM_ARGS, "--batch_size=4", "--eval_iters=1"]
VF = ["vlm", *as_args(FOLDER_TINY), "--batch_size=4", "--eval_iters=1"]  # the same, on a folder
# a tiny CLIP run
C = ["clip", "--img_size=32", "--n_layer=1", "--n_embd=32", "--n_head=2", "--text_n_layer=1",
     "--text_n_embd=32", "--text_n_head=2", "--n_train=64", "--n_eval=16", "--batch_size=4", "--eval_iters=1"]
G = ["gen", "--img_size=32", "--n_layer=1", "--n_embd=32", "--n_head=2", "--codebook_size=16", "--n_train=64",
     "--n_eval=16", "--batch_size=4", "--eval_iters=1"]  # a tiny generator run
CKPTS = ["--ckpt={vlm}/ckpt.pt", "--control_ckpt={vlm}/ckpt.pt", "--n_scenes=8"]  # the study, a tiny VLM

BAD = [  # (script, out_dir kind, arguments, words the message must hold)
    ("train", "trained", [*T, "--lr=-1"], "lr=-1.0 must be positive"),
    ("train", "trained", [*T, "--lr=nan"], "finite number"),
    ("train", "trained", [*T, "--lr=inf"], "finite number"),
    ("train", "trained", [*T, "--lr=0"], "lr=0.0 must be positive"),
    ("train", "trained", [*T, "--lr=1e-4", "--min_lr=1e-3"], "above lr"),
    ("train", "trained", [*T, "--min_lr=-1"], "min_lr=-1.0 must be at least 0"),
    ("train", "trained", [*T, "--patch_size=0"], "patch_size=0 must be at least 1"),
    ("train", "trained", [*T, "--n_head=0"], "n_head=0 must be at least 1"),
    ("train", "trained", [*T, "--n_train=0"], "n_train=0 must be at least 1"),
    ("train", "trained", [*T, "--img_size=0"], "img_size=0 must be at least 1"),
    ("train", "trained", [*T, "--img_size=60"], "not divisible by patch_size"),
    ("train", "trained", [*T, "--n_embd=30", "--n_head=4"], "divisible by n_head"),
    ("train", "trained", [*T, "--mask_ratio=1.5"], "mask_ratio=1.5"),
    ("train", "trained", [*T, "--mask_ratio=0.99"], "no visible patch"),
    ("train", "trained", [*T, "--masking=diagonal"], "choose random, block or grid"),
    ("train", "empty", ["mim", *MAE_ARGS, "--target=features", "--init_teacher=nowhere.pt"],
     "no checkpoint at"),
    ("train", "empty", ["mim", *MAE_ARGS, "--init_teacher={vlm}/ckpt.pt", "--masking=attention"],
     "'vlm' checkpoint, not 'mae'"),
    ("train", "empty", ["mim", *MAE_ARGS, "--target=edges"], "choose pixels, norm_pix, tokens or features"),
    ("train", "empty", [*C, "--image_mask_ratio=1"], "image_mask_ratio=1.0 must be in [0, 1)"),
    ("train", "empty", [*C, "--unmasked_from=100"], "needs --image_mask_ratio > 0"),
    ("train", "empty", [*C, "--dataset=folder"], "needs --data_path=DIR"),
    ("train", "empty", [*C, "--dataset=folder", "--data_path=x", "--cooccur=0"], "the shapes world's"),
    ("negatives", "empty", ["{vlm}/ckpt.pt"], "'vlm' checkpoint, not 'clip'"),
    ("train", "empty", [*G, "--mask_min=0"], "mask_min=0.0 must be in (0, 1]"),
    ("train", "empty", [*G, "--p_uncond=1.5"], "p_uncond=1.5 must be in [0, 1]"),
    ("train", "empty", [*G, "--codebook_size=1"], "codebook_size=1 must be at least 2"),
    ("negatives", "empty", ["nowhere.pt", "--split=test"], "choose val or ood"),
    ("train", "trained", [*T, "--max_iters=0"], "max_iters=0 must be at least 1"),
    ("train", "trained", [*T, "--batch_size=-2"], "batch_size=-2 must be at least 1"),
    ("train", "trained", [*T, "--warmup_iters=-1"], "warmup_iters=-1"),
    ("train", "trained", [*T, "--weight_decay=-0.1"], "weight_decay"),
    ("train", "trained", [*T, "--max_iters=1.5"], "expected int"),
    ("train", "trained", [*T, "--compile=maybe"], "expected bool"),
    ("train", "trained", [*T, "--init_from=resumee"], "choose scratch or resume"),
    ("train", "trained", [*T, "--dtype=float8"], "choose auto, float32"),
    ("train", "trained", [*T, "--mask_ration=0.5"], "did you mean --mask_ratio"),
    ("train", "trained", ["mea"], "did you mean mae"),
    ("train", "trained", [*T, "missing.conf"], "config file not found"),
    ("train", "trained", [*T, "{latin1}"], "not a UTF-8 text file"),
    ("train", "trained", [*T, "{quote}"], "unbalanced quotes"),
    ("train", "trained", [*T, "--device=cuda"], "no CUDA GPU"),
    ("train", "trained", [*T, "--device=mps"], "MPS"),
    ("train", "trained", [*T, "--device=tpu"], "choose auto, cpu"),
    ("train", "trained", T, "already holds ckpt.pt and ckpt_best.pt"),
    ("train", "trained", ["mae", "--init_from=resume", "--n_embd=64", "--n_head=2"],
     "n_embd=64 (checkpoint: 32)"),
    ("train", "trained", ["mlm", "--init_from=resume"], "'mae' checkpoint, not 'mlm'"),
    ("train", "empty", ["mae", "--init_from=resume"], "no checkpoint"),
    ("train", "partial", ["mae", "--init_from=resume"], "lacks optimizer"),
    ("train", "garbage", ["mae", "--init_from=resume"], "cannot read checkpoint"),
    ("train", "file", T, "is a file, not a folder"),
    ("train", "under_file", T, "not writable"),
    ("train", "empty", [*T, "--dataset=folder"], "needs --data_path"),
    ("train", "empty", [*T, "--dataset=folder", "--data_path=/nonexistent"], "image folder not found"),
    ("train", "empty", [*T, "--dataset=folder", "--data_path={imgs}"], "cannot read image"),
    ("train", "empty", [*T, "--dataset=cifar10", "--data_path={notar}"], "not a readable cifar-10"),
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_json}"], "jsonl, line 3: not JSON"),
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_missing}"], "nope.png does not exist"),
    ("train", "empty", [*VF, "--init_vision=auto", "--dataset=folder", "--data_path={cap_missing}"],
     "nope.png does not exist"),  # found before the MAE that would train on the folder's images first
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_objects}"], "a list of non-empty strings"),
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_notext}"], "no caption and no question"),
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_few}"], "at least 10 are needed"),
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_few}", "--noise=0.2"],
     "--noise is the shapes world's"),
    ("train", "empty", [*VF, "--cooccur=0.9", "--dataset=folder", "--data_path={cap_few}"],
     "--cooccur is the shapes world's"),
    ("train", "empty", [*VF, "--dataset=folder", "--data_path={cap_broken}"], "cannot read image"),
    ("hallucination", "empty", ["--data_path={cap}", "--pope_file={pope}"], "elsewhere.jpg is not among"),
    ("hallucination", "empty", ["--pope_file={pope}"], "give --data_path=DIR too"),
    ("train", "empty", [*M, "--block_size=0"], "block_size=0 must be at least 2"),
    ("train", "empty", [*M, "--corpus={binary}"], "not UTF-8"),
    ("train", "empty", [*M, "--objective=gpt"], "choose bert or diffusion"),
    ("train", "empty", [*M, "--mask_prob=0"], "mask_prob=0.0"),
    ("train", "empty", [*M, "--tokenizer=bpe", "--vocab_size=10"], "vocab_size=10"),
    ("sample", "trained", ["mae", "--n=0"], "n=0 must be at least 1"),
    ("sample", "trained", ["mae", "--n=-2"], "n=-2 must be at least 1"),
    ("sample", "trained", ["mae", "--mask_ratio=1.5"], "mask_ratio=1.5"),
    ("sample", "trained", ["mlm", "--steps=0"], "steps=0 must be at least 1"),
    ("sample", "trained", ["mlm", "--top_k=-3"], "top_k=-3"),
    ("sample", "trained", ["mlm", "--temperature=-1"], "temperature=-1.0"),
    ("sample", "trained", ["mlm", "--method=beam"], "method='beam'"),
    ("sample", "trained", ["mae", "--device=cuda"], "no CUDA GPU"),
    ("sample", "trained", ["mae", "--image={notar}"], "cannot read image"),
    ("sample", "partial", ["mae"], "lacks optimizer"),
    ("sample", "empty", ["mae"], "no checkpoint"),
    ("bench", "empty", ["mae", "--steps=0"], "steps=0 must be at least 1"),
    ("bench", "empty", ["mae", "--device=mps"], "MPS"),
    ("bench", "empty", ["nope"], "no benchmark for 'nope'"),
    # found while building data and model, before the start-up banner: the error is all there is
    ("train", "empty", [*V, "--init_vision={garbage}"], "cannot read checkpoint"),
    ("train", "empty", [*V, "--vision_n_embd=64", "--init_vision={mae}"],
     "encoder.cls_token is (1, 1, 32) there"),
    ("train", "empty", [*V, "--init_vision={vlm}/ckpt.pt"], "'vlm' checkpoint, not 'mae'"),
    ("train", "empty", [*T, "--dataset=cifar10", "--data_path={imgs}"], "is a folder"),
    ("train", "dangling", T, "symbolic link to nothing"),
    ("train", "loop", T, "symbolic link to nothing"),
    ("train", "readonly", T, "not writable"),
    ("sample", "vlm", ["vlm", "--n=100"], "--n=100: the val split has 16 scenes"),
    ("sample", "vlm_readonly", ["vlm", "--n=2"], "not writable"),
    ("sample", "trained", ["mae", "--image={bomb}"], "cannot read image"),
    ("hallucination", "dangling", CKPTS, "symbolic link to nothing"),
    ("hallucination", "file", CKPTS, "is a file, not a folder"),
    ("hallucination", "readonly", CKPTS, "not writable"),
    ("hallucination", "empty", [*CKPTS, "--caption_tokens=200"], "caption_tokens=200"),
    ("hallucination", "empty", [*CKPTS, "--n_scenes=100"],
     "n_scenes=100: the biased model's val split has 16"),
    ("bench", "empty", ["sight", "{vlm}", "{vlm}"], "give it a .png name"),
    ("bench", "empty", ["sight", "{vlm}", "curves.txt"], "give it a .png name"),
    ("bench", "empty", ["sight", "{vlm}", "/nonexistent/curves.png"], "there is no folder /nonexistent"),
    ("bench", "empty", ["sight", "{vlm}"], "give the run folders and then"),
    ("bench", "empty", ["sight", "/nonexistent", "curves.png"], "no checkpoint"),
    ("images", "empty", ["{imgs}"], "is a folder"),
]


def row_id(script, args):
    return f"{script}:{' '.join(args[len(T):] if args[:len(T)] == T else args)}"


@pytest.mark.parametrize("script, kind, args, words", BAD, ids=[row_id(s, a) for s, _, a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, monkeypatch, trained, trained_vlm,
                                                          script, kind, args, words):
    out = make_out_dir(kind, trained, trained_vlm, tmp_path)
    named = {**files(tmp_path), "mae": str(trained / "ckpt.pt"), "vlm": str(trained_vlm)}
    args = [a.format(**named) for a in args] + ([f"--out_dir={out}"] if script in TAKES_OUT_DIR else [])
    before = snapshot(out)
    if kind.endswith("readonly"):  # as root, a folder's mode does not stop writing: ask access() instead
        monkeypatch.setattr(os, "access", partial(access_denied_in, out, os.access))
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as e:
        config.cli(SCRIPTS[script])
    printed = capsys.readouterr()
    err = printed.err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    assert printed.out == "", printed.out  # not even the banner: every check comes before it
    assert snapshot(out) == before


def access_denied_in(folder, access, path, mode):
    """os.access, except that nothing may be written in `folder`."""
    if Path(path) == folder and mode & os.W_OK:
        return False
    return access(path, mode)


def tiny_module(on_train_batch):
    """mae's face, with a Data that calls on_train_batch(n) at the n-th gradient-enabled train batch."""
    class Data(mae.Data):
        calls = 0

        def batch(self, split, pos, batch_size, device):
            if split == "train" and torch.is_grad_enabled():
                Data.calls += 1
                on_train_batch(Data.calls)
            return super().batch(split, pos, batch_size, device)
    return types.SimpleNamespace(Config=mae.Config, train_defaults=mae.train_defaults, Model=mae.Model,
                                 Data=Data, evaluate=mae.evaluate)


def test_interrupting_a_diverging_run_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # the 1st grad-enabled batch is for FLOP counting; the 2nd is the first step, at lr 1e30
    module = tiny_module(lambda n: n == 2 and os.kill(os.getpid(), signal.SIGINT))
    args = [*MAE_ARGS, "--lr=1e30", "--min_lr=0", "--warmup_iters=0", "--max_iters=50",
            f"--out_dir={tmp_path}"]
    tc, mc = train.build_configs(module, parse_overrides(args, train.TrainConfig, mae.Config))
    with pytest.raises(SystemExit) as e:
        train.train("mae", tc, mc, module)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "diverged" in err and "last good checkpoint" in err
    ckpt = load_checkpoint(tmp_path / "ckpt.pt", "mae")
    assert ckpt["iter"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not list(tmp_path.glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_saves_exits_143_and_resume_continues(tmp_path):
    common = [*MAE_ARGS, "--log_interval=1", "--lr_decay_iters=1000"]  # one schedule, however long the run
    p = subprocess.Popen([sys.executable, "train.py", "mae", *common, "--max_iters=100000",
                          f"--out_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("iter 3/"):
            p.send_signal(signal.SIGTERM)
            break
    p.stdout.read()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 143, err
    assert "interrupted at iteration" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.tmp"))
    it = load_checkpoint(tmp_path / "ckpt.pt", "mae")["iter"]
    assert it >= 3
    p = run("train.py", "mae", "--init_from=resume", f"--max_iters={it + 2}", f"--out_dir={tmp_path}")
    assert f"resumed from {tmp_path / 'ckpt.pt'} at iteration {it}" in p.stdout
    resumed = load_checkpoint(tmp_path / "ckpt.pt", "mae")
    run("train.py", "mae", *common, f"--max_iters={it + 2}", f"--out_dir={tmp_path / 'straight'}")
    straight = load_checkpoint(tmp_path / "straight/ckpt.pt", "mae")
    assert resumed["iter"] == it + 2 and [i for i, _ in resumed["history"]["train"]] == list(range(1, it + 3))
    assert resumed["history"]["train"] == straight["history"]["train"]  # the losses, bit for bit
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_a_save_that_fails_midway_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"iter": 1, "w": torch.ones(3)}, path)

    def half_then_disk_full(obj, f):  # writes the start of a file where it is told to, then fails
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        save_atomic({"iter": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["iter"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # and no temporary file left beside it


def test_ctrl_c_during_startup_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train.py", "mae", "--n_train=40000", "--img_size=32",
                          f"--out_dir={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    for line in p.stdout:
        if line.startswith("rendering shapes/train"):  # rendering 40,000 scenes: stop it halfway
            time.sleep(0.5)
            p.send_signal(signal.SIGINT)
            break
    p.stdout.read()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 130 and err.strip() == "interrupted", err
    assert not out.exists()


def test_a_second_run_into_a_busy_out_dir_is_refused(tmp_path):
    lock = lock_out_dir(tmp_path, fresh=True)  # as a running train.py holds it
    try:
        p = run("train.py", "mae", *MAE_ARGS, "--max_iters=2", f"--out_dir={tmp_path}", check=False)
        assert p.returncode == 2 and "another run is training" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    finally:
        os.close(lock)
    run("train.py", "mae", *MAE_ARGS, "--max_iters=2", f"--out_dir={tmp_path}")  # free again: it runs
    assert (tmp_path / "ckpt.pt").exists() and not list(tmp_path.glob("*.tmp"))


def test_more_bad_input_is_one_line(tmp_path, tiny_vlm_ckpt):
    """Each surface checks its flags against the whole job before it starts: a flag that does nothing,
    heads or scenes that do not exist, an MAE deeper than the tower."""
    deep = tmp_path / "deep"
    run("train.py", "mae", *MAE_ARGS, "--n_layer=2", "--max_iters=1", "--eval_iters=1", f"--out_dir={deep}")
    cures = ["-m", "study.cures", f"--ckpt={tiny_vlm_ckpt}", f"--control_ckpt={tiny_vlm_ckpt}",
             f"--halved_ckpt={tiny_vlm_ckpt}", "--n_scenes=6"]
    rows = [(["train.py", "vlm", *VLM_ARGS, "--data_path=somewhere"], "does nothing in the shapes world"),
            (["train.py", "mae", *MAE_ARGS, "--data_path=somewhere"], "does nothing in the shapes world"),
            (["train.py", "vlm", *VLM_ARGS, "--mae_weight=0.5", "--vision_n_layer=0"],
             "vision_n_layer=0 has none"),
            (["train.py", "vlm", *VLM_ARGS, f"--init_vision={deep / 'ckpt.pt'}"],
             "encoder.blocks.1.attn.proj.bias is (32,) there, nothing here"),
            ([*cures, "--k_heads=99"], "k_heads=99: the study model has 4 heads"),
            ([*cures, "--n_calib=999"], "n_calib=999: the study model has 64 training scenes")]
    for args, words in rows:
        out = tmp_path / "out"
        p = run(*args, f"--out_dir={out}", check=False)
        one_line = len(p.stderr.strip().splitlines()) == 1
        assert p.returncode == 2 and words in p.stderr and one_line, (args, p.stderr)
        assert p.stdout == "" and not out.exists(), args
