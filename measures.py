"""How object hallucination is measured, with the shapes world's exact truth: POPE and CHAIR.

    POPE (Li et al. 2023)        "is there a {shape}?", half about present shapes, half about absent
                                 ones drawn at random, among the most frequent (popular), or among
                                 those that co-occur most with what is present (adversarial).
    CHAIR (Rohrbach et al. 2018) shapes a caption names that are not in the scene, per mention
                                 (CHAIR_i) and per caption (CHAIR_s), beside object recall; compared
                                 at one fixed caption length, so no method wins by saying less.
`hallucination.py` runs them for every decoding method; the functions here only count. Below them,
what `train.py vlm` reports of a trained VLM (vlm.evaluate and vlm.monitor): questions, captions,
and attribute words with the real image against a blank canvas (the language prior alone); and
plot_runs, runs of `train.py vlm` side by side (`python vlm.py RUN ... PNG`).
"""
import json
from pathlib import Path

import numpy as np
import torch

from checkpoints import load_checkpoint
from common import f1, pyplot, savefig
from data.pairs import CAPTION_PROMPT, blank_like, row_images
from data.shapes import COLOUR_NAMES, SHAPES, SIZES, caption, object_match, parse_caption, questions
from mlm import word_mask

POPE_SPLITS = ("random", "popular", "adversarial")


def object_stats(sets, n_vocab):
    """Each image's objects (sets of vocabulary indices; None = not annotated) -> each object's frequency
    (V,) and P(object b present | object a present) (V, V)."""
    present = np.zeros((len(sets), n_vocab))
    for i, objs in enumerate(sets):
        present[i, list(objs or ())] = 1
    freq = present.mean(0)
    cooc = (present.T @ present) / np.maximum(present.sum(0)[:, None], 1)  # (V, V): row a, column b
    return freq, cooc


def shape_stats(shapes_split):
    """The shapes world's: shape frequency (6,) and co-occurrence (6, 6) over a split's scenes."""
    return object_stats([set(shapes_split.scene(i)[:, 0].tolist()) for i in range(len(shapes_split))],
                        len(SHAPES))


def pope_questions(sets, split, n_scenes, seed, freq, cooc):
    """-> [(image, object, label)], one present and one absent object per image: exactly half 'yes'.
    sets: each image's objects (vocabulary indices; None = not annotated, never asked about)."""
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split)])
    pool = np.array([i for i, objs in enumerate(sets) if objs])
    scenes = pool[rng.choice(len(pool), size=min(n_scenes, len(pool)), replace=False)]
    out = []
    for i in scenes.tolist():
        present = sorted(sets[i])
        absent = [o for o in range(len(freq)) if o not in present]
        if not absent:
            continue
        if split == "random":
            no = int(rng.choice(absent))
        elif split == "popular":
            no = max(absent, key=freq.__getitem__)
        else:  # the absent object that co-occurs most with those present
            no = max(absent, key=cooc[present].max(0).__getitem__)
        out += [(i, int(rng.choice(present)), "yes"), (i, no, "no")]
    return out


def pope_metrics(labels, answers):
    """labels, answers: lists of 'yes'/'no' (answers may hold None: unparsable, counted as not 'yes')."""
    tp = sum(lab == "yes" and a == "yes" for lab, a in zip(labels, answers))
    fp = sum(lab == "no" and a == "yes" for lab, a in zip(labels, answers))
    fn = sum(lab == "yes" and a != "yes" for lab, a in zip(labels, answers))
    n = len(labels)
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return {"accuracy": sum(lab == a for lab, a in zip(labels, answers)) / n, "precision": p, "recall": r,
            "f1": f1(p, r), "yes_ratio": sum(a == "yes" for a in answers) / n,
            "unparsable": sum(a is None for a in answers)}


def parse_yes_no(text):
    """Strict: 'yes' or 'no' only as the first word, else None (never silently a yes)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return words[0] if words and words[0] in ("yes", "no") else None


def pope_rule(text):
    """POPE's own reading of an answer (RUCAIBox/POPE evaluate.py): the first sentence, commas
    dropped, is 'no' if 'No', 'no' or 'not' is one of its words, else 'yes' (so an empty or
    unrelated answer counts as yes). Reported beside the strict parse, so figures compare with papers."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def chair(captions, scenes):
    """captions: texts; scenes: object arrays. -> CHAIR_i, CHAIR_s, recall (shapes as the objects;
    a shape said twice where there is one counts one hallucination)."""
    mentions = hallucinated = bad_captions = hits = n_objects = 0
    for text, objs in zip(captions, scenes):
        said = [(-1, -1, shape) for _, _, shape in parse_caption(text)]
        tp, n_said, n_true = object_match(said, objs)
        mentions, hallucinated = mentions + n_said, hallucinated + n_said - tp
        bad_captions += n_said > tp
        hits, n_objects = hits + tp, n_objects + n_true
    return {"chair_i": hallucinated / max(1, mentions), "chair_s": bad_captions / max(1, len(captions)),
            "recall": hits / max(1, n_objects)}


