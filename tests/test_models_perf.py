"""Performance options of the models (dblocks.models.options): scanned layers and remat compute the same function
as the unrolled model from the same (converted) parameters; bf16 trains like fp32; fused attention equals the
explicit one under the masks the tasks use; chunked cross-entropy equals the full one; a Dense's kernel gradient and
remat='narrow' keep what they promise."""
import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from dblocks import losses
from dblocks.models import ar, layers, stack
from dblocks.models.dit import DiT
from dblocks.models.mdm import MDMTransformer
from dblocks.models.recurrent import RecurrentModel
from dblocks.models.vit import ViTClassifier, ViTDenoiser

N = 2


def _perturb(params):
    """Zero-initialised heads and AdaLN gates make outputs trivially equal; give every leaf some signal."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _families():
    img = jax.random.normal(jax.random.PRNGKey(0), (N, 8, 8, 3))
    tok = jax.random.randint(jax.random.PRNGKey(1), (N, 6), 0, 11)
    z = jax.random.normal(jax.random.PRNGKey(2), (N, 6, 8))
    cn = jnp.array([[0.1] * 6, [-0.4] * 6])
    return {
        "dit": (lambda **o: DiT(num_layers=3, hidden=16, heads=2, patch=2, image_size=8, channels=3, num_classes=4,
                                **o), (img, jnp.array([0.1, -0.5]), jnp.array([1, 4]))),
        "vit_denoiser": (lambda **o: ViTDenoiser(num_layers=3, hidden=16, heads=2, patch=4, num_classes=5, **o),
                         (img, jnp.ones((N, 8)), jnp.array([0.2, -0.3]))),
        "vit_classifier": (lambda **o: ViTClassifier(num_layers=3, hidden=16, heads=2, patch=4, num_classes=5, **o),
                           (img,)),
        "mdm": (lambda **o: MDMTransformer(vocab_size=10, num_layers=3, hidden=16, heads=2, **o),
                (tok % 10, jnp.array([0.3, 0.9]))),
        "ar_denoiser": (lambda **o: ar.ARModel(vocab=11, num_layers=3, hidden=16, heads=2, **o), (tok, z, cn)),
        "ar_lm": (lambda **o: ar.ARModel(vocab=11, num_layers=3, hidden=16, heads=2, diffusion=False, **o), (tok,)),
        "recurrent": (lambda **o: RecurrentModel(vocab=11, hidden=16, heads=2, prelude=1, core=2, coda=2, **o),
                      (tok, z, cn)),
        "recurrent_lm": (lambda **o: RecurrentModel(vocab=11, hidden=16, heads=2, prelude=1, core=2, coda=2,
                                                    diffusion=False, iterations=2, **o), (tok,)),
    }


FAMILIES = _families()


@pytest.mark.parametrize("name", [n if n in ("vit_classifier", "ar_denoiser")
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])   # two families by default, every one with -m slow
def test_scan_and_remat_match_unrolled(name):
    make, args = FAMILIES[name]
    base = make()

    def value_and_grad(m, p):   # jitted: eager Flax applies dispatch op by op and are slow
        return jax.jit(jax.value_and_grad(lambda q: jnp.sum(jnp.sin(m.apply({"params": q}, *args)))))(p)

    p0 = _perturb(jax.jit(lambda: base.init(jax.random.PRNGKey(3), *args)["params"])())
    y0, g0 = value_and_grad(base, p0)
    variants = ((True, "none"), (True, "dots"), (False, "full"), (True, "full"), (True, "narrow")) if name == "dit" \
        else ((True, "full"),)   # scan and remat together for every family; each option alone on DiT
    for scan, remat in variants:
        m = make(scan_layers=scan, remat=remat)
        p = stack.stack_params(p0) if scan else p0
        fresh = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(3), *args)["params"])
        assert jax.tree.structure(fresh) == jax.tree.structure(p), (scan, remat)
        assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, p)
        y, g = value_and_grad(m, p)
        np.testing.assert_allclose(y, y0, atol=1e-4, rtol=1e-5)
        g = stack.unstack_params(g) if scan else g
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
    if name == "dit":   # the unrolled layout is the historical one, and the conversion is invertible
        assert {"layer_0", "layer_2"} <= set(p0) and "layers" not in p0
        assert jax.tree.structure(stack.unstack_params(stack.stack_params(p0))) == jax.tree.structure(p0)


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_ar_cache_paths_scanned(scan):
    """Prefill + cached noisy rows, and prefill + one cached clean row, equal the uncached full passes of the
    unrolled model, scanned or not."""
    T, t_max = 5, 8
    tok = jax.random.randint(jax.random.PRNGKey(1), (N, T + 1), 0, 11)
    z = jax.random.normal(jax.random.PRNGKey(2), (N, T + 1, 8))
    cn = jnp.full((N, T + 1), 0.2)
    pos, pmask, cmask = jnp.full((1, 1), T), ar.prefix_mask(T, t_max), ar.causal_mask(T)

    def check(diffusion):
        m = ar.ARModel(vocab=11, num_layers=2, hidden=16, heads=2, diffusion=diffusion, scan_layers=scan)
        base = ar.ARModel(vocab=11, num_layers=2, hidden=16, heads=2, diffusion=diffusion)
        args = (tok, z, cn) if diffusion else (tok,)
        p0 = _perturb(jax.jit(lambda: base.init(jax.random.PRNGKey(3), *args)["params"])())
        p = stack.stack_params(p0) if scan else p0

        @jax.jit
        def cached(p):
            _, kvs = m.apply({"params": p}, tok[:, :T], jnp.arange(T)[None], cmask, method=m.clean_rows)
            cache = ar.write_cache(ar.empty_cache(2, N, t_max, 2, 8), kvs, 0)
            if diffusion:
                return m.apply({"params": p}, z[:, T:T + 1], cn[:, T:T + 1], pos, pmask, cache,
                               method=m.noisy_rows)[:, 0]
            return m.apply({"params": p}, tok[:, T:T + 1], pos, pmask, cache, method=m.clean_rows)[0][:, 0]

        full = jax.jit(lambda q: base.apply({"params": q}, *args))(p0)[:, T]
        np.testing.assert_allclose(cached(p), full, atol=2e-5, rtol=1e-5)

    check(True)
    check(False)


@pytest.mark.slow
def test_bf16_cache_holds_the_compute_dtype_and_decodes_identically():
    """A bfloat16 model's K/V cache is bfloat16 (half the bytes, no conversion per call): the keys and values are
    computed in bf16, so storing them in float32 only round-tripped them exactly, and the next clean and noisy rows
    come out bit-identical from either cache."""
    from dblocks.tasks import get_task
    from experiments.configs import tiny_ar
    c = tiny_ar.get_config()
    c.method, c.model.dtype = "dblocks", "bfloat16"
    task = get_task(c)
    model = task.make_model(task.units("dblocks")[1])
    params = _perturb(task.init_params(model, jax.random.PRNGKey(0), task.dummy_batch()))
    tokens = jnp.asarray(np.arange(10).reshape(2, 5) % task.vocab.size)
    fns = task.block_fns(model, "softmax")
    _, cache = fns["prefill"](params, tokens)
    assert all(k.dtype == v.dtype == jnp.bfloat16 for k, v in cache)
    wide = [(k.astype(jnp.float32), v.astype(jnp.float32)) for k, v in cache]   # the cache as it was stored before
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 1, task.target_dim))
    row = lambda cc: fns["noisy_row"](params, cc, z, jnp.full((2,), 0.3), 5, jax.random.PRNGKey(0),  # noqa
                                      tokens[:, 4])
    for a, b in zip(jax.tree.leaves(row(cache)), jax.tree.leaves(row(wide))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _saved_residuals(fn, *args) -> str:
    """What jax.ad_checkpoint.print_saved_residuals prints for fn(*args): one line per value kept for the backward."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    return out.getvalue()


