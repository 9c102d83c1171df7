"""Hallucination's cures beyond contrastive decoding: the small functions each cure is made of.

    VTI (Liu et al. 2024)        steer the hidden states along a direction per layer: the visual one
                                 is the mean (or first principal component) of the image tokens'
                                 states minus those of heavily masked copies; added at inference as
                                 x' = normalize(normalize(x) + alpha * normalize(d)) * |x|. Control:
                                 random directions of the same norms. The textual direction per fused
                                 layer: the last caption token's state for the true caption minus that
                                 for the caption with the missing partner added.
    VHR ("Cracking the Code of    a head's vision-aware divergence (VHD) = how far its output at the
    Hallucination in LVLMs")     answer position moves between the real image and the blank canvas,
                                 averaged over calibration scenes; while decoding, the top-k heads'
                                 outputs are scaled by gamma. Controls: k random heads, the k least
                                 vision-aware heads.
Preference training (DPO) lives in `preference.py`. `python -m study.cures` runs every cure beside its
control on the study's model (see main).
"""
import json
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vlm
from data import to_tensor
from data.pairs import CAPTION_PROMPT, blank_like, row_images
from data.shapes import PARTNER, SHAPES, caption, exist_question
from hallucination import (COLUMNS, StudyConfig, check_study, check_study_checkpoint, plot_bars, run_method,
                           study_args, study_model, table, vlm_configs)
from lib.checkpoints import save_atomic
from lib.common import UserError, at_least, pick_device
from lib.config import cli, config_help, parse_overrides, usage
from study.decoding import METHODS
from study.measures import shape_stats
from study.preference import hallucinated_caption, preference_tune
from vlm import prefix_lm_mask


def principal_direction(diffs, pca=False):
    """(N, D) differences -> (D,): their mean, or their first principal component turned to agree
    with the mean (a component's sign is arbitrary)."""
    mean = diffs.mean(0)
    if not pca:
        return mean
    _, _, v = torch.linalg.svd(diffs - mean, full_matrices=False)
    d = v[0] * mean.norm()
    return d if torch.dot(d, mean) >= 0 else -d


def steer(x, direction, alpha):
    """VTI's shift of states x (..., D) along direction (D,), their norms kept; alpha = 0 is x itself."""
    if alpha == 0:
        return x
    shifted = F.normalize(x, dim=-1) + alpha * F.normalize(direction, dim=-1)
    return F.normalize(shifted, dim=-1) * x.norm(dim=-1, keepdim=True)


def random_like(directions, gen):
    """The control: for each direction (D,), a random one of the same norm."""
    out = []
    for d in directions:
        r = torch.randn(d.shape, generator=gen, dtype=d.dtype).to(d.device)  # drawn on the CPU: any device
        out.append(r / r.norm() * d.norm())
    return out


@contextmanager
def hooked(handles):
    """The hooks `handles` stay on the model for the block, and are removed after it, whatever happens."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Attention heads (VHR)

def scale_input(scale, module, args):
    """A forward pre-hook: the module's input times scale (C,)."""
    return (args[0] * scale.to(args[0]),)


