"""EDM (Karras et al. 2022) as written: noise distribution, loss weight, preconditioning, grids and ODE steps.

Everything here is a pure function of arrays. Shapes: `sigma` is a scalar or a vector [N] (one sigma per sample);
data arrays are [N, ...] and sigma is broadcast over their trailing axes with `expand_to`.
The probability-flow ODE is dz/dsigma = (z - D(z, sigma)) / sigma (VE process, z = y + sigma * eps).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

Array = jax.Array

LOSS_WEIGHTINGS = ("edm", "none", "clamped")


@dataclasses.dataclass(frozen=True)
class EDM:
    """The EDM constants (paper App. C/E defaults)."""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    @classmethod
    def from_config(cls, cfg) -> "EDM":
        return cls(float(cfg.sigma_min), float(cfg.sigma_max), float(cfg.sigma_data), float(cfg.p_mean),
                   float(cfg.p_std))


def expand_to(x: Array, like: Array) -> Array:
    """Broadcasts a per-sample vector [N] over the trailing axes of `like` [N, ...]."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


# ---------------------------------------------------------------------------------------------------------------
# Log-normal noise distribution, truncated to [lo, hi]
# ---------------------------------------------------------------------------------------------------------------

def lognormal_cdf(sigma, p_mean: float, p_std: float):
    """P(s <= sigma) for ln s ~ N(p_mean, p_std^2) (not truncated)."""
    return ndtr((jnp.log(sigma) - p_mean) / p_std)


def lognormal_icdf(q, p_mean: float, p_std: float):
    """Inverse of `lognormal_cdf`."""
    return jnp.exp(p_mean + p_std * ndtri(q))


def sample_sigma(key: Array, shape, lo, hi, p_mean: float, p_std: float) -> Array:
    """Draws sigma from the log-normal truncated to [lo, hi] by inverse CDF (one sigma per element of `shape`).

    `lo`, `hi` may be traced scalars, so one compiled step serves every block.
    """
    q_lo, q_hi = lognormal_cdf(lo, p_mean, p_std), lognormal_cdf(hi, p_mean, p_std)
    u = jax.random.uniform(key, shape, minval=0.0, maxval=1.0)
    sigma = lognormal_icdf(q_lo + u * (q_hi - q_lo), p_mean, p_std)
    return jnp.clip(sigma, lo, hi)  # guard the float round-off at the ends


# ---------------------------------------------------------------------------------------------------------------
# Loss weight and preconditioning
# ---------------------------------------------------------------------------------------------------------------

def edm_lambda(sigma, sigma_data: float):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: makes lambda * c_out^2 = 1."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def loss_weight(sigma, sigma_data: float, mode: str = "edm", max_weight: float = 10.0):
    """Per-sample loss weight, applied to a per-sample loss [N] before any reduction.

    edm:     lambda(sigma), the paper's stated objective (principled for L2, where lambda * c_out^2 = 1).
    none:    1; what the authors' released code effectively trains with (its [N] x [N,1] broadcast bug gives
             mean(loss) * mean(lambda), a constant factor).
    clamped: lambda(sigma) / lambda(sigma_data), clipped to [0, max_weight]. For cross-entropy, where lambda spans
             four orders of magnitude inside the lowest-noise block, this bounds the weight at low sigma.
    """
    if mode == "edm":
        return edm_lambda(sigma, sigma_data)
    if mode == "none":
        return jnp.ones_like(sigma)
    if mode == "clamped":
        return jnp.minimum(edm_lambda(sigma, sigma_data) / edm_lambda(sigma_data, sigma_data), max_weight)
    raise ValueError(f"unknown loss weighting {mode!r}; choose one of {LOSS_WEIGHTINGS}")


def weighted_mean(per_sample_loss: Array, weight: Array) -> Array:
    """mean_i(w_i * loss_i). Both must be [N]: a [N] x [N, 1] product is the broadcast bug of docs/method.md §5."""
    if per_sample_loss.shape != weight.shape or per_sample_loss.ndim != 1:
        raise ValueError(f"per-sample loss {per_sample_loss.shape} and weight {weight.shape} must both be [N]: "
                         "a broadcast here would weight every sample by every other sample's weight")
    return jnp.mean(per_sample_loss * weight)


@dataclasses.dataclass(frozen=True)
class Precond:
    c_skip: Array
    c_out: Array
    c_in: Array
    c_noise: Array


def precondition(sigma, sigma_data: float) -> Precond:
    """EDM preconditioning: D(z, sigma) = c_skip * z + c_out * F(c_in * z, c_noise)."""
    s2 = sigma**2 + sigma_data**2
    return Precond(c_skip=sigma_data**2 / s2, c_out=sigma * sigma_data / jnp.sqrt(s2), c_in=1.0 / jnp.sqrt(s2),
                   c_noise=0.25 * jnp.log(sigma))


# ---------------------------------------------------------------------------------------------------------------
# Sampling grids (descending, first point sigma_max, last point sigma_min)
# ---------------------------------------------------------------------------------------------------------------

