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

PARTITION_KINDS = ("equiprobable", "loguniform", "information")   # information: dblocks.information
_PHI = NormalDist()


@dataclasses.dataclass(frozen=True)
class Partition:
    """B blocks over the noise range.

    Mind the two orders (a known trap; the names are kept because tasks, checkpoints and metas use them):
    boundaries: B+1 levels, ASCENDING (boundaries[0] = lowest level, boundaries[-1] = highest), so block b's own
                interval is (boundaries[B-1-b], boundaries[B-b]); use `interval(b)` rather than indexing it.
    ranges:     per block, in BLOCK ORDER (ranges[0] = block 0 = highest noise), the (lo, hi) range it is trained
                on: its interval widened by the overlap gamma in log space and clamped to the global range.
    """
    boundaries: tuple[float, ...]
    ranges: tuple[tuple[float, float], ...]
    gamma: float = 0.0

    @property
    def num_blocks(self) -> int:
        return len(self.ranges)

    def interval(self, b: int) -> tuple[float, float]:
        """Block b's own interval (lo, hi), no overlap: the levels it owns at inference."""
        B = self.num_blocks
        return self.boundaries[B - 1 - b], self.boundaries[B - b]

    def block_of(self, level):
        """Block that owns `level`. A level on a boundary goes to the higher-noise block (the authors'
        `bucketize(right=True)`); levels outside the range are clamped. A jax array (or tracer) is mapped on the
        device in float32; a Python float or numpy array is mapped on the host in float64 (no device round trip)."""
        if isinstance(level, (jax.Array, jax.core.Tracer)):
            inner = jnp.asarray(self.boundaries[1:-1], jnp.float32)
            ascending_idx = jnp.searchsorted(inner, jnp.asarray(level, jnp.float32), side="right")
            return (self.num_blocks - 1 - ascending_idx).astype(jnp.int32)
        ascending_idx = np.searchsorted(np.asarray(self.boundaries[1:-1], np.float64),
                                        np.asarray(level, np.float64), side="right")
        return (self.num_blocks - 1 - ascending_idx).astype(np.int32)

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


def make_partition(num_blocks: int, edm: edm_lib.EDM, gamma: float = 0.0, kind: str = "equiprobable",
                   boundaries: Sequence[float] | None = None) -> Partition:
    """The sigma partition of an EDM task. B=1 is ordinary EDM training over the whole range."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if kind == "equiprobable":
        bounds = equiprobable_boundaries(num_blocks, edm)
    elif kind == "information":   # computed by the task from its fixed target space (dblocks.information)
        if boundaries is None:
            raise ValueError("the 'information' partition needs boundaries from the task's target space")
        bounds = [float(v) for v in boundaries]
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

# Where a step starts exactly on a boundary (MDM grids equal in alpha, sigma grids of k*B+1 points up to float32
# round-off), the step covers the LOWER block's interval. A step is therefore routed by the top of the interval it
# covers: the level a fraction STEP_PROBE of the way (in log level) from its start to its end. Any other start level
# is owned by one block, and that block runs the step, so every evaluation stays at a level its block owns.
STEP_PROBE = 1e-3


def step_blocks(grid, partition: Partition) -> np.ndarray:
    """Block that runs step i (grid[i] -> grid[i+1]) of a descending grid of positive levels: the owner of the
    interval's top (see STEP_PROBE). Host numpy, float64. Returns [len(grid) - 1] int32."""
    g = np.log(np.asarray(grid, np.float64))
    return partition.block_of(np.exp(g[:-1] - STEP_PROBE * (g[:-1] - g[1:])))


def grid_blocks(grid, partition: Partition) -> np.ndarray:
    """Block that makes each call of a descending grid: the step calls (`step_blocks`), then the final denoise at
    grid[-1], run by the owner of that level (a boundary goes to the higher-noise block). Returns [len(grid)] int32."""
    grid = np.asarray(grid, np.float64)
    return np.append(step_blocks(grid, partition), partition.block_of(grid[-1])).astype(np.int32)


def steps_per_block(grid, partition: Partition) -> np.ndarray:
    """Number of ODE steps (grid[i] -> grid[i+1]) each block runs, in block order: [B] int."""
    grid = check_grid(grid, partition)
    return np.bincount(step_blocks(grid, partition), minlength=partition.num_blocks)


def check_grid(grid, partition: Partition) -> np.ndarray:
    """Refuses a grid that is not strictly decreasing and positive, or that skips a block: a block whose own
    interval the grid's span [grid[-1], grid[0]] crosses but which it never calls (its noise range would be run by
    another block, outside that block's training range; docs/method.md "3 Sampling"). A grid may end above the lowest
    block (a language model reads its token from the last call): the blocks below its span are not skipped, just
    unused."""
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"a sampling grid needs at least 2 points, got {grid.size}")
    if np.any(np.diff(grid) >= 0) or grid[-1] <= 0:
        raise ValueError("a sampling grid must be strictly decreasing and positive")
    called = set(grid_blocks(grid, partition).tolist())
    spanned = [b for b in range(partition.num_blocks)
               if partition.interval(b)[0] < grid[0] and partition.interval(b)[1] > grid[-1]]
    missing = [b for b in spanned if b not in called]
    if missing:
        raise ValueError(f"a {len(grid)}-point grid never runs block(s) {missing} of {partition.num_blocks}; "
                         f"use at least {partition.num_blocks} points")
    return grid
