"""The shapes world: a CLEVR in miniature that every idea trains on offline.

A scene is 1 to `max_objects` coloured shapes placed on the cells of a `grid` x `grid` layout of a
square canvas, drawn with pillow at 4x and box-filtered down (antialiased, and the background stays
exactly uniform, so no ringing turns into a target for MAE's per-patch normalised loss). Each scene
is a pure function of (seed, split, index): the same pixels, caption and questions whatever the
batch order, the number of workers or the DDP rank.

The world carries a language prior on purpose, the raw material of object hallucination: shape
frequencies are skewed (`skew`) and some shapes pull in a partner (`cooccur`: a circle brings a
square, a triangle a star, a diamond a cross). The `ood` split draws scenes with both biases
broken, so a model that leans on the prior instead of the pixels shows it there.
"""
import functools
import hashlib
import json
import multiprocessing
import os
import re
import signal
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data import checked_cache, write_manifest

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {"red": (220, 50, 47), "green": (60, 180, 75), "blue": (45, 100, 230),
           "yellow": (235, 205, 40), "purple": (150, 70, 200), "cyan": (40, 200, 210)}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
PARTNER = {0: 1, 1: 0, 2: 4, 4: 2, 3: 5, 5: 3}  # circle<->square, triangle<->star, diamond<->cross
SPLITS = {"train": 0, "val": 1, "test": 2, "ood": 3}
BACKGROUND = (24, 24, 32)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CACHE_DIR = Path(__file__).parent / "cache"


@dataclass(frozen=True)
class World:
    img_size: int = 64
    grid: int = 3
    max_objects: int = 4
    skew: float = 0.5      # shape k is drawn with weight 1/(k+1)**skew; 0 = uniform
    cooccur: float = 0.5   # chance that a new object is the partner of a shape already present
    seed: int = 0
    noise: float = 0.0     # the perception knob, pixels only: Gaussian noise std, a fraction of 255

    def for_split(self, split):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        return replace(self, skew=0.0, cooccur=0.0) if split == "ood" else self


def position_name(cell, grid=3):
    row, col = divmod(cell, grid)
    rows = ("top", "middle", "bottom") if grid == 3 else [f"row {r + 1}" for r in range(grid)]
    cols = ("left", "center", "right") if grid == 3 else [f"column {c + 1}" for c in range(grid)]
    if grid == 3 and row == 1:
        return "center" if col == 1 else cols[col]
    if grid == 3 and col == 1:
        return rows[row]
    return f"{rows[row]} {cols[col]}"


def sample_scene(world, split, index):
    """-> int array (n, 4): one row (shape, colour, size, cell) per object, in reading order."""
    w = world.for_split(split)
    rng = np.random.default_rng([w.seed, SPLITS[split], index])
    n = int(rng.integers(1, w.max_objects + 1))
    p = 1.0 / np.arange(1, len(SHAPES) + 1) ** w.skew
    p /= p.sum()
    shapes = []
    for _ in range(n):
        partners = [PARTNER[s] for s in shapes if PARTNER[s] not in shapes]
        if partners and rng.random() < w.cooccur:
            shapes.append(partners[0])
        else:
            shapes.append(int(rng.choice(len(SHAPES), p=p)))
    cells = rng.choice(w.grid * w.grid, size=n, replace=False)
    colours = rng.integers(0, len(COLOURS), size=n)
    sizes = rng.integers(0, len(SIZES), size=n)
    objs = np.stack([np.array(shapes), colours, sizes, cells], axis=1)
    return objs[np.argsort(objs[:, 3])]


