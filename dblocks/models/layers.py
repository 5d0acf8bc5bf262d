"""Transformer layers conditioned through AdaLN-Zero (DiT), shared by every model family.

Shapes: tokens x [N, T, H] (H = hidden), conditioning c [N, H], attention mask [N or 1, 1, T, T] (True = may attend)
or a `MaskSpec` (the same mask as a rule of row and column indices, dblocks.models.chunked).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dblocks.models.chunked import Mask, MaskSpec, chunked_attention, map_samples, mlp

Array = jax.Array


def sinusoidal_embedding(x: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """[N] -> [N, dim] cosine/sine features (DiT's timestep embedding, fed with EDM's c_noise = ln(sigma)/4)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = x.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_2d(grid_size: int, dim: int) -> Array:
    """Fixed 2-D sine-cosine position embedding [grid_size^2, dim] (DiT/MAE)."""
    coords = jnp.arange(grid_size, dtype=jnp.float32)
    gy, gx = jnp.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
    parts = []
    for g in (gy, gx):
        args = g.reshape(-1)[:, None] * omega[None]
        parts += [jnp.sin(args), jnp.cos(args)]
    return jnp.concatenate(parts, axis=-1)


def rope(x: Array, positions: Array, base: float = 10_000.0) -> Array:
    """Rotary position embedding on [N, T, heads, d] with integer positions [N or 1, T] (angles in float32, the
    result in x's dtype)."""
    d = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(d, dtype=jnp.float32) / d)
    ang = positions[..., None, None].astype(jnp.float32) * freqs  # [N, T, 1, d]
    x1, x2 = x[..., :d].astype(jnp.float32), x[..., d:].astype(jnp.float32)
    out = jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x1 * jnp.sin(ang) + x2 * jnp.cos(ang)], -1)
    return out.astype(x.dtype)


Dropout = nn.Module | tuple[float, Array] | None


def attend(q: Array, k: Array, v: Array, mask: Mask, implementation: str = "xla", dropout: Dropout = None,
           chunk: int = 128) -> Array:
    """softmax(q k^T / sqrt(d) + mask) v on [N, T, heads, d] (keys [N, S, heads, d]); mask bool, broadcastable to
    [N, heads, T, S], or a MaskSpec. 'xla' / 'cudnn' go through jax.nn.dot_product_attention (logits and softmax in
    float32); 'einsum', or a `dropout` module on the probabilities, takes the explicit path (also float32 softmax);
    'chunked' is `chunked_attention` (O(T) memory; its dropout is (rate, key))."""
    if implementation == "chunked":
        if isinstance(dropout, nn.Module):
            raise TypeError("chunked attention takes dropout as (rate, key), not a module")
        return chunked_attention(q, k, v, mask, chunk, dropout)
    if isinstance(mask, MaskSpec):
        mask = mask.dense()
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask if mask.ndim == 4 else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if implementation != "einsum" and dropout is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("nhqk,nkhd->nqhd", probs, v)


def attend_cached(q: Array, k: Array, v: Array, cache: tuple[Array, Array], mask: Array | None) -> Array:
    """Attention of S new rows over [cache ; themselves] without concatenating: q, k, v [N, S, heads, d]; cache
    (k, v) head-major [N, heads, T_max, d] (dblocks.models.ar.empty_cache); mask bool, broadcastable to
    [N, heads, S, T_max + S] (cache slots first). The same softmax as `attend` on the concatenation, computed in two
    parts that share one maximum and one denominator. Measured at decoding shapes on the CPU (batch 64, 64 slots,
    4 heads of 32): 112 us against 339 us for concatenate + attend, whose dot transposes the whole cache per call
    (docs/lab/performance.md, "Where the decoding loop's time went")."""
    t_max, scale = cache[0].shape[2], 1.0 / math.sqrt(q.shape[-1])
    ck, cv = cache[0].astype(k.dtype), cache[1].astype(v.dtype)
    lc = jnp.einsum("nqhd,nhkd->nhqk", q, ck, preferred_element_type=jnp.float32) * scale
    ls = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask if mask.ndim == 4 else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        low = jnp.finfo(jnp.float32).min
        lc = jnp.where(mask[..., :t_max], lc, low)
        ls = jnp.where(mask[..., t_max:], ls, low)
    top = jnp.maximum(lc.max(-1, keepdims=True), ls.max(-1, keepdims=True))
    pc, ps = jnp.exp(lc - top), jnp.exp(ls - top)
    den = pc.sum(-1, keepdims=True) + ps.sum(-1, keepdims=True)          # [N, heads, S, 1]
    out = (jnp.einsum("nhqk,nhkd->nqhd", pc.astype(cv.dtype), cv, preferred_element_type=jnp.float32)
           + jnp.einsum("nhqk,nkhd->nqhd", ps.astype(v.dtype), v, preferred_element_type=jnp.float32))
    return (out / jnp.swapaxes(den, 1, 2)).astype(v.dtype)