def _temp_bytes(scan: bool, remat: str) -> int:
    m = DiT(num_layers=6, hidden=32, heads=2, patch=2, image_size=16, channels=3, num_classes=4, scan_layers=scan,
            remat=remat)
    x, c, y = jnp.zeros((16, 16, 16, 3)), jnp.zeros((16,)), jnp.zeros((16,), jnp.int32)
    params = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, c, y)["params"])
    grad = jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, x, c, y) ** 2)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_scanned_remat_reduces_compiled_temporaries():
    plain, remat, narrow = _temp_bytes(True, "none"), _temp_bytes(True, "full"), _temp_bytes(True, "narrow")
    assert remat < 0.7 * plain, (remat, plain)
    assert narrow < 0.7 * plain, (narrow, plain)


@pytest.mark.parametrize("name", ["dit", "vit_classifier", "ar_denoiser"])
def test_narrow_remat_saves_the_named_width_activations_only(name):
    """remat='narrow' (each layer class: AdaLNZeroLayer, ViTLayer, CausalLayer) keeps the layer's named
    [N, T, hidden] activations and none of the MLP's [N, T, 4 * hidden] ones."""
    make, args = FAMILIES[name]
    m = make(remat="narrow")
    p = jax.jit(lambda: m.init(jax.random.PRNGKey(3), *args)["params"])()
    saved = _saved_residuals(lambda q: jnp.sum(jnp.sin(m.apply({"params": q}, *args))), p)
    lines = [ln for ln in saved.splitlines() if "from the argument" not in ln]
    assert any("named 'attn_in'" in ln for ln in lines) and any("named 'mlp_in'" in ln for ln in lines), lines
    assert not [ln for ln in lines if ",64]" in ln], lines          # hidden 16, MLP width 64: recomputed


