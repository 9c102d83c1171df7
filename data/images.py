"""Real images: a folder of the user's png/jpg files, and CIFAR-10 from its standard python tarball.

Both end as uint8 arrays (N, H, W, 3) so every idea sees the same thing as the shapes world.
"""
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CACHE_DIR = Path(__file__).parent / "cache"


def load_image(path, size):
    """One image file -> uint8 (size, size, 3): shorter side resized to `size`, centre-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None


def load_folder(folder, size):
    """Every png/jpg under `folder` (sorted) -> (uint8 (N, size, size, 3), list of paths)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no .png/.jpg images in {folder}")
    return np.stack([load_image(p, size) for p in paths]), paths


def folder_split(folder, size, split):
    """Every 10th image (in sorted order) is held out as 'val'; the rest is 'train'."""
    images, _ = load_folder(folder, size)
    held_out = np.arange(len(images)) % 10 == 9
    if held_out.sum() == 0 or (~held_out).sum() == 0:
        raise UserError(f"{folder}: need at least 10 images to hold out a validation split")
    return images[held_out] if split != "train" else images[~held_out]


def prepare_cifar10(source=CIFAR10_URL, cache_dir=CACHE_DIR):
    """Download (or copy from a local path / file:// URL) the python tarball; cache uint8 arrays.

    -> Path of the folder holding {train,test}_{images,labels}.npy.
    """
    out = Path(cache_dir) / "cifar10"
    if (out / "test_labels.npy").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "cifar-10-python.tar.gz"
        if os.path.exists(str(source)):
            shutil.copy(source, tarball)
        else:
            print(f"downloading {source} ...", flush=True)
            try:
                urllib.request.urlretrieve(str(source), tarball)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot fetch CIFAR-10 from {source} ({e}); offline, pass a local "
                                f"copy of cifar-10-python.tar.gz as data_path") from None
        batches = {}
        with tarfile.open(tarball, "r:gz") as tar:
            for m in tar.getmembers():
                name = os.path.basename(m.name)
                if name.startswith(("data_batch_", "test_batch")):
                    batches[name] = pickle.load(tar.extractfile(m), encoding="bytes")
        if "test_batch" not in batches:
            raise UserError(f"{source} is not the CIFAR-10 python tarball (no test_batch inside)")
        out.mkdir(parents=True, exist_ok=True)
        for split, names in (("train", sorted(n for n in batches if n != "test_batch")),
                             ("test", ["test_batch"])):
            data = np.concatenate([batches[n][b"data"] for n in names])
            labels = np.concatenate([batches[n][b"labels"] for n in names]).astype(np.int64)
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
            for arr, what in ((images, "images"), (labels, "labels")):
                np.save(Path(tmp) / "a.npy", np.ascontiguousarray(arr))
                os.replace(Path(tmp) / "a.npy", out / f"{split}_{what}.npy")
    return out


def cifar10_split(source, size, split):
    """CIFAR-10 uint8 (N, size, size, 3): 'train' is the 50k training set, anything else the test set."""
    folder = prepare_cifar10(source or CIFAR10_URL)
    images = np.load(folder / f"{'train' if split == 'train' else 'test'}_images.npy")
    if size != 32:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                           for im in images])
    return images


if __name__ == "__main__":  # python -m data.images [cifar-10-python.tar.gz | URL]
    import sys
    try:
        print(f"CIFAR-10 ready in {prepare_cifar10(*sys.argv[1:2])}")
    except UserError as e:
        sys.exit(f"error: {e}")
