"""What the scripts and the ideas share: user errors and checks, devices and processes, pictures.

As in nanochat (`common.py`, with checkpoints in `checkpoint_manager.py`, here `checkpoints.py`),
the small things live in one library module, so that an idea (mae.py, mlm.py, vlm.py,
hallucination.py) never imports a script (train.py, sample.py, bench.py), and each is written once.
"""
import difflib
import gc
import importlib
import math
import os
import platform
import signal
import sys
import textwrap
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

IDEAS = ("mae", "mim", "mlm", "vlm", "clip", "gen")


# ---------------------------------------------------------------------------------------------
# Mistakes in what the user asked for: one line, found before anything is printed or written

class UserError(Exception):
    """A mistake in what the user asked for: scripts print it in one line and exit non-zero."""


def at_least(cfg, minimum, *keys):
    """A one-line error for the first of `keys` whose value in the dataclass `cfg` is below `minimum`."""
    for k in keys:
        if getattr(cfg, k) < minimum:
            raise UserError(f"{k}={getattr(cfg, k)} must be at least {minimum}")


def choices_text(choices):
    """('a', 'b', 'c') -> 'a, b or c'"""
    choices = [str(c) for c in choices]
    return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]


def one_of(cfg, key, choices):
    """A one-line error unless cfg.key is one of `choices`."""
    value = getattr(cfg, key)
    if value not in choices:
        raise UserError(f"{key}={value!r}; choose {choices_text(choices)}")


def divisible(cfg, key, by):
    """A one-line error unless cfg.key is a multiple of cfg.by."""
    if getattr(cfg, key) % getattr(cfg, by):
        raise UserError(f"{key}={getattr(cfg, key)} is not divisible by {by}={getattr(cfg, by)}")


def load_idea(name):
    """'mae' -> the mae module, or a one-line error with a did-you-mean."""
    if name not in IDEAS:
        close = difflib.get_close_matches(name, IDEAS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; choose {choices_text(IDEAS)}"
        raise UserError(f"unknown idea {name!r}{hint}")
    return importlib.import_module(name)


def f1(precision, recall):
    return 2 * precision * recall / max(1e-9, precision + recall)


# ---------------------------------------------------------------------------------------------
# Devices, precision, processes, the machine

def pick_device(name):
    """'auto' -> the best device here (cuda > mps > cpu); anything else is checked against this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"device={name!r}; choose auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}: this machine has no CUDA GPU; use --device=cpu or auto")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name}: MPS (Apple GPU) is not available here; use --device=cpu or auto")
    return name


def pick_dtype(name, device_type):
    """'auto' -> bf16 where the GPU has it, else fp16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def cpu_name():
    """'AMD EPYC (family 23 model 1), 2 cores': what every time in the README is measured on."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:  # macOS, Windows
        pass
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and not any(c.isdigit() for c in name):  # a VM that hides the model
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    return f"{name}, {os.cpu_count()} cores"


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return "Apple GPU (MPS)" if device == "mps" else cpu_name()


def peak_memory_mib(device_type="cpu"):
    """Peak memory of this process in MiB (the GPU's allocations on CUDA), or None where it cannot be read."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def fmt_mib(mib):
    return "n/a" if mib is None else f"{mib:,.0f} MiB"


@dataclass
class Run:
    """This process's place in the run: its device and precision, its rank among world processes."""
    device: str
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    ddp: bool = False  # under torchrun: gradients all-reduced, one process per device

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):  # cuda, mps or cpu
        return self.device.split(":")[0]

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def own_rng(self):
        """Randomness that leaves training's RNG stream untouched."""
        return torch.random.fork_rng(devices=[self.device] if self.device_type == "cuda" else [])

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def setup_distributed(tc):
    """One process, or one of torchrun's (RANK, WORLD_SIZE, LOCAL_RANK set): -> Run."""
    device = pick_device(tc.device)
    rank, world = 0, 1
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Run(device, pick_dtype(tc.dtype, device.split(":")[0]), rank, world, ddp="RANK" in os.environ)


def teardown_distributed(run, model):
    if run.ddp:
        del model  # the DDP wrapper (in reference cycles) holds the process group: free it on every rank,
        gc.collect()  # or gloo's threads can meet their end at interpreter exit and abort the process
        dist.barrier()
        dist.destroy_process_group()


class StopSignals:
    """SIGINT and SIGTERM only raise a flag; the loop looks at it between steps, so a step or a
    save is never cut in half."""

    def __init__(self):
        self.received = []
        self.old = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, sig, frame):
        self.received.append(sig)

    def restore(self):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def any(self, run):
        flag = torch.tensor(float(bool(self.received)))
        if run.ddp:  # stop together, or a rank waits forever in all_reduce
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


