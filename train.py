"""One training loop for every idea: `python train.py mae|mlm|vlm [config_file] [--key=value ...]`.

In the spirit of nanoGPT's train.py. Each idea module (mae.py, mlm.py, vlm.py) shows the loop the
same small face, and the loop calls nothing else:
    Config            a dataclass of the idea's own keys, with laptop-CPU defaults
    train_defaults    the idea's defaults for the loop's keys (TrainConfig below)
    Model(cfg)        an nn.Module; model(batch) -> (loss, metrics)
    Data(cfg, seed)   .batch(split, pos, batch_size, device) -> batch, a pure function of pos;
                      .items(batch) counts what `.unit` names (images, tokens) for throughput
    evaluate(model, data, device) -> dict of figures reported once training is done
The same loop runs on a laptop CPU, one GPU, or many under torchrun (DDP).
"""
import dataclasses
import gc
import json
import math
import os
import resource
import signal
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from config import cli, config_help, load_idea, parse_overrides
from data import UserError, at_least


@dataclass
class TrainConfig:
    out_dir: str = ""             # default: out-<idea>
    device: str = "auto"          # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"           # auto (bf16 where supported, else fp16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False         # torch.compile the model
    seed: int = 1337
    batch_size: int = 64          # per device and micro-step
    grad_accum: int = 1           # micro-steps per optimizer step
    max_iters: int = 2000
    lr_decay_iters: int = 0       # where the cosine reaches min_lr; 0 = max_iters
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0        # 0 = off
    eval_interval: int = 250
    eval_iters: int = 10
    log_interval: int = 50
    init_from: str = "scratch"    # scratch | resume (from out_dir/ckpt.pt)

    def __post_init__(self):
        if self.init_from not in ("scratch", "resume"):
            raise UserError(f"init_from={self.init_from!r}; choose scratch or resume")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"dtype={self.dtype!r}; choose auto, float32, bfloat16 or float16")
        at_least(self, 1, "batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval")
        at_least(self, 0, "lr_decay_iters", "warmup_iters", "weight_decay", "grad_clip", "min_lr")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} must be positive")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr={self.min_lr} is above lr={self.lr}; the schedule decays from lr to min_lr")


# ---------------------------------------------------------------------------------------------
# Configuration: defaults < a checkpoint's config < the command line (config.py parses it)

def build_configs(module, overrides, base=None):
    """-> (TrainConfig, module.Config): defaults < base (a checkpoint's config) < overrides."""
    base = base or {"train": {}, "model": {}}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = {**module.train_defaults, **base["train"], **{k: v for k, v in overrides.items() if k in names}}
    mc = {**base["model"], **{k: v for k, v in overrides.items() if k not in names}}
    return TrainConfig(**tc), module.Config(**mc)


# ---------------------------------------------------------------------------------------------
# Devices, precision, checkpoints

def pick_device(name):
    """'auto' -> the best device here; anything else is checked against what this machine has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
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
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def load_checkpoint(path, idea):
    """A checkpoint of `idea`, or a one-line error: missing, unreadable, or another idea's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first (python train.py {idea}) or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint at all, ...
        raise UserError(f"cannot read checkpoint {path}: {e.__class__.__name__}") from None
    if not isinstance(ckpt, dict) or "idea" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train.py")
    if ckpt["idea"] != idea:
        raise UserError(f"{path} is a {ckpt['idea']!r} checkpoint, not {idea!r}")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or set(ckpt["config"]) != {"train", "model"}:
        raise UserError(f"{path} lacks {', '.join(missing) or 'its config'}: not a complete train.py checkpoint")
    return ckpt


CKPT_KEYS = ("model", "optimizer", "scaler", "config", "iter", "best_val_loss", "rng", "history")