def _kernel_grad_of(x: Array, g: Array, kernel: Array) -> Array:
    """The gradient of `kernel` in y = x @ kernel from y's cotangent g, with the smaller of x and g as the operand
    contracted over its rows (the one XLA's CPU dot copies transposed): x^T g for an expanding layer (in < out),
    (g^T x)^T otherwise (JAX's own orientation)."""
    rows = tuple(range(x.ndim - 1))
    if x.shape[-1] < g.shape[-1]:
        grad = jax.lax.dot_general(x, g, ((rows, rows), ((), ())))
    else:
        grad = jax.lax.dot_general(g, x, ((rows, rows), ((), ()))).T
    return grad.astype(kernel.dtype)


@jax.custom_vjp
def _kernel_grad(x: Array, kernel: Array) -> Array:
    """Zeros shaped like x @ kernel, whose cotangent g gives the kernel its gradient as dot(x^T, g)."""
    return jnp.zeros(x.shape[:-1] + kernel.shape[1:], x.dtype)


def _kernel_grad_fwd(x, kernel):
    return _kernel_grad(x, kernel), (x, kernel)


def _kernel_grad_bwd(res, g):
    x, kernel = res
    return None, _kernel_grad_of(x, g, kernel)


_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def _gelu(h: Array) -> Array:
    return nn.gelu(h, approximate=True)


def _gelu_derivative(h: Array) -> Array:
    """d gelu(h) / dh for the tanh GELU, 0.5 * h * (1 + tanh(z)) with z = sqrt(2 / pi) * (h + 0.044715 h^3), written
    with s = sigmoid(2 z) = (1 + tanh(z)) / 2: gelu = h * s, gelu' = s + 2 h s (1 - s) z'. Through exp rather than
    tanh, so XLA computes it inside the gradient's elementwise pass instead of sharing (and writing out) a tanh
    with gelu(h)."""
    c = math.sqrt(2.0 / math.pi)
    z = c * (h + 0.044715 * h ** 3)
    s = 1.0 / (1.0 + jnp.exp(-2.0 * z))
    return s + 2.0 * h * s * (1.0 - s) * c * (1.0 + 3 * 0.044715 * h * h)


@jax.custom_vjp
def _gelu_dense_grads(h: Array, kernel: Array) -> Array:
    """Zeros shaped like gelu(h) @ kernel, whose cotangent g gives h and the kernel their gradients, recomputing
    gelu(h) (and its derivative) from h in the backward pass."""
    return jnp.zeros(h.shape[:-1] + kernel.shape[1:], h.dtype)


def _gelu_dense_grads_fwd(h, kernel):
    return _gelu_dense_grads(h, kernel), (h, kernel)


def _gelu_dense_grads_bwd(res, g):
    h, kernel = res
    ga = jax.lax.dot_general(g, kernel.astype(g.dtype), (((g.ndim - 1,), (1,)), ((), ()))).astype(h.dtype)
    # h + 0 * ga[0] ties the recomputation to the cotangent, so XLA can neither merge it with the forward pass's
    # gelu(h) (common subexpressions) nor schedule it before this layer's backward pass: either would keep the
    # [rows, 4 * hidden] activations alive again. (An optimization_barrier does not hold: XLA's CPU pipeline removes
    # barriers before scheduling. The element is read from the matmul's output, a buffer: one taken from g itself
    # let XLA fuse g's whole computation into the elementwise loop. Floating-point x * 0 is not folded by XLA; a
    # non-finite ga[0] makes the gradients non-finite either way.)
    h = h + ga.reshape(-1)[0] * 0
    return ga * _gelu_derivative(h), _kernel_grad_of(_gelu(h), g, kernel)


_gelu_dense_grads.defvjp(_gelu_dense_grads_fwd, _gelu_dense_grads_bwd)


def _standard(x: Array, kernel: Array, dimension_numbers) -> bool:
    return kernel.ndim == 2 and dimension_numbers == (((x.ndim - 1,), (0,)), ((), ()))