def _kernel_grad_dots(fn, *args):
    """(lhs shape, rhs shape) of every dot_general in the gradient's jaxpr (inner jaxprs included)."""
    shapes = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                shapes.append((tuple(e.invars[0].aval.shape), tuple(e.invars[1].aval.shape)))
            for sub in jax.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.slow
def test_dense_kernel_gradient_transposes_the_smaller_operand():
    """An expanding Dense (in < out) differentiates its kernel as x^T g, not (g^T x)^T: on the CPU the left operand
    of a dot is copied transposed, and g [rows, out] is the large one. Same values and gradients as lax.dot_general,
    f32 and bf16; a remat policy that saves matmul outputs still saves the product."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8))
    dims = (((2,), (0,)), ((), ()))
    for shape in [(8, 24), (8, 8), (8, 4)]:                         # expanding, square, contracting
        w = jax.random.normal(jax.random.PRNGKey(1), shape)
        for dt, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]:
            def loss(x, w, dot):
                return jnp.sum(jnp.tanh(dot(x.astype(dt), w.astype(dt), dims)).astype(jnp.float32) ** 2)
            ours = jax.value_and_grad(lambda x, w: loss(x, w, layers.dense_dot_general), (0, 1))(x, w)
            ref = jax.value_and_grad(lambda x, w: loss(x, w, jax.lax.dot_general), (0, 1))(x, w)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    w = jnp.ones((8, 24))
    grad = jax.grad(lambda w, x: jnp.sum(layers.dense_dot_general(x, w, dims) ** 2))
    dots = _kernel_grad_dots(grad, w, x)
    assert ((3, 5, 8), (3, 5, 24)) in dots          # x^T g: x on the left
    assert ((3, 5, 24), (3, 5, 8)) not in dots      # not g^T x
    m = ViTClassifier(num_layers=1, hidden=16, heads=2, patch=4, num_classes=5, mlp_ratio=4.0)
    img = jnp.ones((2, 8, 8, 3))
    p = m.init(jax.random.PRNGKey(0), img)["params"]
    shapes = _kernel_grad_dots(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, img) ** 2)), p)
    assert ((2, 5, 16), (2, 5, 64)) in shapes and ((2, 5, 64), (2, 5, 16)) not in shapes   # the MLP's 16 -> 64
    policy = jax.checkpoint(lambda x, w: jnp.sum(jnp.tanh(layers.dense_dot_general(x, w, dims))),
                            policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    saved = _saved_residuals(policy, x, jnp.ones((8, 24)))
    assert "f32[3,5,24] output of dot_general" in saved, saved


def _mlp_stack_grad(second_dense, n_layers=4, rows=512, hidden=16, wide=256):
    """Gradient of a residual stack of MLPs (hidden -> wide -> hidden, tanh GELU); second_dense(h, kernel) is the
    second layer given the first one's pre-activation output h."""
    dims = (((1,), (0,)), ((), ()))

    def loss(params, x):
        for w1, w2 in params:
            x = x + second_dense(layers.dense_dot_general(x, w1, dims), w2)
        return jnp.sum(x ** 2)

    keys = jax.random.split(jax.random.PRNGKey(4), 2 * n_layers + 1)
    params = [(jax.random.normal(keys[2 * i], (hidden, wide)) / 4,
               jax.random.normal(keys[2 * i + 1], (wide, hidden)) / 16) for i in range(n_layers)]
    return jax.grad(loss), params, jax.random.normal(keys[-1], (rows, hidden))


