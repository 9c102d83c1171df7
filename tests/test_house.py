"""The house rules, checked: the schedule's shape, portability, line length, what scripts and
checkpoints promise at the edges (usage, fallbacks, leftovers, resume without the MAE)."""
import ast
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from lib import common
from lib.checkpoints import load_checkpoint
from lib.common import UserError
from tests.conftest import MAE_ARGS, ROOT, VLM_ARGS, run
from train import TrainConfig, get_lr

SOURCES = sorted(p for p in ROOT.rglob("*.py") if "cache" not in p.parts and not p.name.startswith("."))


def test_lr_schedule_warms_up_then_follows_the_cosine_to_its_floor():
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [get_lr(i, tc) for i in range(130)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)  # linear warmup
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1e-3)  # the peak, where the cosine starts
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway down: the mean of lr and min_lr
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110:] == [1e-4] * 20  # the floor, from max_iters on
    tc = TrainConfig(lr=1e-3, min_lr=0, warmup_iters=0, max_iters=100, lr_decay_iters=50)
    assert get_lr(25, tc) == pytest.approx(0.5e-3) and get_lr(50, tc) == 0 and get_lr(99, tc) == 0


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {}  # every module of the project (tests aside), by its import name
for folder in (".", "data", "study", "lib"):
    MODULES.update({module_name(p): p for p in (ROOT / folder).glob("*.py")})


