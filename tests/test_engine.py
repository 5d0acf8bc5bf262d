"""The block-training engine: independence of blocks, resume, e2e baseline, only the active block resident."""
import contextlib
import json
import os
import threading

import jax
import numpy as np
import pytest

from dblocks import data as data_lib
from dblocks import order
from dblocks import engine, loop, steps
from dblocks.checkpoint import CheckpointMismatchError
from dblocks import train as train_lib
from dblocks.tasks import get_task
from experiments.configs import tiny_dit


def _cfg(**overrides):
    c = tiny_dit.get_config()
    c.update_from_flattened_dict(overrides)
    return c


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def all_blocks(tmp_path_factory):
    """One uninterrupted all-blocks run, shared by the tests below."""
    wd = str(tmp_path_factory.mktemp("all"))
    return wd, train_lib.train(_cfg(), wd, return_params=True)


def test_block_trained_alone_equals_block_from_all_blocks_run(all_blocks, tmp_path):
    _, finals = all_blocks
    alone = train_lib.train(_cfg(**{"blocks.train": "1"}), str(tmp_path), return_params=True)
    assert list(alone) == ["block_01"]
    _assert_trees_equal(alone["block_01"], finals["block_01"])
    assert not os.path.exists(tmp_path / "blocks" / "block_00")


def test_every_block_trained_from_its_own_init(all_blocks):
    """Each block moved away from its own fold_in(seed, b) initialisation (a trainer that skipped or reused a
    block's updates fails), and blocks end different from one another."""
    _, finals = all_blocks
    cfg = _cfg()
    task = get_task(cfg)
    trainer = engine.Trainer(task, cfg, "", task.source("train"))
    for unit in task.units("dblocks"):
        init = trainer.initial_state(unit, trainer.model(unit))["params"]
        moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
                 for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(finals[unit.name]))]
        assert max(moved) > 1e-4, unit.name
    a, b = finals["block_00"], finals["block_01"]
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_unit_draws_its_own_randomness():
    """fold_in(seed, b): two blocks of the same shape start from different parameters and draw different step keys
    (with one key for every block they would start equal; their ranges and data orders alone hid that)."""
    cfg = _cfg()
    task = get_task(cfg)
    trainer = engine.Trainer(task, cfg, "", task.source("train"))
    b0, b1 = task.units("dblocks")[:2]
    p0, p1 = (jax.tree.leaves(trainer.initial_state(u, trainer.model(u))["params"]) for u in (b0, b1))
    drawn = [(x, y) for x, y in zip(p0, p1) if np.ptp(np.asarray(x)) > 0]   # leaves initialised at random
    assert drawn and not any(np.array_equal(x, y) for x, y in drawn)
    assert not np.array_equal(steps.step_base_key(cfg.seed, 0), steps.step_base_key(cfg.seed, 1))


def test_one_unit_step_compiles_once(tmp_path):
    """The fresh state comes out committed to the step's device like the step's own output, so the step's first and
    later calls share one executable (an uncommitted initial state made every run compile the step twice)."""
    cfg = _cfg(**{"blocks.train": "0"})
    task = get_task(cfg)
    trainer = engine.Trainer(task, cfg, str(tmp_path), task.source("train"))
    trainer.train_unit(task.units("dblocks")[0])
    assert [f._cache_size() for f in trainer.compiled.values()] == [1]


class Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_parameters(all_blocks, tmp_path):
    _, finals = all_blocks

    def kill(unit, step):  # dies in block 1 after its step-3 checkpoint, before step 5
        if unit.index == 1 and step == 4:
            raise Killed

    with pytest.raises(Killed):
        train_lib.train(_cfg(), str(tmp_path), on_step=kill)
    meta = json.load(open(tmp_path / "blocks" / "block_01" / "meta.json"))
    assert meta["complete"] is False
    assert not os.path.exists(tmp_path / "blocks" / "block_02" / "meta.json")   # locked up front, never started
    resumed = train_lib.train(_cfg(), str(tmp_path), return_params=True)  # the same command again
    for name in ("block_00", "block_01", "block_02"):
        _assert_trees_equal(resumed[name], finals[name])
    assert json.load(open(tmp_path / "blocks" / "block_01" / "meta.json"))["complete"] is True


