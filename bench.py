"""Speed, measured side by side in one run: `python bench.py mae|mim|clip|mlm|vlm|hallucination [--steps=N]`;
and time to sight, runs of `train.py vlm` drawn side by side: `python bench.py sight RUN ... OUT.png`.

Absolute times on shared machines are noisy; the ratios in one run are what to read. Each
training configuration runs in a fresh process, so its peak memory is its own.
"""
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from data.pairs import CAPTION_PROMPT, length_groups
from lib.checkpoints import load_checkpoint, load_model
from lib.common import (UserError, at_least, check_writable, choices_text, device_name, fmt_mib,
                        peak_memory_mib, pick_device, pyplot, savefig)
from lib.config import cli, config_help, parse_overrides, usage
from train import TrainConfig


@dataclass
class BenchConfig:
    steps: int = 10        # timed training steps per row (after 2 warm-ups); hallucination: rounds of runs
    device: str = "auto"   # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps

    def __post_init__(self):
        at_least(self, 1, "steps")
        pick_device(self.device)


def time_steps(model, make_batch, steps, forward=None):
    """Median seconds per training step (forward, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 2):
        batch = make_batch(i)
        t0 = time.perf_counter()
        loss = forward(batch) if forward else model(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[2:])[len(times[2:]) // 2]


def train_row(args):
    """In a fresh process: (items/s, peak memory MiB, what an item is) of training one config."""
    idea, cfg, batch_size, steps, device = args
    torch.manual_seed(0)
    module = __import__(idea)
    model = module.Model(cfg).to(device)
    data = module.Data(cfg, seed=TrainConfig.seed, verbose=False)  # train.py's data and cache
    dt = time_steps(model, partial(data.batch, "train", batch_size=batch_size, device=device), steps)
    items = data.items(data.batch("train", 0, batch_size, device))
    return items / dt, peak_memory_mib(device.split(":")[0]), data.unit


def in_fresh_process(fn, args):
    # an executor's worker (unlike a Pool's) may start processes of its own: rendering uses them
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, args).result()


def train_rows(idea, rows, bc, device):
    """Print training throughput and peak memory of each (name, config); -> items/s of the first."""
    module = __import__(idea)
    bs = module.train_defaults["batch_size"]
    print(f"device {device} ({device_name(device)}), batch {bs}, "
          f"{torch.get_num_threads()} threads, {bc.steps} steps per row\n")
    speeds = []
    for name, cfg in rows:
        speed, peak, unit = in_fresh_process(train_row, (idea, cfg, bs, bc.steps, device))
        if not speeds:
            print(f"{'config':<44}{'train ' + unit + '/s':>16}{'peak memory':>14}")
        print(f"{name:<44}{speed:>16,.0f}{fmt_mib(peak):>14}")
        speeds.append(speed)
    return speeds[0]


def forward_mask_tokens_in_encoder(model, imgs):
    """The design MAE argues against: every patch enters the encoder, removed ones as a mask token
    (SimMIM/BEiT style). Same loss, same decoder (with nothing left to insert)."""
    from mae import patchify, random_masking
    enc = model.encoder
    x = enc.patch_embed(patchify(imgs, enc.p))  # (N, L, D)
    N, L, D = x.shape
    _, mask, _ = random_masking(x, model.cfg.mask_ratio)
    x = torch.where(mask.bool().unsqueeze(-1), model.encoder_mask_token.expand(N, L, D), x)
    x = torch.cat([enc.cls_token.expand(N, -1, -1), x], dim=1) + enc.pos_embed  # (N, 1+L, D)
    for blk in enc.blocks:
        x = blk(x)
    pred = model.forward_decoder(enc.norm(x), torch.arange(L, device=x.device).expand(N, L))
    return model.forward_loss(imgs, pred, mask).mean()


def bench_mae(bc):
    import mae
    from data.shapes import World, render, sample_scene
    device = pick_device(bc.device)
    default = mae.Config()
    larger = replace(default, n_layer=6, n_embd=192, n_head=6, decoder_n_layer=4, decoder_n_embd=128)
    bs = mae.train_defaults["batch_size"]
    step_ips = train_rows("mae", (("default (4x128, decoder 2x64, 64px/8)", default),
                                  ("larger (6x192, decoder 4x128, 64px/8)", larger)), bc, device)

    torch.manual_seed(0)
    data = mae.Data(default, seed=TrainConfig.seed, verbose=False)
    batches = [data.batch("train", i, bs, device) for i in range(bc.steps + 2)]
    print("\nasymmetric encoder vs mask tokens in the encoder (same model, 75% masking):")
    for name, cfg in (("default", default), ("larger", larger)):
        model = mae.MAE(cfg).to(device)
        model.encoder_mask_token = torch.nn.Parameter(torch.zeros(1, 1, cfg.n_embd, device=device))
        forward = partial(forward_mask_tokens_in_encoder, model)
        t_sym = time_steps(model, batches.__getitem__, bc.steps, forward)
        t_asym = time_steps(model, batches.__getitem__, bc.steps)
        print(f"  {name:<10} asymmetric {1000 * t_asym:7.1f} ms/step | mask tokens in encoder "
              f"{1000 * t_sym:7.1f} ms/step | speed-up {t_sym / t_asym:.2f}x")

    n = 20 * bs
    t0 = time.perf_counter()
    for i in range(0, n, bs):
        data.batch("train", i // bs, bs, device)
    cached = n / (time.perf_counter() - t0)
    world = World()
    t0 = time.perf_counter()
    for i in range(200):
        render(world, sample_scene(world, "train", i))
    rendered = 200 / (time.perf_counter() - t0)
    print("\ndata throughput vs training throughput (default config):")
    print(f"  cached batches   {cached:>10,.0f} images/s = {cached / step_ips:6.1f}x the training step")
    print(f"  render on the fly{rendered:>10,.0f} images/s = {rendered / step_ips:6.1f}x the training step "
          f"(one process; the cache is built once per split)")


def bench_mim(bc):
    """A training step of each target and each masking of mim.py, side by side (the teachers random:
    a trained one costs the same)."""
    import mim
    rows = [(f"--target={t}", mim.Config(target=t)) for t in mim.TARGETS]
    rows += [(f"--masking={m}", mim.Config(masking=m)) for m in mim.Config.maskings if m != "random"]
    train_rows("mim", rows, bc, pick_device(bc.device))


def bench_clip(bc):
    """A CLIP training step with FLIP's patch dropping at 0, 50% and 75%: the image tower's tokens fall
    to a half and a quarter; the text tower and the loss cost the same."""
    import clip
    rows = [(f"--image_mask_ratio={r}", clip.Config(image_mask_ratio=r)) for r in (0.0, 0.5, 0.75)]
    base = train_rows("clip", rows[:1], bc, pick_device(bc.device))
    for name, cfg in rows[1:]:
        args = ("clip", cfg, clip.train_defaults["batch_size"], bc.steps, pick_device(bc.device))
        speed, peak, _ = in_fresh_process(train_row, args)
        print(f"{name:<44}{speed:>16,.0f}{fmt_mib(peak):>14}   {speed / base:.2f}x")


def bench_mlm(bc):
    import mlm
    from data import text
    from data.bpe import Tokenizer
    device = pick_device(bc.device)
    default = mlm.Config()
    larger = replace(default, n_layer=6, n_embd=256, n_head=8, block_size=128)
    bs = mlm.train_defaults["batch_size"]
    train_rows("mlm", (("default (4x128, context 64, shapes BPE)", default),
                       ("larger (6x256, context 128, shapes BPE)", larger)), bc, device)

    model = mlm.MLM(default).to(device).eval()
    ids = torch.full((bs, default.block_size), model.mask_id, device=device)
    for method in ("maskgit", "mdlm"):
        t0 = time.perf_counter()
        mlm.unmask(model, ids, steps=16, method=method)
        dt = time.perf_counter() - t0
        print(f"sampling {method:<8} 16 steps, {bs} x {default.block_size} tokens: "
              f"{ids.numel() / dt:>10,.0f} tokens/s")

    shared = Path(__file__).resolve().parent.parent / "shared/data/tiny_shakespeare.txt"
    name, corpus = ("Tiny Shakespeare", shared.read_text()) if shared.exists() else \
        ("pydoc", "\n".join(text.documents("pydoc")["train"]))
    corpus = corpus[:1_000_000]
    t0 = time.perf_counter()
    tok = Tokenizer.train("bpe", corpus, 512)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = len(tok.encode(corpus))
    t_enc = time.perf_counter() - t0
    print(f"\nBPE tokenizer, 512 tokens on {len(corpus) / 1e6:.2f} MB of {name}: trained in {t_train:.1f} s; "
          f"encodes {n / t_enc:,.0f} tokens/s ({len(corpus) / n:.2f} bytes/token)")


def bench_vlm(bc):
    import vlm
    device = pick_device(bc.device)
    default = vlm.Config(init_vision="none")
    tower = replace(default, vision_n_layer=4, n_layer=4, texts_per_image=2)  # config/vlm_tower.conf
    train_rows("vlm", (("default (no tower, fused 6x128, 4 texts)", default),
                       ("one text per image", replace(default, texts_per_image=1)),
                       ("tower (ViT 4x128, fused 4x128, 2 texts)", tower),
                       ("larger (fused 6x256, 4 texts)", replace(default, n_embd=256, n_head=8))),
               bc, device)
    vlm_stages(default, bc, device)
    torch.manual_seed(0)
    model = vlm.VLM(default).to(device).eval()
    with torch.no_grad():
        model.head_bias[model.tok.eot_id] = -1e9  # never stop early: every row writes all 32 tokens
    data = vlm.Data(default, seed=TrainConfig.seed, verbose=False)
    print("\ngeneration, 32 new tokens after image + 'describe the image.' (greedy):")
    for bs in (1, 32):
        b = data.make_batch("val", np.arange(bs), [(CAPTION_PROMPT, "")] * bs, device)
        speed = {}
        for cache in (True, False):
            images, prompt, index = b["images"], b["prompt"], b["image_index"]
            model.generate(images, prompt, 4, use_cache=cache, image_index=index)  # warm-up
            t0 = time.perf_counter()
            out = model.generate(images, prompt, 32, use_cache=cache, image_index=index)
            speed[cache] = out.numel() / (time.perf_counter() - t0)
        print(f"  batch {bs:>2}: KV cache {speed[True]:>8,.0f} tokens/s | "
              f"recomputing {speed[False]:>8,.0f} tokens/s"
              f" | speed-up {speed[True] / speed[False]:.1f}x")


def vlm_stages(cfg, bc, device):
    """Where a training step's time goes, stage by stage (medians), and what evaluation costs."""
    import vlm
    torch.manual_seed(0)
    model, data = vlm.VLM(cfg).to(device), vlm.Data(cfg, seed=TrainConfig.seed, verbose=False)
    bs = vlm.train_defaults["batch_size"]
    batches = [data.batch("train", i, bs, device) for i in range(bc.steps + 2)]

    def tower(b):
        return model.image_tokens(b["images"]).float().pow(2).mean()  # the image tokens' forward and backward
    t_step = time_steps(model, batches.__getitem__, bc.steps)
    t_tower = time_steps(model, batches.__getitem__, bc.steps, tower)
    t0 = time.perf_counter()
    for i in range(bc.steps):
        data.batch("train", i, bs, device)
    t_data = (time.perf_counter() - t0) / bc.steps
    b, pad = batches[0], data.tok.pad_id
    real = int((b["prompt"] != pad).sum() + (b["answer"] != pad).sum())
    padded = len(b["prompt"]) * (b["prompt"].shape[1] + b["answer"].shape[1])
    grouped = sum(len(rows) * (P + A) for rows, P, A in length_groups(b["prompt"], b["answer"], pad))
    print(f"\nwhere a training step goes (batch {bs} images x {cfg.texts_per_image} texts, forward + "
          f"backward + AdamW):\n  whole step {1000 * t_step:7.1f} ms | image tokens (tower if any, "
          f"projector) {1000 * t_tower:7.1f} ms "
          f"({100 * t_tower / t_step:.0f}%) | the rest (fused stack, loss, optimizer) "
          f"{1000 * (t_step - t_tower):7.1f} ms | data {1000 * t_data:5.1f} ms")
    print(f"  text tokens a step: {real:,} real; padded to the batch's longest {padded:,}; "
          f"in two length groups {grouped:,} (what the fused stack reads, beside the image tokens)")
    model.eval()
    t0 = time.perf_counter()
    vlm.monitor(model, data, device)
    t_monitor = time.perf_counter() - t0
    t0 = time.perf_counter()
    vlm.evaluate(model, data, device)
    print(f"  evaluation: monitor (200 ood existence questions) {t_monitor:.1f} s at each eval; the final "
          f"evaluate() {time.perf_counter() - t0:.0f} s (an untrained model: captions run to 40 tokens)")


