"""A continuous-time ELBO for embedding-space diffusion of tokens (VE process z = E_v + sigma * eps), in nats per
token, with each sigma routed to the block that owns it.

    -log p(v) <= ||E_v||^2 / (2 sigma_max^2)                                    prior term (KL to N(0, sigma_max^2))
               + int_{sigma_min}^{sigma_max} sigma^-3 E_eps ||E_v - D(E_v + sigma eps, sigma)||^2 dsigma     diffusion
               - E_eps log p(v | E_v + sigma_min eps)                           decoder, p(v|z) ~ N(z; E_v, sigma_min^2)

D is the block's posterior mean softmax(logits) @ E. The diffusion term is the VDM loss -1/2 int SNR' ||y - D||^2
with SNR = 1 / sigma^2. For the exact denoiser of a categorical prior q the bound is tight: its expectation over the
noise equals -log q(v) for every v (up to the truncation at sigma_min and sigma_max), which the tests check.

Estimator: u = log sigma; int sigma^-3 f dsigma = int sigma^-2 f du. Each block's own interval of the partition is
cut into strata of equal width in u, their number proportional to the interval's width in u (at least one per
block; `num_sigmas` in all); each token gets one sigma drawn uniformly in u inside every stratum and its own eps.
One stratum costs one teacher-forced pass of its block over the batch; the estimate is unbiased.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import partition as partition_lib

Array = jax.Array
ESTIMATOR = ("stratified log-uniform sigma: strata of equal width in log sigma inside each block's own interval "
             "(count proportional to its width, >= 1 per block), one sigma and one eps per token per stratum; "
             "prior and decoder terms from one eps per token")


def strata(partition: partition_lib.Partition, num_sigmas: int) -> list[tuple[int, float, float]]:
    """(block, log sigma lo, log sigma hi) of every stratum."""
    logs = [(math.log(partition.interval(b)[0]), math.log(partition.interval(b)[1]))
            for b in range(partition.num_blocks)]
    total = sum(hi - lo for lo, hi in logs)
    out = []
    for b, (lo, hi) in enumerate(logs):
        k = max(1, int(round(num_sigmas * (hi - lo) / total)))
        out += [(b, lo + j * (hi - lo) / k, lo + (j + 1) * (hi - lo) / k) for j in range(k)]
    return out


def elbo_nats(denoise: Callable[[int, Array, Array], Array], y: Array, E: Array,
              partition: partition_lib.Partition, sigma_min: float, sigma_max: float, key: Array,
              num_sigmas: int = 32) -> dict:
    """Per-token ELBO terms for clean targets y [N, T, D] (rows of E [V, D]) and a denoiser
    `denoise(b, z [N, T, D], sigma [N, T]) -> D [N, T, D]` (block b's posterior mean). Returns numpy arrays
    [N, T] of nats: 'diffusion_per_block' [B, N, T], 'diffusion', 'prior', 'decoder', 'total'."""
    N, T, _ = y.shape
    per_block = np.zeros((partition.num_blocks, N, T))
    for i, (b, u_lo, u_hi) in enumerate(strata(partition, num_sigmas)):
        k_u, k_e = jax.random.split(jax.random.fold_in(key, i))
        u = u_lo + (u_hi - u_lo) * jax.random.uniform(k_u, (N, T))
        sigma = jnp.exp(u)
        z = y + sigma[..., None] * jax.random.normal(k_e, y.shape)
        err = jnp.sum((y - denoise(b, z, sigma)) ** 2, axis=-1)                      # [N, T]
        per_block[b] += np.asarray((u_hi - u_lo) * err / sigma ** 2, np.float64)
    prior = np.asarray(jnp.sum(y ** 2, -1) / (2 * sigma_max ** 2), np.float64)
    z = y + sigma_min * jax.random.normal(jax.random.fold_in(key, 10_000), y.shape)
    sq = jnp.sum((z[..., None, :] - E) ** 2, -1)                                      # [N, T, V]
    logp = jax.nn.log_softmax(-sq / (2 * sigma_min ** 2), -1)
    true = jnp.argmin(jnp.sum((y[..., None, :] - E) ** 2, -1), -1)
    decoder = -np.asarray(jnp.take_along_axis(logp, true[..., None], -1)[..., 0], np.float64)
    diffusion = per_block.sum(0)
    return {"diffusion_per_block": per_block, "diffusion": diffusion, "prior": prior, "decoder": decoder,
            "total": diffusion + prior + decoder}


def exact_denoiser(log_prior: Array, E: Array) -> Callable[[int, Array, Array], Array]:
    """The Bayes posterior mean of y ~ q (log q = log_prior [V]) given z = E_v + sigma eps, any block."""
    half_sq = 0.5 * jnp.sum(E * E, -1)

    def denoise(b, z, sigma):
        logits = log_prior + (z @ E.T - half_sq) / sigma[..., None] ** 2
        return jax.nn.softmax(logits, -1) @ E
    return denoise