def dense_dot_general(x: Array, kernel: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
    """`lax.dot_general` for a Dense (x [..., in] @ kernel [in, out]) whose kernel gradient transposes the smaller
    operand.

    JAX differentiates x @ kernel into kernel_grad = (g^T x)^T: the cotangent g [rows, out] is the left operand,
    contracted over its leading (row) axis. A CPU matmul kernel (XLA's YNNPACK) wants the left operand contracted
    over its last axis, so XLA copies g transposed first: for an expanding layer (in < out, e.g. an MLP's 128 ->
    3072) that is the large tensor; removing the copy made the CIFAR-100 ViT block step 8-14 % faster on the CPU
    (docs/lab/performance.md, "The kernel gradient"). Here, when in < out, the kernel gradient is computed as x^T g
    (x is the smaller one) by a custom-VJP term that is zero in the forward pass and that XLA removes; the product
    itself stays an ordinary `dot_general`, so rematerialisation policies that save matmul outputs still see it. Same
    values to float rounding (tests/test_models_perf.py); the input gradient is JAX's own. Being a custom VJP, the
    term supports reverse-mode differentiation only: nothing in dblocks uses `jax.jvp` on a model, and code that
    needs forward mode should build its Dense layers without this `dot_general`.
    """
    swap = _standard(x, kernel, dimension_numbers) and x.shape[-1] < kernel.shape[-1]
    y = jax.lax.dot_general(x, jax.lax.stop_gradient(kernel) if swap else kernel, dimension_numbers,
                            precision=precision, preferred_element_type=preferred_element_type)
    return y + _kernel_grad(jax.lax.stop_gradient(x), kernel).astype(y.dtype) if swap else y


def gelu_dense_dot_general(h: Array, kernel: Array, dimension_numbers, precision=None,
                           preferred_element_type=None) -> Array:
    """gelu(h) @ kernel (tanh GELU) for an MLP's second Dense, given the first one's output h, keeping only h for
    the backward pass.

    Autodiff of gelu(h) @ kernel keeps three [rows, 4 * hidden] tensors per layer until the backward pass: h and the
    tanh for GELU's derivative, gelu(h) for the kernel's gradient; they were most of the CIFAR-100 ViT block step's
    compiled temporaries. Here the product is an ordinary `dot_general` of gelu(h) with gradients stopped (so
    rematerialisation policies still see it) plus a custom-VJP term, zero in the forward pass, that recomputes
    gelu(h) and its derivative from h in the backward pass (one more elementwise pass, no matmul) and returns the
    gradients of h and the kernel. Same values and gradients as `dense_dot_general(gelu(h), ...)` to float rounding
    (tests/test_models_perf.py); reverse mode only, as `dense_dot_general`. Not used in rematerialised layers, which
    recompute the MLP anyway (`stack.apply_layers`).
    """
    if not _standard(h, kernel, dimension_numbers):
        return _plain_gelu_dense_dot_general(h, kernel, dimension_numbers, precision, preferred_element_type)
    stop = jax.lax.stop_gradient
    y = jax.lax.dot_general(_gelu(stop(h)), stop(kernel), dimension_numbers,
                            precision=precision, preferred_element_type=preferred_element_type)
    return y + _gelu_dense_grads(h, kernel).astype(y.dtype)


def _plain_gelu_dense_dot_general(h: Array, kernel: Array, dimension_numbers, precision=None,
                                  preferred_element_type=None) -> Array:
    """gelu(h) @ kernel by plain autodiff (what a rematerialised layer uses)."""
    return dense_dot_general(_gelu(h), kernel, dimension_numbers, precision, preferred_element_type)


def dense(features: int, dtype, init=nn.initializers.xavier_uniform(), gelu_input: bool = False,
          recompute_gelu: bool = True, **kw) -> nn.Dense:
    """A Dense computing in `dtype` with float32 parameters (kernel gradient: `dense_dot_general`). gelu_input: the
    layer computes gelu(x) @ kernel + bias from the pre-activation x (an MLP's second Dense), keeping only x for the
    backward pass (`gelu_dense_dot_general`: same parameters and values, less memory) unless recompute_gelu=False
    (plain autodiff)."""
    if gelu_input:
        dot = gelu_dense_dot_general if recompute_gelu else _plain_gelu_dense_dot_general
    else:
        dot = dense_dot_general
    return nn.Dense(features, kernel_init=init, dtype=dtype, param_dtype=jnp.float32, dot_general=dot, **kw)


def layer_norm(dtype, **kw) -> nn.LayerNorm:
    """Parameter-free LayerNorm (AdaLN supplies scale and shift); statistics in float32."""
    return nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, dtype=dtype, **kw)