def study_model_or_untrained(study, device):
    """The trained study model (how often the cut leaves a choice is a property of the model), or an
    untrained one that writes every token -> (model, cfg)."""
    import vlm
    ckpt = Path(study.out_dir) / "biased/ckpt.pt"
    if ckpt.exists():
        _, model, cfg, _ = load_model("vlm", ckpt, device)
        print(f"the study's model, {ckpt}")
        return model, cfg
    torch.manual_seed(0)
    cfg = vlm.Config()
    model = vlm.VLM(cfg).to(device).eval()
    with torch.no_grad():
        model.head_bias[model.tok.eot_id] = -1e9  # an untrained model would stop at random
    print(f"no trained model at {ckpt} (python hallucination.py trains it), so an untrained one: how often "
          f"the cut leaves a choice, and so what the second branch costs, is a property of the model")
    return model, cfg


def bench_hallucination(bc):
    from study import decoding
    import hallucination as H
    from study import measures
    import vlm
    from data.shapes import exist_question
    device = pick_device(bc.device)
    study = H.StudyConfig()
    model, cfg = study_model_or_untrained(study, device)
    data = vlm.Data(cfg, seed=TrainConfig.seed, verbose=False)
    val = data.shapes["val"]
    n_scenes, n_captions = min(50, len(val)), min(100, len(val))
    qs = measures.pope_questions(data.objects("val"), "adversarial", n_scenes, 0,
                                 *measures.shape_stats(data.shapes["train"]))
    pope = data.make_batch("val", np.array([q[0] for q in qs]), [(exist_question(q[1]), "") for q in qs],
                           device)
    caps = data.make_batch("val", np.arange(n_captions), [(CAPTION_PROMPT, "")] * n_captions, device)
    print(f"device {device} ({device_name(device)}), "
          f"{torch.get_num_threads()} threads; {len(qs)} adversarial POPE questions and {n_captions} "
          f"captions ({study.caption_tokens} tokens at most) a batch; medians of {bc.steps} rounds, each\n"
          f"round running every method once, and each ratio taken against greedy within a round\n")
    runs = [(name, m, True, nullcontext) for name, m in decoding.METHODS.items()]
    runs.append(("VCD (greedy), every row", decoding.METHODS["VCD (greedy)"], False, nullcontext))
    runs += cure_runs(model, data, device)
    tasks = ((pope, 3), (caps, study.caption_tokens))

    def run(method, gate, context, b, n_tokens):
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        with context():
            n = decoding.decode(model, b["images"], b["prompt"], method, study, n_tokens, gen, gate,
                                b["image_index"])[2]
        return (time.perf_counter() - t0) / len(b["prompt"]) * 1000, n / len(b["prompt"])

    read = {}  # the share of rows the second branch reads; this first round is also the warm-up
    for name, m, gate, context in runs:
        for k, task in enumerate(tasks):
            read[name, k] = run(m, gate, context, *task)[1]
    times = {key: [] for key in read}
    for k, task in enumerate(tasks):
        for _ in range(bc.steps):  # round robin: a slow spell of a shared machine hits every method alike
            for name, m, gate, context in runs:
                times[name, k].append(run(m, gate, context, *task)[0])
    print_ratios(runs, times, read)