def test_b1_blocks_equals_e2e_diffusion_training(tmp_path):
    """B=1 is ordinary EDM training over the whole range: the same parameters as the e2e DiT baseline."""
    b1 = train_lib.train(_cfg(**{"blocks.num_blocks": 1, "blocks.gamma": 0.0}), str(tmp_path / "b1"),
                      return_params=True)
    e2e = train_lib.train(_cfg(**{"method": "e2e"}), str(tmp_path / "e2e"), return_params=True)
    _assert_trees_equal(b1["block_00"], e2e["e2e"])
    assert os.path.isdir(tmp_path / "e2e" / "e2e")


def test_only_the_active_block_is_resident(tmp_path):
    """While block b trains, the live device memory is one block's state (plus a batch), not B of them."""
    live = {}

    def measure(unit, step):
        if step == 3:
            live[unit.index] = sum(a.nbytes for a in jax.live_arrays())

    cfg = _cfg(**{"train.steps": 4})
    finals = train_lib.train(cfg, str(tmp_path), on_step=measure, return_params=True)
    one_block = sum(np.asarray(x).nbytes for x in jax.tree.leaves(finals["block_00"]))
    all_states = 3 * 3 * one_block  # three blocks' params + two Adam moments each
    assert live[2] < all_states, (live, one_block)
    assert live[0] == live[1] == live[2]  # memory does not grow as blocks are trained


def test_metrics_file_has_a_record_per_log_step(all_blocks):
    wd, _ = all_blocks
    records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    units = {r["unit"] for r in records}
    assert units == {"block_00", "block_01", "block_02"}
    assert all(np.isfinite(r["loss"]) for r in records)
    assert sorted(r["step"] for r in records if r["unit"] == "block_00") == [3, 6]


