"""The block-training engine: trains units (blocks, or the end-to-end network) of any task.

Read top to bottom: optimizer; train state; the jitted step; one unit's loop (resume, progress, metrics,
checkpoints); the run (which units this process trains). Only the active unit's parameters and optimizer state
are on the device: a unit is initialised or restored, trained, saved and dropped before the next starts.
Per-unit randomness is fold_in(seed, b), and the batch order is a function of (seed, b, step), so a block
trained alone ends with exactly the parameters it has after an all-blocks run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dblocks import checkpoint as ckpt_lib
from dblocks import config as config_lib
from dblocks import data as data_lib
from dblocks import logs
from dblocks.tasks import Task, Unit, get_task

Array = jax.Array
State = dict[str, Any]   # {'step', 'params', 'opt_state', 'ema'}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; nothing from that step is saved."""


# -- optimizer ------------------------------------------------------------------------------------------------

def make_optimizer(optim, steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine (or constant) decay, global-norm clipping, no decay on biases/norms.
    The schedule is per unit: each block runs its own `steps` (matched compute with the baseline)."""
    if optim.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, optim.lr, max(int(optim.warmup_steps), 0), steps,
                                                end_value=optim.lr * optim.min_lr_ratio)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(int(optim.warmup_steps), 1)),
                                   optax.constant_schedule(optim.lr)], [int(optim.warmup_steps)])
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    chain.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask))
    return optax.chain(*chain)


# -- train state and step --------------------------------------------------------------------------------------

def init_state(params, tx: optax.GradientTransformation, ema_decay: float) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params) if ema_decay > 0 else {}}


def make_train_step(task: Task, model: nn.Module, tx: optax.GradientTransformation,
                    ema_decay: float) -> Callable[[State, dict, Array, Array], tuple[State, dict]]:
    """step(state, batch, rng, train_range) -> (state, metrics). Pure, so it can be jitted, vmapped over a block
    axis, or lowered for the memory report."""

    def step(state: State, batch: dict, rng: Array, train_range: Array):
        def loss_fn(params):
            return task.loss(model, params, batch, rng, train_range, train=True)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema_decay > 0:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    return step


def unit_key(seed: int, unit: Unit) -> Array:
    """fold_in(seed, b): the unit's randomness depends on nothing but the seed and its own index."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), unit.index)


# -- one unit ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Trainer:
    """Everything a unit's loop needs that is shared by all units of a run (compiled steps are reused)."""
    task: Task
    config: Any
    workdir: str
    source: Any
    on_step: Callable[[Unit, int], None] | None = None   # test hook, e.g. to simulate a kill

    def __post_init__(self):
        self.tx = make_optimizer(self.config.optim, int(self.config.train.steps))
        self._steps: dict[tuple, Callable] = {}
        self.writer = logs.MetricsWriter(self.workdir)

    def model(self, unit: Unit) -> nn.Module:
        return self.task.make_model(unit)

    def compiled_step(self, model: nn.Module) -> Callable:
        key = (type(model).__name__, repr(model))  # units of the same shape share one compiled step
        if key not in self._steps:
            step = make_train_step(self.task, model, self.tx, float(self.config.optim.ema_decay))
            self._steps[key] = jax.jit(step, donate_argnums=0)
        return self._steps[key]

    def batch(self, unit: Unit, step: int) -> dict:
        c = self.config
        idx = data_lib.batch_indices(len(self.source), int(c.data.batch_size), int(c.seed), unit.index, step)
        return self.task.make_batch(self.source.get(idx), train=True)

    def initial_state(self, unit: Unit, model: nn.Module, batch: dict | None = None) -> State:
        """Fresh state from fold_in(seed, b); `batch` only gives shapes (default: the unit's first batch)."""
        batch = self.batch(unit, 0) if batch is None else batch
        params = self.task.init_params(model, jax.random.fold_in(unit_key(self.config.seed, unit), 0), batch)
        return init_state(params, self.tx, float(self.config.optim.ema_decay))

    def train_unit(self, unit: Unit) -> State:
        c = self.config
        total = int(c.train.steps)
        model = self.model(unit)
        ckpt = ckpt_lib.UnitCheckpoint(os.path.join(self.workdir, unit.subdir()),
                                       ckpt_lib.unit_meta(self.task, unit, c), every=int(c.train.ckpt_every),
                                       keep=int(c.train.keep_checkpoints))
        latest = ckpt.latest_step()
        if latest is None:
            state = self.initial_state(unit, model)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    jax.eval_shape(lambda: self.initial_state(unit, model)))
            state = ckpt.restore(abstract, latest)
            logs.log.info("[%s] resumed from step %d", unit.name, latest)
        start = int(state["step"])
        ckpt.write_meta(complete=start >= total, step=start)
        if start >= total:
            ckpt.close()
            logs.log.info("[%s] already trained (%d steps); skipping", unit.name, total)
            return state

        step_fn = self.compiled_step(model)
        rng_base = jax.random.fold_in(unit_key(c.seed, unit), 1)
        train_range = jnp.asarray(unit.train_range, jnp.float32)
        label = unit.name if unit.is_block else "e2e"
        progress = logs.Progress(label, start, total, int(c.train.log_every))
        t0 = time.time()
        sums, count = None, 0
        for step in range(start, total):
            if self.on_step is not None:
                self.on_step(unit, step)
            state, metrics = step_fn(state, self.batch(unit, step), jax.random.fold_in(rng_base, step), train_range)
            done = step + 1
            if step == start:
                progress.start_clock(done)
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)  # on device, no sync
            count += 1
            if done % int(c.train.log_every) == 0 or done == total or done % int(c.train.ckpt_every) == 0:
                mean = {k: v / count for k, v in sums.items()}  # metrics averaged since the last log line
                loss = float(mean["loss"])
                if not np.isfinite(loss):
                    ckpt.close()
                    raise NonFiniteLossError(f"[{label}] loss is {loss} at step {done}; the last good checkpoint "
                                             f"(step {ckpt.latest_step()}) is kept. Lower optim.lr or check the data.")
                record = progress.update(done, mean)
                if record is not None:
                    self.writer.write({"unit": label, "step": done, "wall": time.time() - t0, **record})
                    sums, count = None, 0
            if done % int(c.train.ckpt_every) == 0 and done != total:
                ckpt.save(done, state)
        ckpt.save(total, state, force=True)
        ckpt.close()
        ckpt.write_meta(complete=True, step=total)
        return state