@pytest.mark.slow
def test_gelu_dense_keeps_only_its_input_for_the_backward_pass():
    """gelu_input=True (an MLP's second Dense given the first one's output h): the same values and gradients as
    gelu(h) @ kernel, f32 and bf16, with or without a remat policy; and the compiled gradient keeps one [rows, wide]
    tensor per layer (h) for the backward pass instead of three (h, the tanh, gelu(h)). Guards the data dependency
    that keeps XLA from merging the recomputation with the forward pass or scheduling it early: without it the
    temporaries are those of plain autodiff."""
    dims = (((2,), (0,)), ((), ()))
    h = 3 * jax.random.normal(jax.random.PRNGKey(0), (3, 5, 24))
    w = jax.random.normal(jax.random.PRNGKey(1), (24, 8))
    for dt, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)]:
        def loss(h, w, gelu_input, policy=None):
            def f(h, w):
                h, w = h.astype(dt), w.astype(dt)
                y = (layers.gelu_dense_dot_general(h, w, dims) if gelu_input
                     else layers.dense_dot_general(nn.gelu(h, approximate=True), w, dims))
                return jnp.sum(jnp.tanh(y).astype(jnp.float32) ** 2)
            return (jax.checkpoint(f, policy=policy) if policy else f)(h, w)
        ref = jax.value_and_grad(lambda h, w: loss(h, w, False), (0, 1))(h, w)
        for policy in (None, jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                       jax.checkpoint_policies.nothing_saveable):
            ours = jax.value_and_grad(lambda h, w: loss(h, w, True, policy), (0, 1))(h, w)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    plain = lambda h, w: layers.dense_dot_general(nn.gelu(h, approximate=True), w, (((1,), (0,)), ((), ())))  # noqa
    fused = lambda h, w: layers.gelu_dense_dot_general(h, w, (((1,), (0,)), ((), ())))                       # noqa
    temps = {}
    for name, second in [("plain", plain), ("fused", fused)]:
        grad, params, x = _mlp_stack_grad(second)
        temps[name] = jax.jit(grad).lower(params, x).compile().memory_analysis().temp_size_in_bytes
    wide_bytes = 512 * 256 * 4
    # 4 layers: the backward pass of the last one starts with the three others' saved tensors alive
    assert temps["fused"] <= temps["plain"] - 2 * 3 * wide_bytes + wide_bytes, temps


