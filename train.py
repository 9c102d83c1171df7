"""One training loop for every idea: `python train.py mae|mim|mlm|vlm [config_file] [--key=value ...]`.

In the spirit of nanoGPT's train.py. Each idea module (mae.py, mim.py, mlm.py, vlm.py) shows the loop the
same small face, and the loop calls nothing else:
    Config            a dataclass of the idea's own keys, with laptop-CPU defaults
    train_defaults    the idea's defaults for the loop's keys (TrainConfig below)
    Model(cfg)        an nn.Module; model(batch) -> (loss, metrics)
    Data(cfg, seed)   the data (a class, or a function that picks one, as the VLM's does):
                      .batch(split, pos, batch_size, device) -> batch, a pure function of pos;
                      .items(batch) counts what `.unit` names (images, tokens) for throughput
    evaluate(model, data, device) -> dict of figures reported once training is done
    monitor(model, data, device)  (optional) a few cheap figures logged at every evaluation
    requires(cfg, out_dir)        (optional) -> (cfg, the runs of other ideas to make first [(idea, args)])
The same loop runs on a laptop CPU, one GPU, or many under torchrun (DDP).
"""
import dataclasses
import json
import math
import os
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from lib.checkpoints import (check_out_dir, check_resume_shapes, load_checkpoint, lock_out_dir, save_atomic,
                             saved_tokenizer, without_init)
from lib.common import (StopSignals, UserError, at_least, count_flops, device_name, fmt_mib, fmt_time,
                        load_idea, one_of, peak_flops, peak_memory_mib, pick_device, plot_losses,
                        setup_distributed, teardown_distributed)
from lib.config import cli, config_help, parse_overrides, usage


