"""Converting a trained end-to-end run into DiffusionBlocks: each block starts from its contiguous slice of the
end-to-end layers, with its own copies of the embedders and the head (docs/conversion.md).

    block b  <-  embedders + e2e layers [o_b, o_b + n_b) (renumbered 0 .. n_b - 1) + head,   o_b = n_0 + ... + n_{b-1}

The copies are made once, before training; each block is written as its step-0 checkpoint in the normal per-block
layout (workdir/blocks/block_XX, optimizer state fresh), so `experiments.train` then trains every block
independently on its own range, exactly as a block trained from scratch, and the blocks share nothing they train.

Parameters are mapped by name (layer indices shifted by o_b). Where the block model has parameters the end-to-end
model lacks (its sigma conditioning, a noisy-input projection), they are zero-initialised, so the block starts as
the e2e slice with the conditioning switched off: an AdaLN modulation with a zero kernel and the bias that
reproduces the e2e LayerNorm's affine (shift = beta, scale = gamma - 1, gate = 1), a zero input projection. The
sigma embedder itself keeps its random init: it feeds only zero kernels, so it changes nothing at step 0, and
zeroing it too would leave the modulation with no gradient. The one model pair whose names differ is the ViT
classifier -> ViT denoiser (`_VIT_RULES`).
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dblocks import assemble
from dblocks import checkpoint as ckpt_lib
from dblocks import steps
from dblocks.tasks import Task, Unit, get_task
from dblocks.tasks.base import block_layers

_LAYER = re.compile(r"(^|/)layer_(\d+)(/|$)")
_KEEP_INIT = re.compile(r"(^|/)(NoiseEmbedder_\d+|noise)/")   # sigma embedders: random init (see module doc)


class ConversionError(ValueError):
    """The end-to-end run cannot be split into the requested blocks."""


def _shift_layer(path: str, offset: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}layer_{int(m.group(2)) + offset}{m.group(3)}", path, count=1)


def _ln_modulation(e2e: dict, layer: str, norms: tuple[str, ...], gates: bool) -> np.ndarray:
    """The AdaLN bias that reproduces plain LayerNorms: per norm (shift = beta, scale = gamma - 1[, gate = 1])."""
    parts = []
    for norm in norms:
        gamma, beta = np.asarray(e2e[f"{layer}{norm}/scale"]), np.asarray(e2e[f"{layer}{norm}/bias"])
        parts += [beta, gamma - 1.0] + ([np.ones_like(gamma)] if gates else [])
    return np.concatenate(parts)


def _vit_rule(path: str, e2e: dict, offset: int):
    """ViTClassifier -> ViTDenoiser (same attention; the MLP's Dense_0/1 become Dense_1/2 because the AdaLN
    modulation is the layer's Dense_0; the head's LayerNorm becomes the FinalLayer's modulation; cls -> label_pos)."""
    m = re.fullmatch(r"layer_(\d+)/(.*)", path)
    if m:
        layer, rest = f"layer_{int(m.group(1)) + offset}/", m.group(2)
        if rest == "Dense_0/kernel":
            return "zeros"
        if rest == "Dense_0/bias":
            return _ln_modulation(e2e, layer, ("LayerNorm_0", "LayerNorm_1"), gates=True)
        rest = {"Dense_1/kernel": "Dense_0/kernel", "Dense_1/bias": "Dense_0/bias",
                "Dense_2/kernel": "Dense_1/kernel", "Dense_2/bias": "Dense_1/bias"}.get(rest, rest)
        return e2e.get(layer + rest)
    if path == "head/Dense_0/kernel":
        return "zeros"
    if path == "head/Dense_0/bias":
        return _ln_modulation(e2e, "", ("norm",), gates=False)
    return {"head/Dense_1/kernel": e2e.get("head/kernel"), "head/Dense_1/bias": e2e.get("head/bias"),
            "label_pos": e2e.get("cls")}.get(path, e2e.get(path))


def _name_rule(path: str, e2e: dict, offset: int):
    return e2e.get(_shift_layer(path, offset))


def rule_for(task: Task) -> Callable:
    return _vit_rule if task.config.task == "vit" else _name_rule


def block_params(template, e2e_params, offset: int, rule: Callable) -> tuple[dict, dict]:
    """The block's parameters from the e2e ones; returns (params, report {path: 'copied'|'mapped'|'zeros'|'init'})."""
    flat_t = traverse_util.flatten_dict(jax.device_get(template), sep="/")
    flat_e = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(e2e_params), sep="/").items()}
    out, report = {}, {}
    for path, leaf in flat_t.items():
        src = rule(path, flat_e, offset)
        if isinstance(src, str) and src == "zeros":
            out[path], report[path] = np.zeros(leaf.shape, leaf.dtype), "zeros"
        elif src is not None:
            if tuple(np.shape(src)) != tuple(leaf.shape):
                raise ConversionError(f"{path}: the e2e value has shape {np.shape(src)}, the block needs {leaf.shape}")
            out[path], report[path] = np.asarray(src, leaf.dtype), "copied"
        elif _KEEP_INIT.search(path):
            out[path], report[path] = np.asarray(leaf), "init"
        else:
            out[path], report[path] = np.zeros(leaf.shape, leaf.dtype), "zeros"
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(out, sep="/")), report


