"""The shapes world written out as a user's folder: `python -m data.export DIR [--key=value ...]`.

What a folder of one's own looks like (data/captioned.py reads it), and a check of that path: the
exported world, read back as a folder, gives the built-in world's images and texts.
"""
import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from data.captioned import MIN_IMAGES
from data.pairs import SHAPES_PROMPT
from data.shapes import SHAPES, World, caption, exist_question, join_words, questions, render, sample_scene
from lib.common import UserError, at_least, check_writable
from lib.config import cli, config_help, parse_overrides, usage


@dataclass
class ExportConfig:
    n_train: int = 20000         # training scenes, as the built-in VLM reads
    n_val: int = 500             # held-out scenes
    cooccur: float = 0.5         # the world's bias (data/shapes.py)
    skew: float = 0.5            # how unequal the shapes' frequencies are; 0 = uniform
    img_size: int = 64           # pixels a side
    seed: int = 1337             # train.py's default seed: the same scenes the built-in path trains on

    def __post_init__(self):
        at_least(self, 1, "n_train", "n_val")
        at_least(self, 16, "img_size")
        at_least(self, 0, "seed", "skew")
        if not 0 <= self.cooccur <= 1:
            raise UserError(f"cooccur={self.cooccur} must be in [0, 1]")
        if self.n_train + self.n_val < MIN_IMAGES:
            raise UserError(f"n_train={self.n_train} and n_val={self.n_val} make {self.n_train + self.n_val} "
                            f"images; a folder needs at least {MIN_IMAGES}")


def check_export(folder):
    """Before anything is written: nothing the user has is overwritten, so folder is new or empty."""
    check_writable(folder)
    if Path(folder).exists() and any(Path(folder).iterdir()):
        raise UserError(f"{folder} already holds files; export into a new or empty folder "
                        f"(nothing a folder holds is overwritten)")


def export(folder, ec, verbose=True):
    """Every scene as a PNG under folder/{train,val}/, and metadata.jsonl: its caption, the shapes
    world's questions (which shapes, "is there a ...?" about every shape, colour, position, shape,
    count) and its objects, written whole or not at all (written_folder)."""
    written_folder(folder, partial(write_world, ec=ec, verbose=verbose))


def written_folder(folder, write):
    """write(tmp) fills a fresh folder beside `folder`, renamed into place at the end: a stop, a crash or
    a full disk midway leaves no folder at all, never half of one (data/compose.py writes this way too)."""
    check_export(folder)
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.export-{os.getpid()}"
    try:
        write(tmp)
        if folder.exists():
            folder.rmdir()  # empty: checked above
        tmp.rename(folder)
    except OSError as e:  # a full disk, say
        raise UserError(f"cannot export to {folder}: {e.strerror or e}; nothing was written there") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_world(folder, ec, verbose):
    """The scenes and metadata.jsonl into folder (made here)."""
    world = World(img_size=ec.img_size, seed=ec.seed, cooccur=ec.cooccur, skew=ec.skew)
    lines = []
    for split, n in (("train", ec.n_train), ("val", ec.n_val)):
        (Path(folder) / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            objs = sample_scene(world, split, i)
            name = f"{split}/{i:05d}.png"
            Image.fromarray(render(world, objs)).save(Path(folder) / name)
            present = sorted(set(objs[:, 0].tolist()))
            qa = [(SHAPES_PROMPT, join_words([SHAPES[s] for s in present]))]
            qa += [(exist_question(s), "yes" if s in present else "no") for s in range(len(SHAPES))]
            qa += [(q, a) for kind, q, a in questions(world, split, i, objs) if kind != "exist"]
            lines.append({"file_name": name, "caption": caption(objs), "split": split,
                          "qa": [{"q": q, "a": a} for q, a in qa], "objects": [SHAPES[s] for s in present]})
            if verbose and (i + 1) % 5000 == 0:
                print(f"exported {split}: {i + 1}/{n}", flush=True)
    (Path(folder) / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def main(argv):
    """python -m data.export DIR [--key=value ...]: the shapes world written out as a user's folder."""
    if not argv or argv[0].startswith("-"):
        return usage("usage: python -m data.export DIR [--n_train=N --n_val=N --cooccur=C ...]   (writes "
                     "the shapes world as a folder)\n" + config_help(ExportConfig), argv)
    ec = ExportConfig(**parse_overrides(argv[1:], ExportConfig))
    check_export(argv[0])
    export(argv[0], ec)
    print(f"wrote {ec.n_train + ec.n_val} images and metadata.jsonl to {argv[0]}")
    return 0


if __name__ == "__main__":
    cli(main)