@pytest.mark.slow
def test_rematerialised_layers_use_the_plain_gelu_dense():
    """Under remat the layer recomputes its MLP anyway: stack.apply_layers turns gelu_dense_dot_general off there
    (inside a scanned, rematerialised body it let XLA materialise the GELU's constants at full width: cifar10_dit's
    block + remat step 9,874 -> 13,714 MiB compiled). Without remat every layer family uses it."""
    img = jnp.ones((2, 8, 8, 3))
    for remat, scan in [("none", False), ("none", True), ("full", False), ("full", True), ("narrow", True)]:
        m = ViTClassifier(num_layers=2, hidden=16, heads=2, patch=4, num_classes=5, remat=remat, scan_layers=scan)
        p = jax.jit(lambda m=m: m.init(jax.random.PRNGKey(0), img)["params"])()
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, img) ** 2)))(p))
        assert ("_gelu_dense_grads" in jaxpr) == (remat == "none"), (remat, scan)


def test_fused_attention_matches_explicit_under_task_masks():
    T, t_max = 6, 9
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k1, (N, 2 * T, 2, 8))
    k = jax.random.normal(k2, (N, 2 * T, 2, 8))
    v = jax.random.normal(k3, (N, 2 * T, 2, 8))
    for mask in (None, ar.causal_mask(2 * T), ar.ar_mask(T)):
        np.testing.assert_allclose(layers.attend(q, k, v, mask, "xla"), layers.attend(q, k, v, mask, "einsum"),
                                   atol=1e-5, rtol=1e-5)
    pm = ar.prefix_mask(4, t_max - 1)                                     # one row against a cache
    np.testing.assert_allclose(layers.attend(q[:, :1], k[:, :t_max], v[:, :t_max], pm, "xla"),
                               layers.attend(q[:, :1], k[:, :t_max], v[:, :t_max], pm, "einsum"), atol=1e-5)
    # the masked keys really are ignored: changing them changes nothing
    m = ar.ar_mask(T)
    k_changed = k.at[:, T:].add(3.0)                                      # noisy keys: clean rows never see them
    a = layers.attend(q, k, v, m, "xla")[:, :T]
    np.testing.assert_allclose(layers.attend(q, k_changed, v, m, "xla")[:, :T], a, atol=1e-6)
    bf = layers.attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), m, "xla")
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(bf.astype(jnp.float32), layers.attend(q, k, v, m, "einsum"), atol=0.05)


@pytest.mark.slow
def test_bf16_trains_like_fp32():
    """bf16 compute, float32 parameters and optimizer state: the loss curve of a tiny DiT regression run stays
    within a few per cent of the fp32 one."""
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 3))
    c, y = jnp.linspace(-1, 1, 16), jnp.arange(16) % 4
    target = jnp.roll(x, 1, axis=1)
    curves = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        m = DiT(num_layers=2, hidden=32, heads=2, patch=2, image_size=8, channels=3, num_classes=4, dtype=dtype)
        params = m.init(jax.random.PRNGKey(1), x, c, y)["params"]
        tx = optax.adam(1e-3)
        opt = tx.init(params)

        @jax.jit
        def step(params, opt):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((m.apply({"params": p}, x, c, y) - target) ** 2))(params)
            u, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, u), opt, loss

        losses_ = []
        for _ in range(30):
            params, opt, loss = step(params, opt)
            losses_.append(float(loss))
        assert loss.dtype == jnp.float32
        floats = [a for a in jax.tree.leaves((params, opt)) if jnp.issubdtype(a.dtype, jnp.floating)]
        assert floats and all(a.dtype == jnp.float32 for a in floats)
        curves[dtype] = np.array(losses_)
    f32, b16 = curves[jnp.float32], curves[jnp.bfloat16]
    assert f32[-1] < 0.8 * f32[0]                                          # it learns
    np.testing.assert_allclose(b16, f32, rtol=0.05)                        # the same curve, step by step
    assert not np.array_equal(b16, f32)                                    # and bf16 really was used


