"""Data for every idea: the shapes world (offline default), image folders, CIFAR-10, text corpora."""
import numpy as np


class UserError(Exception):
    """A mistake in what the user asked for: scripts print it in one line and exit non-zero."""


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
