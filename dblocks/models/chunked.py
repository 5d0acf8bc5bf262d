"""Attention and MLP in O(T) memory (docs/performance.md, "Attention and MLP in O(T) memory"): masks as rules of
row and column indices (`MaskSpec`), attention over query chunks (`chunked_attention`), and a layer's MLP or whole
computation over row or sample chunks (`mlp`, `map_samples`), each chunk under `jax.checkpoint` inside `lax.map`,
so one chunk's working set exists at a time, in the forward and in the backward pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A [rows, cols] boolean attention mask (True = may attend) given by a rule of the row and column indices
    instead of an array, so the chunked attention builds one query chunk's [chunk, cols] slice at a time and never
    the whole mask (which is quadratic in the sequence). rule(i, j, n) works elementwise on broadcast integer
    arrays, NumPy or JAX; n is the rule's one parameter (e.g. the AR layout's T). A static pytree (no leaves), so it
    passes through jit, scan and remat as a constant."""
    rule: Callable[[Any, Any, int], Any]
    rows: int
    cols: int
    n: int = 0

    def dense(self) -> np.ndarray:
        """The whole mask, [rows, cols] bool."""
        return np.asarray(self.rule(np.arange(self.rows)[:, None], np.arange(self.cols)[None], self.n), bool)

    def block(self, i: Array) -> Array:
        """Rows i [c] of the mask: [c, cols] bool (rows past the end: whatever the rule gives; callers drop them)."""
        return self.rule(i[:, None], jnp.arange(self.cols)[None], self.n)


def _causal_rule(i, j, n):
    return i >= j


def causal(T: int) -> MaskSpec:
    """The causal mask on T rows as a MaskSpec: row i may attend to rows j <= i."""
    return MaskSpec(_causal_rule, T, T)


Mask = Array | MaskSpec | None


def _balanced(total: int, chunk: int) -> tuple[int, int]:
    """(number of chunks, rows per chunk) covering `total` rows with chunks of at most `chunk` rows, as equal as
    possible, so the padding is under one row per chunk (257 rows in chunks of 128: 3 x 86, not 3 x 128)."""
    count = -(-total // max(1, min(chunk, total)))
    return count, -(-total // count)


def chunked_attention(q: Array, k: Array, v: Array, mask: Mask, chunk: int = 128,
                      dropout: tuple[float, Array] | None = None) -> Array:
    """`attend` in O(T) memory: the queries in chunks of at most `chunk` rows under `lax.map`, each chunk's body
    under `jax.checkpoint`. Rows are independent, so each chunk is the einsum path on its rows (float32 softmax);
    the checkpoint makes the backward pass recompute a chunk's probabilities instead of saving every chunk's, which
    would add up to the whole [N, heads, T, S] tensor again. Peak transient: one chunk's [N, heads, chunk, S].

    T not divisible by the chunk: the chunks are balanced (ceil(T / chunk) chunks of equal size) and the queries
    padded by fewer rows than there are chunks; the padded rows are computed and dropped. mask: a MaskSpec (each
    chunk builds its rows from the rule), a dense bool array broadcastable to [N, heads, T, S] (sliced per chunk
    when it has T rows, e.g. a padding mask [N, 1, 1, S] is used whole), or None. dropout: (rate, key) on the
    probabilities, each chunk's key folded from the chunk index.
    """
    N, T, heads, d = q.shape
    count, rows = _balanced(T, chunk)
    pad = count * rows - T
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(N, count, rows, heads, d).swapaxes(0, 1)
    dense = None
    if mask is not None and not isinstance(mask, MaskSpec):
        dense = jnp.asarray(mask)
        dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)          # [Nm, Hm, Tm, S]
    per_chunk = dense is not None and dense.shape[2] != 1
    if per_chunk:   # [count, Nm, Hm, rows, S]
        dense = jnp.pad(dense, ((0, 0), (0, 0), (0, pad), (0, 0)))
        dense = jnp.moveaxis(dense.reshape(*dense.shape[:2], count, rows, dense.shape[-1]), 2, 0)
    scale = 1.0 / math.sqrt(d)

    def body(qc: Array, index: Array, mc: Array | None) -> Array:   # qc [N, rows, heads, d] -> same
        logits = jnp.einsum("nqhd,nkhd->nhqk", qc, k, preferred_element_type=jnp.float32) * scale
        if isinstance(mask, MaskSpec):
            allowed = mask.block(index * rows + jnp.arange(rows))             # [rows, S]
        else:
            allowed = mc if per_chunk else dense
        if allowed is not None:
            logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        if dropout is not None:
            rate, key = dropout
            keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - rate), jnp.zeros((), probs.dtype))
        return jnp.einsum("nhqk,nkhd->nqhd", probs, v)

    body = jax.checkpoint(body)
    out = jax.lax.map(lambda a: body(*a), (qs, jnp.arange(count), dense if per_chunk else None))
    return out.swapaxes(0, 1).reshape(N, count * rows, heads, d)[:, :T]