def imports_of(path):
    """The project's modules a file imports, at its top or inside a function (a lazy import is an
    import all the same): `from data import text` names the package and its module data.text."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in MODULES}
    return out - {module_name(path)}


def test_the_import_graph_has_no_cycle_and_measures_import_no_idea():
    graph = {name: imports_of(path) for name, path in MODULES.items()}
    state = {}  # name -> "open" while its imports are walked, "done" after

    def walk(name, trail):
        if state.get(name) == "open":
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if state.get(name) != "done":
            state[name] = "open"
            for imported in sorted(graph[name]):
                walk(imported, trail + [name])
            state[name] = "done"
    for name in sorted(graph):
        walk(name, [])
    assert "study.measures" not in graph["vlm"]  # the model never imports what measures it
    assert graph["study.measures"] <= {"lib", "lib.common", "data", "data.shapes"}  # they only count


def test_no_comprehension_a_student_must_unfold():
    """A comprehension has one `for` and holds no other comprehension: two loops are written as two."""
    comprehensions = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    dense = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, comprehensions):
                inner = [n for n in ast.walk(node) if n is not node and isinstance(n, comprehensions)]
                if len(node.generators) > 1 or inner:
                    dense.append(f"{path.name}:{node.lineno}")
    assert not dense, dense


def test_every_module_imports_without_resource_and_fcntl():
    modules = sorted(MODULES)
    code = ("import sys; sys.modules['resource'] = None; sys.modules['fcntl'] = None\n"  # as on Windows
            f"import importlib; [importlib.import_module(m) for m in {modules}]\n"
            "from lib import common\n"
            "assert common.peak_memory_mib() is None and common.fmt_mib(None) == 'n/a'\n"
            "import tempfile; from lib import checkpoints\n"
            "assert checkpoints.lock_out_dir(tempfile.mkdtemp(), fresh=True) is None\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_peak_memory_reads_kib_on_linux_and_bytes_on_macos(monkeypatch):
    usage = types.SimpleNamespace(ru_maxrss=3 * 2 ** 20)
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage={0: usage}.get)
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(sys, "platform", "linux")
    assert common.peak_memory_mib() == 3 * 1024  # KiB
    monkeypatch.setattr(sys, "platform", "darwin")
    assert common.peak_memory_mib() == 3  # bytes


def test_lines_fit_110_characters_and_no_lambda_is_bound_to_a_name():
    long, bound = [], []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        long += [f"{path.name}:{n}" for n, line in enumerate(text.splitlines(), 1) if len(line) > 110]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Lambda):
                bound.append(f"{path.name}:{node.lineno}")
    assert len(SOURCES) > 20 and not long and not bound, (long, bound)


def test_files_and_functions_read_in_one_sitting():
    """A file reads in one sitting (about 300-450 lines, 500 at most), a function about 60 (the loop 100).
    The rule serves reading: never move code to another file only to stay under it."""
    too_long = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 500:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = 100 if (path.name, node.name) == ("train.py", "train") else 60
                if node.end_lineno - node.lineno + 1 > limit:
                    too_long.append(f"{path.name}:{node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_help_explains_every_key():
    """Each key of every configuration has its one-line meaning beside it in the source, which --help
    prints: `python train.py vlm --help` names and explains each of its keys."""
    import dataclasses
    import bench
    from study import causes
    from study import cures
    import hallucination
    import mae
    import mlm
    import sample
    import train
    import vlm
    from lib.config import field_help
    from data.export import ExportConfig
    for cls in (train.TrainConfig, mae.Config, mlm.Config, vlm.Config, hallucination.StudyConfig,
                causes.MapConfig, cures.CureConfig, sample.SampleConfig, bench.BenchConfig, ExportConfig):
        meaning = field_help(cls)
        assert [f.name for f in dataclasses.fields(cls) if len(meaning.get(f.name, "")) < 8] == [], cls
    out = run("train.py", "vlm", "--help").stdout
    assert "the loop:" in out and "vlm: the model and its data:" in out
    assert "--merge=2" in out and "pixel shuffle" in out.split("--merge=2")[1].splitlines()[0]
    assert "out-mae beside out_dir" in out  # a comment's second line joins its first


def test_ideas_never_import_scripts():
    scripts = {"train", "sample", "bench"}
    for name, path in MODULES.items():
        if name in scripts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for imported in names:
                allowed = name == "hallucination" and imported == "train"  # the study trains its models
                assert imported.split(".")[0] not in scripts or allowed, (name, imported)


@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py"])
def test_no_arguments_print_usage_and_exit_2_help_exits_0(script):
    p = run(script, check=False)
    assert p.returncode == 2 and "usage" in p.stderr and p.stdout == ""
    p = run(script, "--help")
    assert "usage" in p.stdout


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    from data.images import load_image
    img = load_image(tmp_path / "g16.png", 64)
    assert img.shape == (64, 64, 3) and (img == 255).mean() < 0.01  # pillow's convert would clip 94% to 255
    assert abs(int(img[32, 0, 0]) - round(grey[32, 0] / 65535 * 255)) <= 1


def test_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    from data import checked_cache

    def build():
        raise PermissionError(13, "Permission denied")
    with pytest.raises(UserError, match="cannot write the cache shapes/train in .*Permission denied"):
        checked_cache(tmp_path / "manifest.json", build, "shapes/train")


def test_missing_best_checkpoint_falls_back_to_the_latest_and_resume_clears_dead_writers(tmp_path):
    run("train.py", "mae", *MAE_ARGS, "--max_iters=2", "--eval_interval=2", f"--out_dir={tmp_path}")
    (tmp_path / "ckpt_best.pt").unlink()  # as if killed while writing it
    p = run("sample.py", "mae", f"--out_dir={tmp_path}", "--n=2")
    assert p.stdout.startswith(f"no {tmp_path / 'ckpt_best.pt'}; using {tmp_path / 'ckpt.pt'}")
    stale = tmp_path / "ckpt.pt.12345.678.tmp"
    stale.write_bytes(b"half a checkpoint")
    run("train.py", "mae", "--init_from=resume", "--max_iters=3", f"--out_dir={tmp_path}")
    assert not stale.exists() and load_checkpoint(tmp_path / "ckpt.pt", "mae")["iter"] == 3


def test_resuming_a_vlm_does_not_need_its_mae_again(tmp_path):
    mae_args = [*MAE_ARGS, "--max_iters=1", "--eval_iters=1", f"--out_dir={tmp_path / 'mae'}"]
    run("train.py", "mae", *mae_args)
    vlm_run = ["--batch_size=4", "--eval_iters=1", f"--out_dir={tmp_path / 'vlm'}"]
    run("train.py", "vlm", *VLM_ARGS, *vlm_run, "--max_iters=2", f"--init_vision={tmp_path / 'mae/ckpt.pt'}")
    (tmp_path / "mae/ckpt.pt").unlink()
    run("train.py", "vlm", "--init_from=resume", "--max_iters=3", f"--out_dir={tmp_path / 'vlm'}")
    ckpt = load_checkpoint(tmp_path / "vlm/ckpt.pt", "vlm")
    assert ckpt["iter"] == 3 and ckpt["config"]["model"]["init_vision"].endswith("mae/ckpt.pt")
    assert math.isfinite(ckpt["best_val_loss"]) and torch.isfinite(ckpt["model"]["wte.weight"]).all()
