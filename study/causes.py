"""Hallucination's causes, where the shapes world makes them exact: edits of a scene, and the layers.

    BEAF (Ye-Bin et al. 2024)    render a scene again with one object removed and ask "is there a
                                 {removed}?" before and after, and about an object left alone. True
                                 Understanding = yes before, no after; IGnorance = wrong both times;
                                 StuBbornness = the same answer both times; InDecision = the answer
                                 about the unchanged object flips. Removals are split into the missing
                                 partner of a present trigger (what the prior expects) and any other.
    The layers                   at the answer position of "is there a {shape}?", each layer's state
                                 read by the logit lens (the final norm and the tied head: P(yes) vs
                                 P(no)) and by a linear probe trained on training scenes ("The First
                                 to Know"; DeCo): does an earlier layer know what the last one says
                                 wrong?
    The map                      `python -m study.causes [--key=value ...]`: the study's VLM (the
                                 default recipe, the tower from the MAE) trained on a grid of worlds, the
                                 co-occurrence bias x the pixel noise (the perception knob), one
                                 budget for every cell; per cell sight (`ood` existence), POPE,
                                 the partner-yes rate, CHAIR_i and BEAF. Each cell's checkpoint and
                                 figures are kept: a second run resumes where the first stopped.
"""
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import vlm
from data.shapes import PARTNER, SHAPES, exist_question, render_scene
from hallucination import (StudyConfig, ask, chair_run, check_study_checkpoint, pope_run, train_or_finish,
                           vlm_configs, yes_no_tokens)
from lib.checkpoints import load_checkpoint, load_model, save_atomic, weights_path
from lib.common import UserError, at_least, check_writable, pick_device, pyplot, savefig
from lib.config import cli, config_help, parse_overrides, usage
from mae import linear_probe
from study.decoding import METHODS
from study.measures import parse_yes_no, shape_stats
from vlm import answer_questions

# ---------------------------------------------------------------------------------------------
# BEAF: before and after an exact edit


def beaf_edits(shapes_split, n_scenes, seed):
    """-> [(scene, removed row, kept row, kind)]: per scene at most one partner removal (an object whose
    shape is the partner of another present shape, and the only one of its shape) and one random removal
    (any other object alone of its shape), each with another object left alone to ask about."""
    rng = np.random.default_rng([seed, 11])
    edits = []
    for i in rng.permutation(len(shapes_split)).tolist():
        objs = shapes_split.scene(i)
        shapes = objs[:, 0].tolist()
        alone = [k for k, s in enumerate(shapes) if shapes.count(s) == 1 and len(objs) > 1]
        expected = {PARTNER[t] for t in shapes}  # the partners the present shapes bring
        partner = [k for k in alone if shapes[k] in expected]
        other = [k for k in alone if k not in partner]
        for kind, rows in (("partner", partner), ("random", other)):
            if rows:
                k = int(rng.choice(rows))
                kept = [j for j in range(len(objs)) if shapes[j] != shapes[k]]
                edits.append((i, k, int(rng.choice(kept)), kind))
        if len({e[0] for e in edits}) >= n_scenes:
            break
    return edits


def removed_images(world, split, shapes_split, edits):
    """The scenes of `edits` drawn again without their removed object: uint8 (E, H, W, 3)."""
    out = []
    for scene, k, _, _ in edits:
        objs = shapes_split.scene(scene)
        out.append(render_scene(world, split, scene, np.delete(objs, k, axis=0)))
    return np.stack(out)


@torch.no_grad()
def ask_exists(model, data, images, shapes, study, device, batch_size=200):
    """Greedy answers to "is there a {shape}?" about each image: 'yes', 'no' or None (unparsable)."""
    questions = [exist_question(s) for s in shapes]
    raws, _ = ask(model, data, images, questions, METHODS["greedy"], study, torch.Generator(), device,
                  batch_size)
    return [parse_yes_no(t) for t in raws]


