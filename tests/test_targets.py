"""The fixed target space E and the bridge back from logits (docs/method.md §5: the scale contract)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import targets


@pytest.mark.parametrize("num,dim", [(10, 64), (100, 32)])
def test_rows_have_rms_sigma_data_and_are_near_orthogonal(num, dim):
    E = targets.fixed_embedding(num, dim, sigma_data=0.5, seed=0)
    np.testing.assert_allclose(np.sqrt((E**2).mean(axis=1)), 0.5, rtol=1e-5)  # per-coordinate RMS = sigma_data
    cos = (E @ E.T) / (0.25 * dim)
    off = np.abs(cos[~np.eye(num, dtype=bool)])
    assert off.max() < (1e-5 if num <= dim else 0.8)
    np.testing.assert_array_equal(E, targets.fixed_embedding(num, dim, 0.5, seed=0))  # same seed, same E
    assert not np.allclose(E, targets.fixed_embedding(num, dim, 0.5, seed=1))


def test_bridges_share_the_training_scale():
    E = jnp.asarray(targets.fixed_embedding(10, 64, 0.5))
    confident = jnp.eye(10)[3] * 50.0
    for kind in targets.BRIDGES:  # a confident prediction maps onto the training target itself
        np.testing.assert_allclose(targets.bridge(confident, E, kind, key=jax.random.PRNGKey(0)), E[3], atol=1e-4)
    unsure = jnp.zeros(10)
    norm = float(jnp.linalg.norm(E[0]))
    assert float(jnp.linalg.norm(targets.bridge(unsure, E, "softmax"))) < 0.5 * norm  # softmax@E shrinks
    np.testing.assert_allclose(jnp.linalg.norm(targets.bridge(unsure + 0.1 * jnp.arange(10), E, "renorm")), norm,
                               rtol=1e-4)
    with pytest.raises(ValueError):
        targets.bridge(unsure, E, "nearest")
    with pytest.raises(ValueError, match="key"):
        targets.bridge(unsure, E, "sample")


def test_sample_bridge_draws_rows_with_the_softmax_probabilities():
    E = jnp.asarray(targets.fixed_embedding(4, 8, 0.5))
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.2, 1e-9]))
    rows = jax.vmap(lambda k: targets.bridge(logits, E, "sample", key=k))(jax.random.split(jax.random.PRNGKey(1), 4000))
    which = np.argmax(np.asarray(rows @ E.T), axis=-1)          # rows are orthogonal: recover the drawn class
    np.testing.assert_allclose(np.bincount(which, minlength=4) / 4000, [0.5, 0.3, 0.2, 0.0], atol=0.03)
