"""Data for every idea: the shapes world (offline default), image folders, CIFAR-10, text corpora."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from lib.common import UserError


def to_tensor(images, device):
    """uint8 (N, H, W, 3) array -> float (N, 3, H, W) in [-1, 1] on `device` (bytes travel, not floats)."""
    x = torch.from_numpy(np.array(images)).to(device, non_blocking=True)  # a copy: memmaps are read-only
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def stream_indices(n, seed, start, count):
    """Positions start..start+count of an endless stream of per-epoch permutations of range(n).

    A batch is a pure function of its position, so resuming, or giving each DDP rank its own
    positions, needs no sampler state: the iteration number is the data position.
    """
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = min(n - offset, count - len(out))
        out.extend(np.random.default_rng([seed, epoch]).permutation(n)[offset:offset + take])
        pos += take
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# Caches are checked, never trusted: a manifest of sizes and checksums, written last

def file_digest(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(manifest, files):
    """Record each file's size and checksum in `manifest`, atomically, after the files are complete."""
    entries = {Path(f).name: [os.path.getsize(f), file_digest(f)] for f in files}
    tmp = f"{manifest}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps(entries))
    os.replace(tmp, manifest)


def cache_problem(manifest):
    """None if every file the manifest lists is there with its size and checksum, else what is wrong."""
    manifest = Path(manifest)
    if not manifest.exists():
        return "missing"
    try:
        entries = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{manifest.name} is damaged"
    for name, (size, digest) in entries.items():
        f = manifest.parent / name
        if not f.exists():
            return f"{name} is missing"
        if os.path.getsize(f) != size:
            return f"{name} has {os.path.getsize(f):,} bytes, expected {size:,}"
        if file_digest(f) != digest:
            return f"{name} does not match its checksum"
    return None


def checked_cache(manifest, build, what, verbose=True):
    """Build the cache unless its manifest vouches for it; a damaged one is rebuilt with one line."""
    problem = cache_problem(manifest)
    if problem and problem != "missing" and verbose:
        print(f"cache {what}: {problem}; rebuilding", flush=True)
    if problem:
        try:
            build()
        except PermissionError as e:  # a read-only cache folder
            raise UserError(f"cannot write the cache {what} in {Path(manifest).parent} "
                            f"({e.strerror}); make it writable") from None
        problem = cache_problem(manifest)
        if problem:
            raise UserError(f"cache {what} could not be written ({problem}); check free disk space")
