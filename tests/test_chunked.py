"""Attention and MLP in O(T) memory (model.attention='chunked', model.mlp_chunk): the same values and gradients as
the explicit einsum path under every mask the models use, compiled temporaries that grow linearly in T where the
einsum path's grow quadratically, the same loss for whole tiny models, and a row-chunked MLP that keeps the
parameters and lowers the compiled temporaries under remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks.models import ar, chunked, layers
from dblocks.models.options import validate_options
from dblocks.models.vit import ViTLayer

N, HEADS, D = 2, 2, 8


def _qkv(T, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (N, T, HEADS, D)).astype(dtype) for k in keys]


def _value_and_grad(implementation, mask, chunk=128, dropout=None):
    def f(q, k, v):
        out = layers.attend(q, k, v, mask, implementation, dropout, chunk).astype(jnp.float32)
        return jnp.sum(jnp.sin(out))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def _padding(T):   # [N, 1, 1, T]: sample 0 sees every key, sample 1 the first T - 5
    return (jnp.arange(T)[None] < jnp.array([[T], [T - 5]]))[:, None, None]


MASKS = {"none": lambda T: None, "causal": chunked.causal, "causal_dense": ar.causal_mask,
         "ar": lambda T: ar.ar_mask_spec(T // 2), "ar_dense": lambda T: ar.ar_mask(T // 2), "padding": _padding}


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("T,chunk", [(48, 16), (50, 16), (50, 128)])   # dividing, not dividing, one chunk
def test_chunked_matches_einsum(mask, T, chunk):
    q, k, v = _qkv(T)
    m = MASKS[mask](T)
    y0, g0 = _value_and_grad("einsum", m)(q, k, v)
    y, g = _value_and_grad("chunked", m, chunk)(q, k, v)
    np.testing.assert_allclose(y, y0, rtol=1e-5)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize("mask", ["causal", "ar"])
def test_chunked_matches_einsum_bf16(mask):
    q, k, v = _qkv(50, jnp.bfloat16)
    m = MASKS[mask](50)
    y0, g0 = _value_and_grad("einsum", m)(q, k, v)
    y, g = _value_and_grad("chunked", m, 16)(q, k, v)
    np.testing.assert_allclose(y, y0, rtol=2e-2)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=6e-2)


def test_mask_specs_equal_the_arrays():
    """The rules the models pass equal the arrays of the other paths (ar_mask changes must update ar_mask_spec)."""
    for T in (1, 5, 8):
        np.testing.assert_array_equal(ar.ar_mask_spec(T).dense(), ar.ar_mask(T))
        np.testing.assert_array_equal(chunked.causal(T).dense(), ar.causal_mask(T))
        rows = jnp.arange(T, 2 * T)
        np.testing.assert_array_equal(ar.ar_mask_spec(T).block(rows), ar.ar_mask(T)[T:])


def test_chunked_dropout():
    """(rate, key): rate 0 is the identity; otherwise deterministic per key, about `rate` of the weights dropped,
    and each chunk draws its own pattern."""
    q, k, v = _qkv(32)
    key = jax.random.PRNGKey(5)
    base = layers.attend(q, k, v, None, "chunked", chunk=8)
    np.testing.assert_allclose(layers.attend(q, k, v, None, "chunked", (0.0, key), 8), base, rtol=1e-6)
    ones = jnp.ones_like(v)   # each output is sum(kept probabilities) / keep: 1 on average
    a = layers.attend(q, k, ones, None, "chunked", (0.5, key), 8)
    np.testing.assert_array_equal(a, layers.attend(q, k, ones, None, "chunked", (0.5, key), 8))
    assert not np.allclose(a, layers.attend(q, k, ones, None, "chunked", (0.5, jax.random.PRNGKey(6)), 8))
    assert abs(float(a.mean()) - 1.0) < 0.1
    chunks = np.asarray(a[..., 0]).reshape(N, 4, 8, HEADS)
    assert not np.allclose(chunks[:, 0], chunks[:, 1])


def _temps(implementation, T, mask_fn, chunk=64):
    s = jax.ShapeDtypeStruct((4, T, 4, 32), jnp.float32)
    fn = _value_and_grad(implementation, mask_fn(T), chunk)
    return fn.lower(s, s, s).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("mask", ["none", "ar"])
def test_chunked_temporaries_grow_linearly(mask):
    """Value + gradient at T and 4T: the einsum path's temporaries grow about 16x (the check can fail), the chunked
    path's about 4x (without the checkpoint on the chunk body, lax.map saves every chunk's probabilities and the
    growth is quadratic again)."""
    T = 256
    einsum = _temps("einsum", 4 * T, MASKS[mask]) / _temps("einsum", T, MASKS[mask])
    chunked = _temps("chunked", 4 * T, MASKS[mask]) / _temps("chunked", T, MASKS[mask])
    assert einsum > 10, einsum
    assert chunked < 6, chunked


def test_options_validated():
    assert validate_options({"attention": "chunked", "attention_chunk": 64, "mlp_chunk": 0}) == []
    for bad in ({"attention_chunk": 0}, {"mlp_chunk": -1}, {"mlp_chunk": 1.5}, {"attention_chunk": True},
                {"layer_chunk": -2}):
        assert len(validate_options(bad)) == 1, bad


# -- whole models ---------------------------------------------------------------------------------------------------

def _perturb(params):
    """Zero-initialised heads and gates make outputs trivially equal; give every leaf some signal."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _task_loss_and_grad(name, **options):
    from importlib import import_module
    from dblocks.tasks import get_task
    c = import_module(f"experiments.configs.{name}").get_config()
    with c.unlocked():
        c.model.update(options)
    task = get_task(c)
    unit = task.units("dblocks")[0]
    model = task.make_model(unit)
    batch = task.dummy_batch(4)
    params = _perturb(jax.jit(lambda: task.init_params(model, jax.random.PRNGKey(1), batch))())
    fn = jax.value_and_grad(lambda p: task.loss(model, p, batch, jax.random.PRNGKey(2),
                                                jnp.asarray(unit.train_range, jnp.float32))[0])
    return jax.jit(fn)(params)