def map_rows(f: Callable[[Array], Array], x: Array, chunk: int) -> Array:
    """f applied to the rows of x [..., H] in chunks of at most `chunk` rows (the leading axes flattened into rows,
    chunks balanced as in `chunked_attention`) under `lax.map`, each chunk under `jax.checkpoint`: the peak is one
    chunk's working set, and the backward pass keeps only the chunks' inputs. f must act on each row alone."""
    lead, width = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, width)
    count, rows = _balanced(flat.shape[0], chunk)
    flat = jnp.pad(flat, ((0, count * rows - flat.shape[0]), (0, 0))).reshape(count, rows, width)
    out = jax.lax.map(jax.checkpoint(f), flat)                                 # [count, rows, out]
    return out.reshape(count * rows, -1)[:math.prod(lead)].reshape(*lead, -1)


def map_samples(layer: nn.Module, chunk: int, batched: tuple, shared: tuple = (), dropout: bool = False,
                **kwargs) -> Any:
    """layer(*batched, *shared, **kwargs) computed on chunks of at most `chunk` samples under `lax.map`, each chunk
    under `jax.checkpoint`: the layer's whole working set (attention, MLP, LayerNorms, their gradients) exists for
    one chunk at a time, while its input and output stay whole. Samples are independent inside a layer, so the
    result is the same to float rounding. The arrays in `batched` (at any depth) whose leading axis is N (x's) are
    split, the others there (e.g. a [1, 1, H] conditioning) and everything in `shared` (masks, positions) are used
    whole; chunks balanced, padded samples computed and dropped. The layer runs as a clone with layer_chunk=0 and
    its own parameters; dropout=True: each chunk's dropout key is folded from the chunk index."""
    n = batched[0].shape[0]
    count, size = _balanced(n, chunk)
    flat, tree = jax.tree.flatten(batched)
    split = [a.ndim >= 1 and a.shape[0] == n for a in flat]
    pad = lambda a: jnp.pad(a, [(0, count * size - n)] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
    xs = [pad(a).reshape(count, size, *a.shape[1:]) for a, s in zip(flat, split) if s]
    inner, params = layer.clone(parent=None, layer_chunk=0), layer.variables["params"]
    key = layer.make_rng("dropout") if dropout else None

    def body(chunked: list, index: Array) -> Any:
        it = iter(chunked)
        call = jax.tree.unflatten(tree, [next(it) if s else a for a, s in zip(flat, split)])
        rngs = {"dropout": jax.random.fold_in(key, index)} if dropout else {}
        return inner.apply({"params": params}, *call, *shared, rngs=rngs, **kwargs)

    out = jax.lax.map(lambda a: jax.checkpoint(body)(*a), (xs, jnp.arange(count)))
    return jax.tree.map(lambda a: a.reshape(count * size, *a.shape[2:])[:n], out)


def mlp(owner: nn.Module, fc1: nn.Dense, fc2: nn.Dense, h: Array, chunk: int = 0) -> Array:
    """fc2(fc1(h)) (fc2 takes fc1's pre-activation, `dense(gelu_input=True)`), the MLP of every layer class.
    chunk > 0: in row chunks through `map_rows`, so the wide [rows, mlp_ratio * hidden] activations exist for one
    chunk at a time (also in the backward pass and under remat). The same parameters (the modules are declared by
    the caller as before and applied with their own variables) and the same values to float rounding. `owner`: the
    calling module (at initialisation the modules run whole, creating their parameters)."""
    if chunk <= 0 or owner.is_initializing():
        return fc2(fc1(h))
    p1, p2 = fc1.variables["params"], fc2.variables["params"]
    f1, f2 = fc1.clone(parent=None), fc2.clone(parent=None)
    return map_rows(lambda r: f2.apply({"params": p2}, f1.apply({"params": p1}, r)), h, chunk)
