"""How object hallucination is measured, with the shapes world's exact truth: POPE and CHAIR.

    POPE (Li et al. 2023)        "is there a {shape}?", half about present shapes, half about absent
                                 ones drawn at random, among the most frequent (popular), or among
                                 those that co-occur most with what is present (adversarial).
    CHAIR (Rohrbach et al. 2018) shapes a caption names that are not in the scene, per mention
                                 (CHAIR_i) and per caption (CHAIR_s), beside object recall; compared
                                 at one fixed caption length, so no method wins by saying less.
`hallucination.py` runs them for every decoding method; the functions here only count.
"""
import numpy as np

from common import f1
from data.shapes import SHAPES, object_match, parse_caption

POPE_SPLITS = ("random", "popular", "adversarial")


def shape_stats(shapes_split):
    """From a split's scenes: shape frequency (6,) and P(shape b present | shape a present) (6, 6)."""
    objs = shapes_split.objects[:, :, 0]  # (N, max_objects), -1 = none
    present = np.stack([(objs == s).any(1) for s in range(len(SHAPES))], 1).astype(np.float64)  # (N, 6)
    freq = present.mean(0)
    cooc = (present.T @ present) / np.maximum(present.sum(0)[:, None], 1)  # (6, 6): row a, column b
    return freq, cooc


def pope_questions(shapes_split, split, n_scenes, seed, freq, cooc):
    """-> [(scene, shape, label)], one present and one absent shape per scene: exactly half 'yes'."""
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split)])
    scenes = rng.choice(len(shapes_split), size=n_scenes, replace=False)
    out = []
    for i in scenes.tolist():
        shapes = sorted(set(shapes_split.scene(i)[:, 0].tolist()))
        absent = [s for s in range(len(SHAPES)) if s not in shapes]
        if not absent:
            continue
        if split == "random":
            no = int(rng.choice(absent))
        elif split == "popular":
            no = max(absent, key=freq.__getitem__)
        else:  # the absent shape that co-occurs most with those present
            no = max(absent, key=cooc[shapes].max(0).__getitem__)
        out += [(i, int(rng.choice(shapes)), "yes"), (i, no, "no")]
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
