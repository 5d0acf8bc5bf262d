"""The DiffusionBlocks sampler: the probability-flow ODE from sigma_max down a grid, each step run by the block
that owns the sigma it starts from (highest noise first), then a final denoise at the last grid point.

    z_0 ~ N(0, sigma_max^2 I)
    for i in 0 .. n-2:   b = block_of(grid[i]);  D = D_b(z, grid[i]);  z = step(z, D, grid[i], grid[i+1])
    return D_{block_of(grid[-1])}(z, grid[-1])

A task gives `denoise(b, z, sigma) -> (D, aux)`: D in target space, aux whatever it reads out (logits for
classification). For discrete targets D is the bridge `softmax(logits) @ E`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import partition as partition_lib

SOLVERS = ("euler", "heun")


@dataclasses.dataclass
class SampleResult:
    denoised: jax.Array          # D at the last grid point: the sample
    aux: Any                     # the task's read-out of the last call
    trace: list                  # the read-out after every call, in order (for per-step diagnostics)
    block_calls: int             # number of block evaluations (network forward passes) per sample
    blocks: np.ndarray           # block run at each grid point


def grid_for(num_points: int, edm: edm_lib.EDM, kind: str = "cdf") -> np.ndarray:
    """Descending grid: 'cdf' (equal steps in the log-normal's CDF, each block about n/B steps) or 'karras'."""
    if kind == "cdf":
        return np.asarray(edm_lib.cdf_grid(num_points, edm), np.float64)
    if kind == "karras":
        return np.asarray(edm_lib.karras_grid(num_points, edm.sigma_min, edm.sigma_max), np.float64)
    raise ValueError(f"unknown grid kind {kind!r}; choose 'cdf' or 'karras'")


def sample(denoise: Callable[[int, jax.Array, jax.Array], tuple[jax.Array, Any]], z0: jax.Array,
           grid: np.ndarray, partition: partition_lib.Partition, solver: str = "euler",
           keep_trace: bool = False) -> SampleResult:
    """Runs the chain. `denoise(b, z, sigma)` takes sigma as a per-sample vector [N]."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    grid = partition_lib.check_grid(grid, partition)
    blocks = partition_lib.grid_blocks(grid, partition)
    n = z0.shape[0]
    vec = lambda s: jnp.full((n,), s, jnp.float32)  # noqa: E731
    z, trace, calls = z0, [], 0
    for i in range(len(grid) - 1):
        b, s, s_next = int(blocks[i]), vec(grid[i]), vec(grid[i + 1])
        d, aux = denoise(b, z, s)
        calls += 1
        if solver == "euler":
            z = edm_lib.euler_step(z, d, s, s_next)
        else:
            z = edm_lib.heun_step(lambda zz, ss: denoise(b, zz, ss)[0], z, d, s, s_next)
            calls += 1
        if keep_trace:
            trace.append(aux)
    d, aux = denoise(int(blocks[-1]), z, vec(grid[-1]))
    calls += 1
    if keep_trace:
        trace.append(aux)
    return SampleResult(d, aux, trace, calls, blocks)