def convert(e2e_workdir: str, blocks_workdir: str, config=None) -> dict:
    """Writes every block's step-0 checkpoint into blocks_workdir from the e2e run's (EMA) parameters; returns a
    summary. `config` (default: the e2e run's, with method = dblocks) sets B, the layer split and training."""
    e2e = assemble.load_run(e2e_workdir, method="e2e")
    if config is None:
        config = assemble.load_config(e2e_workdir)
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    config.method = "dblocks"
    layers = block_layers(config)
    if sum(layers) != e2e.units[0].num_layers:
        raise ConversionError(f"the blocks' layers {layers} sum to {sum(layers)}, the e2e model has "
                              f"{e2e.units[0].num_layers}")
    return write_blocks(config, e2e.params[0], blocks_workdir, e2e_workdir)


def write_blocks(config, e2e_params, blocks_workdir: str, source: str = "") -> dict:
    """Writes the blocks' step-0 checkpoints (and config.json) of `config` (method dblocks) from e2e parameters."""
    task = get_task(config)
    if os.path.exists(os.path.join(blocks_workdir, "blocks")):
        raise ConversionError(f"{blocks_workdir}/blocks exists: convert into a new workdir")
    os.makedirs(blocks_workdir, exist_ok=True)
    ckpt_lib.write_json_atomic(os.path.join(blocks_workdir, "config.json"), json.loads(config.to_json_best_effort()))
    tx = steps.make_optimizer(config.optim, int(config.train.steps))
    rule, summary, offset = rule_for(task), {"from": os.path.abspath(source) if source else "", "blocks": []}, 0
    for unit in task.units("dblocks"):
        model = task.make_model(unit)
        template = task.init_params(model, steps.init_key(int(config.seed), unit.index), task.dummy_batch(2))
        params, report = block_params(template, e2e_params, offset, rule)
        state = steps.init_state(params, tx, float(config.optim.ema_decay))
        _save_step0(blocks_workdir, task, unit, config, state, summary["from"])
        summary["blocks"].append({"unit": unit.name, "layers": [offset, offset + unit.num_layers],
                                  "copied": sum(v == "copied" for v in report.values()),
                                  "init": sum(v == "init" for v in report.values()),
                                  "zeros": sorted(p for p, v in report.items() if v == "zeros")})
        offset += unit.num_layers
    return summary


def _save_step0(workdir: str, task: Task, unit: Unit, config, state, source: str) -> None:
    ck = ckpt_lib.UnitCheckpoint(os.path.join(workdir, unit.subdir()), ckpt_lib.unit_meta(task, unit, config),
                                 every=int(config.train.ckpt_every), keep=int(config.train.keep_checkpoints))
    try:
        ck.save(0, state, force=True)
        ck.wait_until_finished()
        ck.write_meta(complete=False, step=0, converted_from=source)
    finally:
        ck.close()
