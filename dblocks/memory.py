"""Compiled memory of one training step, exactly and without running it (docs/design.md, Measuring).

`jax.jit(step).lower(abstract args).compile().memory_analysis()` gives the bytes XLA allocates for the step's
arguments, outputs and temporaries. It is exact and repeatable on any backend, so paper-sized models can be
measured on a CPU. The state is donated, so the outputs alias the arguments; the total counts them once:
total = arguments + outputs - aliased + temporaries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import engine, steps
from dblocks.tasks import Task, Unit


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def step_memory(task: Task, unit: Unit, batch_size: int) -> dict:
    """Compiles (never runs) the training step of `unit` at `batch_size` and returns its memory in bytes."""
    config = task.config
    trainer = engine.Trainer(task, config, workdir="", source=None)
    model = task.make_model(unit)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), task.dummy_batch(batch_size))
    state = jax.eval_shape(lambda: trainer.initial_state(unit, model, task.dummy_batch(2)))
    step = jax.jit(steps.make_train_step(task, model, trainer.tx, config.optim),
                   donate_argnums=0)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    compiled = step.lower(state, batch, rng, jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"unit": unit.name, "layers": unit.num_layers, "batch_size": batch_size,
            "params_bytes": tree_bytes(state["params"]), "opt_state_bytes": tree_bytes(state["opt_state"]),
            "ema_bytes": tree_bytes(state["ema"]), "batch_bytes": tree_bytes(batch),
            "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(total)}


def memory_report(task: Task, batch_size: int | None = None) -> dict:
    """The largest block's step against the end-to-end step of the same config."""
    batch_size = int(batch_size or task.config.data.batch_size)
    blocks = [step_memory(task, u, batch_size) for u in _distinct_blocks(task)]
    block = max(blocks, key=lambda r: r["total_bytes"])
    e2e = step_memory(task, task.units("e2e")[0], batch_size)
    return {"config_task": task.name, "num_blocks": int(task.config.blocks.num_blocks),
            "num_layers": int(task.config.model.num_layers), "batch_size": batch_size, "block": block, "e2e": e2e,
            "block_step_bytes": block["total_bytes"], "e2e_step_bytes": e2e["total_bytes"],
            "ratio": block["total_bytes"] / e2e["total_bytes"]}


def _distinct_blocks(task: Task) -> list[Unit]:
    seen, out = set(), []
    for u in task.units("dblocks"):
        if u.num_layers not in seen:
            seen.add(u.num_layers)
            out.append(u)
    return out
