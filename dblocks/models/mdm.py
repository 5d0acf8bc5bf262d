"""The masked-diffusion denoiser f(x_t, t): a bidirectional transformer over tokens with a [MASK] token, conditioned
on t through AdaLN-Zero (the DiT-style network of SEDD/MDLM/MD4 that the paper uses, docs/method.md §4.3).

A DiffusionBlocks block is a whole MDMTransformer with L/B layers: its own token embedding, t embedder, layers and
output head (docs/design.md item 1). The end-to-end baseline is the same module with all L layers.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dblocks.models.layers import AdaLNZeroLayer, FinalLayer, NoiseEmbedder
from dblocks.models.stack import apply_layers

Array = jax.Array


class MDMTransformer(nn.Module):
    """tokens [N, L] int in [0, vocab_size] (vocab_size is the [MASK] id), t [N] in [0, 1] -> logits [N, L, vocab_size].

    Positions enter through rotary embeddings in every attention layer; t enters as DiT's timestep, t * t_scale,
    through sinusoidal features and an MLP, then AdaLN-Zero in every layer and in the final layer. The output head
    is zero-initialised, so an untrained block predicts the uniform distribution (loss ln V per masked token).
    """
    vocab_size: int
    num_layers: int
    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    t_scale: float = 1000.0
    scan_layers: bool = False      # performance options: dblocks.models.options
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"
    attention_chunk: int = 128
    mlp_chunk: int = 0
    layer_chunk: int = 0

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @nn.compact
    def __call__(self, tokens: Array, t: Array, train: bool = False) -> Array:
        _, length = tokens.shape
        h = nn.Embed(self.vocab_size + 1, self.hidden, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name="token_embed")(tokens)                   # [N, L, H]
        c = NoiseEmbedder(self.hidden, dtype=self.dtype)(t * self.t_scale)            # [N, H]
        positions = jnp.arange(length)[None]                                          # [1, L]
        kw = dict(hidden=self.hidden, heads=self.heads, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                  dtype=self.dtype, attention=self.attention, attention_chunk=self.attention_chunk,
                  mlp_chunk=self.mlp_chunk, layer_chunk=self.layer_chunk)
        h, _ = apply_layers(AdaLNZeroLayer, self.num_layers, kw, h, (c, None, positions), scan=self.scan_layers,
                            remat=self.remat, static={"train": train}, static_argnum=5)
        return FinalLayer(self.hidden, self.vocab_size, self.dtype, self.layer_chunk)(h, c)  # [N, L, V] float32
