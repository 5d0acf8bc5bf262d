"""Gradient accumulation (config.train.microbatches, dblocks.steps): one step over k microbatches is the whole
batch's step to float tolerance, for a block and for the end-to-end unit, in both trainers; it needs less temporary
memory; a bad microbatch count is refused before anything runs.
"""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import engine, memory, steps
from dblocks import train as train_lib
from dblocks.config import ConfigError, validate
from dblocks.tasks import get_task

# one case in the default suite (the AR block's draw is the most involved); every task and method with -m slow
CASES = [pytest.param(n, m, marks=() if (n, m) == ("tiny_ar", "dblocks") else pytest.mark.slow)
         for n in ("tiny_dit", "tiny_ar", "tiny_vit", "tiny_mdm", "tiny_recurrent") for m in ("dblocks", "e2e")]


def config_of(name: str, method: str = "dblocks", microbatches: int = 1):
    c = importlib.import_module(f"experiments.configs.{name}").get_config()
    c.method, c.train.microbatches = method, microbatches
    c.optim.warmup_steps = 0   # a first step with a learning rate > 0, so the parameters move
    return c


def one_step(name: str, method: str, microbatches: int) -> tuple[dict, dict, dict]:
    """(params before, params after one step, metrics) of the run's last unit on its real first batch."""
    c = config_of(name, method, microbatches)
    validate(c)
    task = get_task(c)
    unit = task.units(method)[-1]
    trainer = engine.Trainer(task, c, "", task.source("train"))
    model = trainer.model(unit)
    state, batch = trainer.initial_state(unit, model), trainer.batch(unit, 0)
    before = jax.device_get(state["params"])
    state, metrics = jax.jit(trainer.train_step(model))(state, batch, steps.step_base_key(c.seed, unit.index),
                                                        jnp.asarray(unit.train_range, jnp.float32))
    return before, jax.device_get(state["params"]), jax.device_get(metrics)


def max_rel_diff(a, b) -> float:
    """Largest |a - b| / max |b| over leaves."""
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)), a, b)))


def check_equal_to_whole_batch(name: str, method: str):
    p0, p1, m1 = one_step(name, method, 1)
    _, p4, m4 = one_step(name, method, 4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=2e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    print(f"{name} {method}: loss {m1['loss']:.6g} vs {m4['loss']:.6g}, params differ by {max_rel_diff(p4, p1):.2g}")
    assert max_rel_diff(p4, p1) < 1e-4
    assert max_rel_diff(p1, p0) > 1e-4   # the step moved the parameters: the equality is not that of two inits


@pytest.mark.parametrize("name, method", CASES)
def test_four_microbatches_equal_the_whole_batch(name, method):
    check_equal_to_whole_batch(name, method)


def test_draw_is_sliced_not_redrawn():
    """Each sample's noise level and noise are those of the whole batch's draw: microbatch m holds samples
    m, m + k, ... of task.draw's output (a redraw per microbatch would give other values)."""
    c = config_of("tiny_dit")
    task = get_task(c)
    unit = task.units("dblocks")[0]
    model = task.make_model(unit)
    batch = task.make_batch(task.source("train").get(np.arange(8)), train=True)
    inputs, _ = task.draw(model, batch, jax.random.PRNGKey(3), jnp.asarray(unit.train_range))
    micro = steps.microbatched(inputs, 4)
    assert micro["sigma"].shape == (4, 2)
    np.testing.assert_array_equal(micro["sigma"][1], inputs["sigma"][1::4])
    np.testing.assert_array_equal(micro["z"][3], inputs["z"][3::4])


@pytest.mark.slow
def test_microbatches_need_less_temporary_memory():
    c = config_of("tiny_dit", "e2e")
    task = get_task(c)
    unit = task.units("e2e")[0]
    whole = memory.step_memory(task, unit, 1024)   # a batch whose activations outweigh the tiny model's state
    c.train.microbatches = 4
    micro = memory.step_memory(get_task(c), unit, 1024)
    print(f"temp bytes: {whole['temp_bytes']} whole batch, {micro['temp_bytes']} in 4 microbatches")
    assert micro["temp_bytes"] < 0.6 * whole["temp_bytes"], (micro["temp_bytes"], whole["temp_bytes"])
    assert micro["state_bytes"] == whole["state_bytes"]


@pytest.mark.slow
def test_mesh_trainer_with_microbatches(tmp_path):
    """The mesh trainer (the step vmapped over blocks, each block's batch split over 'data') with 2 microbatches
    ends where the sequential trainer with the whole batch does."""
    def run(workdir, **parallel):
        c = config_of("tiny_dit", microbatches=2 if parallel else 1)
        c.train.steps, c.blocks.train = 3, "1,2"
        c.parallel.update(parallel)
        return train_lib.train(c, str(workdir), return_params=True)

    seq = run(tmp_path / "seq")
    mesh = run(tmp_path / "mesh", mode="mesh", data=2, blocks=2)
    for name in ("block_01", "block_02"):
        assert max_rel_diff(mesh[name], seq[name]) < 1e-4, name


@pytest.mark.parametrize("fields, message", [
    (dict(microbatches=3), "divisible by train.microbatches=3"),
    (dict(microbatches=0), "train.microbatches=0 must be >= 1"),
    (dict(microbatches=4, cpu_devices=4), "train.microbatches=4 x parallel.cpu_devices=4"),
    (dict(microbatches=4, mode="mesh", data=4), "train.microbatches=4 x parallel.data=4"),
])
def test_bad_microbatches_are_refused(fields, message):
    c = config_of("tiny_dit")   # batch 8
    c.train.microbatches = fields.pop("microbatches")
    c.parallel.update(fields)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(c)


def test_good_microbatches_pass():
    c = config_of("tiny_dit", microbatches=4)
    c.parallel.update(dict(mode="mesh", data=2))
    validate(c)