def save_atomic(obj, path):
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"  # unique: two writers never share one
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_out_dir(out_dir, fresh):
    """Before anything is written: out_dir must be (or become) a writable folder, and a run from
    scratch never lands on a trained checkpoint."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out_dir {out_dir} is a file, not a folder")
    parent = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"out_dir {out_dir} is not writable ({parent} is {'read-only' if parent.is_dir() else 'a file'})")
    old = [n for n in ("ckpt.pt", "ckpt_best.pt") if (out_dir / n).exists()]
    if fresh and old:
        raise UserError(f"{out_dir} already holds {' and '.join(old)}; continue it with --init_from=resume, "
                        f"or train into another --out_dir (or delete the old one)")


def lock_out_dir(out_dir):
    """An exclusive lock on out_dir for this process's lifetime (the OS drops it if we die), so a
    second run into the same folder is refused instead of racing this one. -> the held handle."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; unique temp names still keep saves whole
        return None
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"another run is training in {out_dir}; wait for it, or use another --out_dir") from None
    return fd


def check_resume_shapes(model, ckpt, mc):
    """A resume whose config changes a parameter's shape fails here, naming the key and both values."""
    own = model.state_dict()
    for name, saved in ckpt["model"].items():
        if name in own and own[name].shape != saved.shape:
            old = ckpt["config"]["model"]
            changed = [f"{k}={v} (checkpoint: {old[k]})" for k, v in asdict(mc).items() if k in old and old[k] != v]
            raise UserError(f"cannot resume: {', '.join(changed) or name} changes the shape of {name} "
                            f"from {tuple(saved.shape)} to {tuple(own[name].shape)}; drop the override "
                            f"or start a new --out_dir")
    missing = sorted(set(own) ^ set(ckpt["model"]))
    if missing:
        raise UserError(f"cannot resume: the checkpoint's weights do not match this model ({missing[0]}, ...)")


