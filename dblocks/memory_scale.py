"""Compiled training-step memory over model size: where DiffusionBlocks' saving is about B (docs/memory_at_scale.md).

A family is a base config whose layer shape is scaled in hidden size, depth and heads (`scaled_config`): the DiT
family scales cifar10_dit (AdaLN-Zero DiT layers, MLP 4x, 32x32x3 images in patches of 2: 256 tokens), the LM family
scales lm1b_ar (the same layers with rotary positions, 256 tokens, a stand-in 32,000-token vocabulary). For each size
the sweep compiles the end-to-end step once (as configured and with remat) and, for each number of blocks B, the
largest block's step (as configured and with remat); nothing is allocated or run (dblocks.memory). Each row keeps
the step's state (parameters, optimizer state, EMA, the batch) apart from its temporaries (activations, gradients,
workspaces): at 1B+ parameters the state is most of the step, and that is the part a block divides by B.

`claimed_params` counts a unit's parameters from the layer shape alone (used to pick the sizes); the sweep records the
count of the parameter tree it compiled, and tests check the two agree.
"""
from __future__ import annotations

import copy
import time
from typing import Iterable, NamedTuple

import jax
import ml_collections
import numpy as np

from dblocks import memory
from dblocks.models import options as options_lib
from dblocks.tasks import Task, Unit, get_task


class Size(NamedTuple):
    hidden: int
    layers: int
    heads: int


# About 10M to 3.8B parameters (DiT family; the LM family adds its vocabulary tables). Depths divide by 8, so every
# B in BLOCKS splits the layers evenly; head dims 64-128.
LADDER = (Size(256, 8, 4), Size(384, 16, 6), Size(768, 16, 12), Size(1024, 24, 16), Size(1536, 24, 16),
          Size(2048, 24, 16), Size(2560, 32, 20))
BLOCKS = (1, 2, 4, 8)
BATCH_SIZE = 32           # per-step batch of every row (images 32x32x3, or sequences of 256 tokens)
LM_VOCAB = 32_000         # lm1b_ar's Llama-2 SentencePiece size; a stand-in (memory.with_vocab_size)

# Row variants: option overrides by dotted config key. "remat" is the baseline a user short of memory tries first.
# "remat_chunked" adds the options that bound one layer's working set (docs/performance.md, "Attention and MLP in O(T)
# memory"): attention in chunks of query rows, and every layer run on chunks of LAYER_CHUNK samples, each
# rematerialised. The same settings on both sides, so its ratio is block / e2e at their best memory settings.
REMAT = {"model.scan_layers": True, "model.remat": "full"}
LAYER_CHUNK = 4           # samples per layer chunk: 8 chunks at BATCH_SIZE
REMAT_CHUNKED = {**REMAT, "model.attention": "chunked", "model.layer_chunk": LAYER_CHUNK}
VARIANTS = {"": {}, "_remat": REMAT, "_remat_chunked": REMAT_CHUNKED}


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of config with {'section.field': value} set."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for key, value in overrides.items():
            section, field = key.split(".")
            config[section][field] = value
    return config


def scaled_config(base: ml_collections.ConfigDict, size: Size, num_blocks: int,
                  batch_size: int = BATCH_SIZE) -> ml_collections.ConfigDict:
    """base with the layer shape `size`, `num_blocks` blocks (an even split), `batch_size` and the default model
    options (how a layer is computed: the VARIANTS set them, whatever the base config chose); all else unchanged."""
    defaults = {f"model.{k}": v for k, v in options_lib.DEFAULTS.items()}
    return with_overrides(base, {**defaults, "model.hidden": size.hidden, "model.num_layers": size.layers,
                                 "model.heads": size.heads, "blocks.num_blocks": num_blocks,
                                 "blocks.layers": "", "data.batch_size": batch_size})


def scaled_task(config: ml_collections.ConfigDict, vocab_size: int | None) -> Task:
    return memory.with_vocab_size(get_task(config), vocab_size)


