"""A causal transformer as an autoregressive DiffusionBlocks denoiser (paper §4.4) or as a plain causal LM.

Denoiser layout: one sequence of 2T rows, [clean ; noisy]. Clean row j holds token j; noisy row i holds the noisy
target-space point z_i of token i. Mask (`ar_mask`): clean rows are causal over clean rows; noisy row i attends to
clean rows j < i and to itself, nothing else (no row sees a future token, and no noisy row sees another noisy one,
so all T positions train in one pass). Noisy row i reuses RoPE position i (`ar_positions`).

Conditioning, per row (AdaLN-Zero with a per-row modulation): noisy row i gets its own sigma_i through the noise
embedder; clean rows get the fixed sentinel c_noise(sigma_min), i.e. "this row is clean". The sentinel is a
constant, so the clean rows of a block do not depend on any noise: their keys and values are computed once per token
and cached at generation. The plain causal LM (the end-to-end baseline) is the same module without noisy rows;
its rows all carry the sentinel, so AdaLN reduces to learned per-layer scales and shifts.

T-row layout (`layout="t"`, for a network that reads no z: the prior head, docs/language_models.md): the block is
the causal LM over the T clean rows (sentinel conditioning, the same trunk as the clean rows of the 2T layout), and
the prediction of token i is read from row i-1 (tokens < i) by the head, whose AdaLN is conditioned on sigma_i; row 0
(no context) reads a zero row. Half the rows of the 2T layout, and the same K/V cache (the clean rows').

Shapes: tokens [N, T] int; z [N, T, D] (D = target dim, already scaled by c_in); c_noise [N, T]; hidden [N, S, H].
A K/V cache is a list, one (k, v) pair per layer, each [N, heads, T_max, head_dim] (head-major).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dblocks.models.chunked import MaskSpec, causal, map_rows, map_samples, mlp
from dblocks.models.layers import NoiseEmbedder, attend, attend_cached, dense, layer_norm, rope
from dblocks.models.stack import apply_layers

Array = jax.Array
KV = tuple[Array, Array]
Cond = tuple[Array, int]   # (conditioning [N or 1, S_i or 1, H], S_i rows it covers), in row order


# -- masks and positions ------------------------------------------------------------------------------------------

def causal_mask(T: int) -> np.ndarray:
    """[T, T] bool: row i may attend to rows j <= i."""
    i = np.arange(T)
    return i[:, None] >= i[None, :]


def ar_mask(T: int) -> np.ndarray:
    """[2T, 2T] bool for [clean ; noisy]: clean->clean causal (j <= i), noisy->clean strictly before (j < i),
    noisy->noisy only itself, clean->noisy never."""
    i = np.arange(T)
    top = np.concatenate([i[:, None] >= i[None, :], np.zeros((T, T), bool)], axis=1)
    bottom = np.concatenate([i[:, None] > i[None, :], np.eye(T, dtype=bool)], axis=1)
    return np.concatenate([top, bottom], axis=0)


def _ar_rule(i, j, T):
    """`ar_mask` elementwise on row and column indices (NumPy or JAX arrays)."""
    clean_col = j < T
    return ((i < T) & clean_col & (i >= j)) | ((i >= T) & ((clean_col & (i - T > j)) | (i == j)))


def ar_mask_spec(T: int) -> MaskSpec:
    """`ar_mask(T)` as a MaskSpec (built per query chunk by attention='chunked'; the same array otherwise)."""
    return MaskSpec(_ar_rule, 2 * T, 2 * T, T)


def ar_positions(T: int) -> np.ndarray:
    """[2T] int: clean row j at position j, noisy row i reuses position i."""
    return np.concatenate([np.arange(T), np.arange(T)]).astype(np.int32)


def prefix_mask(pos: Array, t_max: int, rows: int = 1) -> Array:
    """[rows, t_max + rows] bool for `rows` rows at position `pos` attending to a cache of t_max slots (valid: slots
    < pos) and to themselves only (the rows are either one clean row or independent noisy rows of one position)."""
    cached = jnp.broadcast_to(jnp.arange(t_max) < pos, (rows, t_max))
    return jnp.concatenate([cached, jnp.eye(rows, dtype=bool)], axis=1)


# -- layers ---------------------------------------------------------------------------------------------------------

def _rows(conds: Sequence[Array], sizes: Sequence[int], lin: nn.Module, n: int) -> Array:
    """Applies `lin(silu(c))` to each conditioning segment once and broadcasts it over its rows: [N, S, out]."""
    outs = [lin(nn.silu(c)) for c in conds]
    return jnp.concatenate([jnp.broadcast_to(o, (n, s, o.shape[-1])) for o, s in zip(outs, sizes)], axis=1)


def _layer_norm(dtype=jnp.float32) -> nn.LayerNorm:
    return layer_norm(dtype)


class CausalLayer(nn.Module):
    """AdaLN-Zero transformer layer (DiT's Linear(SiLU(c)) modulation, zero-initialised) with per-row conditioning,
    rotary positions and an optional K/V prefix (the cache). `sizes`: rows covered by each conditioning array, in
    row order (static). Returns (x, (k, v) of these rows)."""
    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    sizes: tuple = ()
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    recompute_gelu: bool = True   # MLP keeps only its first output for backward; off under remat (stack.apply_layers)
    attention_chunk: int = 128    # query rows per chunk of attention='chunked'
    mlp_chunk: int = 0            # rows per MLP chunk (chunked.mlp); 0: the whole MLP at once
    layer_chunk: int = 0          # samples per chunk of the whole layer (chunked.map_samples); 0: all at once

    @nn.compact
    def __call__(self, x: Array, conds: Sequence[Array], mask: Array | MaskSpec, positions: Array,
                 prefix: KV | None = None) -> tuple[Array, KV]:
        if 0 < self.layer_chunk < x.shape[0] and prefix is None and not self.is_initializing():
            return map_samples(self, self.layer_chunk, (x, tuple(conds)), (mask, positions))
        N, S, H = x.shape
        hd = H // self.heads
        mod = _rows(conds, self.sizes, dense(6 * H, self.dtype, nn.initializers.zeros, name="adaln"), N)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        h = checkpoint_name(_layer_norm(self.dtype)(x) * (1 + scale_a) + shift_a, "attn_in")
        qkv = dense(3 * H, self.dtype, name="qkv")(h)
        q, k, v = jnp.split(qkv.reshape(N, S, 3 * self.heads, hd), 3, axis=2)
        q, k = rope(q, positions), rope(k, positions)
        if prefix is None:
            out = attend(q, k, v, mask, self.attention, chunk=self.attention_chunk)
        else:   # generation: the cache is read in place, never concatenated or transposed
            out = attend_cached(q, k, v, prefix, mask)
        out = out.reshape(N, S, H)
        x = x + gate_a * checkpoint_name(dense(H, self.dtype, name="proj")(out), "attn_out")
        h = checkpoint_name(_layer_norm(self.dtype)(x) * (1 + scale_m) + shift_m, "mlp_in")
        fc1 = dense(int(H * self.mlp_ratio), self.dtype, name="fc1")
        fc2 = dense(H, self.dtype, name="fc2", gelu_input=True, recompute_gelu=self.recompute_gelu)
        h = checkpoint_name(mlp(self, fc1, fc2, h, self.mlp_chunk), "mlp_out")
        return x + gate_m * h, (k, v)


class LayerStack(nn.Module):
    """`num_layers` CausalLayers in sequence; with `prefixes` (one (k, v) per layer) every layer reads the cache.
    Unrolled (children layer_i) or scanned (child `layers`, stacked parameters), with an optional remat policy
    (dblocks.models.stack)."""
    num_layers: int
    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    scan_layers: bool = False
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    attention_chunk: int = 128
    mlp_chunk: int = 0
    layer_chunk: int = 0

    @nn.compact
    def __call__(self, x: Array, conds: Sequence[Cond], mask: Array | MaskSpec, positions: Array,
                 prefixes: Sequence[KV] | None = None) -> tuple[Array, list[KV]]:
        kw = dict(hidden=self.hidden, heads=self.heads, mlp_ratio=self.mlp_ratio,
                  sizes=tuple(int(s) for _, s in conds), dtype=self.dtype, attention=self.attention,
                  attention_chunk=self.attention_chunk, mlp_chunk=self.mlp_chunk, layer_chunk=self.layer_chunk)
        per_layer = None if prefixes is None else [(kv,) for kv in prefixes]
        x, kvs = apply_layers(CausalLayer, self.num_layers, kw, x, (tuple(c for c, _ in conds), mask, positions),
                              per_layer, scan=self.scan_layers, remat=self.remat)
        return x, list(kvs or [])


class RowHead(nn.Module):
    """Final AdaLN (per-row shift, scale; zero-initialised) and a zero-initialised Linear to logits (float32).
    features=True returns the normalised, modulated rows [N, S, H] before the Linear (the input of
    dblocks.losses.chunked_cross_entropy with the Linear's kernel and bias, params['head']['Dense_1'])."""
    hidden: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, conds: Sequence[Cond], features: bool = False) -> Array:
        shift, scale = jnp.split(_rows([c for c, _ in conds], [s for _, s in conds],
                                       dense(2 * self.hidden, self.dtype, nn.initializers.zeros), x.shape[0]),
                                 2, axis=-1)
        h = _layer_norm(self.dtype)(x) * (1 + scale) + shift
        out = dense(self.out_dim, self.dtype, nn.initializers.zeros)
        return h if features else out(h).astype(jnp.float32)


# -- the model --------------------------------------------------------------------------------------------------------

class ARModel(nn.Module):
    """Denoiser F(tokens, c_in z, c_noise) -> logits [N, T, V] of the noisy rows (diffusion=True), or the causal
    LM tokens -> next-token logits [N, T, V] (diffusion=False). Each DiffusionBlocks block is one whole ARModel with
    its own embeddings, layers and head (docs/design.md item 1)."""
    vocab: int
    num_layers: int
    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    diffusion: bool = True
    sigma_min: float = 0.002   # the clean rows' sentinel noise level
    scan_layers: bool = False  # performance options: dblocks.models.options
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    prev_token: bool = False   # noisy row i also reads token i-1 (its own table; config model.prev_token)
    attention_chunk: int = 128
    mlp_chunk: int = 0
    layer_chunk: int = 0
    layout: str = "2t"         # denoiser rows: "2t" [clean ; noisy] or "t" (reads no z; config model.ar_layout)

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.hidden, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype)
        self.noise = NoiseEmbedder(self.hidden, dtype=self.dtype)
        self.stack = LayerStack(self.num_layers, self.hidden, self.heads, self.mlp_ratio, self.scan_layers,
                                self.remat, self.dtype, self.attention, self.attention_chunk, self.mlp_chunk,
                                self.layer_chunk)
        self.head = RowHead(self.hidden, self.vocab, self.dtype)
        if self.diffusion and self.layout == "2t":
            self.z_in = dense(self.hidden, self.dtype)
        if self.diffusion and self.layout == "2t" and self.prev_token:
            # its own table at unit scale: added to z_in(c_in z) (unit scale) before the first LayerNorm, the shared
            # embedding (std 0.02, scale-free in the clean rows) would start 50 times below the noise
            self.prev_embed = nn.Embed(self.vocab, self.hidden, embedding_init=nn.initializers.normal(1.0),
                                       dtype=self.dtype)

    def sentinel(self) -> Array:
        """[1, 1, H]: the clean rows' conditioning, c_noise(sigma_min) through the noise embedder."""
        return self.noise(jnp.full((1,), 0.25 * math.log(self.sigma_min)))[:, None]

    def noisy_cond(self, c_noise: Array) -> Array:
        """c_noise [N, S] -> [N, S, H]. With layer_chunk, in chunks of layer_chunk samples' rows, each
        rematerialised (`map_rows`): computed whole, the embedding's sinusoidal features and hidden activations,
        four [N * S, H]-sized buffers, stay alive through the whole step outside the layer stack."""
        if 0 < self.layer_chunk < c_noise.shape[0] and not self.is_initializing():
            params, inner = self.noise.variables["params"], self.noise.clone(parent=None)
            f = lambda r: inner.apply({"params": params}, r[:, 0])  # noqa: E731
            return map_rows(f, c_noise[..., None], self.layer_chunk * c_noise.shape[1])
        return self.noise(c_noise.reshape(-1)).reshape(*c_noise.shape, self.hidden)

    def __call__(self, tokens: Array, z: Array | None = None, c_noise: Array | None = None,
                 features: bool = False) -> Array:
        """Logits [N, T, V] float32; features=True: the head's input rows [N, T, H] instead (chunked loss)."""
        T = tokens.shape[1]
        if not self.diffusion:
            x, _ = self.stack(self.embed(tokens), ((self.sentinel(), T),), causal(T), jnp.arange(T)[None])
            return self.head(x, ((self.sentinel(), T),), features)
        c = self.noisy_cond(c_noise)
        if self.layout == "t":   # z is not read: row i-1 of the causal trunk, the head conditioned on sigma_i
            x, _ = self.stack(self.embed(tokens), ((self.sentinel(), T),), causal(T), jnp.arange(T)[None])
            x = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))                               # [N, T, H]
            return self.head(x, ((c, T),), features)
        e, noisy = self.embed(tokens), self.z_in(z)
        if self.prev_token:   # row i gets token i-1 (row 0: nothing), as the LM's row i-1 has it in its stream
            noisy = noisy + jnp.pad(self.prev_embed(tokens[:, :-1]), ((0, 0), (1, 0), (0, 0)))
        x = jnp.concatenate([e, noisy], axis=1)
        x, _ = self.stack(x, ((self.sentinel(), T), (c, T)), ar_mask_spec(T), ar_positions(T)[None])
        return self.head(x[:, T:], ((c, T),), features)

    # -- cached generation: clean rows write the cache, noisy rows only read it --------------------------------------
    def clean_rows(self, tokens: Array, positions: Array, mask: Array,
                   prefixes: Sequence[KV] | None = None) -> tuple[Array, list[KV]]:
        """Clean rows (the prompt, or one new token) -> (LM logits [N, S, V], their (k, v) per layer). The logits
        are the LM's next-token prediction; a denoiser ignores them."""
        S = tokens.shape[1]
        x, kvs = self.stack(self.embed(tokens), ((self.sentinel(), S),), mask, positions, prefixes)
        return self.head(x, ((self.sentinel(), S),)), kvs

    def noisy_rows(self, z: Array, c_noise: Array, positions: Array, mask: Array,
                   prefixes: Sequence[KV], prev: Array | None = None) -> Array:
        """Noisy rows (scaled by c_in) at one position, reading the clean prefix's cache -> logits [N, S, V].
        prev [N]: the token before that position (used with prev_token; the position is >= 1 in generation).
        T layout: z is not read; the row is the clean row of `prev` (`positions` and `mask` are those of prev's
        position, pos - 1), its layers at the sentinel, the head at sigma."""
        c = self.noisy_cond(c_noise)
        if self.layout == "t":
            S = z.shape[1]
            x = jnp.broadcast_to(self.embed(prev)[:, None], (z.shape[0], S, self.hidden))
            x, _ = self.stack(x, ((self.sentinel(), S),), mask, positions, prefixes)
            return self.head(x, ((c, S),))
        x = self.z_in(z)
        if self.prev_token:
            x = x + self.prev_embed(prev)[:, None]
        x, _ = self.stack(x, ((c, z.shape[1]),), mask, positions, prefixes)
        return self.head(x, ((c, z.shape[1]),))


def empty_cache(num_layers: int, n: int, t_max: int, heads: int, head_dim: int, dtype=jnp.float32) -> list[KV]:
    """One (k, v) per layer, each [N, heads, T_max, head_dim]: head-major, the layout the attention's dots read
    without a transpose (layers.attend_cached). `dtype`: that of the keys and values written (the model's compute
    dtype), so a bfloat16 model's cache is half the size and is read without a conversion per call."""
    z = jnp.zeros((n, heads, t_max, head_dim), dtype)
    return [(z, z) for _ in range(num_layers)]


def write_cache(cache: Sequence[KV], kvs: Sequence[KV], pos) -> list[KV]:
    """Writes per-layer (k, v) of rows [N, S, heads, d] starting at `pos` into the head-major cache (dynamic pos,
    jit-friendly)."""
    upd = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), pos,  # noqa
                                                           axis=2)
    return [(upd(ck, k), upd(cv, v)) for (ck, cv), (k, v) in zip(cache, kvs)]
