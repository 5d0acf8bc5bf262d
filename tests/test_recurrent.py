"""Recurrent-depth model: K-step inference with an oracle core lands on the target, causality of the DiffusionBlocks
denoiser, cached vs uncached decoding for both methods, the random depth of the baseline, and training compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import edm as edm_lib
from dblocks import sampling, targets
from dblocks.tasks import get_task
from experiments.configs import tiny_recurrent
from dblocks.assemble import random_run


@pytest.fixture(scope="module")
def runs():
    out = {m: random_run(tiny_recurrent.get_config(), m) for m in ("dblocks", "e2e")}
    c = tiny_recurrent.get_config()
    c.model.prev_token = True
    out["dblocks_prev"] = random_run(c, "dblocks")
    c.recurrent.noisy_prelude = True   # the noisy row runs the prelude too: its cache slots must be read as well
    out["dblocks_np"] = random_run(c, "dblocks")
    return out


def test_k_euler_steps_with_an_oracle_core_land_on_the_target(runs):
    """An oracle denoiser (logits that pick the target token) run for K steps of the B=1 chain: the state ends at
    E[target], up to sigma_min / sigma_max of the initial offset, exactly as the Euler recursion predicts."""
    run = runs["dblocks"]
    task = run.task
    K = int(task.config.recurrent.mean_iterations)
    grid = np.asarray(task.sampler_options(run).grid)
    assert len(grid) == K and run.partition.num_blocks == 1
    E = task.E
    target = jnp.array([3, 7, 11])
    logits = 50.0 * jax.nn.one_hot(target, E.shape[0])

    def oracle(b, z, s):
        assert b == 0
        return targets.bridge(logits, E), logits

    z0 = edm_lib.initial_noise(jax.random.PRNGKey(0), (3, E.shape[1]), task.edm.sigma_max)
    res = sampling.sample(oracle, z0, grid, run.partition, "euler")
    assert res.block_calls == K
    np.testing.assert_array_equal(np.argmax(res.aux, -1), target)
    np.testing.assert_allclose(res.denoised, E[target], atol=1e-5)
    # the last state before the final read-out: y + (sigma_last / sigma_max) (z0 - y)
    z = z0
    for i in range(K - 1):
        z = edm_lib.euler_step(z, E[target], grid[i], grid[i + 1])
    expected = E[target] + (grid[-1] / grid[0]) * (z0 - E[target])
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)
    dist0, dist = (float(jnp.linalg.norm(a - E[target], axis=-1).max()) for a in (z0, z))
    assert dist < 1e-4 * dist0 and dist < 0.01 * float(jnp.linalg.norm(E[0]))


def test_denoiser_is_causal(runs):
    run = runs["dblocks"]
    model, params = run.models[0], run.params[0]
    T = 16
    tokens = jnp.asarray(np.arange(2 * T).reshape(2, T) % 20)
    z, c = jax.random.normal(jax.random.PRNGKey(1), (2, T, 16)), jax.random.normal(jax.random.PRNGKey(2), (2, T))
    f = jax.jit(lambda t: model.apply({"params": params}, t, z, c))
    base = f(tokens)
    for j in (0, 4, T - 1):
        out = f(tokens.at[:, j].set((tokens[:, j] + 1) % 20))
        np.testing.assert_allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-5)
        if j < T - 1:
            assert np.abs(out[:, j + 1:] - base[:, j + 1:]).max() > 1e-4


@pytest.mark.parametrize("method", ["dblocks"] + [pytest.param(m, marks=pytest.mark.slow)
                                                 for m in ("dblocks_prev", "dblocks_np", "e2e")])
def test_cached_generation_equals_uncached(runs, method):
    run = runs[method]
    prompts = np.array([[1, 2, 3, 4, 9, 10, 11, 12], [5, 6, 7, 8, 13, 14, 15, 16]], np.int32)
    a, calls = run.task.generate(run, prompts, 14, seed=1, use_cache=True)
    b, _ = run.task.generate(run, prompts, 14, seed=1, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert calls == 4


def test_baseline_depth_has_the_configured_mean():
    task = get_task(tiny_recurrent.get_config())
    r = task.config.recurrent
    draws = jax.vmap(task.sample_depth)(jax.random.split(jax.random.PRNGKey(0), 4000))
    assert float(draws.min()) >= 0
    assert abs(float(draws.mean()) + r.backprop_iterations - r.mean_iterations) < 0.1


@pytest.mark.slow
def test_baseline_loss_trains_only_through_the_last_iterations(runs):
    """The loss compiles with a random number of iterations; its gradient is finite and reaches every layer."""
    run = runs["e2e"]
    task, model = run.task, run.models[0]
    batch = {"tokens": np.arange(32).reshape(2, 16) % 20}
    g = jax.jit(jax.grad(lambda p, k: task.loss(model, p, batch, k, jnp.zeros(2))[0]))(run.params[0],
                                                                                     jax.random.PRNGKey(0))
    norms = {k: float(optax_norm(v)) for k, v in g.items()}
    assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def test_training_compute_counts_layers():
    task = get_task(tiny_recurrent.get_config())
    P, C, D, K, k = 1, 1, 1, 4, 2
    e2e, db = task.training_compute("e2e"), task.training_compute("dblocks")
    assert e2e["forward_layer_rows_per_token"] == P + K * C + D
    assert e2e["backward_layer_rows_per_token"] == P + k * C + D
    assert db["forward_layer_rows_per_token"] == (P + C + D) + (C + D)
    assert db["inference_layer_rows_per_token"] == (P + C + D) + K * (C + D)
    c = tiny_recurrent.get_config()
    c.recurrent.noisy_prelude = True
    assert get_task(c).training_compute("dblocks")["inference_layer_rows_per_token"] == (P + C + D) + K * (P + C + D)


def test_noisy_prelude_runs_the_prelude_on_the_noisy_rows(runs):
    """Same parameters, two layouts: the clean rows' prelude is the same, so only the noisy rows' logits change."""
    a, b = runs["dblocks_prev"], runs["dblocks_np"]
    T = 16
    tokens = jnp.asarray(np.arange(2 * T).reshape(2, T) % 20)
    z, c = jax.random.normal(jax.random.PRNGKey(1), (2, T, 16)), jax.random.normal(jax.random.PRNGKey(2), (2, T))
    out_a = a.models[0].apply({"params": b.params[0]}, tokens, z, c)
    out_b = b.models[0].apply({"params": b.params[0]}, tokens, z, c)
    assert float(jnp.abs(out_a - out_b).max()) > 1e-3
