"""DiT (Peebles & Xie) as the raw network F of an EDM denoiser D = c_skip z + c_out F(c_in z, c_noise, y).

A DiffusionBlocks block is a whole DiT with L/B layers: its own patch embedding, noise and label embedders, layers
and final layer (docs/design.md item 1). The end-to-end baseline is the same module with all L layers.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dblocks.models.layers import AdaLNZeroLayer, FinalLayer, NoiseEmbedder, sincos_2d
from dblocks.models.stack import apply_layers

Array = jax.Array
CONV_FEATURES = 16   # channels per pixel ahead of the output convolution (DiT.out_conv)


class DiT(nn.Module):
    """F(x, c_noise, label): images [N, S, S, C] -> [N, S, S, C].

    label is int [N] in [0, num_classes]; the extra index num_classes is the 'no label' token of classifier-free
    guidance (training drops labels to it with probability class_dropout).
    """
    num_layers: int
    hidden: int
    heads: int
    patch: int
    image_size: int
    channels: int
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
    out_conv: int = 0              # kernel size of a convolution over the unpatchified output (0: none, as DiT)

    @nn.compact
    def __call__(self, x: Array, c_noise: Array, label: Array, train: bool = False) -> Array:
        N, S, _, C = x.shape
        p, g = self.patch, S // self.patch
        h = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(x)  # [N, g, g, H]
        h = h.reshape(N, g * g, self.hidden) + sincos_2d(g, self.hidden)[None].astype(self.dtype)
        c = NoiseEmbedder(self.hidden, dtype=self.dtype)(c_noise)
        c = c + nn.Embed(self.num_classes + 1, self.hidden, embedding_init=nn.initializers.normal(0.02),
                         dtype=self.dtype)(label)
        kw = dict(hidden=self.hidden, heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                  dtype=self.dtype, attention=self.attention, attention_chunk=self.attention_chunk,
                  mlp_chunk=self.mlp_chunk, layer_chunk=self.layer_chunk)
        h, _ = apply_layers(AdaLNZeroLayer, self.num_layers, kw, h, (c, None, None), scan=self.scan_layers,
                            remat=self.remat, static={"train": train}, static_argnum=5)
        # with out_conv the final layer writes CONV_FEATURES channels per pixel and a convolution across patch
        # borders maps them to the image: each patch's pixels otherwise come from one token only, and a small,
        # briefly trained DiT shows its patch grid. The final layer is zero-initialised, so either way the model
        # starts at output 0.
        k = CONV_FEATURES if self.out_conv else C
        out = FinalLayer(self.hidden, p * p * k, self.dtype, self.layer_chunk)(h, c)  # [N, g*g, p*p*k] float32
        out = out.reshape(N, g, g, p, p, k).transpose(0, 1, 3, 2, 4, 5).reshape(N, S, S, k)
        if self.out_conv:
            out = nn.Conv(C, (self.out_conv, self.out_conv), padding="SAME", name="out_conv")(out)
        return out
