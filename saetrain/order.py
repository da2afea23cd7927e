"""The data order: a pure function of (seed, epoch, store layout, rank, world).

Chunks (the store's unit of reading) are split once into a held-out set and a training
set. Each epoch permutes the training chunks, deals them to data-parallel ranks, and
groups each rank's chunks into windows of `window` chunks; the tokens of a window are
then permuted together. A window is the shuffle buffer: every batch mixes tokens of
`window` chunks drawn from anywhere in the store. Every kept token of the training set
appears exactly once per epoch, and a position in the order is just (epoch, tokens
consumed), so resuming needs no replay.
"""

from __future__ import annotations

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) % 2**64 for k in key])  # distinct for negative seeds


def split_holdout(chunks: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, holdout) chunk lists; holdout has round(fraction * n) chunks (at least 1 if fraction > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = round(fraction * len(chunks))
    if fraction > 0:
        n = max(n, 1)
    picked = set(_rng(seed, 0x401D).permutation(len(chunks))[:n].tolist())
    train = [c for i, c in enumerate(chunks) if i not in picked]
    hold = [c for i, c in enumerate(chunks) if i in picked]
    return train, hold


def epoch_windows(chunks: list[int], *, seed: int, epoch: int, window: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's windows of chunk indices for one epoch."""
    perm = [chunks[i] for i in _rng(seed, epoch, 0xC4C).permutation(len(chunks))]
    mine = perm[rank::world]
    return [mine[i : i + window] for i in range(0, len(mine), window)]


def window_permutation(n: int, *, seed: int, epoch: int, window: int, rank: int = 0) -> np.ndarray:
    """The token order inside window number `window` (n kept tokens)."""
    return _rng(seed, epoch, window, rank, 0x5EED).permutation(n)
