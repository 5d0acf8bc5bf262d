"""A stack of identical layers, unrolled or scanned, with an optional rematerialisation policy.

`apply_layers` runs `n` layers of one class inside a compact module:
- unrolled (scan=False): children `layer_0` .. `layer_{n-1}` of the caller (the historical parameter layout);
  with remat each layer is wrapped in `nn.remat` (names unchanged).
- scanned (scan=True): one child `layers` (`nn.scan` over a body that holds `layer`), whose parameters carry a
  leading axis of size n. XLA compiles one layer instead of n, and with remat the backward pass keeps only the
  per-layer carries, which is what makes remat reduce compiled temporaries on the CPU backend (an unrolled loop of
  `jax.checkpoint`s is re-fused by XLA there and saves nothing).

Remat policies (`model.remat`): 'none'; 'full' (save nothing inside a layer, recompute it all in the backward
pass); 'dots' (save the matmul outputs that have no batch dimension, jax.checkpoint_policies.
dots_with_no_batch_dims_saveable, recompute the elementwise work); 'narrow' (save a layer's four activations of
the model's width, named in every layer class: the attention's input and output, the MLP's input and output;
recompute the MLP's wide hidden activations and the attention from them); any other name of
jax.checkpoint_policies.

`stack_params` / `unstack_params` convert a parameter tree between the two layouts, so a scanned model and an
unscanned one compute the same function from the same numbers (tests/test_models_perf.py).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
REMAT = ("none", "full", "dots", "narrow")
# the checkpoint_name tags of every layer class (layers.AdaLNZeroLayer, vit.ViTLayer, ar.CausalLayer) that
# remat='narrow' saves: each [N, T, hidden]; the MLP's [N, T, mlp_ratio * hidden] activations are recomputed
NARROW = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def remat_policy(name: str) -> Callable | None:
    """The jax.checkpoint policy of a `model.remat` name ('full' -> None: save nothing)."""
    if name == "full":
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "narrow":
        return jax.checkpoint_policies.save_only_these_names(*NARROW)
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        raise ValueError(f"model.remat={name!r}: expected one of {REMAT} or a jax.checkpoint_policies name")
    return policy


class _Body(nn.Module):
    """One scan iteration: (x, broadcast args, per-layer args) -> (x, per-layer output or None)."""
    layer_cls: Any
    layer_kwargs: tuple
    call_kwargs: tuple = ()

    @nn.compact
    def __call__(self, x, bcast, xs):
        out = self.layer_cls(**dict(self.layer_kwargs), name="layer")(x, *bcast, *xs, **dict(self.call_kwargs))
        return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def apply_layers(layer_cls: type, n: int, layer_kwargs: dict, x: Array, bcast: Sequence = (),
                 per_layer: Sequence | None = None, *, scan: bool = False, remat: str = "none",
                 static: dict | None = None, static_argnum: int | None = None) -> tuple[Array, Any]:
    """Runs n layers `layer_cls(**layer_kwargs)(x, *bcast, *per_layer[i], **static)` in sequence.

    bcast: arguments shared by every layer (arrays or None). per_layer: a sequence of n argument tuples (unrolled)
    or None. static: keyword arguments that are Python values (e.g. train); under unrolled remat they must be the
    trailing positional arguments, `static_argnum` (counting self as 0) marks the first of them.
    Returns (x, outputs): outputs is a list of the layers' second return values (or None when they return x only).
    """
    static = static or {}
    if n == 0:
        return x, []
    if remat != "none" and "recompute_gelu" in {f.name for f in dataclasses.fields(layer_cls)}:
        # a rematerialised layer recomputes its MLP anyway; there the custom backward pass of gelu_dense_dot_general
        # gains nothing and, inside a scanned body, let XLA fuse the GELU into the matmul with its constants
        # broadcast to full [rows, 4 * hidden] buffers (cifar10_dit block + remat: 9,874 -> 13,714 MiB compiled)
        layer_kwargs = {**layer_kwargs, "recompute_gelu": False}
    if not scan:
        cls = layer_cls
        if remat != "none":
            argnums = tuple(range(static_argnum, static_argnum + len(static))) if static else ()
            cls = nn.remat(layer_cls, policy=remat_policy(remat), static_argnums=argnums)
        outs = []
        for i in range(n):
            extra = tuple(per_layer[i]) if per_layer is not None else ()
            out = cls(**layer_kwargs, name=f"layer_{i}")(x, *bcast, *extra, *static.values())
            x, o = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            outs.append(o)
        return x, (outs if outs[0] is not None else None)
    body = _Body if remat == "none" else nn.remat(_Body, policy=remat_policy(remat), prevent_cse=False)
    scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, 0), length=n)
    xs = () if per_layer is None else jax.tree.map(lambda *a: jnp.stack(a), *[tuple(p) for p in per_layer])
    x, ys = scanned(layer_cls=layer_cls, layer_kwargs=tuple(layer_kwargs.items()),
                    call_kwargs=tuple(static.items()), name="layers")(x, tuple(bcast), xs)
    if ys is None:
        return x, None
    return x, [jax.tree.map(lambda a: a[i], ys) for i in range(n)]


# -- parameter layouts ------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^layer_(\d+)$")


def stack_params(params: dict) -> dict:
    """Unrolled layout -> scanned layout: every dict holding layer_0..layer_{n-1} gets one `layers/layer` entry
    with the n layers' leaves stacked on a new leading axis."""
    if not isinstance(params, dict):
        return params
    idx = sorted(int(m.group(1)) for k in params if (m := _LAYER.match(k)))
    out = {k: stack_params(v) for k, v in params.items() if not _LAYER.match(k)}
    if idx:
        if idx != list(range(len(idx))):
            raise ValueError(f"layers are not numbered 0..n-1: {idx}")
        layers = [params[f"layer_{i}"] for i in idx]
        out["layers"] = {"layer": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    return out


def unstack_params(params: dict) -> dict:
    """Scanned layout -> unrolled layout (the inverse of stack_params)."""
    if not isinstance(params, dict):
        return params
    out = {k: unstack_params(v) for k, v in params.items() if k != "layers"}
    if "layers" in params and isinstance(params["layers"], dict) and set(params["layers"]) == {"layer"}:
        stacked = params["layers"]["layer"]
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            out[f"layer_{i}"] = jax.tree.map(lambda a: a[i], stacked)
    return out
