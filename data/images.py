"""Real images: a folder of the user's png/jpg files, and CIFAR-10 from its standard python tarball.

Both end as uint8 arrays (N, H, W, 3) so every idea sees the same thing as the shapes world.
"""
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data import checked_cache, write_manifest
from lib.common import UserError
from lib.config import cli, usage

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CACHE_DIR = Path(__file__).parent / "cache"


def to_rgb(im):
    """Any pillow image -> RGB; 16- and 32-bit greyscale is scaled to 8 bits first (pillow's own
    convert would clip it: most pixels of a 16-bit image would become 255)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() <= 65535 else 2.0 ** 32 - 1
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    return im.convert("RGB")


def load_image(path, size):
    """One image file -> uint8 (size, size, 3): shorter side resized to `size`, centre-cropped."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)))
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
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


def folder_splits(folder, size):
    """Every 10th image (in sorted order) is held out -> {'train': ..., 'val': ...}, decoded once."""
    if not folder:
        raise UserError("--dataset=folder needs --data_path=DIR, the folder of your png/jpg images")
    images, _ = load_folder(folder, size)
    held_out = np.arange(len(images)) % 10 == 9
    if held_out.sum() == 0 or (~held_out).sum() == 0:
        raise UserError(f"{folder}: need at least 10 images to hold out a validation split")
    return {"train": images[~held_out], "val": images[held_out]}


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch (a dict of bytes, lists and numpy arrays) and nothing else: a pickle
    may name any function to call, so every global outside numpy's array rebuilders is refused."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UserError(f"refusing to load {module}.{name} from a CIFAR-10 batch: not plain data "
                            f"(a crafted or wrong file?)")
        return super().find_class(module, name)


def read_cifar_tarball(tarball, source):
    """-> {batch name: dict}, read without running anything the file says."""
    batches = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for m in tar.getmembers():
                name = os.path.basename(m.name)
                if m.isfile() and name.startswith(("data_batch_", "test_batch")):
                    batch = CifarUnpickler(tar.extractfile(m), encoding="bytes").load()
                    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
                        raise UserError(f"{source}: {name} is not a CIFAR-10 batch")
                    batches[name] = batch
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{source} is not a readable cifar-10-python.tar.gz "
                        f"({e.__class__.__name__}: {e})") from None
    if "test_batch" not in batches:
        raise UserError(f"{source} is not the CIFAR-10 python tarball (no test_batch inside)")
    return batches


def prepare_cifar10(source=CIFAR10_URL, cache_dir=CACHE_DIR, verbose=True):
    """Download (or copy from a local path / file:// URL) the python tarball; cache uint8 arrays.

    -> Path of the folder holding {train,test}_{images,labels}.npy, vouched for by manifest.json.
    """
    if os.path.isdir(str(source)):
        raise UserError(f"{source} is a folder; give the cifar-10-python.tar.gz file (or its URL)")
    out = Path(cache_dir) / "cifar10"
    checked_cache(out / "manifest.json", lambda: _build_cifar10(source, out), "cifar10", verbose)
    return out


def _build_cifar10(source, out):
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
        batches = read_cifar_tarball(tarball, source)
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for split, names in (("train", sorted(n for n in batches if n != "test_batch")),
                             ("test", ["test_batch"])):
            data = np.concatenate([np.asarray(batches[n][b"data"], np.uint8) for n in names])
            labels = np.concatenate([batches[n][b"labels"] for n in names]).astype(np.int64)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise UserError(f"{source}: batches hold {data.shape} pixels, "
                                f"not (N, 3072) with one label each")
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
            for arr, what in ((images, "images"), (labels, "labels")):
                np.save(Path(tmp) / "a.npy", np.ascontiguousarray(arr))
                os.replace(Path(tmp) / "a.npy", out / f"{split}_{what}.npy")
                files.append(out / f"{split}_{what}.npy")
        write_manifest(out / "manifest.json", files)


def cifar10_splits(source, size):
    """CIFAR-10 uint8 (N, size, size, 3): {'train': the 50k training set, 'val': the test set};
    resized copies are cached beside the 32 px arrays, so resizing happens once."""
    folder = prepare_cifar10(source or CIFAR10_URL)
    out = {}
    for split, name in (("train", "train"), ("val", "test")):
        path = folder / f"{name}_images.npy" if size == 32 else folder / f"{name}_images_{size}.npy"

        def resize(path=path, name=name):
            small = np.load(folder / f"{name}_images.npy")
            big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                            for im in small])
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, big)
            os.replace(tmp, path)
            write_manifest(path.with_suffix(".manifest.json"), [path])
        if size != 32:
            checked_cache(path.with_suffix(".manifest.json"), resize, f"cifar10 at {size} px")
        out[split] = np.load(path, mmap_mode="r")
    return out


def main(argv):
    """python -m data.images [cifar-10-python.tar.gz | URL]: prepare CIFAR-10 ahead of training."""
    if len(argv) > 1 or "-h" in argv or "--help" in argv:
        return usage("usage: python -m data.images [cifar-10-python.tar.gz | URL]   (prepares CIFAR-10)",
                     argv)
    print(f"CIFAR-10 ready in {prepare_cifar10(*argv)}")
    return 0


if __name__ == "__main__":
    cli(main)