@contextmanager
def scaled_heads(model, heads, gamma):
    """Within the block, the outputs of heads [(layer, head)] are multiplied by gamma before the
    attention's output projection: each head's contribution, and only it, scales. Off: no cost."""
    by_layer = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    handles = []
    for layer, hs in by_layer.items():
        attn = model.blocks[layer].attn
        C = attn.proj.in_features
        scale = torch.ones(C)  # (C,): the heads' outputs lie side by side, hd channels each
        for h in hs:
            scale[h * C // attn.n_head:(h + 1) * C // attn.n_head] = gamma
        handles.append(attn.proj.register_forward_pre_hook(partial(scale_input, scale)))
    with hooked(handles):
        yield model


@torch.no_grad()
def head_outputs(model, images, prompt):
    """Every head's output at the answer position (the last one) -> (L, B, h, hd)."""
    outs = []

    def hook(proj, args):
        y = args[0][:, -1]  # (B, C)
        outs.append(y.view(y.shape[0], model.cfg.n_head, -1))  # (B, h, hd)
    with hooked([blk.attn.proj.register_forward_pre_hook(hook) for blk in model.blocks]):
        model.start(images, prompt)
    return torch.stack(outs)  # (L, B, h, hd)


@torch.no_grad()
def vhd_scores(model, data, n_scenes, device, seed=0):
    """Each head's vision-aware divergence over n_scenes training scenes, asked "is there a
    {shape}?" about a random shape: mean |out(image) - out(blank)| -> (L, h)."""
    rng = np.random.default_rng([seed, 17])
    scenes = rng.choice(len(data.shapes["train"]), size=n_scenes, replace=False)
    shapes = rng.integers(len(SHAPES), size=n_scenes)
    b = data.make_batch("train", scenes, [(exist_question(s), "") for s in shapes], device)
    images = row_images(b)
    real = head_outputs(model, images, b["prompt"])
    blank = head_outputs(model, blank_like(images), b["prompt"])
    return (real - blank).norm(dim=-1).mean(1)  # (L, h)


def pick_heads(vhd, k, how, gen=None):
    """k heads [(layer, head)] of a VHD table (L, h): the most vision-aware (top, VHR), the least
    (least, a control) or random ones (random, the other control)."""
    flat = vhd.flatten()
    if how == "top":
        idx = flat.topk(k).indices
    elif how == "least":
        idx = (-flat).topk(k).indices
    else:
        idx = torch.randperm(len(flat), generator=gen)[:k]
    n_head = vhd.shape[1]
    return [(int(i) // n_head, int(i) % n_head) for i in idx]


# ---------------------------------------------------------------------------------------------
# Latent steering (VTI)

def steer_output(direction, alpha, module, args, out):
    """A forward hook: the module's output steered along direction."""
    return steer(out, direction.to(out), alpha)


@contextmanager
def steered(modules, directions, alpha):
    """Within the block, each module's output is steered along its direction (VTI)."""
    handles = [m.register_forward_hook(partial(steer_output, d, alpha)) for m, d in zip(modules, directions)]
    with hooked(handles):
        yield


@torch.no_grad()
def block_outputs(blocks, run):
    """Each block's output while run() runs -> [tensor per block]."""
    outs = []
    with hooked([b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in blocks]):
        run()
    return outs


def masked_copies(images, keep, gen, patch):
    """Copies of images (B, 3, H, W) with all but a `keep` share of patches (at least one) painted
    the blank canvas (VTI masks 99% of the image)."""
    B, _, H, W = images.shape
    g = H // patch
    n_keep = max(1, round(keep * g * g))
    kept = torch.rand(B, g * g, generator=gen).argsort(1) < n_keep  # (B, g*g): n_keep random patches
    kept = kept.view(B, 1, g, 1, g, 1).expand(B, 1, g, patch, g, patch).reshape(B, 1, H, W)
    return torch.where(kept.to(images.device), images, blank_like(images))


@torch.no_grad()
def visual_directions(model, images, gen, trials=4, keep=0.01, pca=False):
    """Per tower block: the image tokens' states minus their mean over masked copies, averaged (or
    the first principal component) over images -> [(1+L, Dv) per block]."""
    real = block_outputs(model.vision.blocks, lambda: model.vision(images))
    masked = [block_outputs(model.vision.blocks, lambda: model.vision(
        masked_copies(images, keep, gen, model.cfg.patch_size))) for _ in range(trials)]
    out = []
    for i, r in enumerate(real):
        diffs = r - torch.stack([m[i] for m in masked]).mean(0)  # (B, 1+L, Dv)
        out.append(principal_direction(diffs.flatten(1), pca).view(r.shape[1:]))
    return out


@torch.no_grad()
def textual_directions(model, data, n_scenes, device, seed=0, pca=False):
    """Per fused block: the last caption token's state for the true caption minus that for the one
    with the missing partner added, over training scenes that have one -> [(D,) per block]."""
    rng = np.random.default_rng([seed, 19])
    train, scenes, pairs = data.shapes["train"], [], []
    for i in rng.permutation(len(train))[:4 * n_scenes].tolist():
        bad = hallucinated_caption(train.scene(i), rng)
        if bad is not None and len(scenes) < 2 * n_scenes:
            scenes += [i, i]
            pairs += [(CAPTION_PROMPT, caption(train.scene(i))), (CAPTION_PROMPT, bad)]
    b = data.make_batch("train", np.array(scenes), pairs, device)
    img = model.image_tokens(b["images"], b["image_index"])
    x, key_valid, n_prefix = model.sequence(img, b["prompt"], b["answer"])
    last = n_prefix + (b["answer"] != model.tok.pad_id).sum(1) - 1  # (N,): each text's end-of-text
    states = block_outputs(model.blocks, lambda: model.run(x, prefix_lm_mask(key_valid, n_prefix)))
    rows = torch.arange(len(scenes), device=x.device)
    return [principal_direction(s[rows, last][0::2] - s[rows, last][1::2], pca) for s in states]


# ---------------------------------------------------------------------------------------------
# The table: every cure beside its own control, on the study's model

@dataclass
class CureConfig(StudyConfig):
    halved_ckpt: str = ""        # the study's VLM on the world with the bias halved; default out_dir/halved
    k_heads: int = 4             # VHR: heads scaled (of n_layer x n_head)
    gamma: float = 2.0           # VHR: their outputs' scale
    vti_alpha: float = 0.05      # VTI: steering strength (normalised: ~3 degrees; 0.1 broke captions)
    n_calib: int = 64            # training scenes for VHD scores and VTI directions
    dpo_steps: int = 300         # DPO and its controls: tuning steps from the study model

    def __post_init__(self):
        super().__post_init__()
        if self.data_path:
            raise UserError("study.cures runs on the shapes world (its controls read the world's scenes); "
                            "--data_path is for hallucination.py")
        at_least(self, 1, "k_heads", "n_calib", "dpo_steps")
        at_least(self, 0, "gamma", "vti_alpha")


@contextmanager
def vti(model, visual, textual, alpha):
    """VTI: the tower's blocks steered along the visual directions, the stack's along the textual."""
    with steered(model.vision.blocks, visual, alpha), steered(model.blocks, textual, alpha):
        yield


def ready(model, method, context):
    """A row that needs no training -> (model, method, context, training seconds)."""
    return model, method, context, 0.0


def tuned(model, data, how, steps, seed, device):
    """A row whose model is tuned on preferences first -> (model, method, context, training seconds)."""
    model, seconds = preference_tune(model, data, how, steps, seed, device)
    return model, METHODS["greedy"], nullcontext(), seconds


def cure_rows(model, models, data, cc, seed, device):
    """One seed's rows -> [(name, make)], make() -> (model, method, context, training seconds): each
    cure, then its controls; a row is made only when it is measured. The heads, directions and
    preference pairs are drawn from the seed."""
    gen = torch.Generator().manual_seed(seed)
    greedy, k = METHODS["greedy"], cc.k_heads
    vhd = vhd_scores(model, data, cc.n_calib, device, seed)
    scenes = np.random.default_rng([seed, 29]).choice(len(data.shapes["train"]), cc.n_calib, replace=False)
    images = to_tensor(data.shapes["train"].images[np.sort(scenes)], device)
    visual, textual = visual_directions(model, images, gen), textual_directions(model, data, cc.n_calib,
                                                                                device, seed)
    rows = [("greedy", partial(ready, model, greedy, nullcontext()))]
    for name in ("M3ID (greedy)", "DeCo (greedy)"):
        rows.append((name, partial(ready, model, METHODS[name], nullcontext())))
    for how, name in (("top", f"VHR: top {k} heads x {cc.gamma}"), ("random", f"control: {k} random heads"),
                      ("least", f"control: {k} least vision-aware heads")):
        heads = scaled_heads(model, pick_heads(vhd, k, how, gen), cc.gamma)
        rows.append((name, partial(ready, model, greedy, heads)))
    steer = vti(model, visual, textual, cc.vti_alpha)  # an encoder-free model has no tower to steer
    vti_name = "VTI: visual + textual directions" if visual else "VTI: textual directions (no tower)"
    rows.append((vti_name, partial(ready, model, greedy, steer)))
    steer = vti(model, random_like(visual, gen), random_like(textual, gen), cc.vti_alpha)
    rows.append(("control: random directions, same norms", partial(ready, model, greedy, steer)))
    for how, name in (("dpo", "DPO (partner negatives)"), ("sft", "control: fine-tuning on the preferred"),
                      ("dpo-random", "control: DPO, random-shape negatives")):
        rows.append((name, partial(tuned, model, data, how, cc.dpo_steps, seed, device)))
    rows += [("data: unbiased world", partial(ready, models["unbiased"], greedy, nullcontext())),
             ("data: bias halved", partial(ready, models["halved"], greedy, nullcontext()))]
    return rows


def row_stamp(cc, out_dir):
    """What a row's figures depend on: every key but where they go and how many seeds, and when each of
    the three models was saved. A row measured under another stamp is measured again."""
    keys = {k: v for k, v in asdict(cc).items() if k not in ("device", "out_dir", "seeds")}
    paths = [Path(given or out_dir / name / "ckpt.pt") for name, given in
             (("biased", cc.ckpt), ("unbiased", cc.control_ckpt), ("halved", cc.halved_ckpt))]
    return {"config": keys, "models": [p.stat().st_mtime_ns for p in paths]}


def measured_row(out_dir, seed, name, stamp):
    """A row's figures saved by an earlier run of the same stamp (a killed run resumes), or None."""
    path = row_path(out_dir, seed, name)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):  # none yet, or damaged: measured again
        return None
    return saved["figures"] if isinstance(saved, dict) and saved.get("stamp") == stamp else None


def row_path(out_dir, seed, name):
    return Path(out_dir) / "rows" / f"seed{seed}-{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}.json"


def partner_yes_rate(records, val):
    """Of the POPE questions about a missing partner of a present shape: the share answered yes."""
    said = []
    for r in records:
        objs = val.scene(r["scene"])
        shapes = set(objs[:, 0].tolist())
        asked = SHAPES.index(r["question"].split()[-1].rstrip("?"))
        if r["label"] == "no" and asked in {PARTNER[s] for s in shapes}:
            said.append(r["parsed"] == "yes")
    return float(np.mean(said)) if said else float("nan")


CURE_COLUMNS = COLUMNS + [("partner_yes", "partner yes"), ("x_greedy", "x greedy"),
                          ("train_min", "train min")]


def check_controls(cc, out_dir):
    """Before any cure runs: the heads and scenes asked for exist, and each control is a model the study
    can ask that reads images of the study model's size (the scenes are drawn once, at that size)."""
    study = Path(cc.ckpt or out_dir / "biased/ckpt.pt")
    if study.exists():
        model = check_study_checkpoint(study)
    else:  # trained first, by the study's recipe
        model = asdict(vlm_configs(study_args("biased"))[1])
    size, heads = model["img_size"], model["n_layer"] * model["n_head"]
    if cc.k_heads > heads:
        raise UserError(f"k_heads={cc.k_heads}: the study model has {heads} heads ({model['n_layer']} layers "
                        f"x {model['n_head']})")
    if cc.n_calib > model["n_train"]:
        raise UserError(f"n_calib={cc.n_calib}: the study model has {model['n_train']} training scenes")
    for name, given in (("unbiased", cc.control_ckpt), ("halved", cc.halved_ckpt)):
        path = Path(given or out_dir / name / "ckpt.pt")
        if path.exists() and check_study_checkpoint(path)["img_size"] != size:
            raise UserError(f"{path} reads {check_study_checkpoint(path)['img_size']} px images, the study "
                            f"model {size} px: a control must match the model it controls")


def measure_row(make, data, name, cc, seed, stats, device):
    """Make a row's model (tuning it, for the preference rows) and measure it -> its figures."""
    model, method, context, train_seconds = make()
    t0 = time.time()
    with context:
        figures, records = run_method(model, data, name, method, cc, seed, stats, device)
    figures["seconds"], figures["train_min"] = time.time() - t0, train_seconds / 60
    figures["partner_yes"] = partner_yes_rate(records, data.shapes["val"])
    return figures


def main(argv):
    if "-h" in argv or "--help" in argv:
        return usage(__doc__.split("\n\n")[0] + "\n" + config_help(CureConfig), argv)
    cc = CureConfig(**parse_overrides(argv, CureConfig))
    device, out_dir = pick_device(cc.device), Path(cc.out_dir)
    check_study(cc, out_dir)
    check_controls(cc, out_dir)
    model, cfg, ckpt = study_model(cc.ckpt, out_dir, "biased", device)
    models = {"unbiased": study_model(cc.control_ckpt, out_dir, "unbiased", device)[0],
              "halved": study_model(cc.halved_ckpt, out_dir, "halved", device)[0]}
    data = vlm.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    stats = shape_stats(data.shapes["train"])
    results, t_start, stamp = {}, time.time(), row_stamp(cc, out_dir)
    (out_dir / "rows").mkdir(parents=True, exist_ok=True)
    for seed in range(cc.seeds):
        for name, make in cure_rows(model, models, data, cc, seed, device):
            figures = measured_row(out_dir, seed, name, stamp)
            earlier = " (measured by an earlier run)" if figures else ""
            if figures is None:
                figures = measure_row(make, data, name, cc, seed, stats, device)
                save_atomic(json.dumps({"stamp": stamp, "figures": figures}), row_path(out_dir, seed, name))
            greedy_seconds = figures["seconds"] if name == "greedy" else results["greedy"][seed]["seconds"]
            figures["x_greedy"] = figures["seconds"] / greedy_seconds
            results.setdefault(name, []).append(figures)
            print(f"seed {seed} {name:<40} POPE adv. F1 {100 * figures['pope_adversarial_f1']:.1f} | "
                  f"partner yes {100 * figures['partner_yes']:.1f} | "
                  f"CHAIR_i {100 * figures['chair_i']:.1f} | "
                  f"{figures['seconds']:.0f} s{earlier}", flush=True)
    print(f"\n{table(results, CURE_COLUMNS, plain=('x_greedy', 'train_min'))}\n")
    save_atomic(json.dumps({"config": asdict(cc), "methods": results}, indent=1), out_dir / "cures.json")
    plot_bars(results, out_dir / "cures.png")
    print(f"wrote cures.json and cures.png to {out_dir} in {(time.time() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    cli(main)
