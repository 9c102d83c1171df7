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

from data.shapes import SHAPES, object_match, parse_caption
from lib.common import f1

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
        grams = set()  # every run of 1 to `longest` words
        for n in range(1, longest + 1):
            grams |= {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
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
