"""Compiled memory and FLOPs of one training step, exactly and without running it (docs/design.md, Measuring).

`jax.jit(step).lower(abstract args).compile()` gives `memory_analysis()`: the bytes XLA allocates for the step's
arguments, outputs and temporaries, and `cost_analysis()`: its FLOPs. Both are exact and repeatable on any backend,
so paper-sized models can be measured on a CPU. The state is donated, so the outputs alias the arguments:
  state = arguments + outputs - aliased   (parameters, optimizer state, EMA, the batch, the step's outputs)
  total = state + temporaries             (temporaries: activations kept for the backward pass, workspaces)

`memory_report` gives four rows per config: the end-to-end step and the largest block's step, each as configured
and with rematerialisation (scanned layers + a remat policy, dblocks.models.stack), the honest baseline for a
memory claim: a user short of memory tries remat before DiffusionBlocks.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import steps
from dblocks.tasks import Task, Unit, get_task

ROWS = ("e2e", "e2e_remat", "block", "block_remat")


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def with_model_options(task: Task, **options) -> Task:
    """The same task with config.model options overridden (e.g. scan_layers=True, remat='full')."""
    if not options:
        return task
    config = copy.deepcopy(task.config)
    with config.unlocked():
        for k, v in options.items():
            config.model[k] = v
    return get_task(config)


class _SizedVocab:
    """A stand-in vocabulary of a given size (compile-only measurements of a language config whose tokenizer
    file is not on this machine; only .size is used to build the model and the target space)."""

    def __init__(self, size: int):
        self.size = int(size)


def with_vocab_size(task: Task, size: int | None) -> Task:
    """The task with its vocabulary replaced by a stand-in of `size` tokens (None: unchanged)."""
    if size:
        task.set_vocab(_SizedVocab(size))
    return task


def flops_of(compiled) -> float:
    """FLOPs of a compiled program from XLA's cost analysis (0.0 when the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _pieces(task: Task, unit: Unit):
    config = task.config
    tx = steps.make_optimizer(config.optim, int(config.train.steps))
    model = task.make_model(unit)
    step = jax.jit(steps.make_train_step(task, model, tx, config.optim), donate_argnums=0)

    def init(batch_size: int = 2):
        params = task.init_params(model, steps.init_key(int(config.seed), unit.index), task.dummy_batch(batch_size))
        return steps.init_state(params, tx, float(config.optim.ema_decay))
    return model, step, init


def compile_step(task: Task, unit: Unit, batch_size: int, shardings: tuple | None = None,
                 example: dict | None = None) -> tuple[Any, dict, Any]:
    """(compiled step, abstract state, abstract batch) of `unit` at `batch_size`; nothing is allocated.
    shardings (replicated, batch): the state, key and range replicated and the batch split, for a data-parallel
    step (experiments.bench --cpu_devices); None: one device. example: a training batch whose shapes and dtypes
    the step is compiled for (e.g. uint8 images, so the executable can train; default task.dummy_batch)."""
    _, step, init = _pieces(task, unit)
    rep, dat = shardings or (None, None)
    spec = lambda t, sh: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh), t)  # noqa
    batch = spec(task.dummy_batch(batch_size) if example is None else example, dat)
    state = spec(jax.eval_shape(init), rep)
    key = spec(jax.eval_shape(lambda: steps.step_base_key(0, unit.index)), rep)
    compiled = step.lower(state, batch, key, jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep)).compile()
    return compiled, state, batch


def step_flops(task: Task, unit: Unit, batch_size: int, compiled=None) -> tuple[float, str]:
    """(FLOPs of one training step, how they were counted). XLA's cost analysis counts the body of a loop once,
    so for scanned layers the FLOPs come from compiling the same step unrolled (same layers, same remat policy:
    jax.checkpoint's barriers keep the recomputation in the count)."""
    if bool(task.config.model.scan_layers):
        unrolled = with_model_options(task, scan_layers=False)
        if isinstance(vars(task).get("vocab"), _SizedVocab):   # keep a stand-in vocabulary
            unrolled.set_vocab(task.vocab)
        return flops_of(compile_step(unrolled, unit, batch_size)[0]), "unrolled compile (scan counts one layer)"
    return flops_of(compiled if compiled is not None else compile_step(task, unit, batch_size)[0]), "compiled step"