@pytest.mark.slow
def test_metrics_are_interval_means_in_both_modes(tmp_path):
    """A logged loss is the mean over its log interval (not the loss of the logging step), sequentially and on the
    mesh: a record every 3 steps equals the mean of the per-step records, in both modes."""
    def run(name, log_every, mode="sequential"):
        c = _cfg(**{"train.steps": 6, "train.log_every": log_every, "train.ckpt_every": 6, "blocks.train": "0",
                    "parallel.mode": mode})
        train_lib.train(c, str(tmp_path / name))
        return [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]

    every = run("every_step", 1)
    assert [r["step"] for r in every] == [1, 2, 3, 4, 5, 6]
    assert all("lr" in r for r in every) and all(r["examples_per_s"] > 0 for r in every[1:])  # 1st: compiles
    expected = [np.mean([r["loss"] for r in every[:3]]), np.mean([r["loss"] for r in every[3:]])]
    for mode in ("sequential", "mesh"):
        got = run(mode, 3, mode)
        assert [r["step"] for r in got] == [3, 6]
        np.testing.assert_allclose([r["loss"] for r in got], expected, rtol=1e-4)
        assert abs(got[0]["loss"] - every[2]["loss"]) > 1e-6   # not the logging step's own loss


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 4097])
def test_batch_order_is_a_permutation_per_epoch(n):
    bs = max(1, n // 7)
    epoch = np.concatenate([data_lib.batch_indices(n, bs, 0, 1, s) for s in range(n // bs)])
    assert len(np.unique(epoch)) == len(epoch) == (n // bs) * bs and epoch.min() >= 0 and epoch.max() < n
    again = np.concatenate([data_lib.batch_indices(n, bs, 0, 1, s) for s in range(n // bs, 2 * (n // bs))])
    assert n < 8 or not np.array_equal(np.sort(epoch[:bs]), np.sort(again[:bs]))   # a new order each epoch


def test_batch_order_costs_o_batch_not_o_dataset():
    """A billion examples: a whole-dataset permutation (8 GB) per step would not even fit; O(batch) work does."""
    idx = data_lib.batch_indices(10 ** 9, 16, seed=3, unit=2, step=12345)
    assert len(np.unique(idx)) == 16 and idx.min() >= 0 and idx.max() < 10 ** 9


def test_checkpoints_of_another_batch_order_are_refused(tmp_path, monkeypatch):
    """A run begun under an older batch order is refused, not silently resumed on a different order."""
    c = _cfg(**{"train.steps": 2, "optim.warmup_steps": 1, "blocks.train": "0"})
    monkeypatch.setattr(order, "BATCH_ORDER", "permutation-v0")
    train_lib.train(c, str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatchError, match="batch_order"):
        train_lib.train(c, str(tmp_path))


def test_image_batches_travel_as_uint8_and_give_the_float_loss():
    """Training batches hold uint8 pixels (a quarter of float32's bytes to the device); the loss converts them on
    the device and equals the loss of the float batch."""
    cfg = _cfg()
    task = get_task(cfg)
    trainer = engine.Trainer(task, cfg, "", task.source("train"))
    unit = task.units("dblocks")[1]
    batch = trainer.batch(unit, 0)
    assert batch["image"].dtype == np.uint8
    model = trainer.model(unit)
    params = trainer.initial_state(unit, model)["params"]
    as_float = {**batch, "image": data_lib.to_model_range(batch["image"])}
    rng, rr = jax.random.PRNGKey(0), jax.numpy.asarray(unit.train_range)
    a = task.loss(model, params, batch, rng, rr)[0]
    b = task.loss(model, params, as_float, rng, rr)[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_no_host_read_of_device_arrays_between_log_points(tmp_path, monkeypatch):
    """The step loop never reads a device array on the host except where it means to (log and checkpoint points,
    inside loop._allow_transfers): every host read of an array (float(), np.asarray, .item() all go through
    ArrayImpl._value) made by the loop's thread elsewhere is counted, and there must be none."""
    from jax._src import array as array_lib
    seen = {"in_loop": False, "allowed": False, "reads": 0, "allowed_reads": 0}
    value = array_lib.ArrayImpl._value

    def counted(self):
        if seen["in_loop"] and threading.current_thread() is threading.main_thread():
            seen["allowed_reads" if seen["allowed"] else "reads"] += 1
        return value.fget(self)

    @contextlib.contextmanager
    def allow():
        seen["allowed"] = True
        try:
            yield
        finally:
            seen["allowed"] = False

    def run(*args, **kwargs):
        seen["in_loop"] = True
        try:
            return real_run(*args, **kwargs)
        finally:
            seen["in_loop"] = False

    real_run = loop.run
    monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(counted))
    monkeypatch.setattr(loop, "_allow_transfers", allow)
    monkeypatch.setattr(loop, "run", run)
    c = _cfg(**{"train.steps": 6, "train.log_every": 3, "train.ckpt_every": 6, "blocks.train": "0"})
    train_lib.train(c, str(tmp_path))
    assert seen["reads"] == 0 and seen["allowed_reads"] > 0, seen


class _Stop(Exception):
    pass


def test_time_based_checkpoints(tmp_path):
    """train.ckpt_every_secs saves on the clock even when the step interval is never reached: a run killed at step
    4 (ckpt_every=100) resumes from step 3, not from scratch."""
    c = _cfg(**{"train.ckpt_every": 100, "train.ckpt_every_secs": 1e-9, "blocks.train": "0"})

    def kill(unit, step):
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        train_lib.train(c, str(tmp_path), on_step=kill)
    steps_on_disk = sorted(int(n) for n in os.listdir(tmp_path / "blocks" / "block_00") if n.isdigit())
    assert steps_on_disk and steps_on_disk[-1] == 4, steps_on_disk   # steps 0-3 done, saved by the clock
