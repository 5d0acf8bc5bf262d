"""How much the noisy target z = E_v + sigma * eps tells about the token v, and a noise partition placed by it.

For a fixed target space E and a prior q over tokens (the train split's unigram frequencies), the fraction of the
token's uncertainty that z removes at noise level sigma is

    f(sigma) = 1 - E_{v ~ q, eps} [-log p(v | z)] / H(q),   p(v | z) ~ q(v) N(z; E_v, sigma^2 I).

It falls from 1 (small sigma: z gives the token away) to 0 (large sigma: z says nothing). The information partition
puts the B-1 inner boundaries where f = 1/B, 2/B, ..., (B-1)/B, so every block owns an equal share of the bits z
reveals (a fixed, pre-training analogue of CDCD's time warping). It depends only on E and the unigram counts, which
every block has before training, so the blocks stay independent (docs/design.md item 4).
"""
from __future__ import annotations

import numpy as np

from dblocks import partition as partition_lib


def information_curve(E: np.ndarray, prior: np.ndarray, sigmas: np.ndarray, num_samples: int = 2000,
                      seed: int = 0) -> np.ndarray:
    """f(sigma) for each sigma (Monte Carlo over v ~ prior and eps, common random numbers across sigma)."""
    E = np.asarray(E, np.float64)
    prior = np.asarray(prior, np.float64) / np.sum(prior)
    rng = np.random.default_rng(seed)
    v = rng.choice(len(prior), size=num_samples, p=prior)
    eps = rng.standard_normal((num_samples, E.shape[1]))
    log_prior = np.log(prior)
    H = -np.sum(prior * log_prior)
    proj_y = E[v] @ E.T                      # [S, V]  <E_v, E_u>
    proj_e = eps @ E.T                       # [S, V]  <eps, E_u>
    half_sq = 0.5 * np.sum(E * E, -1)
    out = []
    for s in np.asarray(sigmas, np.float64):
        logits = log_prior + (proj_y + s * proj_e - half_sq) / s ** 2
        logits -= logits.max(-1, keepdims=True)
        logp = logits[np.arange(num_samples), v] - np.log(np.exp(logits).sum(-1))
        out.append(1.0 + float(np.mean(logp)) / H)
    return np.clip(np.asarray(out), 0.0, 1.0)


def information_boundaries(E: np.ndarray, prior: np.ndarray, num_blocks: int, sigma_min: float, sigma_max: float,
                           num_samples: int = 2000, seed: int = 0) -> list[float]:
    """B+1 ascending sigmas: sigma_min, the levels where f = (B-1)/B, ..., 1/B, then sigma_max."""
    sigmas = np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), 400))
    f = information_curve(E, prior, sigmas, num_samples, seed)            # decreasing in sigma
    f = np.minimum.accumulate(f)                                          # monotone against Monte Carlo noise
    inner = []
    for k in range(num_blocks - 1, 0, -1):                                # ascending sigma: high fractions first
        share = k / num_blocks
        # log sigma where f crosses `share`, interpolated on the decreasing curve
        inner.append(float(np.exp(np.interp(-share, -f, np.log(sigmas)))))
    bounds = [float(sigma_min), *inner, float(sigma_max)]
    if any(lo >= hi for lo, hi in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"information boundaries are not increasing: {bounds} (is the target norm so large that "
                         f"z gives the token away at sigma_max, or so small that it never does at sigma_min?)")
    return bounds


def with_sigma_floor(part: partition_lib.Partition, floor: float) -> partition_lib.Partition:
    """The same partition with every block's lowest training sigma raised to `floor` (a block whose whole range lies
    below the floor keeps its range). Inference ownership (the boundaries) is unchanged."""
    ranges = tuple((max(lo, floor), hi) if max(lo, floor) < hi else (lo, hi) for lo, hi in part.ranges)
    return partition_lib.Partition(part.boundaries, ranges, part.gamma)