def test_chunked_cross_entropy_matches_full():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k1, (3, 7, 16))
    w = 0.3 * jax.random.normal(k2, (16, 50))
    b = jnp.linspace(-1, 1, 50)
    labels = jax.random.randint(k3, (3, 7), 0, 50)

    def full(h, w, b):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w + b, labels)

    def chunked(h, w, b):
        return losses.chunked_cross_entropy(h, w, b, labels, chunk_size=4)

    np.testing.assert_allclose(chunked(h, w, b), full(h, w, b), atol=1e-5, rtol=1e-5)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * jnp.arange(7)), argnums=(0, 1, 2))(h, w, b)
    g_chunk = jax.grad(lambda *a: jnp.sum(chunked(*a) * jnp.arange(7)), argnums=(0, 1, 2))(h, w, b)
    for a, c in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5)


def test_chunked_cross_entropy_never_holds_all_logits():
    h = jax.ShapeDtypeStruct((8, 256, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 8192), jnp.float32)
    b = jax.ShapeDtypeStruct((8192,), jnp.float32)
    labels = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    logits_bytes = 8 * 256 * 8192 * 4

    def temps(fn):
        g = jax.jit(jax.grad(lambda h, w, b, y: jnp.mean(fn(h, w, b, y)), argnums=(0, 1)))
        return g.lower(h, w, b, labels).compile().memory_analysis().temp_size_in_bytes

    full = temps(lambda h, w, b, y: optax.softmax_cross_entropy_with_integer_labels(h @ w + b, y))
    chunked = temps(lambda h, w, b, y: losses.chunked_cross_entropy(h, w, b, y, chunk_size=256))
    chunk_bytes = 256 * 8192 * 4                                          # one chunk's logits
    assert full >= logits_bytes
    assert chunked <= 3 * chunk_bytes < logits_bytes / 2, (chunked, full)


def test_runtime_cache_and_gpu_warning(tmp_path, monkeypatch, caplog):
    from dblocks import runtime
    monkeypatch.setenv("DBLOCKS_CACHE", str(tmp_path / "cache"))
    assert runtime.cache_dir() == str(tmp_path / "cache")
    monkeypatch.setenv("DBLOCKS_CACHE", "off")
    assert runtime.cache_dir() is None and runtime.enable_compilation_cache() is None
    monkeypatch.setattr(runtime, "gpu_visible", lambda: True)
    with caplog.at_level("INFO", logger="dblocks"):
        info = runtime.log_devices()
    assert info["backend"] == "cpu" and info["jax"] == jax.__version__
    assert any("GPU is visible" in r.message for r in caplog.records)