# -- the run ----------------------------------------------------------------------------------------------------

def units_to_train(task: Task, config) -> list[Unit]:
    units = task.units(config.method)
    if config.method == "e2e":
        return units
    wanted = config_lib.parse_blocks(config.blocks.train, int(config.blocks.num_blocks))
    return [u for u in units if u.index in wanted]


def save_config(config, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        ckpt_lib.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))


def train(config, workdir: str, on_step: Callable[[Unit, int], None] | None = None,
          return_params: bool = False) -> dict[str, Any]:
    """Validates the config, then trains this process's units one after another. With return_params, returns
    {unit name: final params} as host (numpy) trees; device buffers of a unit are dropped before the next starts."""
    config_lib.validate(config)
    task = get_task(config)
    for unit in task.units(config.method):  # refuse a workdir of another config before writing anything into it
        ckpt_lib.check_compatible(os.path.join(workdir, unit.subdir()), ckpt_lib.unit_meta(task, unit, config))
    save_config(config, workdir)
    trainer = Trainer(task, config, workdir, task.source("train"), on_step=on_step)
    units = units_to_train(task, config)
    logs.log.info("training %s: %s", config.method, ", ".join(f"{u.name} ({u.num_layers} layers, range "
                                                              f"[{u.train_range[0]:.4g}, {u.train_range[1]:.4g}])"
                                                              for u in units))
    if (config.get("parallel") or {}).get("mode", "sequential") == "mesh":
        from dblocks import parallel  # imported here: it builds on this module
        return parallel.train_units(trainer, units, on_step=on_step, return_params=return_params)
    finals = {}
    for unit in units:
        state = trainer.train_unit(unit)
        if return_params:
            finals[unit.name] = jax.device_get(state["params"])
        del state  # the unit's device buffers are released before the next unit starts
    return finals