@pytest.mark.parametrize("name", ["tiny_ar"] + [pytest.param(n, marks=pytest.mark.slow)   # AR: the most masks
                                                for n in ("tiny_vit", "tiny_dit", "tiny_mdm", "tiny_recurrent")])
def test_tiny_models_same_loss(name):
    """A block of each tiny config: the same loss and gradients with chunked attention (chunks that do not divide
    T), a chunked MLP and layers in chunks of samples as with the default, from the same parameters (same tree)."""
    y0, g0 = _task_loss_and_grad(name)
    y, g = _task_loss_and_grad(name, attention="chunked", attention_chunk=3, mlp_chunk=5, layer_chunk=3)
    assert jax.tree.structure(g) == jax.tree.structure(g0)
    np.testing.assert_allclose(y, y0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# -- the row-chunked MLP --------------------------------------------------------------------------------------------

def _vit_stack_temps(mlp_chunk, remat="full"):
    """Compiled temporaries of value + gradient of a scanned, rematerialised ViT classifier with a wide MLP."""
    from dblocks.models.vit import ViTClassifier
    model = ViTClassifier(num_layers=4, hidden=32, heads=2, patch=2, num_classes=5, mlp_ratio=16.0,
                          scan_layers=True, remat=remat, mlp_chunk=mlp_chunk)
    img = jax.ShapeDtypeStruct((16, 16, 16, 3), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(img.shape))["params"])
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)))
    return fn.lower(params, img).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_mlp_same_layer():
    """A layer with mlp_chunk: the same parameter tree (initialised whole) and the same values and gradients."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 16))
    base, chunked = ViTLayer(16, 2, mlp_ratio=4.0), ViTLayer(16, 2, mlp_ratio=4.0, mlp_chunk=4)
    params = _perturb(base.init(jax.random.PRNGKey(1), x)["params"])
    assert jax.tree.structure(chunked.init(jax.random.PRNGKey(1), x)["params"]) == jax.tree.structure(params)
    f = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x)))))  # noqa: E731
    (y0, g0), (y, g) = f(base)(params), f(chunked)(params)
    np.testing.assert_allclose(y, y0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_mlp_lowers_temporaries_under_remat():
    """4,096 rows through an MLP 16x wide: in chunks of 256 rows the rematerialised step's temporaries fall well
    below the whole MLP's (one chunk's [256, 512] instead of [4096, 512] in the recomputation)."""
    whole, chunked = _vit_stack_temps(0), _vit_stack_temps(256)
    assert chunked < 0.6 * whole, (chunked, whole)


def _dit_stack_temps(**options):
    """Compiled temporaries of the gradient of a scanned, fully rematerialised DiT (4 layers, 32 samples)."""
    from dblocks.models.dit import DiT
    model = DiT(num_layers=4, hidden=32, heads=2, patch=2, image_size=16, channels=3, num_classes=4,
                scan_layers=True, remat="full", **options)
    img, c, y = jnp.zeros((32, 16, 16, 3)), jnp.zeros(32), jnp.zeros(32, jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), img, c, y)["params"])
    fn = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x, c, y) ** 2)))
    return fn.lower(params, jax.ShapeDtypeStruct(img.shape, img.dtype)).compile().memory_analysis().temp_size_in_bytes


def test_layer_chunk_same_values_with_dropout_and_lower_temporaries():
    """layer_chunk: a DiT layer's working set for 4 samples at a time instead of 32 lowers the rematerialised
    step's temporaries toward the per-layer carries; with dropout active each chunk draws its own keys (finite,
    deterministic). Values: test_tiny_models_same_loss."""
    whole, chunked = _dit_stack_temps(attention="chunked"), _dit_stack_temps(attention="chunked", layer_chunk=4)
    assert chunked < 0.6 * whole, (chunked, whole)
    x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (1, 7, 16)), (5, 7, 16))   # 5 equal samples
    layer = ViTLayer(16, 2, dropout=0.5, attention="chunked", layer_chunk=3)
    params = layer.init(jax.random.PRNGKey(1), x)["params"]
    run = jax.jit(lambda k: layer.apply({"params": params}, x, True, rngs={"dropout": k}))
    a = run(jax.random.PRNGKey(2))
    assert np.isfinite(a).all() and np.array_equal(a, run(jax.random.PRNGKey(2)))
    assert not np.allclose(a[0], a[3])   # chunks 0 and 1 (samples 0-2, 3-4) draw different dropout patterns


def _outside_stack_temps(family: str, layer_chunk: int) -> int:
    """Compiled temporaries of the gradient of a DiT, MDM or AR denoiser with no layers: the embeddings, final layer
    and output, what lies outside the layer stack (32 samples, 64 tokens, hidden 32)."""
    from dblocks.models.dit import DiT
    from dblocks.models.mdm import MDMTransformer
    if family == "dit":
        model = DiT(num_layers=0, hidden=32, heads=2, patch=2, image_size=16, channels=3, num_classes=4,
                    layer_chunk=layer_chunk)
        args = (jnp.zeros((32, 16, 16, 3)), jnp.zeros(32), jnp.zeros(32, jnp.int32))
    elif family == "mdm":
        model = MDMTransformer(vocab_size=27, num_layers=0, hidden=32, heads=2, layer_chunk=layer_chunk)
        args = (jnp.zeros((32, 64), jnp.int32), jnp.zeros(32))
    else:   # the AR denoiser: per-row noise levels, each row's conditioning through the noise embedder
        model = ar.ARModel(vocab=27, num_layers=0, hidden=32, heads=2, layer_chunk=layer_chunk)
        args = (jnp.zeros((32, 64), jnp.int32), jnp.zeros((32, 64, 8)), jnp.zeros((32, 64)))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args)["params"])
    fn = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, *args) ** 2)))
    return fn.lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("family", ["dit", "mdm", "ar"])
def test_layer_chunk_also_chunks_what_lies_outside_the_stack(family):
    """layer_chunk reaches the DiT's and MDM's final layer (its LayerNorm and modulation of the whole [N, T, hidden]
    stack output kept about six buffers of that size, the peak of cifar10_dit's steps once the layers were chunked)
    and the AR denoiser's per-row noise embedding (four [N * T, hidden] activations kept through lm1b_ar's block
    step): in chunks of 4 samples the temporaries fall to about a half. Values: test_tiny_models_same_loss."""
    whole, chunked = _outside_stack_temps(family, 0), _outside_stack_temps(family, 4)
    assert chunked < 0.7 * whole, (chunked, whole)