def beaf_answers(model, data, split, edits, study, device):
    """-> one record per edit: the answers about the removed and the kept object, before and after."""
    shapes_split = data.shapes[split]
    before = np.stack([shapes_split.images[e[0]] for e in edits])
    after = removed_images(data.world, split, shapes_split, edits)
    removed = [int(shapes_split.scene(e[0])[e[1], 0]) for e in edits]
    kept = [int(shapes_split.scene(e[0])[e[2], 0]) for e in edits]
    images = np.concatenate([before, after, before, after])
    a = ask_exists(model, data, images, removed + removed + kept + kept, study, device)
    E = len(edits)
    return [{"scene": e[0], "kind": e[3], "removed": removed[j], "kept": kept[j], "before": a[j],
             "after": a[E + j], "kept_before": a[2 * E + j], "kept_after": a[3 * E + j]}
            for j, e in enumerate(edits)]


def beaf_measures(records):
    """BEAF's four measures and its F1 of TU and (1 - ID), over records (each a removal)."""
    n = max(1, len(records))
    tu = sum(r["before"] == "yes" and r["after"] == "no" for r in records) / n
    ig = sum(r["before"] == "no" and r["after"] == "yes" for r in records) / n
    sb = sum(r["before"] is not None and r["before"] == r["after"] for r in records) / n
    indecision = sum(r["kept_before"] != r["kept_after"] for r in records) / n
    f1 = 2 * tu * (1 - indecision) / (tu + 1 - indecision) if tu + 1 - indecision > 0 else 0.0
    return {"TU": tu, "IG": ig, "SB": sb, "ID": indecision, "F1": f1, "n": len(records)}


def beaf_table(records):
    """{'partner': measures, 'random': measures, 'all': measures}"""
    out = {}
    for kind in ("partner", "random"):
        out[kind] = beaf_measures([r for r in records if r["kind"] == kind])
    out["all"] = beaf_measures(records)
    return out


# ---------------------------------------------------------------------------------------------
# The layers: logit lens and linear probes at the answer position

@torch.no_grad()
def answer_states(model, images, prompt, image_index=None):
    """The state at the position that predicts the answer's first token, after the embedding and after
    each block -> (n_layer + 1, B, D). image_index: as in a batch."""
    no_answer = prompt[:, :0]
    x, key_valid, n_prefix = model.sequence(model.image_tokens(images, image_index), prompt, no_answer)
    states = []
    model.run(x, vlm.prefix_lm_mask(key_valid, n_prefix), states=states)
    states = [s[:, -1] for s in states]  # (B, D) each: the last position predicts the answer
    return torch.stack(states)  # (L + 1, B, D)


def logit_lens(model, states):
    """(L + 1, B, D) states -> (L + 1, B, V) logits: the final norm and the tied head applied to each."""
    return model.head(states)  # (L + 1, B, V)


def lens_says_yes(model, states):
    """(L + 1, B) bool: does each layer's lens put P(yes) above P(no)?"""
    yes, no = yes_no_tokens(model.tok)  # the shapes world's words: two first tokens
    logits = logit_lens(model, states)
    return logits[..., yes] > logits[..., no]


def existence_items(shapes_split, n_scenes, seed):
    """-> [(scene, shape, truth, is_partner)]: per scene a present shape, a missing partner of a present
    trigger (where there is one) and a random absent shape."""
    rng = np.random.default_rng([seed, 13])
    items = []
    for i in range(min(n_scenes, len(shapes_split))):
        shapes = set(shapes_split.scene(i)[:, 0].tolist())
        missing = [PARTNER[t] for t in shapes if PARTNER[t] not in shapes]
        absent = [s for s in range(len(SHAPES)) if s not in shapes]
        items.append((i, int(rng.choice(sorted(shapes))), True, False))
        if missing:
            items.append((i, int(rng.choice(missing)), False, True))
        if absent:
            items.append((i, int(rng.choice(absent)), False, False))
    return items


@torch.no_grad()
def states_of(model, data, split, items, device, batch_size=256):
    """Answer-position states of "is there a {shape}?" for items -> (L + 1, N, D)."""
    out = []
    for k in range(0, len(items), batch_size):
        chunk = items[k:k + batch_size]
        questions = [(exist_question(c[1]), "") for c in chunk]
        b = data.make_batch(split, np.array([c[0] for c in chunk]), questions, device)
        out.append(answer_states(model, b["images"], b["prompt"], b["image_index"]).cpu())
    return torch.cat(out, dim=1)


