"""Training a run: check everything, then hand the units to the sequential or the mesh trainer.

The top of the library's training side: it imports both trainers (`dblocks.engine`, `dblocks.parallel`), neither of
which imports it. Everything a user can get wrong is refused here, before anything is compiled or written.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax

from dblocks import checkpoint as ckpt_lib
from dblocks import config as config_lib
from dblocks import engine, logs, loop, parallel, preflight, user_data
from dblocks.tasks import Task, Unit, get_task


def units_to_train(task: Task, config) -> list[Unit]:
    """The units this process trains: the e2e network, or the blocks named by config.blocks.train."""
    units = task.units(config.method)
    if config.method == "e2e":
        return units
    wanted = config_lib.parse_blocks(config.blocks.train, int(config.blocks.num_blocks))
    return [u for u in units if u.index in wanted]


def check_workdir(workdir: str) -> None:
    """An empty --workdir, or one naming a file, is a user error (before anything is written)."""
    if not str(workdir or "").strip():
        raise config_lib.ConfigError("--workdir is empty: name the directory for checkpoints, metrics and samples")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise config_lib.ConfigError(f"--workdir {workdir} is a file, not a directory: name a new or existing "
                                     f"directory")


def unfinished(units: list[Unit], workdir: str, steps: int) -> list[Unit]:
    """The units whose meta does not record `steps` finished ones (those this run will compile a step for)."""
    def done(u: Unit) -> bool:
        path = os.path.join(workdir, u.subdir(), ckpt_lib.META)
        meta = ckpt_lib.read_json(path) if os.path.exists(path) else {}
        return bool(meta.get("complete")) and int(meta.get("step", 0)) >= steps
    return [u for u in units if not done(u)]


def check_data(config, source) -> None:
    """Problems that need the data itself (the config alone cannot show them)."""
    n, bs = len(source), int(config.data.batch_size)
    if bs > n:
        raise config_lib.ConfigError(f"invalid config:\n  - data.batch_size={bs} exceeds the {n} training examples "
                                     f"of data.name={config.data.name!r}")


def train(config, workdir: str, on_step: Callable[[Unit, int], None] | None = None,
          return_params: bool = False) -> dict[str, Any]:
    """Validates the config and the data, then trains this process's units (sequentially, or side by side on a
    mesh when config.parallel.mode == 'mesh'). With return_params, returns {unit name: final params} as host trees."""
    check_workdir(workdir)
    # fields left to the data (classes, image size, vocabulary); a tokenizer to train (data.tokenizer=train:VOCAB)
    # is trained into the workdir only once every other field has passed
    user_data.resolve_fields(config, workdir, train_tokenizer=False)
    if user_data.tokenizer_to_train(config):
        config_lib.validate(user_data.with_char_vocab(config))
        user_data.resolve_fields(config, workdir)
    config_lib.validate(config)
    task = get_task(config)
    for unit in task.units(config.method):  # refuse a workdir of another config before writing anything into it
        ckpt_lib.check_compatible(os.path.join(workdir, unit.subdir()), ckpt_lib.unit_meta(task, unit, config))
    source = task.source("train")
    check_data(config, source)
    units = units_to_train(task, config)
    mode = parallel.settings(config)[0]
    asked = config.parallel
    cpus = int(asked.cpu_devices)
    if cpus > 1 and jax.default_backend() != "cpu":
        logs.log.info("parallel.cpu_devices=%d ignored: the backend is %s", cpus, jax.default_backend())
    elif cpus > 1 and mode == "mesh" and parallel.requested_mode(config) == "sequential":
        logs.log.info("parallel.cpu_devices=%d: each step's batch is split over %d CPU devices (the mesh trainer, "
                      "one unit at a time)", cpus, cpus)
    if mode == "mesh":
        parallel.mesh_shape(config, 1)  # a mesh that cannot fit is refused before anything is written
    logs.log.info("%s", parallel.device_plan(config))   # devices visible and used; for parallel.mode=auto, why
    # a step that cannot fit the device is refused before anything is written (locks included); the sequential
    # trainer trains with the preflight's compiled steps
    compiled = (preflight.check(task, unfinished(units, workdir, int(config.train.steps)), config, source)
                if config.train.preflight else {})
    # every unit's lock before anything is written (a second trainer is refused with the workdir unchanged);
    # config.json is written once a unit has restored (Trainer.record_config)
    locks = ckpt_lib.hold_locks([os.path.join(workdir, u.subdir()) for u in units])
    with locks, loop.StopSignal.shared():   # a stop signal while a unit restores or compiles ends the process
        trainer = engine.Trainer(task, config, workdir, source, on_step=on_step, compiled=compiled)
        logs.log.info("training %s: %s", config.method, ", ".join(
            f"{u.name} ({u.num_layers} layers, range [{u.train_range[0]:.4g}, {u.train_range[1]:.4g}])"
            for u in units))
        if mode == "mesh":
            return parallel.train_units(trainer, units, return_params=return_params)
        finals = {}
        for unit in units:
            state = trainer.train_unit(unit)
            if return_params:
                finals[unit.name] = jax.device_get(state["params"])
            del state  # the unit's device buffers are released before the next unit starts
        return finals
