"""The chain that draws one token of a language DiffusionBlocks model: the sampler's options (`Sampler`), the
inference grid, and the chain itself (plain functions of arrays; the task binds its blocks in `denoise`).

The chain for one new token: z ~ N(0, sigma_max^2 I) runs down the grid (sampling.sample), each step by the block
that owns the sigma it starts from; the last call, at grid[-1], gives the logits the token is drawn from
(temperature / top-p, or greedy). A grid may end above sigma_min (`sample.sigma_end`, or an explicit `sample.grid`):
the token is then drawn from that call's softmax, which is a real distribution inside the band where the noisy
target is informative (docs/language_models.md, "Sampler").
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dblocks import edm as edm_lib
from dblocks import sampling

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are drawn. grid: the noise levels the chain visits (empty for a plain LM)."""
    grid: tuple[float, ...] = ()
    solver: str = "euler"
    bridge: str = "softmax"
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    @property
    def calls_per_token(self) -> int:
        """Network (block) evaluations per generated token."""
        if not self.grid:
            return 1
        return 2 * (len(self.grid) - 1) + 1 if self.solver == "heun" else len(self.grid)

    @property
    def stochastic(self) -> bool:
        """Whether the chain draws randomness beyond z_0 (the ancestral solver, the 'sample' bridge)."""
        return self.solver in sampling.STOCHASTIC_SOLVERS or self.bridge == "sample"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": [float(g) for g in self.grid],
                "block_calls_per_token": self.calls_per_token}


def parse_grid(spec) -> tuple[float, ...]:
    """sample.grid: '' (none), '80,0.45,0.2,0.1' or a sequence of floats -> a strictly decreasing tuple."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return ()
    vals = tuple(float(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    if len(vals) < 2 or any(v <= 0 for v in vals) or any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{spec!r} must be at least 2 positive, strictly decreasing noise levels")
    return vals


def make_grid(edm: edm_lib.EDM, grid, grid_points: int, sigma_end: float) -> np.ndarray:
    """The inference grid: an explicit `grid`, else `grid_points` points equally spaced in the CDF of the log-normal
    truncated to [sigma_end, sigma_max] (sigma_end 0 = sigma_min)."""
    explicit = parse_grid(grid)
    if explicit:
        return np.asarray(explicit, np.float64)
    end = float(sigma_end or edm.sigma_min)
    return sampling.grid_for(int(grid_points), dataclasses.replace(edm, sigma_min=end))


def chain_keys(sampler: Sampler, key: Array) -> tuple[Array, Array | None, Array | None]:
    """(z_0's key, the solver's key, the bridge's key). A deterministic chain draws only z_0, from `key` itself (as
    before the stochastic options existed); a stochastic one splits `key` in three. The bridge's key for the c-th
    block call of the chain is fold_in(bridge key, c); the solver's for step i is fold_in(solver key, i)."""
    if not sampler.stochastic:
        return key, None, None
    k_z0, k_steps, k_bridge = jax.random.split(key, 3)
    return k_z0, k_steps, k_bridge


def run_chain(sampler: Sampler, partition, denoise, key: Array, shape, sigma_max: float) -> sampling.SampleResult:
    """One chain from z_0 ~ N(0, sigma_max^2 I) of `shape` down the sampler's grid. denoise(b, z, sigma, key)."""
    k_z0, k_steps, k_bridge = chain_keys(sampler, key)
    calls = iter(range(1 << 30))
    dummy = jax.random.PRNGKey(0)

    def with_key(b, z, s):
        c = next(calls)
        return denoise(b, z, s, dummy if k_bridge is None else jax.random.fold_in(k_bridge, c))
    z0 = edm_lib.initial_noise(k_z0, shape, sigma_max)
    return sampling.sample(with_key, z0, np.asarray(sampler.grid), partition, sampler.solver,
                           key=k_steps if sampler.solver in sampling.STOCHASTIC_SOLVERS else None)