def _outline(shape, cx, cy, r):
    if shape == "square":
        r *= 0.82
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.93 * r, cy + 0.75 * r), (cx - 0.93 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + rad * np.cos(a), cy - rad * np.sin(a)))
    if shape == "cross":
        t = 0.33 * r
        pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r),
               (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(shape)


def render(world, objs, scale=4):
    """-> uint8 (H, W, 3): the scene drawn at `scale`x and box-filtered down."""
    S = world.img_size * scale
    img = Image.new("RGB", (S, S), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = S / world.grid
    for shape, colour, size, pos in objs.tolist():
        row, col = divmod(pos, world.grid)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = cell * (0.46 if size == 1 else 0.3)
        fill = COLOURS[COLOUR_NAMES[colour]]
        if SHAPES[shape] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_outline(SHAPES[shape], cx, cy, r), fill=fill)
    return np.asarray(img.resize((world.img_size,) * 2, Image.BOX))


def describe(obj):
    shape, colour, size, _ = obj
    return f"{SIZES[size]} {COLOUR_NAMES[colour]} {SHAPES[shape]}"


def join_words(parts):
    """['a', 'b', 'c'] -> 'a, b and c'"""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(objs):
    """'a large red circle, a small blue square and a large green triangle' (reading order)."""
    return join_words([f"a {describe(o)}" for o in objs.tolist()])


def exist_question(shape):
    """POPE's question, in the world's words: shape index -> 'is there a circle?'"""
    return f"is there a {SHAPES[shape]}?"


CAPTION_RE = re.compile(r"\b(?:(small|large) )?(?:(%s) )?(%s)\b" % ("|".join(COLOUR_NAMES),
                                                                    "|".join(SHAPES)))


def parse_caption(text):
    """Caption text -> [(size, colour, shape)] as indices, one per shape word; a size or colour the
    text leaves out is -1. The inverse of caption() on its own output, and lenient with a model's."""
    out = []
    for size, colour, shape in CAPTION_RE.findall(text.lower()):
        out.append((SIZES.index(size) if size else -1, COLOUR_NAMES.index(colour) if colour else -1,
                    SHAPES.index(shape)))
    return out


def object_match(said, objs):
    """-> (true positives, objects said, objects present): a said object counts as right when a
    not-yet-matched object of the scene has its shape and whatever size and colour it names."""
    left = [tuple(o) for o in objs[:, [2, 1, 0]].tolist()]  # (size, colour, shape)
    tp = 0
    for size, colour, shape in said:
        hit = next((o for o in left if o[2] == shape and size in (-1, o[0]) and colour in (-1, o[1])), None)
        if hit:
            left.remove(hit)
            tp += 1
    return tp, len(said), len(objs)


def questions(world, split, index, objs):
    """-> list of (kind, question, answer); existence questions are balanced yes/no."""
    rng = np.random.default_rng([world.seed, SPLITS[split], index, 1])
    shapes, colours = objs[:, 0].tolist(), objs[:, 1].tolist()
    absent = [s for s in range(len(SHAPES)) if s not in shapes]
    qa = []
    if rng.random() < 0.5 or not absent:
        qa.append(("exist", exist_question(int(rng.choice(shapes))), "yes"))
    else:
        qa.append(("exist", exist_question(int(rng.choice(absent))), "no"))
    unique_shape = [o for o in objs.tolist() if shapes.count(o[0]) == 1]
    if unique_shape:
        o = unique_shape[int(rng.integers(len(unique_shape)))]
        qa.append(("colour", f"what colour is the {SHAPES[o[0]]}?", COLOUR_NAMES[o[1]]))
        o = unique_shape[int(rng.integers(len(unique_shape)))]
        qa.append(("position", f"where is the {SHAPES[o[0]]}?", position_name(o[3], world.grid)))
    unique_colour = [o for o in objs.tolist() if colours.count(o[1]) == 1]
    if unique_colour:
        o = unique_colour[int(rng.integers(len(unique_colour)))]
        qa.append(("shape", f"what shape is the {COLOUR_NAMES[o[1]]} object?", SHAPES[o[0]]))
    if rng.random() < 0.5:
        qa.append(("count", "how many objects are there?", NUMBERS[len(objs)]))
    else:
        s = int(rng.integers(len(SHAPES)))
        qa.append(("count", f"how many {SHAPES[s]}s are there?", NUMBERS[shapes.count(s)]))
    return qa


def cell_box(world, cell):
    """The pixel rows and columns of a grid cell -> (slice, slice)."""
    row, col = divmod(cell, world.grid)
    edges = np.rint(np.linspace(0, world.img_size, world.grid + 1)).astype(int)
    return slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])


