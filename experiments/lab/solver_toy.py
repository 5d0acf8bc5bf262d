r"""Solvers against an exact denoiser: a known 2-D Gaussian mixture through `dblocks.sampling.sample`.

  python -m experiments.lab.solver_toy          # the table of docs/lab/solvers.md (sliced Wasserstein, B=3, gamma 0.05)
  python -m experiments.lab.solver_toy --order  # relative error against grid size, Gaussian data (exact flow)

For y ~ sum_k w_k N(mu_k, s_k^2 I), the noisy marginal at sigma is the mixture with variances s_k^2 + sigma^2, and
the exact denoiser is the posterior mean

    D(z, sigma) = sum_k r_k(z) [mu_k + s_k^2 / (s_k^2 + sigma^2) (z - mu_k)], r_k ∝ w_k N(z; mu_k, (s_k^2+sigma^2) I).

Every block gets the same exact D, so what is measured is the solver and the grid, not a network. Used by
tests/test_solvers.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dblocks import edm as edm_lib
from dblocks import partition as partition_lib
from dblocks import sampling
from experiments.common import run_main


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A 2-D isotropic Gaussian mixture about the EDM data scale (sigma_data 0.5)."""
    means: tuple = ((-0.8, -0.4), (0.7, -0.5), (0.1, 0.8), (0.9, 0.6))
    stds: tuple = (0.05, 0.15, 0.1, 0.3)
    weights: tuple = (0.3, 0.3, 0.2, 0.2)

    def denoise(self, z: jax.Array, sigma: jax.Array) -> jax.Array:
        """The exact posterior mean E[y | y + sigma eps = z]; z [N, 2], sigma [N]."""
        mu, s2 = jnp.asarray(self.means), jnp.asarray(self.stds) ** 2                     # [K, 2], [K]
        var = s2[None, :] + (sigma ** 2)[:, None]                                         # [N, K]
        sq = jnp.sum((z[:, None, :] - mu[None]) ** 2, axis=-1)                            # [N, K]
        logits = jnp.log(jnp.asarray(self.weights))[None] - sq / (2 * var) - jnp.log(var)  # 2-D: log det = 2 log sd
        r = jax.nn.softmax(logits, axis=-1)
        post = mu[None] + (s2[None] / var)[..., None] * (z[:, None, :] - mu[None])         # [N, K, 2]
        return jnp.einsum("nk,nkd->nd", r, post)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        k = rng.choice(len(self.weights), size=n, p=np.asarray(self.weights))
        return np.asarray(self.means)[k] + np.asarray(self.stds)[k, None] * rng.normal(size=(n, 2))


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_dirs: int = 128, seed: int = 0) -> float:
    """Mean over random directions of the 1-D Wasserstein-1 distance between the projections (equal sizes)."""
    theta = np.random.default_rng(seed).uniform(0, np.pi, num_dirs)
    dirs = np.stack([np.cos(theta), np.sin(theta)], 1)
    pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
    return float(np.mean(np.abs(pa - pb)))


_DENOISE = {}


def chain(mix: Mixture, z0: jax.Array, grid: np.ndarray, partition: partition_lib.Partition,
          solver: str) -> tuple[np.ndarray, int]:
    """The sampler's output from z0 with the exact denoiser at every block; returns (samples [N, 2], calls)."""
    fn = _DENOISE.setdefault(mix, jax.jit(mix.denoise))
    res = sampling.sample(lambda b, z, s: (fn(z, s), None), z0, grid, partition, solver)
    return np.asarray(res.denoised, np.float64), res.block_calls


