"""Memory preflight (dblocks.preflight): a unit whose step cannot fit is refused with exit status 2 before the
workdir is touched, with the options that would fit; a step that fits trains with the preflight's own executable.
"""
import os

import jax
import numpy as np
import pytest

from dblocks import engine, preflight
from dblocks import train as train_lib
from dblocks.config import ConfigError, validate
from dblocks.tasks import get_task
from experiments.common import EXIT_USER_ERROR, user_errors
from experiments.configs import tiny_dit


def config(**train):
    c = tiny_dit.get_config()
    c.train.update(train)
    return c


def test_a_step_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as e, user_errors():
        train_lib.train(config(memory_limit_gb=1e-6), str(workdir))   # 1 kB
    assert e.value.code == EXIT_USER_ERROR
    message = capsys.readouterr().err
    assert message.startswith("error: the training step of block_00 needs ") and "train.memory_limit_gb is 1e-06 GB" \
        in message, message
    assert not workdir.exists()   # no config.json, no blocks/, no metrics
    # each option with its compiled figure (GB); a model this small needs as much with each of them, its memory is
    # all parameters and optimizer state (tests/test_microbatches.py shows accumulation's saving on activations)
    lines = {line.split()[0]: line for line in message.splitlines()[1:]}
    assert "--config.blocks.num_blocks" not in message   # 3 blocks of 3 layers: no more blocks to offer
    for option in ("--config.model.scan_layers=True", "--config.train.microbatches=2"):
        assert lines[option].endswith(" GB)"), message
    assert "model.attention" in message


@pytest.mark.slow
def test_suggestions_offer_more_blocks_and_microbatches():
    c = config(microbatches=1)
    c.model.num_layers, c.blocks.num_blocks = 4, 2
    task = get_task(c)
    unit = task.units("dblocks")[0]
    example = task.make_batch(task.source("train").get(np.arange(8)), train=True)
    _, need = preflight.compile_bytes(task, unit, example)
    options = dict(preflight.suggestions(unit, c, example, 1, need, need // 2))
    assert options["--config.blocks.num_blocks=4"] < need   # a block of 1 layer instead of 2
    # offered with its figure (at this size the float32 gradient sums outweigh the activations they save)
    assert options["--config.train.microbatches=2"] > 0


def test_a_step_that_fits_trains_with_the_preflight_executable(tmp_path):
    c = config(memory_limit_gb=1000.0)
    validate(c)
    task = get_task(c)
    source = task.source("train")
    units = train_lib.units_to_train(task, c)
    compiled = preflight.check(task, units, c, source)
    assert len(compiled) == 1   # three blocks of one layer: one compile
    trainer = engine.Trainer(task, c, str(tmp_path), source, compiled=compiled)
    model = trainer.model(units[1])
    assert trainer.compiled_step(model) is compiled[engine.step_key(model)]
    # the executable takes the trainer's real batches (uint8 images) and gives the jitted step's result
    state = trainer.initial_state(units[1], model)
    batch = jax.device_put(trainer.batch(units[1], 0), jax.local_devices()[0])
    args = (batch, jax.numpy.asarray([1, 2], jax.numpy.uint32), jax.numpy.asarray(units[1].train_range))
    jitted = jax.jit(trainer.train_step(model))(state, *args)[1]["loss"]
    assert float(compiled[engine.step_key(model)](state, *args)[1]["loss"]) == pytest.approx(float(jitted), rel=1e-6)


@pytest.mark.slow
def test_preflight_off_trains_whatever_the_limit(tmp_path):
    workdir = str(tmp_path / "run")
    out = train_lib.train(config(memory_limit_gb=1e-6, preflight=False, steps=3), workdir, return_params=True)
    assert sorted(out) == ["block_00", "block_01", "block_02"]
    assert os.path.exists(os.path.join(workdir, "config.json"))


def test_the_device_or_host_memory_is_the_default_limit():
    have, where = preflight.available_bytes(config())
    assert have > 2 ** 20 and where in ("the host's available memory", f"{jax.devices()[0].device_kind} memory")


def test_a_negative_memory_limit_is_refused():
    with pytest.raises(ConfigError, match="train.memory_limit_gb=-1.0 must be >= 0"):
        validate(config(memory_limit_gb=-1.0))
