"""Masked diffusion (MD4, Shi et al. 2024) as pure functions: schedule, forward masking, loss weight, the partition
in t, the ELBO estimator of bits per character, and the ancestral sampler (paper §2.4 / App. D, docs/method.md §4.3).

Time runs from t = 0 (clean) to t = 1 (every token masked). alpha(t) is the probability that a token is still
unmasked; the linear schedule alpha(t) = 1 - t is MD4's and the paper's. The negative ELBO per sequence is

    -ELBO(x) = int_0^1 w(t) E_{x_t ~ q(.|x)} [ sum_{i: x_t,i = MASK} CE(f(x_t, t)_i, x_i) ] dt,
    w(t) = -alpha'(t) / (1 - alpha(t))                                (1/t for the linear schedule)

and it has no prior or reconstruction term (alpha(1) = 0, alpha(0) = 1).

Partition in t (Eq. 11-12): the expected number of masked tokens grows like 1 - alpha(t), so [t_a, t_b] carries
alpha(t_a) - alpha(t_b) of the demasking work; boundaries t_b = alpha^{-1}(1 - b/B) give every block an equal share
(t_b = b/B for the linear schedule). Block order as everywhere in dblocks: block 0 owns the noisiest end (t near 1)
and runs first; `Partition.block_of` is the one map from t to block.

Overlap (gamma) and t_min, our choice (the paper does not say how gamma maps onto t): the overlap is applied exactly
as for sigma, in log t, by `partition.overlap_ranges`: each interval [t_lo, t_hi] becomes
[t_lo / a, a t_hi] with a = (t_hi / t_lo)^gamma, clamped to the global range [t_min, 1]. Log space needs a lower
end above 0, hence t_min (default 1e-3, MDLM's sampling epsilon): the lowest block owns [t_min, t_1] and training
never draws t < t_min. Why log t: it is the same rule as for sigma (one partition code path), it widens
each block by a fixed fraction of its own scale, and near t = 1 it gives a small overlap where the masked fraction
changes little. The cost: the lowest block, whose log-width grows with ln(1/t_min), widens the most (B=3,
gamma=0.05, t_min=1e-3: [0.001, 0.446]), as sigma's outer blocks do.

ELBO with t_min: the estimator integrates over all of (0, 1] but evaluates the integrand at max(t, t_min). On
[0, t_min] the integrand (the expected CE of a masked token given an almost clean context) barely moves, so this
changes the estimate by t_min * |f(t_min) - f(t)| (far below the standard error), keeps the model inside its trained
range, and bounds the estimator's variance (the plain 1/t weight has a log-divergent variance at t -> 0).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import partition as partition_lib

Array = jax.Array
SCHEDULES = ("linear", "cosine")
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------

def alpha(t, schedule: str = "linear"):
    """Probability that a token is unmasked at time t (1 at t=0, 0 at t=1). Works on floats, numpy and jnp."""
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":   # MD4's cosine schedule: alpha = 1 - cos(pi/2 (1 - t))
        return 1.0 - jnp.cos(0.5 * jnp.pi * (1.0 - jnp.asarray(t)))
    raise ValueError(f"unknown masking schedule {schedule!r}; choose one of {SCHEDULES}")


def alpha_inv(a, schedule: str = "linear"):
    """The t with alpha(t) = a."""
    if schedule == "linear":
        return 1.0 - a
    if schedule == "cosine":
        return 1.0 - 2.0 / np.pi * np.arccos(np.clip(1.0 - np.asarray(a, np.float64), 0.0, 1.0))
    raise ValueError(f"unknown masking schedule {schedule!r}; choose one of {SCHEDULES}")


def loss_weight(t, schedule: str = "linear"):
    """w(t) = -alpha'(t) / (1 - alpha(t)): 1/t for the linear schedule, (pi/2) tan(pi/2 (1-t)) for cosine."""
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return 0.5 * jnp.pi * jnp.tan(0.5 * jnp.pi * (1.0 - jnp.asarray(t)))
    raise ValueError(f"unknown masking schedule {schedule!r}; choose one of {SCHEDULES}")


# ---------------------------------------------------------------------------------------------------------------
# Partition in t
# ---------------------------------------------------------------------------------------------------------------

def equal_alpha_boundaries(num_blocks: int, schedule: str = "linear") -> list[float]:
    """B+1 ascending t with alpha(t_b) = 1 - b/B (Eq. 11-12): 0, ..., 1; every block an equal share of alpha."""
    return [0.0, *(float(alpha_inv(1.0 - b / num_blocks, schedule)) for b in range(1, num_blocks)), 1.0]


