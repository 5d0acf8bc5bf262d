"""The sequential trainer: units (blocks, or the end-to-end network) of any task, one after another on one device.

Only the active unit's parameters and optimizer state are on the device: a unit is initialised or restored, trained
by the shared loop (`dblocks.loop`), saved and dropped before the next starts (docs/design.md item 2). Per-unit
randomness is fold_in(seed, b) (`dblocks.steps`) and the batch order is a function of (seed, b, step), so a block
trained alone ends with exactly the parameters it has after an all-blocks run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dblocks import checkpoint as ckpt_lib
from dblocks import logs, loop, order, steps, validation
from dblocks.tasks import Task, Unit

State = steps.State


def step_key(model: nn.Module) -> tuple:
    """Units whose models have the same key share one compiled step."""
    return type(model).__name__, repr(model)


@dataclasses.dataclass
class Trainer:
    """What every unit of a run shares: the task, the config, the data source, the optimizer and compiled steps
    (units of the same shape reuse one compiled step). The mesh trainer builds on the same object."""
    task: Task
    config: Any
    workdir: str
    source: Any
    on_step: Callable[[Unit, int], None] | None = None   # test hook, e.g. to simulate a kill
    compiled: dict[tuple, Callable] = dataclasses.field(default_factory=dict)   # step_key -> step (the memory
    #                                                                           preflight's executables, then jits)

    def __post_init__(self):
        c = self.config
        self.tx = steps.make_optimizer(c.optim, int(c.train.steps))
        self.lr_at = steps.lr_schedule(c.optim, int(c.train.steps))
        self.writer = logs.MetricsWriter(self.workdir)
        self.config_recorded = False
        self._heldout: dict | None = None
        self._evals: dict[tuple, Callable] = {}   # the held-out loss, jitted once per model shape

    def record_config(self) -> None:
        """Writes WORKDIR/config.json once, when a unit is about to train (its lock held, its checkpoint restored): a
        refused run leaves the config of the runs before it in place."""
        if self.config_recorded or not self.workdir:
            return
        if jax.process_index() == 0:
            try:
                ckpt_lib.write_json_atomic(os.path.join(self.workdir, "config.json"),
                                           json.loads(self.config.to_json_best_effort()))
            except OSError as e:
                if not ckpt_lib.is_write_error(e):
                    raise
                raise ckpt_lib.CheckpointWriteError(e.errno, f"cannot write {self.workdir}/config.json: "
                                                    f"{e.strerror or e}. The workdir must be writable and have free "
                                                    f"space; nothing on disk was lost.") from None
        self.config_recorded = True

    def model(self, unit: Unit) -> nn.Module:
        return self.task.make_model(unit)

    def train_step(self, model: nn.Module) -> Callable:
        """The unit's pure step (steps.make_train_step) for this run's optimizer."""
        return steps.make_train_step(self.task, model, self.tx, self.config.optim)

    def compiled_step(self, model: nn.Module) -> Callable:
        """The jitted step (state donated), one per model shape."""
        key = step_key(model)
        if key not in self.compiled:
            self.compiled[key] = jax.jit(self.train_step(model), donate_argnums=0)
        return self.compiled[key]

    def compiled_eval(self, model: nn.Module) -> Callable:
        """The jitted held-out loss (dblocks.validation), one per model shape."""
        key = ("eval", type(model).__name__, repr(model))
        if key not in self._evals:
            self._evals[key] = jax.jit(validation.make_eval_loss(self.task, model))
        return self._evals[key]

    def heldout(self) -> dict:
        """The fixed held-out batch every unit is evaluated on (host arrays; {} when there is none), loaded at the
        first evaluation."""
        if self._heldout is None:
            self._heldout = validation.heldout_batch(self.task, int(self.config.data.batch_size))
        return self._heldout

    def batch(self, unit: Unit, step: int) -> dict:
        """The unit's host batch at `step` (a pure function of seed, unit and step)."""
        c = self.config
        idx = order.batch_indices(len(self.source), int(c.data.batch_size), int(c.seed), unit.index, step)
        return self.task.make_batch(self.source.get(idx), train=True)

    def initial_state(self, unit: Unit, model: nn.Module, batch: dict | None = None) -> State:
        """Fresh state from the unit's init key; `batch` only gives shapes (default: the unit's first batch)."""
        batch = self.batch(unit, 0) if batch is None else batch
        ema = float(self.config.optim.ema_decay)
        # one compiled program: run op by op, initialisation compiles and keeps hundreds of small programs (about
        # 165 MiB of resident memory for the CIFAR-100 ViT block, docs/lab/performance.md). Its output is committed to
        # the device the step runs on, as the step's own output is: an uncommitted first state would make the step
        # compile a second time at step 2.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        init = jax.jit(lambda key, b: steps.init_state(self.task.init_params(model, key, b), self.tx, ema),
                       out_shardings=device)
        return init(steps.init_key(self.config.seed, unit.index), batch)

    def checkpoint(self, unit: Unit) -> ckpt_lib.UnitCheckpoint:
        c = self.config
        return ckpt_lib.UnitCheckpoint(os.path.join(self.workdir, unit.subdir()),
                                       ckpt_lib.unit_meta(self.task, unit, c),
                                       every=int(c.train.ckpt_every), keep=int(c.train.keep_checkpoints))

    def train_unit(self, unit: Unit) -> State:
        """Trains one unit to config.train.steps (resuming from its latest checkpoint) and returns its state."""
        total = int(self.config.train.steps)
        model = self.model(unit)
        ckpt = self.checkpoint(unit)
        try:
            latest = ckpt.latest_step()
            if latest is None:
                state = self.initial_state(unit, model)
            else:
                state = ckpt.restore(self.abstract_state(unit, model), latest)
                logs.log.info("[%s] resumed from step %d", unit.name, int(state["step"]))
            start = int(state["step"])
            self.record_config()
            ckpt.write_meta(complete=start >= total, step=start)
            if start >= total:
                logs.log.info("[%s] already trained (%d steps); skipping", unit.name, total)
                return state
            driver = _OneUnit(self, unit, model, ckpt, state)
            loop.run(driver, start, total, self.config, self.writer, self.lr_at, self.on_step)
            return driver.state
        finally:
            ckpt.close()

    def abstract_state(self, unit: Unit, model: nn.Module) -> State:
        """Shapes and dtypes of the unit's state, placed on this process's first device (to restore into)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(lambda: self.initial_state(unit, model, self.task.dummy_batch(2))))


class _OneUnit:
    """The loop's driver for one unit on one device."""

    def __init__(self, trainer: Trainer, unit: Unit, model: nn.Module, ckpt, state: State):
        self.trainer, self.units, self.ckpts, self.state = trainer, [unit], [ckpt], state
        self.labels = [unit.name if unit.is_block else "e2e"]
        self.device = jax.local_devices()[0]
        self.devices = [self.device]
        self.base_key = steps.step_base_key(trainer.config.seed, unit.index)
        self.train_range = jnp.asarray(unit.train_range, jnp.float32)
        self.step_fn = trainer.compiled_step(model)
        self.model, self._eval = model, None

    def batch(self, step: int):
        return jax.device_put(self.trainer.batch(self.units[0], step), self.device)

    def step(self, batch):
        self.state, metrics = self.step_fn(self.state, batch, self.base_key, self.train_range)
        return metrics

    def eval_loss(self) -> dict | None:
        """{'val_loss': the unit's held-out loss} on the device (dblocks.validation); not fetched here. None without
        held-out data."""
        if not self.trainer.heldout():
            return None
        if self._eval is None:
            t, unit = self.trainer, self.units[0]
            self._eval = (t.compiled_eval(self.model), jax.device_put(t.heldout(), self.device),
                          validation.eval_key(t.config.seed, unit.index))
        fn, batch, key = self._eval
        return {"val_loss": fn(self.state["params"], batch, key, self.train_range)}

    def lower(self, batch):
        """The step lowered for these arguments (its cost analysis gives FLOPs; dblocks.profiling); a step the memory
        preflight compiled ahead of time is its own cost analysis."""
        if not hasattr(self.step_fn, "lower"):
            return self.step_fn
        return self.step_fn.lower(self.state, batch, self.base_key, self.train_range)

    def to_host(self, tree):
        return jax.device_get(tree)

    def unit_metrics(self, host, i: int) -> dict:
        return host

    def unit_state(self, i: int) -> State:
        return self.state
