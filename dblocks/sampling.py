"""The DiffusionBlocks sampler: the probability-flow ODE from sigma_max down a grid, the blocks taking turns
(highest noise first), then a final denoise at the last grid point.

    z_0 ~ N(0, sigma_max^2 I)
    for i in 0 .. n-2:   b = step_blocks[i];  D_i = D_b(z, grid[i]);  z = step(z, D_i, grid[i], grid[i+1])
    return D_{block_of(grid[-1])}(z, grid[-1])

Step i is run by the block that owns the interval it covers (`partition.step_blocks`: a step starting exactly on a
boundary belongs to the lower block). Solvers (docs/solvers.md):
  euler     one call per grid point; exact when D is constant over a step.
  heun      Heun's method in log sigma (`edm.heun_correct`, the exponential trapezoid rule): one more call per
            step, D' at grid[i+1] evaluated by the block that owns grid[i+1]. Its update is a convex blend at any
            step ratio, so it is safe on the equal-CDF grid's long first and last steps (EDM's trapezoid in sigma
            is not: it was far worse than Euler there).
  dpmpp_2m  DPM-Solver++(2M) in log sigma (`edm.dpmpp_2m_step`): second order from the previous grid point's D
            (which may come from another block), no extra call; the first step is Euler.

A task gives `denoise(b, z, sigma) -> (D, aux)`: D in target space, aux whatever it reads out (logits for
classification). For discrete targets D is the bridge `softmax(logits) @ E`. The grid is checked and the block
schedule computed on the host (numpy); the updates are jitted, so the chain makes no host round trip: with a
jitted `denoise`, every call is dispatched asynchronously.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from dblocks import edm as edm_lib
from dblocks import partition as partition_lib

SOLVERS = ("euler", "heun", "dpmpp_2m")          # deterministic (probability-flow ODE)
STOCHASTIC_SOLVERS = ("ancestral",)               # need a key: `sample(..., key=...)`
ALL_SOLVERS = SOLVERS + STOCHASTIC_SOLVERS
GRID_KINDS = ("cdf", "karras")

_euler = jax.jit(edm_lib.euler_step)
_heun_correct = jax.jit(edm_lib.heun_correct)
_dpmpp_2m = jax.jit(edm_lib.dpmpp_2m_step)
_ancestral = jax.jit(lambda z, d, s, s_next, key: edm_lib.ancestral_step(z, d, s, s_next,
                                                                          jax.random.normal(key, z.shape, z.dtype)))


@dataclasses.dataclass
class SampleResult:
    denoised: jax.Array          # D at the last grid point: the sample
    aux: Any                     # the task's read-out of the last call
    trace: list                  # the read-out at every grid point, in order (for per-step diagnostics)
    block_calls: int             # number of block evaluations (network forward passes) per sample
    blocks: np.ndarray           # block run at each grid point (`partition.grid_blocks`)


def grid_for(num_points: int, edm: edm_lib.EDM, kind: str = "cdf") -> np.ndarray:
    """Descending grid: 'cdf' (equal steps in the log-normal's CDF, each block about n/B steps) or 'karras'."""
    if kind == "cdf":
        return np.asarray(edm_lib.cdf_grid(num_points, edm), np.float64)
    if kind == "karras":
        return np.asarray(edm_lib.karras_grid(num_points, edm.sigma_min, edm.sigma_max), np.float64)
    raise ValueError(f"unknown grid kind {kind!r}; choose one of {GRID_KINDS}")


def block_calls(grid: np.ndarray, solver: str) -> int:
    """Block calls per sample of a chain on an n-point grid (no network needed): n for euler, dpmpp_2m and
    ancestral, 2n - 1 for heun."""
    check_solver(solver, stochastic=True)
    return 2 * len(grid) - 1 if solver == "heun" else len(grid)


def points_for_calls(calls: int, solver: str) -> int:
    """The most grid points whose chain costs at most `calls` block calls with `solver`."""
    check_solver(solver, stochastic=True)
    return (calls + 1) // 2 if solver == "heun" else calls


def blocks_called(grid: np.ndarray, partition: partition_lib.Partition, solver: str) -> list[int]:
    """The blocks a chain on `grid` calls, ascending: the step and final calls (`partition.grid_blocks`), and for
    heun the owners of the corrector levels. A block not listed is never run, so a decoder keeps no K/V cache for
    it (on the language models' two-level default grid, blocks 2 and 3 of 4)."""
    grid = np.asarray(grid, np.float64)
    called = set(partition_lib.grid_blocks(grid, partition).tolist())
    if solver == "heun":
        called |= set(np.asarray(partition.block_of(grid[1:])).reshape(-1).tolist())
    return sorted(int(b) for b in called)


def check_solver(solver: str, stochastic: bool = False) -> None:
    """stochastic: whether the caller passes a key (the stochastic solvers need one)."""
    allowed = ALL_SOLVERS if stochastic else SOLVERS
    if solver not in allowed:
        raise ValueError(f"unknown solver {solver!r}; choose one of {allowed}")


def sample(denoise: Callable[[int, jax.Array, jax.Array], tuple[jax.Array, Any]], z0: jax.Array,
           grid: np.ndarray, partition: partition_lib.Partition, solver: str = "euler",
           keep_trace: bool = False, key: jax.Array | None = None) -> SampleResult:
    """Runs the chain. `denoise(b, z, sigma)` takes sigma as a per-sample vector [N]; `key` only for the stochastic
    solvers."""
    check_solver(solver, stochastic=key is not None)
    grid = partition_lib.check_grid(grid, partition)
    blocks = partition_lib.grid_blocks(grid, partition)            # host numpy: no device round trip
    owners = partition.block_of(grid)                               # owner of each level (Heun's corrector)
    n = z0.shape[0]
    levels = [jax.device_put(np.full((n,), s, np.float32)) for s in grid]
    z, trace, calls, d_prev = z0, [], 0, None
    for i in range(len(grid) - 1):
        s, s_next = float(grid[i]), float(grid[i + 1])
        d, aux = denoise(int(blocks[i]), z, levels[i])
        calls += 1
        if solver == "heun":
            d_next, _ = denoise(int(owners[i + 1]), _euler(z, d, s, s_next), levels[i + 1])
            z = _heun_correct(z, d, d_next, s, s_next)
            calls += 1
        elif solver == "ancestral":
            z = _ancestral(z, d, s, s_next, jax.random.fold_in(key, i))
        elif solver == "dpmpp_2m" and d_prev is not None:
            z = _dpmpp_2m(z, d, d_prev, s, s_next, float(grid[i - 1]))
        else:
            z = _euler(z, d, s, s_next)
        d_prev = d
        if keep_trace:
            trace.append(aux)
    d, aux = denoise(int(blocks[-1]), z, levels[-1])
    calls += 1
    if keep_trace:
        trace.append(aux)
    return SampleResult(d, aux, trace, calls, blocks)
