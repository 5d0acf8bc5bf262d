"""The performance options every model takes, read from `config.model` with defaults (old configs need no change).

  model.scan_layers  False | True      layers under nn.scan (stacked parameters; dblocks.models.stack)
  model.remat        'none' | 'full' | 'dots' | 'narrow' | a jax.checkpoint_policies name
  model.dtype        'float32' | 'bfloat16'   compute dtype; parameters, optimizer state and losses stay float32
  model.attention    'xla' | 'cudnn' | 'einsum'   jax.nn.dot_product_attention's implementation ('cudnn' needs a
                     GPU and bf16/fp16); 'einsum' is the explicit two-einsum path (always used when attention
                     dropout is active in training)

The options change the parameter tree (scan_layers) or the numerics (dtype), so they belong to the model config,
which is part of every checkpoint's signature: a checkpoint of one layout is refused by the other.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dblocks.models.stack import REMAT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "fp32": jnp.float32}
ATTENTION = ("xla", "cudnn", "einsum")
DEFAULTS = {"scan_layers": False, "remat": "none", "dtype": "float32", "attention": "xla"}


def model_options(m: Any) -> dict:
    """dict(scan_layers=, remat=, dtype=, attention=) for a model constructor, from a config.model mapping."""
    get = m.get if hasattr(m, "get") else (lambda k, d: getattr(m, k, d))
    return dict(scan_layers=bool(get("scan_layers", False)), remat=str(get("remat", "none")),
                dtype=DTYPES[str(get("dtype", "float32"))], attention=str(get("attention", "xla")))


def validate_options(m: Any) -> list[str]:
    """Problems with the options in config.model (empty when valid)."""
    get = m.get if hasattr(m, "get") else (lambda k, d: getattr(m, k, d))
    p = []
    if str(get("dtype", "float32")) not in DTYPES:
        p.append(f"model.dtype={get('dtype', '')!r}: expected one of {sorted(DTYPES)}")
    if str(get("attention", "xla")) not in ATTENTION:
        p.append(f"model.attention={get('attention', '')!r}: expected one of {ATTENTION}")
    r = str(get("remat", "none"))
    if r not in REMAT and not hasattr(jax.checkpoint_policies, r):
        p.append(f"model.remat={r!r}: expected one of {REMAT} or a jax.checkpoint_policies name")
    return p