@functools.lru_cache(maxsize=4)
def templates(world):
    """Every object the world can draw, alone in each cell -> (objects (1 + K, 3) as (shape, colour,
    size) with row 0 = empty, and per cell its crops (1 + K, h*w*3) float: cells differ by a pixel)."""
    kinds = [(-1, -1, -1)]  # (shape, colour, size); nothing first
    for shape in range(len(SHAPES)):
        for colour in range(len(COLOURS)):
            kinds += [(shape, colour, size) for size in range(len(SIZES))]
    crops = []
    for cell in range(world.grid ** 2):
        box = cell_box(world, cell)
        row = []
        for shape, colour, size in kinds:
            objs = np.array([[shape, colour, size, cell]]) if shape >= 0 else np.zeros((0, 4), int)
            row.append(render(world, objs)[box].astype(np.float32).ravel())
        crops.append(np.stack(row))
    return np.array(kinds), crops


def read_scene(world, img):
    """The world's own reader: uint8 (H, W, 3) -> (objects (n, 4) in reading order as sample_scene gives
    them, each cell's squared distance to its nearest template per pixel value (cells,)). Each cell is read
    as the object (or emptiness) whose picture alone in that cell is nearest: exact on the world's own
    scenes, whose objects never leave their cells; on a generated picture, the distance says how far
    the nearest reading is from anything the world draws."""
    kinds, crops = templates(world)
    objs, dist = [], []
    for cell in range(world.grid ** 2):
        crop = np.asarray(img)[cell_box(world, cell)].astype(np.float32).ravel()
        d = ((crops[cell] - crop) ** 2).mean(1)  # (1 + K,)
        best = int(d.argmin())
        dist.append(d[best])
        if best:
            objs.append([*kinds[best], cell])
    return np.array(objs, dtype=int).reshape(-1, 4), np.array(dist)


NEGATIVES = ("add_random", "add_popular", "add_partner", "remove", "swap_colours", "swap_positions")


def negative(kind, objs, rng, popular, grid=3):
    """A scene's objects edited the one way `kind` names -> the edited objects in reading order, or None
    where the scene allows no such edit. The edit's caption is a hard negative of the scene's caption:
      add_random, add_popular, add_partner: an object of a shape the scene lacks joins it on an empty cell
        (a random absent shape; the absent shape most frequent in training, `popular` listing the shapes
        most frequent first; the partner of a shape present), its colour and size drawn;
      remove: one object leaves (scenes of two or more);
      swap_colours: two objects of different colours exchange them;
      swap_positions: two objects that read differently exchange cells, so that the caption, in reading
        order, names them the other way round: the same words, rearranged."""
    objs = np.asarray(objs).copy()
    n, present = len(objs), objs[:, 0].tolist()
    absent = [s for s in range(len(SHAPES)) if s not in present]
    if kind in ("add_random", "add_popular", "add_partner"):
        candidates = {"add_random": absent, "add_popular": [s for s in popular if s in absent][:1],
                      "add_partner": [PARTNER[s] for s in present if PARTNER[s] in absent][:1]}[kind]
        empty = [c for c in range(grid * grid) if c not in objs[:, 3]]
        if not candidates or not empty:
            return None
        new = [int(rng.choice(candidates)), int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES))),
               int(rng.choice(empty))]
        objs = np.concatenate([objs, np.array([new], dtype=objs.dtype)])
    elif kind == "remove":
        if n < 2:
            return None
        objs = np.delete(objs, int(rng.integers(n)), axis=0)
    elif kind in ("swap_colours", "swap_positions"):
        column, differ = (1, [1]) if kind == "swap_colours" else (3, [0, 1, 2])
        pairs = []  # (i, j) that differ in what the swap exchanges
        for i in range(n):
            pairs += [(i, j) for j in range(i + 1, n) if (objs[i, differ] != objs[j, differ]).any()]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        objs[[i, j], column] = objs[[j, i], column]
    else:
        raise ValueError(f"unknown negative {kind!r}; choose from {', '.join(NEGATIVES)}")
    return objs[np.argsort(objs[:, 3], kind="stable")]


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops, workers don't print tracebacks