def test_runtime_reads_the_allocator_from_the_memory_map():
    from dblocks import runtime
    libc = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert runtime.allocator(libc) == "glibc"
    assert runtime.allocator(libc + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n") == "tcmalloc"
    assert runtime.allocator(libc + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n") == \
        "jemalloc"
    assert runtime.allocator("") == "system"
    assert runtime.allocator() in ("glibc", "tcmalloc", "jemalloc", "mimalloc", "system")   # this process


def test_bench_matmul_rate():
    from dblocks import runtime
    r = runtime.matmul_rate(256, repeats=2)
    assert r["n"] == 256 and r["gflops"] > 0


@pytest.mark.slow
def test_bench_device_suite_small():
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--device", "--small", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-2000:]
    suite = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    for name in ("cifar10_dit", "cifar100_vit"):
        for row in ("e2e", "block"):
            assert suite[name][row]["gflops_per_s"] > 0 and suite[name][row]["peak_rss_bytes"] > 0
        assert suite[name]["sample_dblocks"]["images_per_s"] > 0


@pytest.mark.slow
def test_bench_splits_the_cpu_for_data_parallel_training_rows():
    """experiments.bench --cpu_devices N: the training rows run with the batch split over N CPU devices (reported as
    such, with the whole batch's FLOPs); a count that does not divide the batch is refused with status 2."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [sys.executable, "-m", "experiments.bench", "--config", "experiments/configs/tiny_vit.py", "--rows",
            "block", "--steps", "1", "--warmup", "1", "--sample_batch", "0", "--json"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # not conftest's 8 devices: --cpu_devices
    bad = subprocess.run(base + ["--cpu_devices", "3"], cwd=root, capture_output=True, text=True, timeout=300,
                         env=env)
    assert bad.returncode == 2 and "must be >= 0 and divide the batch size 16" in bad.stderr, bad.stderr[-1000:]
    proc = subprocess.run(base + ["--cpu_devices", "2"], cwd=root, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])["block"]
    from dblocks import memory
    from dblocks.tasks import get_task
    from experiments.configs import tiny_vit
    task = get_task(tiny_vit.get_config())
    unit = max(task.units("dblocks"), key=lambda u: u.num_layers)
    assert row["devices"] == 2 and row["flops"] == memory.step_flops(task, unit, 16)[0]
    assert row["gflops_per_s"] > 0 and row["step_seconds"] > 0


def test_ar_task_chunked_loss_matches():
    """model.loss_chunk > 0: the end-to-end LM loss through dblocks.losses equals the full-logits loss."""
    from dblocks.tasks import get_task
    from experiments.configs import tiny_ar
    c = tiny_ar.get_config()
    task = get_task(c)
    unit = task.units("e2e")[0]
    model = task.make_model(unit)
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(0), (4, int(c.data.seq_len)), 0, task.vocab.size)}
    params = _perturb(jax.jit(lambda: task.init_params(model, jax.random.PRNGKey(1), batch))())
    full = jax.jit(lambda p: task.loss(model, p, batch, jax.random.PRNGKey(2), jnp.zeros(2))[0])(params)
    with c.unlocked():
        c.model.loss_chunk = 7
    chunked_task = get_task(c)
    chunked = jax.jit(lambda p: chunked_task.loss(model, p, batch, jax.random.PRNGKey(2), jnp.zeros(2))[0])(params)
    np.testing.assert_allclose(chunked, full, rtol=1e-5)


def test_ar_prior_head_chunked_loss_and_grads_match(monkeypatch):
    """model.loss_chunk with the prior head: a DiffusionBlocks block's loss (the prior's CE, no likelihood term) and
    its gradient through dblocks.losses equal the full-logits ones; the posterior head refuses loss_chunk."""
    from dblocks.tasks import get_task
    from experiments.configs import tiny_ar
    _chunked = losses.chunked_cross_entropy
    c = tiny_ar.get_config()
    c.model.likelihood, c.model.match_sigma_data, c.model.lm_head = True, True, "prior"
    c.edm.loss_weighting = "none"
    task = get_task(c)
    unit = task.units("dblocks")[1]
    model = task.make_model(unit)
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(0), (4, int(c.data.seq_len)), 0, task.vocab.size)}
    params = _perturb(jax.jit(lambda: task.init_params(model, jax.random.PRNGKey(1), batch))())
    rng = unit.train_range
    def fn(t):
        return jax.jit(jax.value_and_grad(lambda p: t.loss(model, p, batch, jax.random.PRNGKey(2), rng)[0]))
    full, g_full = fn(task)(params)
    c.model.loss_chunk = 7
    calls = []
    monkeypatch.setattr(losses, "chunked_cross_entropy",
                        lambda *a, **k: calls.append(a[-1]) or _chunked(*a, **k))
    chunked, g_chunked = fn(get_task(c))(params)
    assert calls == [7]   # the chunked path ran
    np.testing.assert_allclose(chunked, full, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_chunked, g_full)
    c.model.lm_head = "posterior"
    assert any("loss_chunk" in p for p in get_task(c).validate())
