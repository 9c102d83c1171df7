"""Photos on the shapes world's grid: `python -m data.compose OBJECTS BACKGROUNDS DIR [--key=value ...]`.

A folder of real pictures whose truth is known, made from any photos: each image in OBJECTS is one
object, named by its file name ("coffee_cup.png" is a coffee cup); each scene pastes one to
`max_objects` of them, small or large, into distinct cells of a 3 x 3 grid over a random crop of a
photo from BACKGROUNDS, and writes its caption ("a large cat at the top left and a small rocket at the
center"), its objects and its questions ("is there a ...?" about one present and one absent object,
"where is the ...?") as `data/captioned.py` reads them. docs/own-data.md measures with it how many
real images a folder needs before the VLM's held-out figures mean something.
"""
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from data.captioned import MIN_IMAGES
from data.export import written_folder
from data.shapes import join_words, position_name
from lib.common import UserError, at_least
from lib.config import cli, config_help, parse_overrides, usage

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ComposeConfig:
    n_train: int = 4000          # training scenes
    n_val: int = 500             # held-out scenes (written with "split": "val")
    img_size: int = 64           # pixels a side; a grid cell is a third of it
    max_objects: int = 3         # objects a scene holds at most (at least one)
    seed: int = 0                # scenes are a pure function of it

    def __post_init__(self):
        at_least(self, 1, "n_train", "n_val", "max_objects")
        at_least(self, 24, "img_size")
        at_least(self, 0, "seed")
        if self.max_objects > 9:
            raise UserError(f"max_objects={self.max_objects}: the grid has 9 cells")
        if self.n_train + self.n_val < MIN_IMAGES:
            raise UserError(f"n_train={self.n_train} and n_val={self.n_val} make too few images; a folder "
                            f"needs at least {MIN_IMAGES}")


def read_photos(folder, what, at_least_n):
    """The photos directly in folder, by name ("coffee_cup.png" -> "coffee cup"), decoded now, so that
    a bad one is one line before anything is written -> {name: RGB image}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder")
    photos = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES):
        name = " ".join(path.stem.replace("_", " ").lower().split())
        if not name or name in photos:
            raise UserError(f"{what}: {path} names {'no object' if not name else 'an object named twice'}; "
                            f"one photo an object, named by its file")
        try:
            with Image.open(path) as im:
                photos[name] = im.convert("RGB")
        except OSError:
            raise UserError(f"{what}: {path} is not an image pillow can read") from None
    if len(photos) < at_least_n:
        raise UserError(f"{what}: {folder} holds {len(photos)} png/jpg photos; give at least {at_least_n}")
    return photos


def object_view(im, side, rng):
    """A view of the object's photo: a square of 70-100% of its short side near the centre, mirrored
    half the time, resized to side x side pixels (no two pastes of an object alike)."""
    s = int(min(im.size) * rng.uniform(0.7, 1.0))
    left = (im.width - s) // 2 + int(rng.integers(-(im.width - s) // 4, (im.width - s) // 4 + 1))
    top = (im.height - s) // 2 + int(rng.integers(-(im.height - s) // 4, (im.height - s) // 4 + 1))
    view = im.crop((left, top, left + s, top + s)).resize((side, side), Image.BICUBIC)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.integers(2) else view


def compose_scene(objects, backgrounds, rng, size, max_objects):
    """One scene -> (image, [(name, 'small' | 'large', cell)] in reading order): a random square crop of
    a background, then 1 to max_objects different objects, each in a cell of its own, centred there."""
    names = sorted(objects)
    bg = backgrounds[sorted(backgrounds)[rng.integers(len(backgrounds))]]
    crop = int(rng.integers(min(bg.size) // 2, min(bg.size) + 1))  # a square of half to all of it
    left, top = int(rng.integers(0, bg.width - crop + 1)), int(rng.integers(0, bg.height - crop + 1))
    canvas = bg.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BICUBIC)
    cell_px = size // 3
    n = int(rng.integers(1, min(len(names), max_objects) + 1))
    chosen = rng.choice(len(names), n, replace=False)
    cells = np.sort(rng.choice(9, n, replace=False))
    placed = []
    for k, cell in zip(chosen, cells):
        big = bool(rng.integers(2))
        side = cell_px - 1 if big else (2 * cell_px) // 3
        row, col = divmod(int(cell), 3)
        x = col * cell_px + (cell_px - side) // 2
        y = row * cell_px + (cell_px - side) // 2
        canvas.paste(object_view(objects[names[k]], side, rng), (x, y))
        placed.append((names[k], "large" if big else "small", int(cell)))
    return canvas, placed


def article(words):
    """'a cat', 'an astronaut'."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def describe(placed, names, rng):
    """A scene's words: caption, objects, questions -> a metadata.jsonl record (without file_name)."""
    phrases = [f"{article(size)} {name} at the {position_name(cell)}" for name, size, cell in placed]
    caption = join_words(phrases)
    present = sorted({name for name, _, _ in placed})
    absent = [n for n in names if n not in present]
    asked = present[rng.integers(len(present))]
    qa = [(f"is there {article(asked)}?", "yes")]
    if absent:
        qa.append((f"is there {article(absent[rng.integers(len(absent))])}?", "no"))
    name, _, cell = placed[rng.integers(len(placed))]  # each object appears once: one answer
    qa.append((f"where is the {name}?", position_name(cell)))
    return {"caption": caption, "objects": present, "qa": [{"q": q, "a": a} for q, a in qa]}


def write_scenes(folder, objects, backgrounds, cc, verbose=True):
    """Every scene as a PNG under folder/{train,val}/ and its words in metadata.jsonl."""
    names, lines = sorted(objects), []
    for split, n, offset in (("train", cc.n_train, 0), ("val", cc.n_val, cc.n_train)):
        (Path(folder) / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([cc.seed, offset + i])
            image, placed = compose_scene(objects, backgrounds, rng, cc.img_size, cc.max_objects)
            name = f"{split}/{i:05d}.png"
            image.save(Path(folder) / name)
            lines.append({"file_name": name, "split": split, **describe(placed, names, rng)})
            if verbose and (i + 1) % 1000 == 0:
                print(f"composed {split}: {i + 1}/{n}", flush=True)
    (Path(folder) / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def main(argv):
    """python -m data.compose OBJECTS BACKGROUNDS DIR [--key=value ...]"""
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 3:
        return usage("usage: python -m data.compose OBJECTS BACKGROUNDS DIR [--n_train=N ...]   (photos of "
                     "objects pasted on photos of backgrounds, with their words, as a folder)\n"
                     + config_help(ComposeConfig), argv)
    cc = ComposeConfig(**parse_overrides([a for a in argv if a.startswith("--")], ComposeConfig))
    objects = read_photos(paths[0], "objects", 2)
    backgrounds = read_photos(paths[1], "backgrounds", 1)
    written_folder(paths[2], partial(write_scenes, objects=objects, backgrounds=backgrounds, cc=cc))
    print(f"wrote {cc.n_train + cc.n_val} scenes of {len(objects)} objects ({', '.join(sorted(objects))}) "
          f"and metadata.jsonl to {paths[2]}")
    return 0


if __name__ == "__main__":
    cli(main)
