"""A recurrent-depth causal LM in the style of Huginn (Geiping et al. 2025): prelude layers embed the tokens, a core
of layers is applied K times to a latent state, coda layers read the state out (paper §4.5, §5.6).

Two modes over the same prelude / core / coda layers:
- diffusion=False, the baseline (Huginn): s_0 ~ N(0, init_std^2 I); s_k = norm(core(adapter([s_{k-1} ; e])));
  logits = coda(s_K). Row i predicts token i+1. Training runs a random number of iterations and back-propagates
  through the last few (dblocks.tasks.lm.recurrent); each iteration k has its own K/V cache at generation.
- diffusion=True, DiffusionBlocks with B=1: the whole network is one denoiser over the [clean ; noisy] layout of
  dblocks.models.ar. The prelude runs on the clean rows only (it never sees noise; with noisy_prelude on the noisy
  rows too, which measured 0.3 bits/char better on Shakespeare, docs/language_models.md); core and coda run on both,
  with the clean rows under the sigma_min sentinel and noisy row i under its own sigma_i. Trained in a single pass
  over the whole sigma range; at inference the K steps of the recurrence become K Euler steps of the ODE, each one
  pass of core and coda for the new token's noisy row against the cached clean prefix.

The cache interface matches ARModel's (`clean_rows`, `noisy_rows`, one (k, v) per cached layer application), so
the autoregressive task's decoder serves both.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dblocks.models.ar import KV, LayerStack, RowHead, ar_mask_spec, ar_positions
from dblocks.models.chunked import causal
from dblocks.models.layers import NoiseEmbedder, dense

Array = jax.Array


class RecurrentModel(nn.Module):
    vocab: int
    hidden: int
    heads: int
    prelude: int
    core: int
    coda: int
    mlp_ratio: float = 4.0
    diffusion: bool = True
    iterations: int = 1            # baseline: core applications at generation (one cache slot each)
    init_std: float = 1.0          # baseline: std of the random initial state s_0
    sigma_min: float = 0.002
    scan_layers: bool = False      # performance options: dblocks.models.options (scan: within each stack)
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    prev_token: bool = False       # DiffusionBlocks: the noisy row also reads token i-1 (as dblocks.models.ar)
    noisy_prelude: bool = False    # DiffusionBlocks: the noisy row also runs the prelude (recurrent.noisy_prelude)
    attention_chunk: int = 128
    mlp_chunk: int = 0
    layer_chunk: int = 0

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.hidden, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype)
        self.noise = NoiseEmbedder(self.hidden, dtype=self.dtype)
        opts = (self.scan_layers, self.remat, self.dtype, self.attention, self.attention_chunk, self.mlp_chunk,
                self.layer_chunk)
        self.prelude_stack = LayerStack(self.prelude, self.hidden, self.heads, self.mlp_ratio, *opts)
        self.core_stack = LayerStack(self.core, self.hidden, self.heads, self.mlp_ratio, *opts)
        self.coda_stack = LayerStack(self.coda, self.hidden, self.heads, self.mlp_ratio, *opts)
        self.head = RowHead(self.hidden, self.vocab, self.dtype)
        if self.diffusion:
            self.z_in = dense(self.hidden, self.dtype)
            if self.prev_token:
                self.prev_embed = nn.Embed(self.vocab, self.hidden, embedding_init=nn.initializers.normal(1.0),
                                           dtype=self.dtype)
        else:
            self.adapter = dense(self.hidden, self.dtype)
            self.core_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)

    @property
    def num_layers(self) -> int:
        """Cached layer applications per row: prelude + core (x iterations for the baseline) + coda."""
        return self.prelude + self.core * (1 if self.diffusion else self.iterations) + self.coda

    def sentinel(self) -> Array:
        return self.noise(jnp.full((1,), 0.25 * math.log(self.sigma_min)))[:, None]

    def _clean(self, S: int):
        return ((self.sentinel(), S),)

    # -- the baseline's pieces, on T rows --------------------------------------------------------------------------
    def prelude_rows(self, tokens, positions, mask, prefixes=None) -> tuple[Array, list[KV]]:
        return self.prelude_stack(self.embed(tokens), self._clean(tokens.shape[1]), mask, positions, prefixes)

    def core_rows(self, s, e, positions, mask, prefixes=None) -> tuple[Array, list[KV]]:
        x, kvs = self.core_stack(self.adapter(jnp.concatenate([s.astype(e.dtype), e], -1)), self._clean(s.shape[1]),
                                 mask, positions, prefixes)
        return self.core_norm(x), kvs

    def coda_rows(self, s, positions, mask, prefixes=None) -> tuple[Array, list[KV]]:
        x, kvs = self.coda_stack(s, self._clean(s.shape[1]), mask, positions, prefixes)
        return self.head(x, self._clean(s.shape[1])), kvs

    def recur(self, tokens: Array, s0: Array, iterations: int, positions=None, mask=None,
              prefixes: Sequence[KV] | None = None) -> tuple[Array, list[KV]]:
        """The baseline's whole pass: logits [N, S, V] and every layer application's (k, v) (cache layout:
        prelude, core iteration 1, ..., core iteration K, coda)."""
        S = tokens.shape[1]
        positions = jnp.arange(S)[None] if positions is None else positions
        mask = causal(S) if mask is None else mask
        pre = (lambda a, b: None) if prefixes is None else (lambda a, b: prefixes[a:b])  # noqa: E731
        e, kvs = self.prelude_rows(tokens, positions, mask, pre(0, self.prelude))
        s, at = s0, self.prelude
        for _ in range(iterations):
            s, kv = self.core_rows(s, e, positions, mask, pre(at, at + self.core))
            kvs, at = kvs + kv, at + self.core
        logits, kv = self.coda_rows(s, positions, mask, pre(at, at + self.coda))
        return logits, kvs + kv

    # -- DiffusionBlocks: one denoiser pass over [clean ; noisy] ----------------------------------------------------
    def __call__(self, tokens: Array, z: Array | None = None, c_noise: Array | None = None,
                 s0: Array | None = None) -> Array:
        T = tokens.shape[1]
        if not self.diffusion:
            s0 = jnp.zeros(tokens.shape + (self.hidden,)) if s0 is None else s0
            return self.recur(tokens, s0, self.iterations)[0]
        c = self.noise(c_noise.reshape(-1)).reshape(*c_noise.shape, self.hidden)
        conds = ((self.sentinel(), T), (c, T))
        noisy = self.z_in(z)
        if self.prev_token:   # row i gets token i-1 (row 0: nothing)
            noisy = noisy + jnp.pad(self.prev_embed(tokens[:, :-1]), ((0, 0), (1, 0), (0, 0)))
        if self.noisy_prelude:   # the clean rows' prelude is unchanged (they never attend to noisy rows)
            x, _ = self.prelude_stack(jnp.concatenate([self.embed(tokens), noisy], axis=1), conds, ar_mask_spec(T),
                                      ar_positions(T)[None])
        else:
            e, _ = self.prelude_rows(tokens, jnp.arange(T)[None], causal(T))
            x = jnp.concatenate([e, noisy], axis=1)
        x, _ = self.core_stack(x, conds, ar_mask_spec(T), ar_positions(T)[None])
        x, _ = self.coda_stack(x, conds, ar_mask_spec(T), ar_positions(T)[None])
        return self.head(x[:, T:], ((c, T),))

    def clean_rows(self, tokens, positions, mask, prefixes=None) -> tuple[Array, list[KV]]:
        """DiffusionBlocks: clean rows through prelude, core and coda (sentinel), returning their (k, v)."""
        pre = (lambda a, b: None) if prefixes is None else (lambda a, b: prefixes[a:b])  # noqa: E731
        S = tokens.shape[1]
        e, kv_p = self.prelude_rows(tokens, positions, mask, pre(0, self.prelude))
        x, kv_c = self.core_stack(e, self._clean(S), mask, positions, pre(self.prelude, self.prelude + self.core))
        x, kv_d = self.coda_stack(x, self._clean(S), mask, positions, pre(self.prelude + self.core, None))
        return self.head(x, self._clean(S)), kv_p + kv_c + kv_d

    def noisy_rows(self, z, c_noise, positions, mask, prefixes, prev=None) -> Array:
        """DiffusionBlocks: noisy rows (scaled by c_in) through core and coda, reading the clean rows' cache; prev [N]:
        the token before their position (with prev_token)."""
        c = self.noise(c_noise.reshape(-1)).reshape(*c_noise.shape, self.hidden)
        conds = ((c, z.shape[1]),)
        x = self.z_in(z) + (self.prev_embed(prev)[:, None] if self.prev_token else 0.0)
        if self.noisy_prelude:
            x, _ = self.prelude_stack(x, conds, mask, positions, prefixes[:self.prelude])
        x, _ = self.core_stack(x, conds, mask, positions, prefixes[self.prelude:self.prelude + self.core])
        x, _ = self.coda_stack(x, conds, mask, positions, prefixes[self.prelude + self.core:])
        return self.head(x, conds)