def cure_runs(model, data, device, n_calib=16):
    """The decoding-time cures that are hooks, not decoding methods: VHR and VTI (study/cures.py's defaults),
    calibrated on a few training scenes (their cost does not depend on which heads or directions)."""
    from study import cures
    from study import decoding
    from data import to_tensor
    cc, greedy = cures.CureConfig(), decoding.METHODS["greedy"]
    heads = cures.pick_heads(cures.vhd_scores(model, data, n_calib, device), cc.k_heads, "top")
    images = to_tensor(data.shapes["train"].images[:n_calib], device)
    visual = cures.visual_directions(model, images, torch.Generator().manual_seed(0))
    textual = cures.textual_directions(model, data, n_calib, device)
    return [(f"VHR (top {cc.k_heads} heads x {cc.gamma})", greedy, True,
             partial(cures.scaled_heads, model, heads, cc.gamma)),
            (f"VTI (alpha {cc.vti_alpha})", greedy, True,
             partial(cures.vti, model, visual, textual, cc.vti_alpha))]


def print_ratios(runs, times, read):
    """ms per answer and, per round, the ratio to greedy in the same round (drift cancels): medians."""
    print(f"{'method':<34}{'ms / POPE answer':>17}{'ms / caption':>14}{'x greedy (POPE, caption)':>26}"
          f"{'rows 2nd branch read':>24}")
    for name, m, *_ in runs:
        ms = [np.median(times[name, k]) for k in range(2)]
        x = [np.median(np.array(times[name, k]) / np.array(times[runs[0][0], k])) for k in range(2)]
        share = ", ".join(f"{100 * read[name, k]:.0f}%" for k in range(2)) if m.second else "-"
        print(f"{name:<34}{ms[0]:>17.2f}{ms[1]:>14.2f}{x[0]:>19.2f}x, {x[1]:.2f}x{share:>24}")