def t_partition(num_blocks: int, gamma: float = 0.0, t_min: float = 1e-3,
                schedule: str = "linear") -> partition_lib.Partition:
    """The masked-diffusion partition: boundaries (t_min, t_1, ..., t_{B-1}, 1) ascending, training ranges in
    block order (block 0 = t near 1) widened by gamma in log t and clamped to [t_min, 1] (see the module doc)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    inner = equal_alpha_boundaries(num_blocks, schedule)[1:-1]
    if not 0.0 < t_min < (inner[0] if inner else 1.0):
        raise ValueError(f"t_min={t_min} must be in (0, {inner[0] if inner else 1.0}): below the first boundary")
    bounds = [float(t_min), *inner, 1.0]
    return partition_lib.Partition(tuple(bounds), partition_lib.overlap_ranges(bounds, gamma), float(gamma))


def sample_t(key: Array, n: int, lo, hi) -> Array:
    """n times in [lo, hi], stratified over the batch (MD4's antithetic sampling: t_i = lo + (hi-lo)(u + i/n mod 1)).
    Uniform in t is the density of the loss integral itself, so no importance weight is needed."""
    u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(n, dtype=jnp.float32) / n, 1.0)
    return lo + (hi - lo) * u


# ---------------------------------------------------------------------------------------------------------------
# Forward process and loss
# ---------------------------------------------------------------------------------------------------------------

def forward_mask(key: Array, tokens: Array, t: Array, mask_id: int, schedule: str = "linear") -> tuple[Array, Array]:
    """q(x_t | x_0): every token is replaced by mask_id independently with probability 1 - alpha(t).
    tokens [N, L] int, t [N] -> (x_t [N, L], masked [N, L] bool)."""
    p_mask = 1.0 - alpha(t, schedule)
    masked = jax.random.uniform(key, tokens.shape) < p_mask[:, None]
    return jnp.where(masked, mask_id, tokens), masked


def masked_ce(logits: Array, tokens: Array, masked: Array) -> Array:
    """Sum over masked positions of the cross-entropy (nats): logits [N, L, V], tokens [N, L] -> [N]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(masked, ce, 0.0), axis=-1)


def integrand(logits: Array, tokens: Array, masked: Array, t: Array, schedule: str = "linear") -> Array:
    """Per-sequence ELBO integrand in nats per token: w(t) * sum_masked CE / L. [N]. Its mean over t ~ U(0, 1) is
    the negative ELBO per character; over t ~ U(block range) it is the block's loss (Eq. 13, up to the width)."""
    return loss_weight(t, schedule) * masked_ce(logits, tokens, masked) / tokens.shape[-1]


# ---------------------------------------------------------------------------------------------------------------
# ELBO / bits per character
# ---------------------------------------------------------------------------------------------------------------

LogitsFn = Callable[[int, Array, Array], Array]   # (block b, x_t [n, L], t [n]) -> logits [n, L, V]


@dataclasses.dataclass
class ElboEstimate:
    bpc: float                  # bits per character, the estimate of -ELBO / (L ln 2)
    stderr: float               # its standard error (sequences as independent draws)
    num_sequences: int
    t_per_sequence: int         # stratified t samples per sequence
    per_stratum: list[float]    # mean integrand per t stratum (bits/char), ascending t: the curve being integrated
    per_block: list[float]      # bits/char contributed by the t's each block owns (block order); they sum to bpc
    values: np.ndarray          # [N, K] the integrand of every (sequence, t) draw, bits/char


