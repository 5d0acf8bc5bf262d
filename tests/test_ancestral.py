"""The ancestral sampler for discrete targets (solver 'ancestral' + bridge 'sample', docs/language_models.md
"Sampler"): with the exact posterior of a categorical prior, each step lands on the noisy marginal, so the chain
draws tokens from the prior at any number of steps; the deterministic Euler chain with the mean bridge does not."""
import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import partition as partition_lib
from dblocks import targets
from dblocks.tasks.lm import sampler as lm_sampler

EDM = edm_lib.EDM()
PART = partition_lib.make_partition(4, EDM, gamma=0.0)
Q = np.asarray([0.55, 0.25, 0.12, 0.05, 0.03])
E = jnp.asarray(targets.fixed_embedding(5, 16, 0.5, norm=1.0))
N = 6000


def exact_denoise(bridge):
    """The Bayes posterior of the prior Q given z = E_v + sigma * eps, as logits, and its bridge."""
    def denoise(b, z, s, key):
        sig = s[:, None, None]
        logits = jnp.log(Q) + (z @ E.T - 0.5 * jnp.sum(E * E, -1)) / sig ** 2
        return targets.bridge(logits, E, bridge, key), logits
    return denoise


def drawn_frequencies(solver, bridge, grid):
    sampler = lm_sampler.Sampler(grid=tuple(grid), solver=solver, bridge=bridge)
    res = lm_sampler.run_chain(sampler, PART, exact_denoise(bridge), jax.random.PRNGKey(3), (N, 1, 16), EDM.sigma_max)
    tokens = jax.random.categorical(jax.random.PRNGKey(4), res.aux[:, 0], axis=-1)
    return np.bincount(np.asarray(tokens), minlength=len(Q)) / N


def test_ancestral_chain_with_sampled_rows_draws_the_prior_exactly_even_on_four_points():
    for grid in ([80.0, 0.45, 0.2, 0.1], [80.0, 1.0, 0.5, 0.2, 0.1, 0.05, 0.01]):
        freq = drawn_frequencies("ancestral", "sample", grid)
        np.testing.assert_allclose(freq, Q, atol=0.02)          # 3 standard errors at N = 6000 is about 0.02


def test_euler_with_the_mean_bridge_distorts_the_prior_on_a_short_grid():
    freq = drawn_frequencies("euler", "softmax", [80.0, 0.45, 0.2, 0.1])
    assert np.abs(freq - Q).max() > 0.05, freq                  # the short deterministic chain is not a sampler


def test_ancestral_step_lands_on_the_noisy_marginal():
    y = jnp.ones((20000, 2))
    z = y + 3.0 * jax.random.normal(jax.random.PRNGKey(0), y.shape)
    z2 = edm_lib.ancestral_step(z, y, 3.0, 0.5, jax.random.normal(jax.random.PRNGKey(1), y.shape))
    np.testing.assert_allclose(np.std(np.asarray(z2 - y), 0), [0.5, 0.5], rtol=0.03)
    np.testing.assert_allclose(np.corrcoef(np.asarray(z - y)[:, 0], np.asarray(z2 - y)[:, 0])[0, 1], 0.5 / 3.0,
                               atol=0.03)   # z' stays on the bridge between z and y, not a fresh draw