def table(num: int = 20_000, rows=(("cdf", 4), ("cdf", 10), ("cdf", 50), ("karras", 10), ("karras", 50)),
          solvers=("euler", "heun", "dpmpp_2m")) -> list[dict]:
    edm = edm_lib.EDM()
    mix, part = Mixture(), partition_lib.make_partition(3, edm, gamma=0.05)
    truth = mix.sample(np.random.default_rng(1), num)
    z0 = edm_lib.initial_noise(jax.random.PRNGKey(0), (num, 2), edm.sigma_max)
    out = []
    for kind, n in rows:
        grid = sampling.grid_for(n, edm, kind)
        row = {"grid": kind, "points": n}
        for solver in solvers:
            if solver not in sampling.SOLVERS:
                continue
            x, calls = chain(mix, z0, grid, part, solver)
            row[solver] = (sliced_wasserstein(x, truth), calls)
        out.append(row)
    floor = sliced_wasserstein(mix.sample(np.random.default_rng(2), num), truth)
    out.append({"grid": "exact samples (noise floor)", "points": 0, "floor": floor})
    return out


def gaussian_error(sd: float, n: int, kind: str, solver: str, edm: edm_lib.EDM = edm_lib.EDM(),
                   num_blocks: int = 3, gamma: float = 0.05) -> float:
    """Relative error of the sample for y ~ N(0, sd^2), D = z sd^2 / (sd^2 + sigma^2). The flow is linear,
    z(sigma) = z(sigma_max) sqrt(sd^2 + sigma^2) / sqrt(sd^2 + sigma_max^2), so the exact output is known."""
    part = partition_lib.make_partition(num_blocks, edm, gamma)

    def denoise(b, z, s):
        return z * (sd ** 2 / (sd ** 2 + s ** 2))[:, None], None
    z0 = jnp.full((1, 1), edm.sigma_max)
    out = float(sampling.sample(denoise, z0, sampling.grid_for(n, edm, kind), part, solver).denoised[0, 0])
    s_min = edm.sigma_min
    exact = edm.sigma_max * np.sqrt(sd ** 2 + s_min ** 2) / np.sqrt(sd ** 2 + edm.sigma_max ** 2) \
        * sd ** 2 / (sd ** 2 + s_min ** 2)
    return abs(out / exact - 1.0)


def order_table(sd: float, kind: str, ns) -> list[str]:
    lines = [f"| sd {sd}, {kind} | " + " | ".join(f"{n} pts" for n in ns) + " | rate (last 3) |",
             "|---|" + "---|" * (len(ns) + 1)]
    for solver in sampling.SOLVERS:
        err = [gaussian_error(sd, n, kind, solver) for n in ns]
        rate = -np.polyfit(np.log(ns[-3:]), np.log(err[-3:]), 1)[0]
        lines.append(f"| {solver} | " + " | ".join(f"{e:.1e}" for e in err) + f" | {rate:.2f} |")
    return lines


def main(argv):
    del argv
    if _ORDER.value:
        for sd in (0.5, 0.05):
            for kind, ns in (("cdf", (4, 6, 10, 20, 40, 80, 160)), ("karras", (10, 20, 40, 80, 160))):
                print("\n".join(order_table(sd, kind, ns)) + "\n")
        return
    rows = table(_NUM.value)
    solvers = [s for s in ("euler", "heun", "dpmpp_2m") if s in sampling.SOLVERS]
    print("| grid | " + " | ".join(f"{s} (calls)" for s in solvers) + " |")
    print("|---|" + "---|" * len(solvers))
    for r in rows:
        if "floor" in r:
            print(f"| {r['grid']} | {r['floor']:.4f} |" + " |" * (len(solvers) - 1))
            continue
        cells = [f"{r[s][0]:.4f} ({r[s][1]})" for s in solvers]
        print(f"| {r['grid']}, {r['points']} points | " + " | ".join(cells) + " |")


if __name__ == "__main__":   # flags only when run: tests import the mixture and the distance
    _NUM = flags.DEFINE_integer("num", 20_000, "samples per chain", lower_bound=2)
    _ORDER = flags.DEFINE_bool("order", False, "error against grid size for Gaussian data")
    run_main(main)