def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Array:
    """EDM's rho-spaced grid of n points."""
    if n < 2:
        raise ValueError(f"a sampling grid needs at least 2 points, got {n}")
    i = jnp.arange(n) / (n - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def cdf_grid(n: int, edm: EDM) -> Array:
    """n points equally spaced in the CDF of the log-normal truncated to [sigma_min, sigma_max].

    Each block of an equi-probability partition then gets about n/B of the steps (paper App. H).
    """
    if n < 2:
        raise ValueError(f"a sampling grid needs at least 2 points, got {n}")
    q_lo = float(lognormal_cdf(edm.sigma_min, edm.p_mean, edm.p_std))
    q_hi = float(lognormal_cdf(edm.sigma_max, edm.p_mean, edm.p_std))
    q = jnp.linspace(q_hi, q_lo, n)
    grid = lognormal_icdf(q, edm.p_mean, edm.p_std)
    return grid.at[0].set(edm.sigma_max).at[-1].set(edm.sigma_min)


# ---------------------------------------------------------------------------------------------------------------
# ODE steps. The paper's printed Eq. (4)/(5) has the wrong sign; this is EDM's (and the authors' code's) form.
# ---------------------------------------------------------------------------------------------------------------

def euler_step(z: Array, denoised: Array, sigma, sigma_next) -> Array:
    """z' = z + (sigma' - sigma) * (z - D) / sigma: a convex blend of z and D for sigma' < sigma."""
    d = (z - denoised) / expand_to(sigma, z)
    return z + expand_to(sigma_next - sigma, z) * d


def heun_step(denoise: Callable[[Array, Array], Array], z: Array, denoised: Array, sigma, sigma_next) -> Array:
    """Heun's second-order step: Euler, then the correction with D' = D(z_euler, sigma') (`heun_correct`)."""
    z_euler = euler_step(z, denoised, sigma, sigma_next)
    return heun_correct(z, denoised, denoise(z_euler, sigma_next), sigma, sigma_next)


def heun_correct(z: Array, denoised: Array, denoised_next: Array, sigma, sigma_next) -> Array:
    """Heun's correction in lambda = -log sigma (the exponential trapezoid rule): the exact solution of the ODE over
    [sigma', sigma] when D is linear in lambda between D (at sigma) and D' (at sigma'). With h = log(sigma/sigma'),

        z' = e^{-h} z + (1 - e^{-h} - c) D + c D',   c = (h - 1 + e^{-h}) / h.

    The weights are >= 0 and sum to 1, so z' is a convex blend at any step ratio (EDM's trapezoid in sigma is not,
    and blows up on a step such as 80 -> 1.3); for small h it agrees with EDM's Heun step to second order."""
    h = jnp.log(sigma / sigma_next)
    e = jnp.exp(-h)
    c = expand_to((h - 1.0 + e) / h, z)
    e = expand_to(e, z)
    return e * z + (1.0 - e - c) * denoised + c * denoised_next


DPMPP_2M_MAX_K = 1.0   # cap on the extrapolation weight k (docs/solvers.md)


def dpmpp_2m_step(z: Array, denoised: Array, denoised_prev: Array, sigma, sigma_next, sigma_prev) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022) for z = y + sigma * eps, in lambda = -log sigma (data prediction):

        h = log(sigma / sigma'),  k = min(h / (2 log(sigma_prev / sigma)), 1),
        D~ = (1 + k) D - k D_prev,   z' = (sigma'/sigma) z + (1 - sigma'/sigma) D~.

    With D~ = D it is the Euler step (exact for a constant D); D_prev (the previous grid point's D, from whichever
    block ran it) adds the linear term in lambda at no extra call. The cap on k (the published method has none)
    stops a step more than twice as long as the previous one (the equal-CDF grid's last step to sigma_min)
    from extrapolating D's slope far past where it was measured."""
    h = jnp.log(sigma / sigma_next)
    k = jnp.minimum(0.5 * h / jnp.log(sigma_prev / sigma), DPMPP_2M_MAX_K)
    k = expand_to(k, z)
    ratio = expand_to(sigma_next / sigma, z)
    return ratio * z + (1.0 - ratio) * ((1.0 + k) * denoised - k * denoised_prev)


def ancestral_step(z: Array, denoised: Array, sigma, sigma_next, noise: Array) -> Array:
    """One step of the VE diffusion's reverse bridge given a clean sample D (an ancestral step): with r = sigma'/sigma,

        z' = D + r^2 (z - D) + sigma' sqrt(1 - r^2) noise,   noise ~ N(0, I).

    If z = y + sigma * eps and D = y, then z' = y + sigma' * eps' exactly, eps' ~ N(0, I): the step lands on the
    noisy marginal at sigma' whatever its length. For discrete targets D is the row of a token drawn from the block's
    softmax (`targets.bridge(..., "sample")`), so with exact posteriors the chain samples exactly, at any number of
    steps; with the mean D instead it is the usual DDPM-style ancestral step (first order)."""
    r = expand_to(sigma_next / sigma, z)
    return denoised + r * r * (z - denoised) + expand_to(sigma_next, z) * jnp.sqrt(1.0 - r * r) * noise


def initial_noise(key: Array, shape, sigma_max: float, dtype=jnp.float32) -> Array:
    """z_0 ~ N(0, sigma_max^2 I), as the paper writes (the ViT code uses 1 + sigma_max^2; the difference is 0.008%)."""
    return sigma_max * jax.random.normal(key, shape, dtype)