def add_noise(world, split, index, img):
    """The scene's own noise (seeded by its index, so an edited re-render gets the same grain)."""
    if not world.noise:
        return img
    rng = np.random.default_rng([world.seed, SPLITS[split], index, 2])
    noisy = img + rng.normal(0.0, world.noise * 255, img.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_scene(world, split, index, objs):
    """Pixels of scene `index` of `split` showing `objs` (its own, or an edit of them)."""
    return add_noise(world, split, index, render(world, objs))


def _scene(world, split, index):
    objs = sample_scene(world, split, index)
    return render_scene(world, split, index, objs), objs


class ShapesSplit:
    """A rendered split held as uint8 arrays, cached on disk (memmap) on first use.

    images: (N, H, W, 3) uint8; objects: (N, max_objects, 4) int16, rows of -1 after the last object.
    """

    def __init__(self, world, split, n, cache_dir=CACHE_DIR, verbose=True):
        self.world, self.split, self.n = world, split, n
        world.for_split(split)  # validates the split name
        key = hashlib.sha1(json.dumps([asdict(world), split, n, 2]).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"shapes_{split}_{n}_{key}"
        checked_cache(path.with_suffix(".manifest.json"), lambda: self._build(path, verbose),
                      f"shapes/{split} ({path.name})", verbose)
        self.images = np.load(path.with_suffix(".img.npy"), mmap_mode="r")
        self.objects = np.load(path.with_suffix(".obj.npy"))

    def _build(self, path, verbose):
        w = self.world
        imgs = np.empty((self.n, w.img_size, w.img_size, 3), np.uint8)
        objs = np.full((self.n, w.max_objects, 4), -1, np.int16)
        workers = min(os.cpu_count() or 1, 8) if self.n >= 4000 else 1
        with multiprocessing.Pool(workers, _ignore_sigint) if workers > 1 else nullcontext() as pool:
            work = partial(_scene, w, self.split)
            scenes = pool.imap(work, range(self.n), chunksize=64) if pool else map(work, range(self.n))
            for i, (img, o) in enumerate(scenes):
                imgs[i], objs[i, :len(o)] = img, o
                if verbose and (i + 1) % 5000 == 0:
                    print(f"rendering shapes/{self.split}: {i + 1}/{self.n}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        files = []
        for arr, suffix in ((imgs, ".img.npy"), (objs, ".obj.npy")):
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # atomic: ranks may race here
            try:
                np.save(tmp, arr)
                os.replace(tmp, path.with_suffix(suffix))
            finally:
                tmp.unlink(missing_ok=True)
            files.append(path.with_suffix(suffix))
        write_manifest(path.with_suffix(".manifest.json"), files)

    def __len__(self):
        return self.n

    def scene(self, i):
        o = self.objects[i]
        return o[o[:, 0] >= 0]

    def presence(self, column, k):
        """-> float (N, k): multi-hot of which shapes (column 0) or colours (column 1) appear."""
        out = np.zeros((self.n, k), np.float32)
        rows, slots = np.nonzero(self.objects[:, :, 0] >= 0)
        out[rows, self.objects[rows, slots, column]] = 1
        return out
