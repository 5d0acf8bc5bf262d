"""The noise partition: which block owns which noise levels, in training and at inference.

Convention (docs/design.md item 3): block 0 holds the first layers and the HIGHEST noise and runs first at inference.
`Partition.block_of` is the one map from a noise level to a block; training, sampling and evaluation all use it.
The partition is generic over a 1-D noise level: sigma for EDM tasks, t for masked diffusion (`t_partition`).
"""
from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib

PARTITION_KINDS = ("equiprobable", "loguniform")
_PHI = NormalDist()


@dataclasses.dataclass(frozen=True)
class Partition:
    """B blocks over the noise range.

    boundaries: B+1 levels, ascending (boundaries[0] = lowest level, boundaries[-1] = highest).
    ranges:     per block, in block order (block 0 = highest noise), the (lo, hi) range it is trained on: its
                interval widened by the overlap gamma in log space and clamped to the global range.
    """
    boundaries: tuple[float, ...]
    ranges: tuple[tuple[float, float], ...]
    gamma: float = 0.0

    @property
    def num_blocks(self) -> int:
        return len(self.ranges)

    def interval(self, b: int) -> tuple[float, float]:
        """Block b's own interval (no overlap): the levels it owns at inference."""
        B = self.num_blocks
        return self.boundaries[B - 1 - b], self.boundaries[B - b]

    def train_ranges(self) -> np.ndarray:
        """[B, 2] float32 (lo, hi) per block, for a step that takes the range as a traced argument."""
        return np.asarray(self.ranges, np.float32)

    def block_of(self, level):
        """Block that owns `level` (scalar or array; jnp-traceable). A level on a boundary goes to the
        higher-noise block (the authors' `bucketize(right=True)`); levels outside the range are clamped."""
        inner = jnp.asarray(self.boundaries[1:-1], jnp.float32)
        ascending_idx = jnp.searchsorted(inner, jnp.asarray(level, jnp.float32), side="right")
        return (self.num_blocks - 1 - ascending_idx).astype(jnp.int32)

    def to_dict(self) -> dict:
        return {"boundaries": list(self.boundaries), "ranges": [list(r) for r in self.ranges], "gamma": self.gamma}


# ---------------------------------------------------------------------------------------------------------------
# Boundaries
# ---------------------------------------------------------------------------------------------------------------

def equiprobable_boundaries(num_blocks: int, edm: edm_lib.EDM) -> list[float]:
    """B+1 ascending sigmas with mass 1/B each under the log-normal truncated to [sigma_min, sigma_max] (Sec. 3.3)."""
    q_min = _PHI.cdf((math.log(edm.sigma_min) - edm.p_mean) / edm.p_std)
    q_max = _PHI.cdf((math.log(edm.sigma_max) - edm.p_mean) / edm.p_std)
    inner = [math.exp(edm.p_mean + edm.p_std * _PHI.inv_cdf(q_min + b / num_blocks * (q_max - q_min)))
             for b in range(1, num_blocks)]
    return [edm.sigma_min, *inner, edm.sigma_max]


def loguniform_boundaries(num_blocks: int, lo: float, hi: float) -> list[float]:
    """Equal intervals in log space: the 'Uniform' baseline of the paper's ablation (App. E.6.2)."""
    return [math.exp(math.log(lo) + b / num_blocks * (math.log(hi) - math.log(lo))) for b in range(num_blocks + 1)]


def overlap_ranges(boundaries: Sequence[float], gamma: float) -> tuple[tuple[float, float], ...]:
    """Training ranges in block order: each interval [s_b, s_{b-1}] becomes [s_b / a, a * s_{b-1}] with
    a = (s_{b-1} / s_b)^gamma (App. C), clamped to [boundaries[0], boundaries[-1]]."""
    if gamma < 0:
        raise ValueError(f"overlap gamma must be >= 0, got {gamma}")
    lo_all, hi_all = boundaries[0], boundaries[-1]
    ranges = []
    for b in range(len(boundaries) - 1):
        lo, hi = boundaries[len(boundaries) - 2 - b], boundaries[len(boundaries) - 1 - b]
        widen = gamma * (math.log(hi) - math.log(lo))
        ranges.append((max(lo_all, math.exp(math.log(lo) - widen)), min(hi_all, math.exp(math.log(hi) + widen))))
    return tuple(ranges)


def make_partition(num_blocks: int, edm: edm_lib.EDM, gamma: float = 0.0, kind: str = "equiprobable") -> Partition:
    """The sigma partition of an EDM task. B=1 is ordinary EDM training over the whole range."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if kind == "equiprobable":
        bounds = equiprobable_boundaries(num_blocks, edm)
    elif kind == "loguniform":
        bounds = loguniform_boundaries(num_blocks, edm.sigma_min, edm.sigma_max)
    else:
        raise ValueError(f"unknown partition kind {kind!r}; choose one of {PARTITION_KINDS}")
    return Partition(tuple(bounds), overlap_ranges(bounds, gamma), float(gamma))


def sample_block_sigma(key: jax.Array, shape, train_range, edm: edm_lib.EDM) -> jax.Array:
    """sigma ~ p_noise restricted to a block's (lo, hi) range and renormalised (inverse CDF); one per element."""
    return edm_lib.sample_sigma(key, shape, train_range[0], train_range[1], edm.p_mean, edm.p_std)


# ---------------------------------------------------------------------------------------------------------------
# Inference grids and blocks
# ---------------------------------------------------------------------------------------------------------------

def grid_blocks(grid, partition: Partition) -> np.ndarray:
    """Block that runs each step of a descending grid: step i (grid[i] -> grid[i+1]) and the final denoise at
    grid[-1] are run by the block that owns the level they start from. Returns [len(grid)] int32."""
    return np.asarray(partition.block_of(jnp.asarray(grid)), np.int32)


def steps_per_block(grid, partition: Partition) -> np.ndarray:
    """Number of ODE steps (grid[i] -> grid[i+1]) each block runs, in block order: [B] int."""
    grid = check_grid(grid, partition)
    return np.bincount(grid_blocks(grid, partition)[:-1], minlength=partition.num_blocks)


def check_grid(grid, partition: Partition) -> np.ndarray:
    """Refuses a grid that is not strictly decreasing or that calls some block neither for a step nor for the
    final denoise: that block's noise range would be skipped by the chain (docs/method.md §5)."""
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"a sampling grid needs at least 2 points, got {grid.size}")
    if np.any(np.diff(grid) >= 0):
        raise ValueError("a sampling grid must be strictly decreasing")
    calls = np.bincount(grid_blocks(grid, partition), minlength=partition.num_blocks)
    if np.any(calls == 0):
        missing = [b for b in range(partition.num_blocks) if calls[b] == 0]
        raise ValueError(f"a {len(grid)}-point grid never runs block(s) {missing} of {partition.num_blocks}; "
                         f"use at least {partition.num_blocks} points")
    return grid
