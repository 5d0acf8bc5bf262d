"""ViT models for classification: the DiffusionBlocks denoiser (paper §4.1) and the plain ViT baseline.

ViTDenoiser is one whole block (docs/design.md item 1): its own patch embedding, position embedding, AdaLN-Zero layers
and head. Its sequence is the patch embeddings plus ONE label token that holds the projected `c_in * z`, where z is
the noisy label embedding in the fixed target space E (dblocks.targets); sigma enters through AdaLN-Zero
(NoiseEmbedder on c_noise). The head reads the label token and returns class logits; the denoised point of the
target space is the bridge softmax(logits) @ E (the task does that), as in the authors' code.

ViTClassifier is the end-to-end baseline: a standard pre-LN ViT (CLS token, L layers, no noise, no label input).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dblocks.models.chunked import map_samples, mlp
from dblocks.models.layers import AdaLNZeroLayer, Attention, FinalLayer, NoiseEmbedder, dense
from dblocks.models.stack import apply_layers

Array = jax.Array


class PatchEmbed(nn.Module):
    """images [N, S, S, C] -> tokens [N, (S/p)^2, H] plus a learned position embedding."""
    hidden: int
    patch: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        N, p = x.shape[0], self.patch
        h = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="proj")(x)  # [N, g, g, H]
        h = h.reshape(N, -1, self.hidden)
        pos = self.param("pos", nn.initializers.normal(0.02), (1, h.shape[1], self.hidden))
        return h + pos.astype(self.dtype)


class ViTDenoiser(nn.Module):
    """Block denoiser: (images [N, S, S, C], c_in*z [N, dim], c_noise [N]) -> logits [N, num_classes].

    No attention mask: every token may attend to every other (the label token must see the image and the image
    tokens see the label); nothing in the input reveals the clean label except z itself.
    """
    num_layers: int
    hidden: int
    heads: int
    patch: int
    num_classes: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    scan_layers: bool = False      # performance options: dblocks.models.options
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    attention_chunk: int = 128
    mlp_chunk: int = 0
    layer_chunk: int = 0

    @nn.compact
    def __call__(self, image: Array, z_in: Array, c_noise: Array, train: bool = False) -> Array:
        h = PatchEmbed(self.hidden, self.patch, self.dtype, name="patch_embed")(image)  # [N, T, H]
        tok = dense(self.hidden, self.dtype, name="label_in")(z_in)
        tok_pos = self.param("label_pos", nn.initializers.normal(0.02), (1, 1, self.hidden)).astype(self.dtype)
        h = jnp.concatenate([tok[:, None] + tok_pos, h], axis=1)                      # [N, 1+T, H]
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        c = NoiseEmbedder(self.hidden, dtype=self.dtype)(c_noise)                      # [N, H]
        kw = dict(hidden=self.hidden, heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                  dtype=self.dtype, attention=self.attention, attention_chunk=self.attention_chunk,
                  mlp_chunk=self.mlp_chunk, layer_chunk=self.layer_chunk)
        h, _ = apply_layers(AdaLNZeroLayer, self.num_layers, kw, h, (c, None, None), scan=self.scan_layers,
                            remat=self.remat, static={"train": train}, static_argnum=5)
        return FinalLayer(self.hidden, self.num_classes, self.dtype, name="head")(h[:, :1], c)[:, 0]  # [N, K]


class ViTLayer(nn.Module):
    """A standard pre-LN transformer layer (the baseline's; no conditioning)."""
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
    def __call__(self, x: Array, train: bool = False) -> Array:
        if 0 < self.layer_chunk < x.shape[0] and not self.is_initializing():
            return map_samples(self, self.layer_chunk, (x,), (), train and self.dropout > 0, train=train)
        def drop(a):
            return nn.Dropout(self.dropout)(a, deterministic=not train)

        ln = lambda: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)  # noqa: E731
        h = Attention(self.hidden, self.heads, self.dropout, self.dtype, self.attention, self.attention_chunk)(
            checkpoint_name(ln()(x), "attn_in"), train=train)
        x = x + drop(checkpoint_name(h, "attn_out"))
        h_in = checkpoint_name(ln()(x), "mlp_in")
        fc1 = dense(int(self.hidden * self.mlp_ratio), self.dtype)
        fc2 = dense(self.hidden, self.dtype, gelu_input=True, recompute_gelu=self.recompute_gelu)
        h = checkpoint_name(mlp(self, fc1, fc2, h_in, self.mlp_chunk), "mlp_out")
        return x + drop(h)


class ViTClassifier(nn.Module):
    """The end-to-end baseline: images [N, S, S, C] -> logits [N, num_classes] through a CLS token."""
    num_layers: int
    hidden: int
    heads: int
    patch: int
    num_classes: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    scan_layers: bool = False      # performance options: dblocks.models.options
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    attention_chunk: int = 128
    mlp_chunk: int = 0
    layer_chunk: int = 0

    @nn.compact
    def __call__(self, image: Array, train: bool = False) -> Array:
        h = PatchEmbed(self.hidden, self.patch, self.dtype, name="patch_embed")(image)  # [N, T, H]
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.hidden)).astype(self.dtype)
        h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, self.hidden)), h], axis=1)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        kw = dict(hidden=self.hidden, heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                  dtype=self.dtype, attention=self.attention, attention_chunk=self.attention_chunk,
                  mlp_chunk=self.mlp_chunk, layer_chunk=self.layer_chunk)
        h, _ = apply_layers(ViTLayer, self.num_layers, kw, h, (), scan=self.scan_layers, remat=self.remat,
                            static={"train": train}, static_argnum=2)
        h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(h[:, 0])
        return dense(self.num_classes, self.dtype, nn.initializers.zeros, name="head")(h).astype(jnp.float32)
