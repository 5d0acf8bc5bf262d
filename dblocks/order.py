"""The seeded, resumable batch order: which examples a unit trains on at each step.

A pure function of (seed, unit, step), so a run resumes exactly and every block's order is its own; O(batch) work per
step (a Feistel permutation evaluated only at the batch's positions), whatever the dataset's size.
"""
from __future__ import annotations

import numpy as np

BATCH_ORDER = "feistel-v1"   # recorded in every block's meta: a run is never resumed on another batch order


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit mixing function (splitmix64's finaliser) of x ^ key."""
    with np.errstate(over="ignore"):
        z = (x ^ key) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """perm(positions) for a seeded pseudo-random permutation of range(n), computed for the given positions only
    (O(len(positions)), not O(n)): a 4-round Feistel network on the smallest even-bit domain >= n, cycle-walked back
    into range(n)."""
    half = max(1, (max(int(n) - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [np.uint64(k) for k in np.random.default_rng([key, 0xFE15]).integers(0, 2 ** 63, 4, dtype=np.int64)]

    def rounds(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << np.uint64(half)) | right

    x = rounds(np.asarray(positions, np.uint64))
    out = x >= np.uint64(n)
    while out.any():   # cycle walking: a bijection of the domain restricted to range(n) stays a bijection
        x[out] = rounds(x[out])
        out = x >= np.uint64(n)
    return x.astype(np.int64)


def batch_indices(num_examples: int, batch_size: int, seed: int, unit: int, step: int) -> np.ndarray:
    """Indices of the batch a unit (block) trains on at `step`: epochs of seeded permutations, a pure function of
    its arguments (so runs resume exactly and blocks' orders are independent), in O(batch_size) per step. The
    remainder of an epoch is dropped, so every batch is full; indices come sorted (reads in file order)."""
    if batch_size > num_examples:
        raise ValueError(f"batch size {batch_size} exceeds the {num_examples} examples of the dataset")
    per_epoch = num_examples // batch_size
    epoch, i = divmod(step, per_epoch)
    key = int(np.random.default_rng([seed, unit, epoch]).integers(0, 2 ** 63, dtype=np.int64))
    return np.sort(permute(np.arange(i * batch_size, (i + 1) * batch_size), num_examples, key))