def time_to_sight(monitor, start, bar=0.95):
    """A run's headline: when its monitor first held `bar` (pretraining's seconds included) -> text."""
    seen = [m for m in monitor if m["ood_exist"] >= bar]
    if not seen:
        best = max((m["ood_exist"] for m in monitor), default=float("nan"))
        return f"sight {bar} not reached (best {best:.3f})"
    m = seen[0]
    return f"sight {bar} at iteration {m['iter']}, {start + m['seconds']:.0f} s (pretraining {start:.0f} s)"


# what each idea's monitor is drawn as, against wall-clock seconds
WATCHED = {"vlm": ("ood_exist", "ood existence accuracy"),
           "clip": ("val_i2t_r1", "val image-to-text recall@1")}


def plot_runs(out_dirs, path):
    """Runs of `train.py vlm` (or of `train.py clip`) side by side -> a PNG: val loss against iteration
    and the run's monitor (vlm: `ood` existence accuracy; clip: val recall@1) against wall-clock seconds,
    the MAE's training time included for a tower started from one (its metrics.json)."""
    fig, (loss_ax, sight_ax) = pyplot().subplots(1, 2, figsize=(11, 4))
    for d in out_dirs:
        ckpt = load_checkpoint(Path(d) / "ckpt.pt", "vlm", ("clip",))
        key, label = WATCHED[ckpt["idea"]]
        loss_ax.plot(*zip(*ckpt["history"]["val"]), "o-", ms=3, label=Path(d).name)
        init = ckpt["config"]["model"].get("init_vision", "")
        start, mae_metrics = 0, Path(init).parent / "metrics.json"  # seconds the MAE took first
        if init not in ("", "none", "auto") and mae_metrics.is_file():
            start = json.loads(mae_metrics.read_text())["train_seconds"]
        monitor = [m for m in ckpt["history"].get("monitor", []) if m["iter"] > 0]  # iteration 0 says nothing
        curve = [(start + m["seconds"], m[key]) for m in monitor]
        if ckpt["idea"] == "vlm":
            print(f"{d}: {time_to_sight(monitor, start)}")
        if curve:
            sight_ax.plot(*zip(*curve), "o-", ms=3, label=Path(d).name + (" (MAE first)" if start else ""))
    loss_ax.set(xlabel="iteration", ylabel="val loss", yscale="log")
    sight_ax.set(xlabel="wall-clock seconds, pretraining included", ylabel=label)
    if key == "ood_exist":
        sight_ax.axhline(0.97, color="gray", ls=":", lw=1)  # the target; 0.5 is chance
    for ax in (loss_ax, sight_ax):
        ax.grid(alpha=0.3)
        if ax.lines[1:] or ax is loss_ax:
            ax.legend(fontsize=8)
    savefig(fig, path)


