"""Assembly: read the B block directories (or the e2e one) of a workdir into one runnable model.

Assembly refuses, with a message that says what to do, a missing block, an unfinished block, or blocks whose meta
(partition, model config: the signature hash) disagree with the run's config or with each other.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from dblocks import checkpoint as ckpt_lib
from dblocks import run_record, steps, user_data
from dblocks import partition as partition_lib
from dblocks.tasks import Task, Unit, get_task


class AssemblyError(RuntimeError):
    """The blocks on disk cannot be combined into one model."""


@dataclasses.dataclass
class Run:
    """A trained run, ready for sampling and evaluation."""
    workdir: str
    config: ml_collections.ConfigDict
    task: Task
    method: str
    partition: partition_lib.Partition   # B=1 over the full range for the e2e baseline
    units: list[Unit]
    models: list[Any]
    params: list[Any]                    # per unit (block order), device arrays
    metas: list[dict]

    @property
    def num_blocks(self) -> int:
        return len(self.units)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise AssemblyError(f"{workdir} has no config.json: it is not a dblocks workdir (train into it first)")
    return ml_collections.ConfigDict(run_record.saved_config(ckpt_lib.read_json(path)))


def detect_method(workdir: str) -> str:
    if os.path.isdir(os.path.join(workdir, "blocks")):
        return "dblocks"
    if os.path.isdir(os.path.join(workdir, "e2e")):
        return "e2e"
    raise AssemblyError(f"{workdir} holds no trained blocks (blocks/) and no end-to-end run (e2e/)")


def _check_metas(task: Task, units: list[Unit], workdir: str, allow_incomplete: bool) -> list[dict]:
    expected = task.signature()
    metas, problems = [], []
    for u in units:
        path = os.path.join(workdir, u.subdir(), ckpt_lib.META)
        if not os.path.exists(path):
            problems.append(f"{u.name} is missing ({path} not found): train it with "
                            f"--config.blocks.train={u.index}" if u.is_block else f"{u.name} is missing ({path})")
            continue
        meta = ckpt_lib.read_json(path)
        metas.append(meta)
        diffs = ckpt_lib.signature_differences(meta, expected)
        if diffs is not None:
            problems.append(f"{u.name} was trained with a different config: {diffs}")
        elif u.is_block and meta.get("block") != u.index:
            problems.append(f"{u.name}'s meta says it is block {meta.get('block')}")
        elif not meta.get("complete") and not allow_incomplete:
            problems.append(f"{u.name} is unfinished (step {meta.get('step')} of {meta.get('steps')}): resume its "
                            f"training with the same command, or pass allow_incomplete")
    if problems:
        raise AssemblyError(f"cannot assemble {workdir}:\n  - " + "\n  - ".join(problems))
    return metas


def weights_target(abstract_state: dict, use_ema: bool) -> dict:
    """The part of a unit's train state that sampling uses: the step counter (the integrity check reads it) and the
    EMA weights, or the parameters where there is no EMA or use_ema is off. Restoring only this leaves the optimizer
    state (two more parameter-sized trees under Adam) and the unused weights on disk."""
    key = "ema" if use_ema and abstract_state["ema"] else "params"
    return {"step": abstract_state["step"], key: abstract_state[key]}


def load_run(workdir: str, method: str | None = None, use_ema: bool = True, allow_incomplete: bool = False,
             config_overrides: dict | None = None) -> Run:
    """Loads every unit of a workdir's run (all B blocks, or the e2e network) with its latest checkpoint: only the
    weights it runs with are read (weights_target), not the whole train state."""
    config = load_config(workdir)
    user_data.resolve_fields(config, workdir, read_data=False)   # a saved text vocabulary is registered
    method = method or detect_method(workdir)
    config.method = method
    if config_overrides:
        config.update_from_flattened_dict(config_overrides)
    task = get_task(config)
    units = task.units(method)
    metas = _check_metas(task, units, workdir, allow_incomplete)
    tx = steps.make_optimizer(config.optim, int(config.train.steps))
    models, params = [], []
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for u in units:
        model = task.make_model(u)
        ckpt = ckpt_lib.UnitCheckpoint(os.path.join(workdir, u.subdir()), ckpt_lib.unit_meta(task, u, config),
                                       read_only=True)   # no lock: a run may be sampled while it trains
        dummy = task.dummy_batch()
        abstract = jax.eval_shape(lambda: steps.init_state(task.init_params(model, jax.random.PRNGKey(0), dummy),
                                                            tx, float(config.optim.ema_decay)))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                weights_target(abstract, use_ema))
        state = ckpt.restore(abstract, partial=True)
        ckpt.close()
        models.append(model)
        params.append(state["ema"] if "ema" in state else state["params"])
    part = task.partition() if method == "dblocks" else partition_lib.Partition(
        boundaries=task.full_range(), ranges=(task.full_range(),))
    return Run(workdir, config, task, method, part, units, models, params, metas)


def randomize(params: Any, key: jax.Array, scale: float = 0.3) -> Any:
    """Every leaf drawn from N(0, scale^2): the zero-initialised AdaLN gates and heads would hide any dependence."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def random_run(config: ml_collections.ConfigDict, method: str) -> Run:
    """A run with random (non-zero) parameters in place of a checkpoint: exercises every code path, and measures
    speed, without training. Unit u's parameters come from PRNGKey(u.index)."""
    config = config.copy_and_resolve_references()
    config.method = method
    task = get_task(config)
    units = task.units(method)
    models = [task.make_model(u) for u in units]
    init = jax.jit(lambda m, k: randomize(task.init_params(m, k, task.dummy_batch()), k), static_argnums=0)
    params = [init(m, jax.random.PRNGKey(u.index)) for m, u in zip(models, units)]
    part = task.partition() if method == "dblocks" else partition_lib.Partition(
        boundaries=task.full_range(), ranges=(task.full_range(),))
    return Run("<random>", config, task, method, part, units, models, params, [{}] * len(units))