def stratified_t(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """[n, k] times: t[i, j] = (j + u_ij) / k, one uniform draw per stratum of (0, 1]."""
    return (np.arange(k)[None] + rng.uniform(size=(n, k))) / k


def elbo_bpc(logits_fn: LogitsFn, tokens: np.ndarray, partition: partition_lib.Partition, mask_id: int,
             t_per_sequence: int = 8, batch_size: int = 64, seed: int = 0, t_min: float = 1e-3,
             schedule: str = "linear") -> ElboEstimate:
    """Monte Carlo estimate of the negative ELBO in bits per character, every t routed to the block that owns it.

    Estimator: for each of the N sequences, K = t_per_sequence times stratified over (0, 1] (one per stratum
    [j/K, (j+1)/K)), a fresh mask per draw, integrand w(t) sum_masked CE / L at t_eff = max(t, t_min). The estimate is
    the mean of the N*K draws; its standard error is std over sequences of their K-draw mean, / sqrt(N).
    With K a multiple of B (linear schedule) every stratum lies inside one block, so each batch calls one block.
    """
    tokens = np.asarray(tokens, np.int32)
    n, length = tokens.shape
    rng = np.random.default_rng(seed)
    ts = np.maximum(stratified_t(rng, n, t_per_sequence), t_min).astype(np.float32)   # [N, K]
    owner = np.asarray(partition.block_of(ts), np.int32)                               # [N, K]
    values = np.zeros(ts.shape, np.float64)
    key = jax.random.PRNGKey(seed)
    for j in range(t_per_sequence):
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            pad = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])  # fixed shapes: one compile
            x0, t = jnp.asarray(tokens[pad]), jnp.asarray(ts[pad, j])
            x_t, masked = forward_mask(jax.random.fold_in(jax.random.fold_in(key, j), start), x0, t, mask_id,
                                       schedule)
            for b in np.unique(owner[rows, j]):
                vals = np.asarray(integrand(logits_fn(int(b), x_t, t), x0, masked, t, schedule))[: len(rows)]
                sel = owner[rows, j] == b
                values[rows[sel], j] = vals[sel]
    values /= LN2
    per_seq = values.mean(axis=1)
    stderr = float(per_seq.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    per_block = [float(np.sum(values * (owner == b)) / values.size) for b in range(partition.num_blocks)]
    return ElboEstimate(float(values.mean()), stderr, n, t_per_sequence, values.mean(axis=0).tolist(), per_block,
                        values)


# ---------------------------------------------------------------------------------------------------------------
# Ancestral sampler
# ---------------------------------------------------------------------------------------------------------------

def sampling_grid(steps: int, schedule: str = "linear") -> np.ndarray:
    """steps+1 descending times from 1 to 0, equally spaced in alpha (each block gets steps/B steps, rounded)."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least 1 step, got {steps}")
    grid = np.asarray([alpha_inv(i / steps, schedule) for i in range(steps + 1)], np.float64)
    grid[0], grid[-1] = 1.0, 0.0
    return grid


def unmask_step(key: Array, x: Array, logits: Array, t, s, mask_id: int, schedule: str = "linear",
                temperature: float = 1.0) -> Array:
    """One reverse step t -> s < t: each masked token is revealed with probability (alpha(s) - alpha(t)) /
    (1 - alpha(t)), its value drawn from softmax(logits / temperature); revealed tokens never change (MD4's
    carry-over). At s = 0 the probability is 1, so the last step fills every mask. x [N, L], logits [N, L, V]."""
    k_reveal, k_token = jax.random.split(key)
    a_t, a_s = alpha(jnp.asarray(t, jnp.float32), schedule), alpha(jnp.asarray(s, jnp.float32), schedule)
    p_reveal = (a_s - a_t) / (1.0 - a_t)
    reveal = (x == mask_id) & (jax.random.uniform(k_reveal, x.shape) < p_reveal)
    if temperature <= 0:
        drawn = jnp.argmax(logits, axis=-1)
    else:
        drawn = jax.random.categorical(k_token, logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.where(reveal, drawn.astype(x.dtype), x)


@dataclasses.dataclass
class MaskedSample:
    tokens: np.ndarray        # [N, L] int32, no mask left
    blocks: np.ndarray        # [steps] block run at each step (block order: 0 first)
    block_calls: int          # network evaluations per sample (one per step)


def step_blocks(grid: np.ndarray, partition: partition_lib.Partition, t_min: float = 1e-3) -> np.ndarray:
    """Block that runs each step t_i -> t_{i+1} of a descending grid: the owner of the interval it covers, with
    the times clamped at t_min (`partition.step_blocks`). A step starting on a boundary (every multiple of B steps
    puts grid points there) belongs to the lower block, so `steps` = kB gives every block k steps. Host numpy."""
    return partition_lib.step_blocks(np.maximum(np.asarray(grid, np.float64), t_min), partition)


@functools.lru_cache(maxsize=32)
def _default_step(mask_id: int, schedule: str, temperature: float) -> Callable:
    return jax.jit(lambda k, x, lg, t, s: unmask_step(k, x, lg, t, s, mask_id, schedule, temperature))


def sample(logits_fn: LogitsFn, key: Array, num: int, length: int, steps: int,
           partition: partition_lib.Partition, mask_id: int, schedule: str = "linear", t_min: float = 1e-3,
           temperature: float = 1.0,
           step_fn: Callable | None = None) -> MaskedSample:
    """Ancestral MD4 sampling from all-[MASK] down a grid equally spaced in alpha; step i (t_i -> t_{i+1}) is run by
    the block that owns the interval it covers (`step_blocks`; the model sees max(t_i, t_min)). step_fn(key, x,
    logits, t, s) may replace the default `unmask_step` (jitted, cached). The schedule is computed on the host and
    nothing is read back from the device until the tokens at the end."""
    grid = sampling_grid(steps, schedule)
    blocks = step_blocks(grid, partition, t_min)
    missing = sorted(set(range(partition.num_blocks)) - set(blocks.tolist()))
    if missing:
        raise ValueError(f"a {steps}-step grid never runs block(s) {missing} of {partition.num_blocks}; "
                         f"use more steps")
    step_fn = step_fn or _default_step(int(mask_id), schedule, float(temperature))
    x = jnp.full((num, length), mask_id, jnp.int32)
    for i in range(steps):
        t_model = jax.device_put(np.full((num,), max(grid[i], t_min), np.float32))
        logits = logits_fn(int(blocks[i]), x, t_model)
        x = step_fn(jax.random.fold_in(key, i), x, logits, np.float32(grid[i]), np.float32(grid[i + 1]))
    return MaskedSample(np.asarray(x, np.int32), blocks, steps)
