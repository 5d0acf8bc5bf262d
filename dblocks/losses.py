"""Cross-entropy over a large vocabulary without materialising the logits.

`chunked_cross_entropy(h, kernel, bias, labels)` equals
`optax.softmax_cross_entropy_with_integer_labels(h @ kernel + bias, labels)` (per row), but computes the logits
`chunk_size` rows at a time inside a `lax.scan` whose body is rematerialised: the forward pass keeps one chunk's
[chunk, V] logits, and the backward pass recomputes each chunk's logits to form its gradient. For `lm1b_ar`
(N=256, T=256, V=32000) the full fp32 logits are 7.8 GiB, and their gradient as much again; with chunks of 4096
rows the loss holds about 0.5 GiB at a time. The matmuls run in the dtype of `h` (bf16 under model.dtype=bfloat16)
with float32 accumulation; logsumexp and the loss are float32.

Use with a model that returns the head's input rows (`ARModel(..., features=True)`) and the head's Linear
parameters (`params['head']['Dense_1']`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _chunk_ce(h: Array, kernel: Array, bias: Array | None, labels: Array) -> Array:
    logits = jnp.einsum("rh,hv->rv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def chunked_cross_entropy(h: Array, kernel: Array, bias: Array | None, labels: Array,
                          chunk_size: int = 4096) -> Array:
    """h [..., H], kernel [H, V], bias [V] or None, labels [...] int -> per-row cross-entropy [...] (float32)."""
    lead = labels.shape
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    R = h2.shape[0]
    chunk = max(1, min(int(chunk_size), R))
    pad = (-R) % chunk
    if pad:
        h2 = jnp.concatenate([h2, jnp.zeros((pad, h2.shape[1]), h2.dtype)])
        y = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    hs, ys = h2.reshape(-1, chunk, h2.shape[1]), y.reshape(-1, chunk)
    body = jax.checkpoint(lambda hc, yc: _chunk_ce(hc, kernel, bias, yc))

    def step(carry, xs):
        return carry, body(*xs)

    _, ce = jax.lax.scan(step, None, (hs, ys))
    return ce.reshape(-1)[:R].reshape(lead)