@dataclass
class TrainConfig:
    out_dir: str = ""             # default: out-<idea>
    device: str = "auto"          # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"           # auto (bf16 if supported, else fp16 on CUDA; fp32 on CPU) | float32 | ...
    compile: bool = False         # torch.compile the model
    seed: int = 1337              # the weights, the masks, the data order and the shapes world's scenes
    batch_size: int = 64          # per device and micro-step
    grad_accum: int = 1           # micro-steps per optimizer step
    max_iters: int = 2000         # training iterations (optimizer steps)
    lr_decay_iters: int = 0       # where the cosine reaches min_lr; 0 = max_iters
    lr: float = 1e-3              # peak learning rate, after the warmup
    min_lr: float = 1e-4          # the cosine ends here
    warmup_iters: int = 100       # linear warmup from 0 to lr
    weight_decay: float = 0.05    # AdamW's, on matrices only (biases and norms: none)
    grad_clip: float = 1.0        # clip the gradient norm to this; 0 = off
    eval_interval: int = 250      # evaluate, checkpoint (and the idea's monitor) every this many iterations
    eval_iters: int = 10          # batches per split in each evaluation
    log_interval: int = 50        # a log line every this many iterations
    init_from: str = "scratch"    # scratch | resume (from out_dir/ckpt.pt)

    def __post_init__(self):
        one_of(self, "init_from", ("scratch", "resume"))
        one_of(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        at_least(self, 1, "batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
                 "log_interval")
        at_least(self, 0, "lr_decay_iters", "warmup_iters", "weight_decay", "grad_clip", "min_lr")
        if self.lr <= 0:
            raise UserError(f"lr={self.lr} must be positive")
        if self.min_lr > self.lr:
            raise UserError(f"min_lr={self.min_lr} is above lr={self.lr}; "
                            f"the schedule decays from lr to min_lr")


def build_configs(module, overrides, base=None):
    """-> (TrainConfig, module.Config): defaults < base (a checkpoint's config) < overrides."""
    base = base or {"train": {}, "model": {}}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = {**module.train_defaults, **base["train"], **{k: v for k, v in overrides.items() if k in names}}
    mc = {**base["model"], **{k: v for k, v in overrides.items() if k not in names}}
    return TrainConfig(**tc), module.Config(**mc)


def get_lr(it, tc):
    """Linear warmup to lr, cosine decay to min_lr at lr_decay_iters (default max_iters), then flat."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.lr * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the whole state of a run

@dataclass
class Progress:
    """What the loop changes as it goes, and what a checkpoint keeps of it."""
    iter: int = 0
    best_val_loss: float = float("inf")
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "monitor": []})


def save_checkpoint(names, out_dir, idea, model, optimizer, scaler, tc, mc, progress, run, carried):
    """Write model, optimizer, configs, progress and every rank's RNG state to out_dir/name, atomically;
    carried: what the model needs to be read (its tokenizer, and the fingerprint of its data)."""
    rng = {"torch": [torch.get_rng_state()],
           "cuda": [torch.cuda.get_rng_state()] if run.device_type == "cuda" else []}
    if run.ddp:  # every rank's stream, so a resumed DDP run continues exactly too
        for k in list(rng):
            gathered = [None] * run.world
            dist.all_gather_object(gathered, rng[k][0] if rng[k] else None)
            rng[k] = [g for g in gathered if g is not None]
    if run.master:
        ckpt = {"idea": idea, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": {"train": asdict(tc), "model": asdict(mc)},
                "iter": progress.iter, "data_position": progress.iter * tc.grad_accum * run.world,
                "best_val_loss": progress.best_val_loss, "rng": rng, "history": progress.history,
                **carried}
        for n in names:
            save_atomic(ckpt, Path(out_dir) / n)


def restore(ckpt, model, optimizer, scaler, run):
    """Continue exactly where a checkpoint stopped -> Progress."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if len(rng["torch"]) == run.world:  # same world size: every rank continues its own stream
        torch.set_rng_state(rng["torch"][run.rank])
        if run.device_type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state(rng["cuda"][run.rank])
    history = {"monitor": [], **ckpt["history"]}
    return Progress(ckpt["iter"], ckpt["best_val_loss"], history)


# ---------------------------------------------------------------------------------------------
# Measuring: evaluation loss, FLOPs and MFU

@torch.no_grad()
def estimate_loss(model, data, tc, run):
    """Mean loss over eval_iters fixed batches per split, averaged over ranks; the same masks every
    time (own RNG), so evals compare, and training's RNG stream is left untouched."""
    out = {}
    model.eval()
    with run.own_rng():
        torch.manual_seed(tc.seed + 1000 + run.rank)
        for split in ("train", "val"):
            losses = torch.zeros(tc.eval_iters, device=run.device)
            for k in range(tc.eval_iters):
                with run.autocast():
                    batch = data.batch(split, k * run.world + run.rank, tc.batch_size, run.device)
                    losses[k] = model(batch)[0]
            mean = losses.mean()
            if run.ddp:
                dist.all_reduce(mean)
                mean /= run.world
            out[split] = mean.item()
    model.train()
    return out


@torch.no_grad()
def healthy(model, data, tc, run):
    """Weights worth saving: finite, and a finite loss on a fixed batch (a diverged step can leave
    finite weights of size 1e30 whose next loss is NaN)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return False
    with run.own_rng(), run.autocast():
        return math.isfinite(model(data.batch("train", 0, tc.batch_size, run.device))[0].item())


def log_line(it, tc, loss, metrics, lr, grad_norm, dt, throughput, mfu):
    extra = "".join(f" | {k} {v.item() if torch.is_tensor(v) else v:.4f}" for k, v in metrics.items())
    return (f"iter {it}/{tc.max_iters} | loss {loss:.4f}{extra} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
            f"{dt * 1000:.0f} ms/iter | {throughput} | MFU {mfu} | {100 * it / tc.max_iters:.0f}% "
            f"ETA {fmt_time((tc.max_iters - it) * dt)}")


# ---------------------------------------------------------------------------------------------
# Stopping: Ctrl-C and SIGTERM between steps (common.StopSignals), a loss that is no longer a number

def diverged(what, it, out_dir, hint="Try a lower --lr."):
    print(f"error: {what} at iteration {it}; stopping, the last good checkpoint in {out_dir} is kept. "
          f"{hint}", file=sys.stderr)
    sys.exit(3)


def stop_now(stop, save, model, data, tc, run, it):
    """Save (if the weights are sound) and exit 130 after Ctrl-C, 143 after SIGTERM."""
    stop.restore()
    if healthy(model, data, tc, run):
        save(["ckpt.pt"])
        msg = f"saved {Path(tc.out_dir) / 'ckpt.pt'}; continue with --init_from=resume"
    else:
        msg = (f"the weights have diverged (non-finite loss), so the last good checkpoint in {tc.out_dir} "
               f"is kept; try a lower --lr")
    if run.master:
        print(f"interrupted at iteration {it}: {msg}", file=sys.stderr, flush=True)
    sys.exit(128 + stop.received[0])  # not a finished run


# ---------------------------------------------------------------------------------------------
# The loop

def build(module, tc, mc, run, resume_ckpt):
    """Data, model, optimizer and scaler, every input checked, before anything is printed."""
    torch.manual_seed(tc.seed + run.rank)
    if run.ddp and not run.master:
        dist.barrier()  # rank 0 renders and caches the data first; the others then read its cache
    data = module.Data(mc, seed=tc.seed, verbose=run.master)
    if run.ddp and run.master:
        dist.barrier()
    if resume_ckpt is not None and hasattr(data, "read_with"):
        data.read_with(resume_ckpt)  # the words it was trained with, whatever the data holds now
    model = module.Model(mc if resume_ckpt is None else without_init(mc), **saved_tokenizer(resume_ckpt))
    if resume_ckpt is not None:
        check_resume_shapes(model, resume_ckpt, mc)
    model = model.to(run.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on biases and norms (1-D)
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=tc.lr, betas=(0.9, 0.95), fused=run.device_type == "cuda")
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == torch.float16)
    return data, model, optimizer, scaler


def wrap(model, tc, run):
    """The module that trains: compiled (torch.compile) and/or DDP-wrapped, sharing the raw weights."""
    if tc.compile:
        model = torch.compile(model)
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(run.device.split(":")[1])] if run.device_type == "cuda" else None)
    return model


def train(idea, tc, mc, module, resume_ckpt=None):
    run = setup_distributed(tc)
    data, model, optimizer, scaler = build(module, tc, mc, run, resume_ckpt)
    run.log(json.dumps({"idea": idea, "train": asdict(tc), "model": asdict(mc)}, indent=1))
    run.log(f"device {run.device} ({device_name(run.device)}), dtype {str(run.dtype).split('.')[-1]}, "
            f"world size {run.world}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    progress = Progress() if resume_ckpt is None else restore(resume_ckpt, model, optimizer, scaler, run)
    out_dir = Path(tc.out_dir)
    if resume_ckpt is not None:
        run.log(f"resumed from {out_dir / 'ckpt.pt'} at iteration {progress.iter} "
                f"(best val loss {progress.best_val_loss:.4f})")
    lock = lock_out_dir(out_dir, fresh=resume_ckpt is None) if run.master else None  # only now
    flops_per_iter = count_flops(model, data.batch("train", 0, tc.batch_size, run.device)) * tc.grad_accum
    peak = peak_flops(run.device_type)
    raw_model, model = model, wrap(model, tc, run)  # the raw one is saved and evaluated
    carried = {"tokenizer": raw_model.tok.state() if hasattr(raw_model, "tok") else None,
               "data_fingerprint": data.fingerprint() if hasattr(data, "fingerprint") else None}
    save = partial(save_checkpoint, out_dir=out_dir, idea=idea, model=raw_model, optimizer=optimizer,
                   scaler=scaler, tc=tc, mc=mc, progress=progress, run=run, carried=carried)
    stop = StopSignals()
    run.log(f"training {tc.max_iters} iterations; {flops_per_iter / 1e9:.2f} GFLOP per iteration")
    t_start = t0 = time.time()
    it_start, step_times = progress.iter, deque(maxlen=tc.log_interval)
    while True:
        it = progress.iter
        # evaluate and checkpoint
        if it % tc.eval_interval == 0 or it >= tc.max_iters:
            losses = estimate_loss(raw_model, data, tc, run)
            progress.history["val"].append((it, losses["val"]))
            if not all(math.isfinite(v) for v in losses.values()):
                diverged(f"eval loss is {losses}", it, out_dir)
            improved = losses["val"] < progress.best_val_loss
            progress.best_val_loss = min(progress.best_val_loss, losses["val"])
            figures = monitor(module, raw_model, data, run, it, time.time() - t_start, progress.history)
            run.log(f"eval {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    f"{' (best)' if improved else ''}{figures}")
            save((["ckpt_best.pt"] if improved else []) + ["ckpt.pt"])  # the best first: never none
            t0 = time.time()  # evaluation is not training time
        if it >= tc.max_iters:
            break
        # forward and backward, gradients accumulated over micro-steps
        lr = get_lr(it, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            batch = data.batch("train", (it * tc.grad_accum + micro) * run.world + run.rank, tc.batch_size,
                               run.device)
            sync = not run.ddp or micro == tc.grad_accum - 1  # all-reduce gradients once per step
            with (nullcontext() if sync else model.no_sync()), run.autocast():
                loss, metrics = model(batch)
            scaler.scale(loss / tc.grad_accum).backward()
            loss_sum += loss.item() / tc.grad_accum
        if not math.isfinite(loss_sum):
            diverged(f"loss is {loss_sum}", it, out_dir, "Try a lower --lr or --dtype=float32.")
        # clip and step
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        progress.iter = it = it + 1
        t1 = time.time()
        step_times.append(t1 - t0)
        t0 = t1
        # log
        if it % tc.log_interval == 0 or it == tc.max_iters:
            progress.history["train"].append((it, loss_sum))
            dt = sum(step_times) / len(step_times)
            throughput = f"{data.items(batch) * tc.grad_accum * run.world / dt:,.0f} {data.unit}/s"
            if peak and run.device_type != "cuda":  # a CPU's peak: the fastest rate seen, at start or since
                peak = max(peak, flops_per_iter / dt)
            mfu = f"{100 * flops_per_iter / dt / peak:.1f}%" if peak else "n/a"  # per device
            line = log_line(it, tc, loss_sum, metrics, lr, grad_norm.item(), dt, throughput, mfu)
            run.log(line, flush=True)
        # stop on Ctrl-C or SIGTERM
        if stop.any(run):
            stop_now(stop, save, raw_model, data, tc, run, it)
    stop.restore()  # Ctrl-C in the final evaluation: one line from config.cli
    result = finish(module, raw_model, data, run, progress, it_start, time.time() - t_start, out_dir)
    teardown_distributed(run, model)
    if lock is not None:
        os.close(lock)
    return result


def monitor(module, model, data, run, it, seconds, history):
    """The idea's cheap figures at an evaluation (if it has any), kept in the history -> ', k v' text."""
    if not hasattr(module, "monitor") or not run.master:
        return ""
    with run.own_rng():
        figures = module.monitor(model, data, run.device)
    history["monitor"].append({"iter": it, "seconds": round(seconds, 1), **figures})
    return "".join(f", {k} {v:.3f}" for k, v in figures.items())


def finish(module, model, data, run, progress, it_start, elapsed, out_dir):
    """The loss curves, the idea's own evaluation and metrics.json (rank 0) -> the figures."""
    if not run.master:
        return None
    plot_losses({k: progress.history[k] for k in ("train", "val")}, out_dir / "loss.png")
    peak_mem = peak_memory_mib(run.device_type)
    run.log(f"trained {progress.iter - it_start} iterations in {fmt_time(elapsed)}; best val loss "
            f"{progress.best_val_loss:.4f}; peak memory {fmt_mib(peak_mem)}; "
            f"loss curves in {out_dir / 'loss.png'}")
    result = {"iterations": progress.iter, "train_seconds": round(elapsed, 1),
              "best_val_loss": progress.best_val_loss, "final_val_loss": progress.history["val"][-1][1],
              "peak_memory_mib": None if peak_mem is None else round(peak_mem),
              "device": device_name(run.device)}
    result.update(module.evaluate(model, data, run.device))
    run.log(json.dumps(result, indent=1))
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


USAGE = """usage: python train.py IDEA [CONFIG_FILE] [--key=value ...]
IDEA is one of: mae, mim, mlm, vlm, clip, gen.
CONFIG_FILE holds `key = value` lines (e.g. config/mae_gpu.conf).
Many processes: torchrun --standalone --nproc_per_node=N train.py IDEA ...
Keys (python train.py IDEA --help lists the idea's own keys too):"""


def configs(idea, argv):
    """The command line (and, for a resume, the checkpoint) -> (module, TrainConfig, Config, checkpoint)."""
    module = load_idea(idea)
    overrides = parse_overrides(argv, TrainConfig, module.Config)
    tc, mc = build_configs(module, overrides)
    ckpt = None
    if tc.init_from == "resume":
        ckpt = load_checkpoint(Path(tc.out_dir or f"out-{idea}") / "ckpt.pt", idea)
        try:
            tc, mc = build_configs(module, overrides, base=ckpt["config"])
        except TypeError as e:  # a key this version does not know
            raise UserError(f"cannot resume: the checkpoint's config does not fit this code ({e})") from None
    given = [a[2:].partition("=")[0] for a in argv if a.startswith("--")]
    if hasattr(mc, "check_flags"):  # flags that would do nothing in the mode chosen
        mc.check_flags(given)
    tc.out_dir = tc.out_dir or f"out-{idea}"
    return module, tc, mc, ckpt


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        return usage(USAGE + "\n" + config_help(TrainConfig, titles=["the loop"]), argv)
    module = load_idea(argv[0])
    if "-h" in argv or "--help" in argv:
        print(USAGE + "\n" + config_help(TrainConfig, module.Config, defaults=module.train_defaults,
                                          titles=["the loop", f"{argv[0]}: the model and its data"]))
        return 0
    module, tc, mc, ckpt = configs(argv[0], argv[1:])
    pick_device(tc.device)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        check_out_dir(tc.out_dir, fresh=ckpt is None)
    first = []
    if hasattr(module, "requires") and ckpt is None:
        mc, first = module.requires(mc, tc.out_dir)
    for idea, args in first:  # another idea's run this one starts from (the VLM's MAE)
        if "RANK" in os.environ:
            raise UserError(f"{argv[0]} starts from python train.py {idea} {' '.join(args)}: run it first")
        print(f"first, what {argv[0]} starts from: python train.py {idea} {' '.join(args)}", flush=True)
        main([idea, *args])
    train(argv[0], tc, mc, module, ckpt)
    return 0


if __name__ == "__main__":
    cli(main)