def layer_report(model, data, device, n_train=2000, n_val=500, seed=0):
    """Per layer: the logit lens's and a linear probe's existence accuracy on val questions, on all of
    them and on those the model's output gets wrong -> {name: [accuracy per layer]}."""
    train_items = existence_items(data.shapes["train"], n_train, 2 * seed)
    val_items = existence_items(data.shapes["val"], n_val, 2 * seed + 1)
    x_train, x_val = states_of(model, data, "train", train_items, device), states_of(model, data, "val",
                                                                                    val_items, device)
    y_train = torch.tensor([c[2] for c in train_items])
    y_val = torch.tensor([c[2] for c in val_items])
    lens = lens_says_yes(model, x_val.to(device)).cpu()  # (L + 1, N)
    wrong = lens[-1] != y_val  # what the model itself says wrong
    partner = torch.tensor([c[3] for c in val_items])
    probe = torch.stack([linear_probe(x_train[l], y_train)(x_val[l]) > 0 for l in range(len(x_val))])
    report = {}
    for name, said in (("lens", lens), ("probe", probe)):
        right = said == y_val  # (L + 1, N)
        report[f"{name}, all"] = right.float().mean(1).tolist()
        report[f"{name}, missing partners"] = right[:, partner].float().mean(1).tolist()
        report[f"{name}, where the output is wrong"] = right[:, wrong].float().mean(1).tolist()
    report["n_wrong"] = int(wrong.sum())
    return report


def plot_layers(report, path):
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for name, accs in report.items():
        if name != "n_wrong":
            ax.plot(accs, "o-" if name.startswith("probe") else "s--", label=name)
    ax.set(xlabel="layer (0 = embeddings)", ylabel="existence accuracy", ylim=(0, 1.02))
    ax.axhline(0.5, color="gray", lw=1, ls=":")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    savefig(fig, path)


# ---------------------------------------------------------------------------------------------
# The map: the prior x perception


PANELS = (("ood_exist", "sight: ood existence", (0.5, 1)),
          ("f1_gap", "POPE F1, random - adversarial", (0, 0.2)),
          ("partner_yes", "yes to a missing partner", (0, 0.5)),
          ("random_absent_yes", "yes to a random absent shape", (0, 0.5)))  # one colour scale a panel


def plot_runs_by_sight(ax, cs, grid):
    """Every run a point: sight against the yes rate to a missing partner (filled) and to a random absent
    shape (x), coloured by co-occurrence, so runs that see alike can be compared across priors."""
    colours = pyplot().cm.plasma(np.linspace(0, 0.85, len(cs)))
    for c, colour in zip(cs, colours):
        runs = []
        for (c2, _), figures in grid.items():
            runs += figures if c2 == c else []
        sight = [f["ood_exist"] for f in runs]
        ax.scatter(sight, [f["partner_yes"] for f in runs], color=colour, label=f"co-occurrence {c}")
        ax.scatter(sight, [f["random_absent_yes"] for f in runs], color=colour, marker="x")
    ax.set(xlabel="sight (ood existence)", ylabel="yes rate: partner (o), random absent (x)",
           title="every run", ylim=(-0.02, 0.6))
    ax.legend()
    ax.grid(alpha=0.3)


