"""DiT denoiser and the generic sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import edm as E
from dblocks import partition as P
from dblocks import sampling
from dblocks.tasks import get_task
from experiments.configs import tiny_dit


@pytest.fixture(scope="module")
def task_model_params():
    task = get_task(tiny_dit.get_config())
    unit = task.units("dblocks")[1]
    model = task.make_model(unit)
    params = task.init_params(model, jax.random.PRNGKey(0), task.dummy_batch(4))
    return task, model, params


def test_dit_shapes_and_zero_init_identity(task_model_params):
    task, model, params = task_model_params
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    sigma = jnp.array([0.01, 0.3, 1.0, 50.0])
    f = model.apply({"params": params}, z, jnp.log(sigma) / 4, jnp.array([0, 1, 2, 4]))
    assert f.shape == z.shape
    np.testing.assert_array_equal(f, 0.0)  # AdaLN-Zero and the zero final layer: F = 0 at init
    d = task.denoise(model, params, z, sigma, jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(d, E.expand_to(E.precondition(sigma, 0.5).c_skip, z) * z, rtol=1e-6)


def test_output_depends_on_sigma_conditioning(task_model_params):
    """docs/method.md §5: a denoiser that cannot tell noise levels apart. After any training step the layers'
    modulation is non-zero, so F must change with c_noise."""
    _, model, params = task_model_params
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(7), p.shape), params)
    z = jnp.ones((2, 8, 8, 1))
    f = lambda c: model.apply({"params": params}, z, jnp.full((2,), c), jnp.array([0, 0]))  # noqa: E731
    assert float(jnp.abs(f(-1.0) - f(1.0)).max()) > 1e-3


def test_dit_loss_is_the_per_sample_edm_weighted_mse(task_model_params):
    """The loss is mean_i lambda(sigma_i) * ||D(z_i) - y_i||^2 / dim, lambda applied per sample before the mean (the
    authors' broadcast bug, mean(lambda) * mean(mse), and an unweighted loss both fail), sigma inside the range."""
    task, model, params = task_model_params
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(7), p.shape), params)
    y = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32))
    label = jnp.arange(4, dtype=jnp.int32)
    rng, lo, hi = jax.random.PRNGKey(3), 0.1, 0.5
    loss, m = task.loss(model, params, {"image": y, "label": label}, rng, jnp.array([lo, hi]), train=False)
    k_sigma, k_eps = jax.random.split(rng, 5)[:2]
    sigma = E.sample_sigma(k_sigma, (4,), lo, hi, task.edm.p_mean, task.edm.p_std)
    assert bool(jnp.all((sigma >= lo) & (sigma <= hi)))
    z = y + sigma[:, None, None, None] * jax.random.normal(k_eps, y.shape)
    mse = jnp.mean((task.denoise(model, params, z, sigma, label) - y) ** 2, axis=(1, 2, 3))
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    np.testing.assert_allclose(float(loss), float(jnp.mean(lam * mse)), rtol=1e-5)
    np.testing.assert_allclose(float(m["mse"]), float(jnp.mean(mse)), rtol=1e-5)
    assert abs(float(loss) - float(jnp.mean(lam) * jnp.mean(mse))) > 1e-3 * float(loss)


def test_guidance_mixes_conditional_and_unconditional(task_model_params):
    task, model, params = task_model_params
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(7), p.shape), params)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    sigma, label = jnp.array([0.5, 2.0]), jnp.array([1, 3])
    cond = task.denoise(model, params, z, sigma, label)
    uncond = task.denoise(model, params, z, sigma, jnp.full((2,), 4))
    guided = task.guided_denoiser(model)
    np.testing.assert_allclose(guided(params, z, sigma, label, 1.0), cond, atol=1e-5)
    np.testing.assert_allclose(guided(params, z, sigma, label, 0.0), uncond, atol=1e-5)
    np.testing.assert_allclose(guided(params, z, sigma, label, 2.0), 2 * cond - uncond, atol=1e-4)
    assert float(jnp.abs(cond - uncond).max()) > 1e-4


def test_sampler_runs_blocks_in_order_with_oracle():
    part = P.make_partition(3, E.EDM(), gamma=0.05)
    y = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    seen = []

    def oracle(b, z, sigma):
        seen.append((b, float(sigma[0])))
        return y, b

    grid = sampling.grid_for(50, E.EDM())
    res = sampling.sample(oracle, E.initial_noise(jax.random.PRNGKey(1), y.shape, 80.0), grid, part,
                          keep_trace=True)
    np.testing.assert_allclose(res.denoised, y)
    blocks = [b for b, _ in seen]
    assert blocks == sorted(blocks) and blocks[0] == 0 and blocks[-1] == 2  # highest noise first
    assert [blocks.count(b) for b in range(3)] == [17, 16, 17]  # 49 steps 17/16/16 + the final denoise
    assert res.block_calls == 50 and len(res.trace) == 50
    for b, s in seen:
        assert int(part.block_of(s)) == b


def test_output_convolution_mixes_pixels_across_patch_borders():
    """model.out_conv: the final layer writes features per pixel and a k x k convolution maps them to the image, so
    a pixel's value reads its neighbours in the adjacent patch (no patch grid in the samples; docs/classification.md).
    The model still starts at output 0 (zero final layer), the convolution is really applied (its kernel changes
    the output), and a size the convolution cannot centre is refused."""
    from dblocks.config import ConfigError, validate
    from dblocks.models.dit import CONV_FEATURES

    config = tiny_dit.get_config()
    with config.unlocked():
        config.model.out_conv = 3
    task = get_task(config)
    model = task.make_model(task.units("dblocks")[0])
    params = task.init_params(model, jax.random.PRNGKey(0), task.dummy_batch(2))
    assert params["out_conv"]["kernel"].shape == (3, 3, CONV_FEATURES, 1)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    c, label = jnp.zeros((2,)), jnp.array([0, 1])
    np.testing.assert_array_equal(model.apply({"params": params}, z, c, label), 0.0)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(7), p.shape), params)
    f = model.apply({"params": params}, z, c, label)
    doubled = {**params, "out_conv": {**params["out_conv"], "kernel": 2 * params["out_conv"]["kernel"]}}
    assert float(jnp.abs(model.apply({"params": doubled}, z, c, label) - f).max()) > 1e-4
    for bad in (2, -1):
        with config.unlocked():
            config.model.out_conv = bad
        with pytest.raises(ConfigError, match="out_conv"):
            validate(config)