# ---------------------------------------------------------------------------------------------
# A folder to write in, and speed

def check_writable(folder):
    """Before the work that ends in writing there: folder must be (or become) a writable folder."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{folder} is a symbolic link to nothing (dangling or looping)")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only" if parent.is_dir() else "a file"
        raise UserError(f"{folder} is not writable ({parent} is {why})")


def peak_flops(device_type):
    """Peak FLOP/s for MFU: dense bf16 for known GPUs; on CPU and MPS the best of three measured fp32
    matmuls (train.py raises it to any faster rate training reaches, so MFU never passes 100%)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "V100": 125e12, "4090": 165e12, "3090": 71e12, "T4": 65e12}
        return next((v for k, v in table.items() if k in name), None)
    a = torch.full((512, 512), 0.5, device=device_type)  # not randn: training's RNG stays untouched
    (a @ a).sum().item()
    best = 0.0
    for _ in range(3):  # the best of three: another job on the machine slows some of them
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ a
            n += 1
        (a @ a).sum().item()  # waits for queued work on MPS
        best = max(best, 2 * 512 ** 3 * n / (time.perf_counter() - t0))
    return best


def count_flops(model, batch):
    """FLOPs of one forward+backward, counted by PyTorch on a real batch (no per-idea formula)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as fc:
        loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# ---------------------------------------------------------------------------------------------
# Pictures

def pyplot():
    """matplotlib's pyplot, drawing to files (no window, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@contextmanager
def written_whole(path):
    """Yields a temporary name beside path, which replaces path only when the block ends without an
    error: a crash or a full disk midway leaves the old file (or none), never half of one."""
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"  # unique: two writers never share one
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def savefig(fig, path, dpi=100, tight=True):
    """The figure to path as a whole PNG or not at all (a full disk midway leaves the old one)."""
    try:
        with warnings.catch_warnings(), written_whole(path) as tmp:  # an untrained model's text: any byte
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            if tight:
                fig.tight_layout()
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix[1:] or "png")
    finally:
        pyplot().close(fig)


def plot_losses(curves, path, xlabel="iteration"):
    """{label: [(x, loss), ...]} -> a log-scale PNG; a curve named 'train' is a plain line."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "-" if label == "train" else "o-", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    savefig(fig, path)


def draw_grid(images, texts, path, cols=4, footer=""):
    """Images (N, H, W, 3) in a grid with each one's text under it -> a PNG; each row leaves room
    for the longest text, so no text runs under the next row's images."""
    cols = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    wrapped = []
    for text in texts:
        text = "".join(c if c.isprintable() or c == "\n" else "?" for c in text)  # an untrained model's bytes
        wrapped.append("\n".join(textwrap.fill(line, 38) for line in text.split("\n")))
    text_h = 0.17 * max(w.count("\n") + 1 for w in wrapped)  # inches of 9-point text under an image
    height = (3.2 + text_h) * rows + 0.4
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, height), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, wrapped):
        ax.imshow(img)
        ax.text(0, -0.03, text, fontsize=9, transform=ax.transAxes, va="top")  # under the image
    fig.text(0.01, 0.01, footer, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.1 / height, bottom=(text_h + 0.3) / height,
                        wspace=0.08, hspace=text_h / 3.2)
    savefig(fig, path, tight=False)