def peak_flops(device_type):
    """Peak FLOP/s for MFU: dense bf16 for known GPUs, a measured fp32 matmul on CPU and MPS."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 70e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "V100": 125e12, "4090": 165e12, "3090": 71e12, "T4": 65e12}
        return next((v for k, v in table.items() if k in name), None)
    a = torch.full((512, 512), 0.5, device=device_type)  # not randn: training's RNG stays untouched
    (a @ a).sum().item()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    (a @ a).sum().item()  # waits for queued work on MPS
    return 2 * 512 ** 3 * n / (time.perf_counter() - t0)


def count_flops(model, batch):
    """FLOPs of one forward+backward, counted by PyTorch on a real batch (no per-idea formula)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as fc:
        loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def plot_losses(curves, path):
    """{label: [(iteration, loss), ...]} -> a log-scale PNG; a curve named 'train' is a plain line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "-" if label == "train" else "o-", ms=3, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# ---------------------------------------------------------------------------------------------
# The loop

def train(idea, tc, mc, module, resume_ckpt=None):
    ddp = "RANK" in os.environ
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = pick_device(tc.device)
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, world, device = 0, 1, pick_device(tc.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = device.split(":")[0]
    dtype = pick_dtype(tc.dtype, device_type)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    out_dir = Path(tc.out_dir)
    if master:
        log(json.dumps({"idea": idea, "train": asdict(tc), "model": asdict(mc)}, indent=1))
        log(f"device {device}, dtype {str(dtype).split('.')[-1]}, world size {world}")

    torch.manual_seed(tc.seed + rank)
    if ddp and not master:
        dist.barrier()  # rank 0 renders and caches the data first; the others then read its cache
    data = module.Data(mc, seed=tc.seed, verbose=master)
    if ddp and master:
        dist.barrier()
    model = module.Model(mc)
    if resume_ckpt is not None:
        check_resume_shapes(model, resume_ckpt, mc)
    model = model.to(device)
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on biases and norms (1-D)
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(0.9, 0.95), fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    it, best_val = 0, float("inf")
    history = {"train": [], "val": []}
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        it, best_val, history = resume_ckpt["iter"], resume_ckpt["best_val_loss"], resume_ckpt["history"]
        rng = resume_ckpt["rng"]
        if len(rng["torch"]) == world:  # same world size: every rank continues its own stream
            torch.set_rng_state(rng["torch"][rank])
            if device_type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state(rng["cuda"][rank])
        log(f"resumed from {out_dir / 'ckpt.pt'} at iteration {it} (best val loss {best_val:.4f})")
    if master:  # every check has passed: only now is out_dir touched
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_out_dir(out_dir)
        check_out_dir(out_dir, fresh=resume_ckpt is None)  # again, under the lock
    flops_per_iter = count_flops(model, data.batch("train", 0, tc.batch_size, device)) * tc.grad_accum
    peak = peak_flops(device_type)
    raw_model = model
    if tc.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)

    def get_lr(i):
        decay_iters = tc.lr_decay_iters or tc.max_iters
        if i < tc.warmup_iters:
            return tc.lr * (i + 1) / (tc.warmup_iters + 1)
        if i >= decay_iters:
            return tc.min_lr
        ratio = (i - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
        return tc.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters fixed batches per split, averaged over ranks; the same masks
        every time (own RNG), so evals compare, and training's RNG stream is left untouched."""
        out = {}
        model.eval()
        with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []):
            torch.manual_seed(tc.seed + 1000 + rank)
            for split in ("train", "val"):
                losses = torch.zeros(tc.eval_iters, device=device)
                for k in range(tc.eval_iters):
                    with autocast:
                        losses[k] = raw_model(data.batch(split, k * world + rank, tc.batch_size, device))[0]
                mean = losses.mean()
                if ddp:
                    dist.all_reduce(mean)
                    mean /= world
                out[split] = mean.item()
        model.train()
        return out

    def save(names):
        rng = {"torch": [torch.get_rng_state()],
               "cuda": [torch.cuda.get_rng_state()] if device_type == "cuda" else []}
        if ddp:  # every rank's stream, so a resumed DDP run continues exactly too
            for k in list(rng):
                gathered = [None] * world
                dist.all_gather_object(gathered, rng[k][0] if rng[k] else None)
                rng[k] = [g for g in gathered if g is not None]
        if master:
            ckpt = {"idea": idea, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "config": {"train": asdict(tc), "model": asdict(mc)},
                    "iter": it, "data_position": it * tc.grad_accum * world,
                    "best_val_loss": best_val, "rng": rng, "history": history}
            for n in names:
                save_atomic(ckpt, out_dir / n)

    @torch.no_grad()
    def healthy():
        """Weights worth saving: finite, and a finite loss on a fixed batch (a diverged step can leave
        finite weights of size 1e30 whose next loss is NaN)."""
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            return False
        with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []), autocast:
            return math.isfinite(raw_model(data.batch("train", 0, tc.batch_size, device))[0].item())

    stop = []
    handlers = {sig: signal.signal(sig, lambda s, f: stop.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}

    def should_stop():
        flag = torch.tensor(float(bool(stop)))
        if ddp:  # stop together, or a rank waits forever in all_reduce
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    log(f"training {tc.max_iters} iterations; {flops_per_iter / 1e9:.2f} GFLOP per iteration")
    t_start = t0 = time.time()
    it_start, step_times = it, deque(maxlen=tc.log_interval)
    while True:
        if it % tc.eval_interval == 0 or it >= tc.max_iters:
            losses = estimate_loss()
            history["val"].append((it, losses["val"]))
            if not all(math.isfinite(v) for v in losses.values()):
                print(f"error: eval loss is {losses} at iteration {it}; stopping, the last good checkpoint "
                      f"in {out_dir} is kept. Try a lower --lr.", file=sys.stderr)
                sys.exit(3)
            improved = losses["val"] < best_val
            best_val = min(best_val, losses["val"])
            log(f"eval {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                f"{' (best)' if improved else ''}")
            save(["ckpt.pt"] + (["ckpt_best.pt"] if improved else []))
            t0 = time.time()  # evaluation is not training time
        if it >= tc.max_iters:
            break
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            batch = data.batch("train", (it * tc.grad_accum + micro) * world + rank, tc.batch_size, device)
            sync = not ddp or micro == tc.grad_accum - 1  # all-reduce gradients once per step
            with (nullcontext() if sync else model.no_sync()), autocast:
                loss, metrics = model(batch)
            scaler.scale(loss / tc.grad_accum).backward()
            loss_sum += loss.item() / tc.grad_accum
        if not math.isfinite(loss_sum):
            print(f"error: loss is {loss_sum} at iteration {it}; stopping, the last good checkpoint in "
                  f"{out_dir} is kept. Try a lower --lr or --dtype=float32.", file=sys.stderr)
            sys.exit(3)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        t1 = time.time()
        step_times.append(t1 - t0)
        t0 = t1
        if it % tc.log_interval == 0 or it == tc.max_iters:
            history["train"].append((it, loss_sum))
            dt = sum(step_times) / len(step_times)
            items = data.items(batch) * tc.grad_accum * world / dt
            mfu = f"{100 * flops_per_iter / dt / peak:.1f}%" if peak else "n/a"  # per device
            eta = (tc.max_iters - it) * dt
            extra = "".join(f" | {k} {v.item() if torch.is_tensor(v) else v:.4f}" for k, v in metrics.items())
            log(f"iter {it}/{tc.max_iters} | loss {loss_sum:.4f}{extra} | lr {lr:.2e} | grad norm "
                f"{grad_norm.item():.3f} | {dt * 1000:.0f} ms/iter | {items:,.0f} {data.unit}/s | MFU {mfu} "
                f"| {100 * it / tc.max_iters:.0f}% ETA {fmt_time(eta)}", flush=True)
        if should_stop():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if healthy():
                save(["ckpt.pt"])
                msg = f"saved {out_dir / 'ckpt.pt'}; continue with --init_from=resume"
            else:
                msg = (f"the weights have diverged (non-finite loss), so the last good checkpoint in {out_dir} "
                       f"is kept; try a lower --lr")
            if master:
                print(f"interrupted at iteration {it}: {msg}", file=sys.stderr, flush=True)
            sys.exit(128 + stop[0])  # 130 after Ctrl-C, 143 after SIGTERM: not a finished run

    for sig, handler in handlers.items():  # Ctrl-C in the final evaluation: one line from config.cli
        signal.signal(sig, handler)
    elapsed = time.time() - t_start
    result = None
    if master:
        plot_losses(history, out_dir / "loss.png")
        peak_mem = (torch.cuda.max_memory_allocated() if device_type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
        log(f"trained {it - it_start} iterations in {fmt_time(elapsed)}; best val loss {best_val:.4f}; "
            f"peak memory {peak_mem:.0f} MiB; loss curves in {out_dir / 'loss.png'}")
        result = {"iterations": it, "train_seconds": round(elapsed, 1), "best_val_loss": best_val,
                  "final_val_loss": history["val"][-1][1], "peak_memory_mib": round(peak_mem)}
        result.update(module.evaluate(raw_model, data, device))
        log(json.dumps(result, indent=1))
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    if ddp:
        del model  # the DDP wrapper (in reference cycles) holds the process group: free it on every rank,
        gc.collect()  # or gloo's threads can meet their end at interpreter exit and abort the process
        dist.barrier()
        dist.destroy_process_group()
    if master and lock is not None:
        os.close(lock)
    return result


USAGE = """usage: python train.py IDEA [CONFIG_FILE] [--key=value ...]
IDEA is one of: mae, mlm, vlm. CONFIG_FILE holds `key = value` lines (e.g. config/mae_gpu.conf).
Many processes: torchrun --standalone --nproc_per_node=N train.py IDEA ...
Keys (python train.py IDEA --help lists the idea's own keys too):"""


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(config_help(TrainConfig))
        return
    idea = argv[0]
    module = load_idea(idea)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        print(config_help(TrainConfig, module.Config, defaults=module.train_defaults))
        return
    overrides = parse_overrides(argv[1:], TrainConfig, module.Config)
    tc, mc = build_configs(module, overrides)
    ckpt = None
    if tc.init_from == "resume":
        ckpt = load_checkpoint(Path(tc.out_dir or f"out-{idea}") / "ckpt.pt", idea)
        try:
            tc, mc = build_configs(module, overrides, base=ckpt["config"])
        except TypeError as e:  # a key this version does not know
            raise UserError(f"cannot resume: the checkpoint's config does not fit this code ({e})") from None
    if not tc.out_dir:
        tc.out_dir = f"out-{idea}"
    pick_device(tc.device)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        check_out_dir(tc.out_dir, fresh=ckpt is None)
    train(idea, tc, mc, module, ckpt)


if __name__ == "__main__":
    cli(main)