def chair_words(captions, sets, vocab, synonyms=None):
    """CHAIR over a vocabulary of objects (a user's folder): an object is mentioned when its name, or a
    word synonyms.json maps to it, appears as words of the caption (exact match, as the CHAIR code has
    for COCO); each object counts once per caption."""
    names = {w.lower(): k for k, w in enumerate(vocab)}
    names.update({w.lower(): vocab.index(o) for w, o in (synonyms or {}).items()})
    longest = max(len(n.split()) for n in names)
    mentions = hallucinated = bad_captions = hits = n_objects = 0
    for text, present in zip(captions, sets):
        words = [w.strip(",.;:!?\"'()") for w in text.lower().split()]
        grams = {" ".join(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}
        said = {names[g] for g in grams if g in names}
        mentions, hallucinated = mentions + len(said), hallucinated + len(said - present)
        bad_captions += bool(said - present)
        hits, n_objects = hits + len(said & present), n_objects + len(present)
    return {"chair_i": hallucinated / max(1, mentions), "chair_s": bad_captions / max(1, len(captions)),
            "recall": hits / max(1, n_objects)}


def chair_of(data, split, idx, captions):
    """CHAIR for the captions of images idx: the shapes world's (shapes, counted with multiplicity),
    or a folder's (its objects' names)."""
    if data.cfg.dataset == "folder":
        sets = data.objects(split)
        return chair_words(captions, [sets[i] for i in idx], data.vocab, data.synonyms)
    return chair(captions, [data.shapes[split].scene(i) for i in idx])


def marked(text, objs):
    """The caption with every hallucinated shape word marked [like this✗]."""
    present = objs[:, 0].tolist()
    words = []
    for w in text.split():
        shape = w.strip(",.").lower()
        if shape in SHAPES and SHAPES.index(shape) in present:
            present.remove(SHAPES.index(shape))
        elif shape in SHAPES:
            w = f"[{w.strip(',.')}✗]" + ("," if w.endswith(",") else "")
        words.append(w)
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# What the VLM can do: questions, captions, and how much of it comes from the image

@torch.no_grad()
def answer_questions(model, data, split, device, batch_size=256, n_scenes=None, kinds=None):
    """Every question (of `kinds`) of the split's first n_scenes held-out scenes, answered greedily
    -> {kind: accuracy, 'all': accuracy}."""
    items = [(i, kind, q, a) for i in range(min(n_scenes or 10 ** 9, len(data.shapes[split])))
             for kind, q, a in questions(data.world, split, i, data.shapes[split].scene(i))
             if kinds is None or kind in kinds]
    right, total = {}, {}
    for k in range(0, len(items), batch_size):
        chunk = items[k:k + batch_size]
        b = data.make_batch(split, np.array([c[0] for c in chunk]), [(c[2], c[3]) for c in chunk], device)
        out = model.generate(row_images(b), b["prompt"], max_new_tokens=6)
        for (_, kind, _, a), said in zip(chunk, model.texts(out)):
            right[kind] = right.get(kind, 0) + (said == a)
            total[kind] = total.get(kind, 0) + 1
    acc = {kind: right[kind] / total[kind] for kind in sorted(total)}
    acc["all"] = sum(right.values()) / sum(total.values())
    return acc


@torch.no_grad()
def caption_scores(model, data, split, device, batch_size=250, max_new_tokens=40):
    """Greedy captions of the split's held-out scenes -> object precision, recall, F1, exact match."""
    tp = n_said = n_true = exact = 0
    n = len(data.shapes[split])
    for k in range(0, n, batch_size):
        idx = np.arange(k, min(n, k + batch_size))
        b = data.make_batch(split, idx, [(CAPTION_PROMPT, "")] * len(idx), device)
        out = model.generate(row_images(b), b["prompt"], max_new_tokens)
        for i, text in zip(idx, model.texts(out)):
            objs = data.shapes[split].scene(i)
            t, s, g = object_match(parse_caption(text), objs)
            tp, n_said, n_true, exact = tp + t, n_said + s, n_true + g, exact + (text == caption(objs))
    p, r = tp / max(1, n_said), tp / max(1, n_true)
    return {"precision": p, "recall": r, "f1": f1(p, r), "exact": exact / n}


@torch.no_grad()
def attribute_accuracy(model, data, split, device, blank=False, batch_size=250):
    """Accuracy on the caption's attribute words (shapes, colours, sizes): teacher-forced for the
    prefix-LM, BERT-masked for the mlm objective. blank=True shows the empty canvas instead: what
    the language prior alone gets right."""
    is_attr = word_mask(model.tok, {*SHAPES, *COLOUR_NAMES, *SIZES}, device)
    right = total = 0
    n = len(data.shapes[split])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for k in range(0, n, batch_size):
            idx = np.arange(k, min(n, k + batch_size))
            pairs = [(CAPTION_PROMPT, caption(data.shapes[split].scene(i))) for i in idx]
            b = data.make_batch(split, idx, pairs, device)
            images = blank_like(b["images"]) if blank else b["images"]
            prompt, answer = b["prompt"], b["answer"]
            if model.cfg.objective == "mlm":  # mask exactly the attribute words, so every one is asked
                inputs = answer.masked_fill(is_attr[answer], model.tok.mask_id)
                pred = model.fill(images, prompt, inputs, b["image_index"]).argmax(-1)
            else:
                pred = model.answer_logits(images, prompt, answer, b["image_index"]).argmax(-1)
            sel = is_attr[answer]
            right += ((pred == answer) & sel).sum().item()
            total += sel.sum().item()
    return right / max(1, total)


@torch.no_grad()
def folder_scores(model, data, device, n=200):
    """A user's folder: greedy answers to the first n held-out images' texts against theirs ->
    exact-match accuracy of captions and of answers."""
    rows, pairs = [], []
    for i, r in enumerate(data.records["val"][:n]):
        rows += [i] * len(data.texts(r))
        pairs += data.texts(r)
    said = []
    for k in range(0, len(pairs), 256):
        b = data.make_batch("val", np.array(rows[k:k + 256]), [(p, "") for p, _ in pairs[k:k + 256]], device)
        said += model.texts(model.generate(row_images(b), b["prompt"], max_new_tokens=40))
    right = [s.strip(" .").lower() == a.strip(" .").lower() for s, (_, a) in zip(said, pairs)]
    is_caption = [p == CAPTION_PROMPT for p, _ in pairs]
    out = {}
    for name, keep in (("caption", is_caption), ("answer", [not c for c in is_caption])):
        if any(keep):
            out[f"val_{name}_exact"] = float(np.mean([r for r, k in zip(right, keep) if k]))
    return out


def evaluate(model, data, device):
    """Questions and captions on held-out val (biased) and ood (bias broken) scenes, and how much
    the model uses its eyes: attribute words with the real image vs a blank one. A user's folder:
    folder_scores."""
    model.eval()
    out = {}
    if model.cfg.dataset == "folder" and model.cfg.objective == "prefix":
        out = folder_scores(model, data, device)
    for split in ("val", "ood") if model.cfg.dataset == "shapes" else ():
        if model.cfg.objective == "prefix":
            for k, v in answer_questions(model, data, split, device).items():
                out[f"{split}_q_{k}"] = v
            for k, v in caption_scores(model, data, split, device).items():
                out[f"{split}_caption_{k}"] = v
        out[f"{split}_attr_acc_image"] = attribute_accuracy(model, data, split, device)
        out[f"{split}_attr_acc_blank"] = attribute_accuracy(model, data, split, device, blank=True)
    model.train()
    return out


@torch.no_grad()
def monitor(model, data, device, n_scenes=200):
    """Sight, cheaply, at every evaluation: the existence question of each of the first n_scenes `ood`
    scenes (balanced yes/no; the world's bias cannot help there) -> {'ood_exist': accuracy}."""
    if model.cfg.objective != "prefix" or model.cfg.dataset == "folder":
        return {}
    model.eval()
    acc = answer_questions(model, data, "ood", device, n_scenes=n_scenes, kinds=("exist",))["all"]
    model.train()
    return {"ood_exist": acc}


def plot_runs(out_dirs, path):
    """Runs of `train.py vlm` side by side -> a PNG: val loss against iteration and, for runs that
    logged it, `ood` existence accuracy against wall-clock seconds, the MAE's training time included
    for a tower started from one (its metrics.json)."""
    fig, (loss_ax, sight_ax) = pyplot().subplots(1, 2, figsize=(11, 4))
    for d in out_dirs:
        ckpt = load_checkpoint(Path(d) / "ckpt.pt", "vlm")
        loss_ax.plot(*zip(*ckpt["history"]["val"]), "o-", ms=3, label=Path(d).name)
        init = ckpt["config"]["model"]["init_vision"]
        start, mae_metrics = 0, Path(init).parent / "metrics.json"  # seconds the MAE took first
        if init not in ("", "none", "auto") and mae_metrics.is_file():
            start = json.loads(mae_metrics.read_text())["train_seconds"]
        sight = [(start + m["seconds"], m["ood_exist"]) for m in ckpt["history"].get("monitor", [])
                 if m["iter"] > 0]  # at iteration 0 the model answers neither yes nor no
        if sight:
            sight_ax.plot(*zip(*sight), "o-", ms=3, label=Path(d).name + (" (MAE first)" if start else ""))
    loss_ax.set(xlabel="iteration", ylabel="val loss", yscale="log")
    sight_ax.set(xlabel="wall-clock seconds, pretraining included", ylabel="ood existence accuracy")
    sight_ax.axhline(0.97, color="gray", ls=":", lw=1)  # the target; 0.5 is chance
    for ax in (loss_ax, sight_ax):
        ax.grid(alpha=0.3)
        if ax.lines[1:] or ax is loss_ax:
            ax.legend(fontsize=8)
    savefig(fig, path)


PANELS = (("ood_exist", "sight: ood existence", (0.5, 1)),
          ("f1_gap", "POPE F1, random - adversarial", (0, 0.2)),
          ("partner_yes", "yes to a missing partner", (0, 0.5)),
          ("random_absent_yes", "yes to a random absent shape", (0, 0.5)))  # one colour scale a panel


def plot_runs_by_sight(ax, cs, grid):
    """Every run a point: sight against the yes rate to a missing partner (filled) and to a random absent
    shape (x), coloured by co-occurrence, so runs that see alike can be compared across priors."""
    colours = pyplot().cm.plasma(np.linspace(0, 0.85, len(cs)))
    for c, colour in zip(cs, colours):
        runs = [f for (c2, _), fs in grid.items() if c2 == c for f in fs]
        sight = [f["ood_exist"] for f in runs]
        ax.scatter(sight, [f["partner_yes"] for f in runs], color=colour, label=f"co-occurrence {c}")
        ax.scatter(sight, [f["random_absent_yes"] for f in runs], color=colour, marker="x")
    ax.set(xlabel="sight (ood existence)", ylabel="yes rate: partner (o), random absent (x)",
           title="every run", ylim=(-0.02, 0.6))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_map(cooccur, noise, grid, path):
    """causes.py's map. cooccur, noise: the grid's values ("0,0.9"); grid: {(cooccur, noise): [figures per
    seed]} -> heat maps, one per panel, mean over seeds (a cell not yet measured stays blank), and
    every run by its sight."""
    cs, ns = sorted(cooccur.split(","), key=float), sorted(noise.split(","), key=float)
    fig, axes = pyplot().subplots(1, len(PANELS) + 1, figsize=(4.2 * (len(PANELS) + 1), 3.6))
    plot_runs_by_sight(axes[-1], cs, grid)
    for ax, (key, title, (lo, hi)) in zip(axes, PANELS):
        runs = [[[f[key] for f in grid.get((c, n), [{key: np.nan}])] for n in ns] for c in cs]
        m = np.array([[np.mean(v) for v in row] for row in runs])
        spread = [[np.std(v) for v in row] for row in runs]
        ax.imshow(m, cmap="viridis", origin="lower", aspect="auto", vmin=lo, vmax=hi)  # (cooccur, noise)
        for (r, c), v in np.ndenumerate(m):
            if np.isfinite(v):
                colour = "w" if v < (lo + hi) / 2 else "k"
                text = f"{v:.2f}" + (f"\n±{spread[r][c]:.2f}" if len(runs[r][c]) > 1 else "")
                ax.text(c, r, text, ha="center", va="center", color=colour, fontsize=8)
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