def claimed_params(config: ml_collections.ConfigDict, layers: int, is_block: bool,
                   vocab_size: int | None = None) -> int:
    """Parameters of a unit with `layers` layers, from the shape alone. Every layer: AdaLN-Zero modulation (6H), QKV,
    projection and the MLP, with biases; LayerNorms have no parameters (AdaLN supplies scale and shift). Around them:
    DiT: patch embedding, noise embedder (256 -> H -> H), class table (+1 null class), final AdaLN and Linear.
    LM: token table and noise embedder, head AdaLN and Linear to the vocabulary; a block (diffusion) also has the
    target-space input Linear and, with model.prev_token, a second token table."""
    m = config.model
    H = int(m.hidden)
    M = int(H * float(m.mlp_ratio))
    layer = (H * 6 * H + 6 * H) + (H * 3 * H + 3 * H) + (H * H + H) + (H * M + M) + (M * H + H)
    noise = (256 * H + H) + (H * H + H)
    head_adaln = H * 2 * H + 2 * H
    if config.task == "dit":
        p, C = int(m.patch), int(config.data.channels)
        out = p * p * C
        rest = (p * p * C * H + H) + noise + (int(config.data.num_classes) + 1) * H + head_adaln + (H * out + out)
    elif config.task == "ar":
        V = int(vocab_size)
        rest = V * H + noise + head_adaln + (H * V + V)
        if is_block:
            D = int(m.target_dim or H)
            rest += (D * H + H) + (V * H if bool(m.prev_token) else 0)
    else:
        raise ValueError(f"claimed_params: task {config.task!r} is not a scale family (dit, ar)")
    return layers * layer + rest


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def unit_row(task: Task, unit: Unit, batch_size: int) -> dict:
    """The compiled step of one unit: its memory (bytes), split into state and temporaries, and its parameters."""
    t0 = time.perf_counter()
    compiled, state, batch = memory.compile_step(task, unit, batch_size)
    m = compiled.memory_analysis()
    state_b = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"unit": unit.name, "layers": unit.num_layers, "params": param_count(state["params"]),
            "params_bytes": memory.tree_bytes(state["params"]),
            "opt_state_bytes": memory.tree_bytes(state["opt_state"]),
            "ema_bytes": memory.tree_bytes(state["ema"]), "batch_bytes": memory.tree_bytes(batch),
            "state_bytes": int(state_b), "temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(state_b + m.temp_size_in_bytes), "compile_seconds": round(time.perf_counter() - t0, 2)}


def largest_block_row(task: Task, batch_size: int) -> dict:
    """The row of the block with the largest step (blocks of distinct depth are compiled; equal ones once)."""
    return max((unit_row(task, u, batch_size) for u in memory._distinct_blocks(task)),
               key=lambda r: r["total_bytes"])


def size_report(base: ml_collections.ConfigDict, size: Size, blocks: Iterable[int] = BLOCKS,
                variants: dict = VARIANTS, batch_size: int = BATCH_SIZE, vocab_size: int | None = None,
                done: dict | None = None) -> dict:
    """All rows of one size: 'e2e<variant>' once, 'block<variant>' per B (under 'blocks'[str(B)]), and per B the
    ratios block<variant> / e2e<variant> ('ratio<variant>'). `done` is an earlier report of the same size (and
    batch): its rows are kept and not compiled again, so a new variant or B is added to an existing file."""
    blocks = tuple(int(b) for b in blocks)
    out = copy.deepcopy(done) if done else {
        "family": base.task, "hidden": size.hidden, "layers": size.layers, "heads": size.heads,
        "batch_size": batch_size, "vocab_size": vocab_size, "blocks": {}}
    if (out["hidden"], out["layers"], out["batch_size"]) != (size.hidden, size.layers, batch_size):
        raise ValueError(f"size_report: done is of another size or batch ({out['hidden']} x {out['layers']}, "
                         f"batch {out['batch_size']})")
    for suffix, overrides in variants.items():
        if "e2e" + suffix not in out:
            config = with_overrides(scaled_config(base, size, blocks[0], batch_size), overrides)
            task = scaled_task(config, vocab_size)
            out["e2e" + suffix] = unit_row(task, task.units("e2e")[0], batch_size)
        e2e = out["e2e" + suffix]
        out["params"] = e2e["params"]
        for b in blocks:
            rows = out["blocks"].setdefault(str(b), {})
            if "block" + suffix not in rows:
                config_b = with_overrides(scaled_config(base, size, b, batch_size), overrides)
                rows["block" + suffix] = largest_block_row(scaled_task(config_b, vocab_size), batch_size)
            rows["ratio" + suffix] = rows["block" + suffix]["total_bytes"] / e2e["total_bytes"]
    return out
