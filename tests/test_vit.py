"""ViT denoiser and classifier: shapes, what each token may see, the loss, the classification sampler with an
oracle denoiser, augmentation, and config validation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dblocks import augment, config as config_lib, targets
from dblocks.assemble import Run
from dblocks.models.vit import ViTClassifier, ViTDenoiser
from dblocks.tasks import get_task
from experiments.configs import tiny_vit


@pytest.fixture(scope="module")
def task():
    return get_task(tiny_vit.get_config())


@jax.jit
def _randomise(params, seed=1):
    """Zero-initialised heads and AdaLN make every output 0 at init; random params make dependencies visible."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_models_shapes_and_own_embedders(task):
    block, e2e = task.units("dblocks")[0], task.units("e2e")[0]
    m_block, m_e2e = task.make_model(block), task.make_model(e2e)
    assert isinstance(m_block, ViTDenoiser) and isinstance(m_e2e, ViTClassifier)
    batch = task.dummy_batch(5)
    p_block = jax.jit(lambda k: task.init_params(m_block, k, batch))(jax.random.PRNGKey(0))
    p_e2e = jax.jit(lambda k: task.init_params(m_e2e, k, batch))(jax.random.PRNGKey(0))
    # every block is a complete denoiser: its own patch embedding, label input, noise embedder and head
    assert {"patch_embed", "label_in", "label_pos", "NoiseEmbedder_0", "head"} <= set(p_block)
    assert len([k for k in p_block if k.startswith("layer_")]) == block.num_layers == 1
    assert len([k for k in p_e2e if k.startswith("layer_")]) == 3 and "cls" in p_e2e
    z = jnp.zeros((5, task.target_dim))
    logits = jax.jit(lambda p: task.logits(m_block, p, batch["image"], z, jnp.full((5,), 0.3)))(p_block)
    assert logits.shape == (5, 4)
    np.testing.assert_allclose(logits, 0.0)   # zero-initialised head: uniform prediction at init
    assert jax.eval_shape(lambda: m_e2e.apply({"params": p_e2e}, batch["image"])).shape == (5, 4)


def test_denoiser_sees_its_own_sample_only(task):
    """No leakage across the batch; the logits depend on the image, on z and on sigma, and on nothing else."""
    model = task.make_model(task.units("dblocks")[1])
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(3, task.target_dim)), jnp.float32)
    sigma = jnp.asarray([0.1, 1.0, 10.0], jnp.float32)
    params = _randomise(jax.jit(lambda k: task.init_params(model, k, task.dummy_batch(3)))(jax.random.PRNGKey(0)))

    def out0(image, z, sigma):
        return task.logits(model, params, image, z, sigma)[0].sum()

    g_img, g_z, g_sigma = jax.jit(jax.grad(out0, argnums=(0, 1, 2)))(image, z, sigma)
    assert float(jnp.abs(g_img[0]).sum()) > 0 and float(jnp.abs(g_z[0]).sum()) > 0 and float(g_sigma[0]) != 0
    for g in (g_img, g_z, g_sigma):
        np.testing.assert_array_equal(np.asarray(g)[1:], 0.0)


def test_loss_is_per_sample_weighted_cross_entropy(task):
    c = tiny_vit.get_config()
    model = task.make_model(task.units("dblocks")[2])
    batch = {k: jnp.asarray(v) for k, v in task.make_batch(task.source("train").get(np.arange(16)), True).items()}
    params = _randomise(jax.jit(lambda k: task.init_params(model, k, batch))(jax.random.PRNGKey(0)))
    rng, rr = jax.random.PRNGKey(3), jnp.asarray(task.units("dblocks")[2].train_range)
    losses = {}
    for mode in ("none", "edm", "clamped"):
        c.edm.loss_weighting = mode
        t = get_task(c)
        loss, metrics = jax.jit(lambda p: t.loss(model, p, batch, rng, rr, train=False))(params)
        losses[mode] = (float(loss), float(metrics["ce"]))
    assert losses["none"][0] == pytest.approx(losses["none"][1], rel=1e-6)          # unweighted = mean CE
    assert losses["edm"][1] == pytest.approx(losses["none"][1], rel=1e-6)           # same samples, same CE
    assert losses["edm"][0] > 10 * losses["none"][0]                               # lambda >> 1 at low sigma
    assert losses["clamped"][0] <= 10 * losses["none"][0] + 1e-4                   # weight capped at max_weight


class _Oracle(nn.Module):
    """Returns confident logits of the true class, which the test writes into pixel (0, 0)."""
    num_classes: int

    @nn.compact
    def __call__(self, image, z_in, c_noise, train=False):
        return 30.0 * jax.nn.one_hot(jnp.round(image[:, 0, 0, 0]).astype(jnp.int32), self.num_classes)


@pytest.mark.parametrize("grid_points", [3, 10])
def test_classification_sampler_with_oracle(task, grid_points):
    part = task.partition()
    units = task.units("dblocks")
    run = Run("", task.config, task, "dblocks", part, units, [_Oracle(4)] * 3, [{}] * 3, [{}] * 3)
    labels = np.asarray([0, 1, 2, 3, 2, 1])
    image = np.zeros((6, 8, 8, 1), np.float32)
    image[:, 0, 0, 0] = labels
    res = task.classify(run, image, grid_points=grid_points, keep_trace=True)
    assert res.block_calls == grid_points and len(res.trace) == grid_points
    assert list(np.unique(res.blocks)) == [0, 1, 2] and res.blocks[0] == 0 and res.blocks[-1] == 2
    for logits in res.trace:
        np.testing.assert_array_equal(np.argmax(logits, -1), labels)
    # the last denoised point is the true class's row of the fixed target space
    np.testing.assert_allclose(res.denoised, task.E[labels], atol=1e-5)