def step_memory(task: Task, unit: Unit, batch_size: int, time_steps: int = 0) -> dict:
    """Compiles the training step of `unit` at `batch_size` and returns its memory (bytes) and FLOPs; with
    time_steps > 0 also runs it on zero data (after one warm-up step) and reports the median seconds per step."""
    t0 = time.perf_counter()
    compiled, state, batch = compile_step(task, unit, batch_size)
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    state_b = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    row = {"unit": unit.name, "layers": unit.num_layers, "batch_size": batch_size,
           "params_bytes": tree_bytes(state["params"]), "opt_state_bytes": tree_bytes(state["opt_state"]),
           "ema_bytes": tree_bytes(state["ema"]), "batch_bytes": tree_bytes(batch),
           "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "state_bytes": int(state_b), "total_bytes": int(state_b + m.temp_size_in_bytes),
           "compile_seconds": round(compile_s, 2)}
    row["flops"], row["flops_source"] = step_flops(task, unit, batch_size, compiled)
    row["compiled_flops"] = flops_of(compiled)
    if time_steps > 0:
        row["step_seconds"] = time_step(task, unit, batch_size, compiled, time_steps)
    return row


def time_step(task: Task, unit: Unit, batch_size: int, compiled, n: int, shardings: tuple | None = None) -> float:
    """Median wall seconds of n runs of the compiled step on zero data (one warm-up run first); shardings as
    compile_step's."""
    _, _, init = _pieces(task, unit)
    rep, dat = shardings or (None, None)
    put = (lambda t, sh: jax.device_put(t, sh)) if shardings else (lambda t, sh: jax.tree.map(jnp.asarray, t))  # noqa
    # initialised by one compiled program, as training does: run op by op, the initialisation compiles and caches
    # hundreds of small programs (about 165 MiB of resident memory in the CIFAR-100 ViT block's bench)
    state = put(jax.jit(init)(), rep)
    batch = put(task.dummy_batch(batch_size), dat)
    key, rng = put((steps.step_base_key(0, unit.index), jnp.asarray(unit.train_range, jnp.float32)), rep)
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, key, rng)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def memory_report(task: Task, batch_size: int | None = None, remat: str = "full", time_steps: int = 0,
                  rows: tuple[str, ...] = ROWS, vocab_size: int | None = None) -> dict:
    """The largest block's step against the end-to-end step of the same config, each as configured and with
    remat (scanned layers + the `remat` policy). Keys: one dict per row in `rows`, '<row>_step_bytes', 'ratio'
    (block / e2e) and 'remat_ratio' (block_remat / e2e_remat)."""
    batch_size = int(batch_size or task.config.data.batch_size)
    variants = {"": with_vocab_size(task, vocab_size),
                "_remat": with_vocab_size(with_model_options(task, scan_layers=True, remat=remat), vocab_size)}
    out = {"config_task": task.name, "num_blocks": int(task.config.blocks.num_blocks),
           "num_layers": int(task.config.model.num_layers), "batch_size": batch_size, "remat_policy": remat,
           "vocab_size": int(vocab_size) if vocab_size else None,
           "model_options": {k: str(task.config.model.get(k, d)) for k, d in
                             (("scan_layers", False), ("remat", "none"), ("dtype", "float32"),
                              ("attention", "xla"))}}
    for name in rows:
        kind, suffix = name.split("_", 1) if "_" in name else (name, "")
        t = variants["_" + suffix if suffix else ""]
        if kind == "e2e":
            r = step_memory(t, t.units("e2e")[0], batch_size, time_steps)
        else:
            blocks = [step_memory(t, u, batch_size, time_steps) for u in _distinct_blocks(t)]
            r = max(blocks, key=lambda r: r["total_bytes"])
        out[name] = r
        out[f"{name}_step_bytes"] = r["total_bytes"]
    if "block" in out and "e2e" in out:
        out["ratio"] = out["block_step_bytes"] / out["e2e_step_bytes"]
    if "block_remat" in out and "e2e_remat" in out:
        out["remat_ratio"] = out["block_remat_step_bytes"] / out["e2e_remat_step_bytes"]
    return out


def _distinct_blocks(task: Task) -> list[Unit]:
    seen, out = set(), []
    for u in task.units("dblocks"):
        if u.num_layers not in seen:
            seen.add(u.num_layers)
            out.append(u)
    return out
