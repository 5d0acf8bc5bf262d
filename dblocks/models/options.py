"""The performance options every model takes, read from `config.model` with defaults (old configs need no change).

  model.scan_layers  False | True      layers under nn.scan (stacked parameters; dblocks.models.stack)
  model.remat        'none' | 'full' | 'dots' | 'narrow' | a jax.checkpoint_policies name
  model.dtype        'float32' | 'bfloat16'   compute dtype; parameters, optimizer state and losses stay float32
  model.attention    'xla' | 'cudnn' | 'einsum' | 'chunked'   jax.nn.dot_product_attention's implementation
                     ('cudnn' needs a GPU and bf16/fp16); 'einsum' is the explicit two-einsum path (always used
                     when attention dropout is active in training); 'chunked' is pure JAX in O(T) memory on every
                     backend: queries in chunks, each rematerialised, masks built per chunk, attention dropout
                     supported (dblocks.models.chunked.chunked_attention)
  model.attention_chunk  int >= 1 (128)   query rows per chunk of 'chunked' (T not divisible: balanced chunks,
                     the queries padded by less than one row per chunk)
  model.mlp_chunk    int >= 0 (0)   rows (batch x sequence) per chunk of every layer's MLP, each chunk
                     rematerialised, so the wide [rows, mlp_ratio * hidden] activations exist one chunk at a time;
                     0: off. The same parameters either way (dblocks.models.chunked.mlp)
  model.layer_chunk  int >= 0 (0)   samples per chunk of every layer's whole computation, each chunk
                     rematerialised, so one layer's working set (attention, MLP, their gradients) exists for one
                     chunk at a time; with remat the peak falls toward the per-layer carries. Also the DiT/MDM
                     final layer and the AR denoiser's per-row noise embedding, outside the stack. 0: off; same
                     parameters (dblocks.models.chunked.map_samples, map_rows)

scan_layers changes the parameter tree and dtype the numerics, so they are part of every checkpoint's signature: a
checkpoint of one layout is refused by the other. remat, attention and the chunk sizes say only how a layer is
computed (the same parameters and values to float rounding), so blocks and resumes may differ in them
(dblocks.run_record.HOW_FIELDS).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dblocks.models.stack import REMAT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "fp32": jnp.float32}
ATTENTION = ("xla", "cudnn", "einsum", "chunked")
DEFAULTS = {"scan_layers": False, "remat": "none", "dtype": "float32", "attention": "xla", "attention_chunk": 128,
            "mlp_chunk": 0, "layer_chunk": 0}


def model_options(m: Any) -> dict:
    """dict(scan_layers=, remat=, dtype=, attention=, attention_chunk=, mlp_chunk=, layer_chunk=) for a model
    constructor, from a config.model mapping."""
    get = m.get if hasattr(m, "get") else (lambda k, d: getattr(m, k, d))
    return dict(scan_layers=bool(get("scan_layers", False)), remat=str(get("remat", "none")),
                dtype=DTYPES[str(get("dtype", "float32"))], attention=str(get("attention", "xla")),
                attention_chunk=int(get("attention_chunk", 128)), mlp_chunk=int(get("mlp_chunk", 0)),
                layer_chunk=int(get("layer_chunk", 0)))


def validate_options(m: Any) -> list[str]:
    """Problems with the options in config.model (empty when valid)."""
    get = m.get if hasattr(m, "get") else (lambda k, d: getattr(m, k, d))
    p = []
    if str(get("dtype", "float32")) not in DTYPES:
        p.append(f"model.dtype={get('dtype', '')!r}: expected one of {sorted(DTYPES)}")
    if str(get("attention", "xla")) not in ATTENTION:
        p.append(f"model.attention={get('attention', '')!r}: expected one of {ATTENTION}")
    for key, low, default in (("attention_chunk", 1, 128), ("mlp_chunk", 0, 0), ("layer_chunk", 0, 0)):
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            p.append(f"model.{key}={value!r}: expected an integer >= {low}")
    r = str(get("remat", "none"))
    if r not in REMAT and not hasattr(jax.checkpoint_policies, r):
        p.append(f"model.remat={r!r}: expected one of {REMAT} or a jax.checkpoint_policies name")
    return p