def test_bridge_uses_the_training_target_space(task):
    """Rows of E have norm sigma_data * sqrt(dim), and a confident bridge returns exactly the training target."""
    E = np.asarray(task.E)
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), 0.5 * np.sqrt(task.target_dim), rtol=1e-5)
    logits = 50.0 * jax.nn.one_hot(jnp.asarray([1, 3]), 4)
    np.testing.assert_allclose(targets.bridge(logits, task.E), E[[1, 3]], atol=1e-5)
    c = tiny_vit.get_config()
    c.model.target_norm, c.model.target_dim = 1.0, 8       # the authors' unit-norm label embeddings
    E1 = np.asarray(get_task(c).E)
    assert E1.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(E1, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(E1 @ E1.T, np.eye(4), atol=1e-5)                    # still orthogonal


def test_augmentations_keep_shape_and_range():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    apply_op = jax.jit(augment.apply_op)
    for op in range(len(augment.OPS)):
        out = apply_op((images[0] + 1) / 2, jnp.int32(op), jnp.float32(0.3), jnp.float32(-1.0))
        assert out.shape == (8, 8, 3) and float(out.min()) >= 0 and float(out.max()) <= 1, augment.OPS[op]
    for name in ("identity", "rotate", "translate_x", "shear_y", "brightness", "color"):  # magnitude 0: unchanged
        out = apply_op((images[0] + 1) / 2, jnp.int32(augment.OPS.index(name)), jnp.float32(0.0), jnp.float32(1.0))
        np.testing.assert_allclose(out, (images[0] + 1) / 2, atol=1e-5, err_msg=name)
    out = jax.jit(augment.rand_augment, static_argnums=(2, 3))(jax.random.PRNGKey(0), images, 2, 9.0)
    assert out.shape == images.shape and float(jnp.abs(out).max()) <= 1.0 + 1e-6
    assert float(jnp.abs(out - images).max()) > 0
    flipped = augment.random_flip(jax.random.PRNGKey(1), images)
    for i in range(4):
        assert np.allclose(flipped[i], images[i]) or np.allclose(flipped[i], images[i][:, ::-1])


def test_rand_augment_works_on_a_few_images_at_a_time():
    """The same values as every image at once (one vmap), in a fraction of its temporaries: the whole batch's gather
    index/weight arrays were the peak of a ViT step once its layers were chunked (docs/performance.md)."""
    images = jax.random.uniform(jax.random.PRNGKey(0), (64, 32, 32, 3), minval=-1, maxval=1)
    key = jax.random.PRNGKey(1)

    def whole_batch(key, x):   # the reference: every image at once
        y = (x + 1) / 2
        for k in jax.random.split(key, 2):
            k_op, k_sign = jax.random.split(k)
            ops = jax.random.randint(k_op, (x.shape[0],), 0, len(augment.OPS))
            signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (x.shape[0],)), 1.0, -1.0)
            y = jax.vmap(lambda im, o, s: augment.apply_op(im, o, jnp.float32(9.0 / 30), s))(y, ops, signs)
        return y * 2 - 1

    ours = jax.jit(augment.rand_augment).lower(key, images).compile()
    ref = jax.jit(whole_batch).lower(key, images).compile()
    np.testing.assert_array_equal(ours(key, images), ref(key, images))
    assert ours.memory_analysis().temp_size_in_bytes < 0.3 * ref.memory_analysis().temp_size_in_bytes


def test_validate_reports_bad_values():
    c = tiny_vit.get_config()
    c.model.patch = 3
    c.sample.grid_points = 2
    c.sample.bridge = "mean"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    msg = str(e.value)
    assert "model.patch=3" in msg and "sample.grid_points=2" in msg and "sample.bridge='mean'" in msg


def test_vit_loss_is_the_mean_of_lambda_times_ce_per_sample():
    """The weighting is per sample, mean(lambda_i * CE_i), not mean(lambda) * mean(CE) (the authors' broadcast bug,
    which the 'edm > 10 * none' check above does not tell apart): recomputed by hand from the same draws."""
    from dblocks import edm as edm_lib, images as images_lib
    c = tiny_vit.get_config()
    c.edm.loss_weighting = "edm"
    task = get_task(c)
    model = task.make_model(task.units("dblocks")[0])
    batch = {k: jnp.asarray(v) for k, v in task.make_batch(task.source("train").get(np.arange(16)), True).items()}
    params = _randomise(task.init_params(model, jax.random.PRNGKey(0), batch), seed=3)
    rng, lo, hi = jax.random.PRNGKey(3), 0.05, 5.0
    loss, _ = task.loss(model, params, batch, rng, jnp.asarray([lo, hi]), train=False)
    _, k_sigma, k_eps, _ = jax.random.split(rng, 4)
    n = batch["label"].shape[0]
    sigma = edm_lib.sample_sigma(k_sigma, (n,), lo, hi, task.edm.p_mean, task.edm.p_std)
    z = task.E[batch["label"]] + sigma[:, None] * jax.random.normal(k_eps, (n, task.target_dim))
    logits = task.logits(model, params, images_lib.to_model_range(batch["image"]), z, sigma)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    lam = (sigma ** 2 + 0.25) / (0.25 * sigma ** 2)
    np.testing.assert_allclose(float(loss), float(jnp.mean(lam * ce)), rtol=1e-4)
    assert abs(float(loss) - float(jnp.mean(lam) * jnp.mean(ce))) > 1e-3 * float(loss)