BENCHES = {"mae": bench_mae, "mim": bench_mim, "clip": bench_clip, "mlm": bench_mlm, "vlm": bench_vlm,
           "hallucination": bench_hallucination}


def sight(argv):
    """python bench.py sight RUN_DIR [RUN_DIR ...] OUT.png: runs of `train.py vlm` (or all of `train.py
    clip`) side by side."""
    if len(argv) < 2:
        raise UserError("give the run folders and then the .png to draw their curves into")
    *runs, png = argv
    if Path(png).suffix.lower() != ".png":
        raise UserError(f"the last argument, {png}, names the picture to write: give it a .png name")
    if not Path(png).parent.is_dir():
        raise UserError(f"cannot write {png}: there is no folder {Path(png).parent}")
    check_writable(Path(png).parent)
    ideas = {load_checkpoint(Path(run) / "ckpt.pt", "vlm", ("clip",))["idea"] for run in runs}  # each checked
    if len(ideas) > 1:
        raise UserError("give runs of one idea: train.py vlm runs or train.py clip runs, not both")
    plot_runs(runs, png)
    print(f"wrote {png}")
    return 0


def main(argv):
    if argv and argv[0] == "sight":
        return sight(argv[1:])
    if argv and argv[0] not in BENCHES and argv[0] not in ("-h", "--help"):
        raise UserError(f"no benchmark for {argv[0]!r}; choose {choices_text(BENCHES)} or sight")
    if not argv or "-h" in argv or "--help" in argv:
        text = ("usage: python bench.py IDEA [--key=value ...]   IDEA: " + ", ".join(BENCHES) + "\n"
                "       python bench.py sight RUN_DIR [RUN_DIR ...] OUT.png   (runs of train.py vlm, or of "
                "clip, side by side: val loss by iteration, sight or recall by wall-clock seconds)")
        return usage(text + "\n" + config_help(BenchConfig), argv)
    BENCHES[argv[0]](BenchConfig(**parse_overrides(argv[1:], BenchConfig)))
    return 0


if __name__ == "__main__":
    cli(main)
