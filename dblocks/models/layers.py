"""Transformer layers conditioned through AdaLN-Zero (DiT), shared by every model family.

Shapes: tokens x [N, T, H] (H = hidden), conditioning c [N, H], attention mask [N or 1, 1, T, T] (True = may attend).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    """Rotary position embedding on [N, T, heads, d] with integer positions [N or 1, T]."""
    d = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(d, dtype=jnp.float32) / d)
    ang = positions[..., None, None].astype(jnp.float32) * freqs  # [N, T, 1, d]
    x1, x2 = x[..., :d], x[..., d:]
    return jnp.concatenate([x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x1 * jnp.sin(ang) + x2 * jnp.cos(ang)], -1)


class NoiseEmbedder(nn.Module):
    """c_noise [N] -> [N, hidden]: sinusoidal features, then Linear-SiLU-Linear (DiT's TimestepEmbedder)."""
    hidden: int
    freq_dim: int = 256

    @nn.compact
    def __call__(self, c_noise: Array) -> Array:
        h = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02))(sinusoidal_embedding(c_noise,
                                                                                                  self.freq_dim))
        return nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02))(nn.silu(h))


class Attention(nn.Module):
    """Multi-head self-attention with an optional boolean mask and optional rotary positions."""
    hidden: int
    heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None, positions: Array | None = None,
                 train: bool = False) -> Array:
        N, T, _ = x.shape
        hd = self.hidden // self.heads
        qkv = nn.Dense(3 * self.hidden, kernel_init=nn.initializers.xavier_uniform())(x)
        q, k, v = jnp.split(qkv.reshape(N, T, 3 * self.heads, hd), 3, axis=2)
        if positions is not None:
            q, k = rope(q, positions), rope(k, positions)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(hd)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(N, T, self.hidden)
        return nn.Dense(self.hidden, kernel_init=nn.initializers.xavier_uniform())(out)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNZeroLayer(nn.Module):
    """One transformer layer with AdaLN-Zero conditioning (DiT): the modulation is Linear(SiLU(c)), zero-initialised,
    so every layer starts as the identity. `official_order=True` reproduces the authors' ViT code, which applies
    the SiLU after the Linear (docs/method.md §5), for parity experiments only."""
    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    official_order: bool = False

    @nn.compact
    def __call__(self, x: Array, c: Array, mask: Array | None = None, positions: Array | None = None,
                 train: bool = False) -> Array:
        lin = nn.Dense(6 * self.hidden, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
        mod = nn.silu(lin(c)) if self.official_order else lin(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        ln = lambda: nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6)  # noqa: E731
        h = Attention(self.hidden, self.heads, self.dropout)(modulate(ln()(x), shift_a, scale_a), mask, positions,
                                                            train)
        x = x + gate_a[:, None] * nn.Dropout(self.dropout)(h, deterministic=not train)
        h = nn.Dense(int(self.hidden * self.mlp_ratio), kernel_init=nn.initializers.xavier_uniform())(
            modulate(ln()(x), shift_m, scale_m))
        h = nn.Dense(self.hidden, kernel_init=nn.initializers.xavier_uniform())(nn.gelu(h, approximate=True))
        return x + gate_m[:, None] * nn.Dropout(self.dropout)(h, deterministic=not train)


class FinalLayer(nn.Module):
    """AdaLN (shift, scale; zero-initialised) then a zero-initialised Linear: the model starts at output 0."""
    hidden: int
    out_dim: int

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        shift, scale = jnp.split(nn.Dense(2 * self.hidden, kernel_init=nn.initializers.zeros)(nn.silu(c)), 2, -1)
        x = modulate(nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6)(x), shift, scale)
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.zeros)(x)