class NoiseEmbedder(nn.Module):
    """c_noise [N] -> [N, hidden]: sinusoidal features, then Linear-SiLU-Linear (DiT's TimestepEmbedder)."""
    hidden: int
    freq_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, c_noise: Array) -> Array:
        init = nn.initializers.normal(0.02)
        h = nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype)(sinusoidal_embedding(c_noise, self.freq_dim))
        return nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype)(nn.silu(h))


class Attention(nn.Module):
    """Multi-head self-attention with an optional boolean mask and optional rotary positions."""
    hidden: int
    heads: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    chunk: int = 128   # query rows per chunk of attention='chunked'

    @nn.compact
    def __call__(self, x: Array, mask: Mask = None, positions: Array | None = None, train: bool = False) -> Array:
        N, T, _ = x.shape
        hd = self.hidden // self.heads
        qkv = dense(3 * self.hidden, self.dtype)(x)
        q, k, v = jnp.split(qkv.reshape(N, T, 3 * self.heads, hd), 3, axis=2)
        if positions is not None:
            q, k = rope(q, positions), rope(k, positions)
        drop = None
        if train and self.dropout > 0:
            drop = ((self.dropout, self.make_rng("dropout")) if self.attention == "chunked"
                    else nn.Dropout(self.dropout, deterministic=False))
        out = attend(q, k, v, mask, self.attention, drop, self.chunk).reshape(N, T, self.hidden)
        return dense(self.hidden, self.dtype)(out)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNZeroLayer(nn.Module):
    """One transformer layer with AdaLN-Zero conditioning (DiT): the modulation is Linear(SiLU(c)), zero-initialised,
    so every layer starts as the identity. (The authors' ViT code applies the SiLU after the Linear; dblocks uses
    DiT's order only, docs/method.md section 5.)"""
    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    recompute_gelu: bool = True   # MLP keeps only its first output for backward; off under remat (stack.apply_layers)
    attention_chunk: int = 128    # query rows per chunk of attention='chunked'
    mlp_chunk: int = 0            # rows per MLP chunk (chunked.mlp); 0: the whole MLP at once
    layer_chunk: int = 0          # samples per chunk of the whole layer (chunked.map_samples); 0: all at once

    @nn.compact
    def __call__(self, x: Array, c: Array, mask: Mask = None, positions: Array | None = None,
                 train: bool = False) -> Array:
        if 0 < self.layer_chunk < x.shape[0] and not self.is_initializing():
            return map_samples(self, self.layer_chunk, (x, c), (mask, positions), train and self.dropout > 0,
                               train=train)
        lin = dense(6 * self.hidden, self.dtype, nn.initializers.zeros, bias_init=nn.initializers.zeros)
        mod = lin(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        ln = lambda: layer_norm(self.dtype)  # noqa: E731
        h = Attention(self.hidden, self.heads, self.dropout, self.dtype, self.attention, self.attention_chunk)(
            checkpoint_name(modulate(ln()(x), shift_a, scale_a), "attn_in"), mask, positions, train)
        x = x + gate_a[:, None] * nn.Dropout(self.dropout)(checkpoint_name(h, "attn_out"), deterministic=not train)
        h_in = checkpoint_name(modulate(ln()(x), shift_m, scale_m), "mlp_in")
        fc1 = dense(int(self.hidden * self.mlp_ratio), self.dtype)
        fc2 = dense(self.hidden, self.dtype, gelu_input=True, recompute_gelu=self.recompute_gelu)
        h = checkpoint_name(mlp(self, fc1, fc2, h_in, self.mlp_chunk), "mlp_out")
        return x + gate_m[:, None] * nn.Dropout(self.dropout)(h, deterministic=not train)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale; zero-initialised) then a zero-initialised Linear: the model starts at output 0.
    The output is float32 whatever the compute dtype (losses are computed in float32).

    layer_chunk > 0: computed on chunks of that many samples, each rematerialised (`map_samples`), as the layers
    are. The LayerNorm and modulation of the whole [N, T, hidden] stack output otherwise keep about six buffers of
    that size alive at once, in the forward and the backward pass, outside the layer stack and its remat: on
    `cifar10_dit` they were the peak of both the block and the end-to-end step (docs/performance.md)."""
    hidden: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32
    layer_chunk: int = 0   # samples per chunk (chunked.map_samples); 0: all at once

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        if 0 < self.layer_chunk < x.shape[0] and not self.is_initializing():
            return map_samples(self, self.layer_chunk, (x, c))
        shift, scale = jnp.split(dense(2 * self.hidden, self.dtype, nn.initializers.zeros)(nn.silu(c)), 2, -1)
        x = modulate(layer_norm(self.dtype)(x), shift, scale)
        return dense(self.out_dim, self.dtype, nn.initializers.zeros)(x).astype(jnp.float32)