def plot_map(cooccur, noise, grid, path):
    """The map. cooccur, noise: the grid's values ("0,0.9"); grid: {(cooccur, noise): [figures per
    seed]} -> heat maps, one per panel, mean over seeds (a cell not yet measured stays blank), and
    every run by its sight: one slide wide (1280 px), its type read from the back of a room."""
    cs, ns = sorted(cooccur.split(","), key=float), sorted(noise.split(","), key=float)
    n = len(PANELS) + 1
    with pyplot().rc_context({"font.size": 13, "legend.fontsize": 11}):
        fig, axes = pyplot().subplots(2, (n + 1) // 2, figsize=(12.8, 8))
        axes = axes.ravel()
        for ax in axes[n:]:
            ax.axis("off")
        plot_runs_by_sight(axes[n - 1], cs, grid)
        for ax, (key, title, (lo, hi)) in zip(axes, PANELS):
            m, spread, n_runs = np.full((len(cs), len(ns)), np.nan), np.zeros((len(cs), len(ns))), {}
            for r, c in np.ndindex(m.shape):  # each cell's mean and spread over its runs
                values = [f[key] for f in grid.get((cs[r], ns[c]), [])]
                n_runs[r, c] = len(values)
                if values:
                    m[r, c], spread[r, c] = np.mean(values), np.std(values)
            ax.imshow(m, cmap="viridis", origin="lower", aspect="auto", vmin=lo, vmax=hi)  # (cooccur, noise)
            for (r, c), v in np.ndenumerate(m):
                if np.isfinite(v):
                    colour = "w" if v < (lo + hi) / 2 else "k"
                    text = f"{v:.2f}" + (f"\n±{spread[r, c]:.2f}" if n_runs[r, c] > 1 else "")
                    ax.text(c, r, text, ha="center", va="center", color=colour)
            ax.set(xticks=range(len(ns)), xticklabels=ns, yticks=range(len(cs)), yticklabels=cs,
                   xlabel="pixel noise", ylabel="co-occurrence", title=title)
        savefig(fig, path)


MAP_COLUMNS = (("ood_exist", "sight", 1, 3), ("pope_random_f1", "POPE F1 random", 100, 1),
               ("pope_adversarial_f1", "F1 adversarial", 100, 1), ("f1_gap", "gap", 100, 1),
               ("partner_yes", "yes to a missing partner (%)", 100, 1),
               ("random_absent_yes", "yes to a random absent shape (%)", 100, 1),
               ("chair_i", "CHAIR_i (%)", 100, 1),
               ("beaf_partner_SB", "BEAF SB, partner removals (%)", 100, 1),
               ("beaf_random_SB", "BEAF SB, other removals (%)", 100, 1))  # key, header, scale, decimals


def map_table(grid):
    """The map as a markdown table: grid {(cooccur, noise): [figures per run]} -> lines, each figure the
    mean ± spread (std) over a cell's runs, or the one value where there is one run."""
    lines = ["| co-occurrence / noise | runs | " + " | ".join(h for _, h, _, _ in MAP_COLUMNS) + " |",
             "|---" * (len(MAP_COLUMNS) + 2) + "|"]
    for (c, n) in sorted(grid, key=lambda cell: (float(cell[0]), float(cell[1]))):
        row = [f"{c} / {n}", str(len(grid[c, n]))]
        for key, _, scale, dec in MAP_COLUMNS:
            v = scale * np.array([f[key] for f in grid[c, n]])
            row.append(f"{v.mean():.{dec}f}" + (f" ± {v.std():.{dec}f}" if len(v) > 1 else ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines

@dataclass
class MapConfig:
    cooccur: str = "0,0.45,0.9"  # the grid: co-occurrence strengths (0.45: the study's bias halved) ...
    noise: str = "0,0.1,0.2,0.4" # ... x pixel noise std (a fraction of 255)
    seeds: int = 1               # training seeds per cell; with --ckpt, evaluation seeds
    max_iters: int = 2000        # every cell's VLM budget, the same for all (the study model's)
    n_scenes: int = 300          # POPE scenes per split, partner questions, BEAF scenes
    config: str = ""             # a config file for every cell's `train.py vlm` (a smaller model, say)
    ckpt: str = ""               # given: BEAF and the layers of this VLM, instead of the map
    out_dir: str = "out-causes"  # where every cell's model and figures, and the map, are kept
    device: str = "auto"         # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps

    def __post_init__(self):
        at_least(self, 1, "seeds", "max_iters", "n_scenes")
        self.ckpt = str(weights_path(self.ckpt)) if self.ckpt else ""  # trained weights by name
        for key in ("cooccur", "noise"):
            given = getattr(self, key)
            try:
                values = [float(v) for v in given.split(",")]
            except ValueError:
                raise UserError(f"--{key}={given}: give numbers separated by commas") from None
            if not all(math.isfinite(v) and v >= 0 and (key == "noise" or v <= 1) for v in values):
                allowed = "[0, 1]" if key == "cooccur" else "0 or more"
                raise UserError(f"--{key}={given}: out of range ({allowed})")
            if len(set(values)) < len(values):
                raise UserError(f"--{key}={given} names a value twice: one model would count as two runs")
        n_eval = vlm_configs([self.config] if self.config else [])[1].n_eval  # a file's keys checked now
        if n_eval < 2:
            raise UserError(f"n_eval={n_eval} in {self.config}: a cell's POPE needs 2 val scenes or more")


def check_cells(map_cfg):
    """Before any cell trains: a cell already in out_dir is reused only if it was made by this recipe."""
    for cooccur, noise, seed in cells(map_cfg):
        path = cell_dir(map_cfg, cooccur, noise, seed) / "ckpt.pt"
        if path.exists():
            model = check_study_checkpoint(path)
            budget = load_checkpoint(path, "vlm")["config"]["train"]["max_iters"]
            recipe = (budget, model["cooccur"], model["noise"])
            if recipe != (map_cfg.max_iters, float(cooccur), float(noise)):
                raise UserError(f"{path.parent} holds a model of another recipe (max_iters={budget}, cooccur="
                                f"{model['cooccur']}, noise={model['noise']}); you asked --max_iters="
                                f"{map_cfg.max_iters}: use another --out_dir, or move that cell")


def cell_dir(map_cfg, cooccur, noise, seed):
    return Path(map_cfg.out_dir) / f"cooccur{cooccur}-noise{noise}-seed{seed}"


def cells(map_cfg):
    """(cooccur, noise, seed) in the order given, the ones already measured first."""
    grid = list(itertools.product(map_cfg.cooccur.split(","), map_cfg.noise.split(","), range(map_cfg.seeds)))
    return sorted(grid, key=lambda cell: not (cell_dir(map_cfg, *cell) / "figures.json").exists())


def train_cell(map_cfg, cooccur, noise, seed):
    """The cell's VLM, trained (or finished) in its folder (a tower's MAE, where a config gives one, is
    shared: out_dir/out-mae)."""
    folder = cell_dir(map_cfg, cooccur, noise, seed)
    args = [*([map_cfg.config] if map_cfg.config else []), f"--cooccur={cooccur}", f"--noise={noise}",
            f"--max_iters={map_cfg.max_iters}", f"--seed={1337 + seed}"]
    train_or_finish(folder, args, f"cell cooccur={cooccur} noise={noise} seed={seed}")
    return folder


@torch.no_grad()
def partner_yes(model, data, n_scenes, device):
    """On val scenes with a trigger whose partner is absent: the 'yes' rate about that partner and about
    a random absent shape that is no partner of anything present -> (partner rate, random rate)."""
    rng = np.random.default_rng(5)
    val, images, asked = data.shapes["val"], [], []
    for i in range(len(val)):
        shapes = set(val.scene(i)[:, 0].tolist())
        missing = [PARTNER[t] for t in shapes if PARTNER[t] not in shapes]
        plain = [s for s in range(len(SHAPES)) if s not in shapes and s not in missing]
        if missing and plain:
            images += [val.images[i]] * 2
            asked += [int(rng.choice(missing)), int(rng.choice(plain))]
        if len(asked) >= 2 * n_scenes:
            break
    said = ask_exists(model, data, np.stack(images), asked, StudyConfig(), device)
    return float(np.mean([a == "yes" for a in said[0::2]])), float(np.mean([a == "yes" for a in said[1::2]]))


def cell_figures(model, data, map_cfg, device):
    study = StudyConfig(n_scenes=min(map_cfg.n_scenes, len(data.shapes["val"]) // 2), seeds=1)
    stats = shape_stats(data.shapes["train"])
    gen = torch.Generator().manual_seed(0)
    pope, _ = pope_run(model, data, "greedy", METHODS["greedy"], study, 0, stats, gen, device)
    out = {"ood_exist": answer_questions(model, data, "ood", device, kinds=("exist",))["all"]}
    out.update({k: v for k, v in pope.items() if "prob" not in k and k.endswith(("accuracy", "f1"))})
    out["f1_gap"] = out["pope_random_f1"] - out["pope_adversarial_f1"]
    out["partner_yes"], out["random_absent_yes"] = partner_yes(model, data, study.n_scenes, device)
    out["chair_i"] = chair_run(model, data, METHODS["greedy"], study, 0, gen, device)["chair_i"]
    edits = beaf_edits(data.shapes["val"], study.n_scenes, 0)
    beaf = beaf_table(beaf_answers(model, data, "val", edits, study, device))
    for kind, figures in beaf.items():
        out.update({f"beaf_{kind}_{k}": v for k, v in figures.items()})
    return out


def measure_cell(map_cfg, folder, device):
    """The cell's figures, from figures.json when it was measured from this very checkpoint."""
    cached = folder / "figures.json"
    stamp = (folder / "ckpt.pt").stat().st_mtime_ns
    try:
        saved = json.loads(cached.read_text()) if cached.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):  # damaged: measured again
        saved = {}
    measured_from = (saved.get("ckpt_mtime_ns"), saved.get("n_scenes")) if isinstance(saved, dict) else None
    if measured_from == (stamp, map_cfg.n_scenes):
        return saved["figures"]
    _, model, cfg, ckpt = load_model("vlm", folder / "ckpt.pt", device)
    data = vlm.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    figures = cell_figures(model, data, map_cfg, device)
    saved = {"n_scenes": map_cfg.n_scenes, "ckpt_mtime_ns": stamp, "figures": figures}
    save_atomic(json.dumps(saved, indent=1), cached)
    return figures


def one_model(map_cfg, device, out_dir):
    """BEAF and the layer reading of one VLM, per evaluation seed -> beaf_layers.json, layers.png (mean)."""
    _, model, cfg, ckpt = load_model("vlm", map_cfg.ckpt, device)
    data = vlm.Data(cfg, seed=ckpt["config"]["train"]["seed"], verbose=False).read_with(ckpt)
    beafs, reports = [], []
    for seed in range(map_cfg.seeds):
        edits = beaf_edits(data.shapes["val"], map_cfg.n_scenes, seed)
        beafs.append(beaf_table(beaf_answers(model, data, "val", edits, StudyConfig(), device)))
        reports.append(layer_report(model, data, device, seed=seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "beaf_layers.json").write_text(json.dumps({"beaf": beafs, "layers": reports}, indent=1))
    mean = {}
    for k in reports[0]:  # each reading's accuracy per layer, averaged over the seeds
        mean[k] = np.mean([r[k] for r in reports], 0).tolist()
    plot_layers(mean, out_dir / "layers.png")
    for kind in beafs[0]:
        cells = []
        for k in beafs[0][kind]:  # a measure's mean and spread over the seeds
            per_seed = [b[kind][k] for b in beafs]
            cells.append(f"{k} {np.mean(per_seed):.3f} ± {np.std(per_seed):.3f}")
        print(f"BEAF {kind:<8}", " | ".join(cells))
    print(f"wrote beaf_layers.json and layers.png to {out_dir}")
    return 0


def main(argv):
    if "-h" in argv or "--help" in argv:
        return usage(__doc__.split("\n\n")[0] + "\n" + config_help(MapConfig), argv)
    given = parse_overrides(argv, MapConfig)
    map_cfg = MapConfig(**given)
    device, out_dir = pick_device(map_cfg.device), Path(map_cfg.out_dir)
    check_writable(out_dir)
    if map_cfg.ckpt:
        unused = [k for k in ("cooccur", "noise", "max_iters", "config") if k in given]
        if unused:
            raise UserError(f"--{unused[0]} shapes the map's cells; with --ckpt there is no map to train")
        check_study_checkpoint(map_cfg.ckpt)
        return one_model(map_cfg, device, out_dir)
    check_cells(map_cfg)
    grid, t0 = {}, time.time()
    for cooccur, noise, seed in cells(map_cfg):
        folder = train_cell(map_cfg, cooccur, noise, seed)
        f = measure_cell(map_cfg, folder, device)
        grid.setdefault((cooccur, noise), []).append(f)
        print(f"cell cooccur={cooccur} noise={noise} seed={seed}: sight {f['ood_exist']:.3f} | POPE F1 "
              f"random {f['pope_random_f1']:.3f} adversarial {f['pope_adversarial_f1']:.3f} | partner "
              f"yes {f['partner_yes']:.3f} vs random {f['random_absent_yes']:.3f}", flush=True)
        # the map so far, after every cell: a long grid stopped midway leaves what it measured
        (out_dir / "map.json").write_text(json.dumps({"config": asdict(map_cfg), "cells": {
            f"{c},{n}": v for (c, n), v in grid.items()}}, indent=1))
        plot_map(map_cfg.cooccur, map_cfg.noise, grid, out_dir / "map.png")
    print("\n".join(map_table(grid)))
    print(f"wrote map.json and map.png to {out_dir} in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    cli(main)
