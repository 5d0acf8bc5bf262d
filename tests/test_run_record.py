"""A run's record (docs/reliability.md): nothing unusable is saved, each unit's meta.json holds the config it trained
with and a resume that would change the result is refused (or recorded when asked for), a refused run leaves the
workdir as it was, and the side files (metrics, TensorBoard events, interrupted saves) never break a run."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from dblocks import checkpoint as ckpt_lib
from dblocks import config as config_lib
from dblocks import logs, loop, runtime
from dblocks.steps import NonFiniteLossError
from dblocks.tasks import get_task
from dblocks.train import train
from experiments import common
from experiments.configs import tiny_ar, tiny_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
    c = tiny_dit.get_config()
    c.update_from_flattened_dict({"blocks.train": "0", **overrides})
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Block 0 of tiny_dit trained to step 6 (checkpoints 3 and 6)."""
    wd = str(tmp_path_factory.mktemp("run"))
    train(_cfg(), wd)
    return wd


@pytest.fixture
def copy(trained, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(trained, dst)
    return dst


def _meta(workdir: str) -> dict:
    return json.load(open(os.path.join(workdir, "blocks", "block_00", "meta.json")))


# -- nothing unusable is saved --------------------------------------------------------------------------------------

class _Driver:
    """One fake unit whose loss stays finite while its parameters turn NaN after step `bad_after`."""

    def __init__(self, ckpt, bad_after: int):
        self.units, self.labels, self.ckpts = [None], ["block_00"], [ckpt]
        self.bad_after, self.state = bad_after, {"step": jnp.int32(0), "params": {"w": jnp.ones(3)}}

    def batch(self, step):
        return step

    def step(self, batch):
        w = self.state["params"]["w"] * (jnp.nan if batch + 1 >= self.bad_after else 1.0)
        self.state = {"step": jnp.int32(batch + 1), "params": {"w": w}}
        return {"loss": jnp.float32(1.0)}

    def to_host(self, tree):
        return jax.device_get(tree)

    def unit_metrics(self, host, i):
        return host

    def unit_state(self, i):
        return self.state

    # the rest of the loop's Driver protocol: no compiled step to cost, no held-out loss
    devices = jax.devices()[:1]

    @property
    def step_fn(self):
        return self.step

    def lower(self, batch):
        raise NotImplementedError("a fake driver has no compiled step")

    def eval_loss(self):
        return None


def test_a_state_holding_nan_is_never_saved_and_the_last_good_step_stays(tmp_path):
    """The loss is finite at every step, but the parameters are NaN from step 5 on: the final save (step 6) is
    refused with the last good step named, and every step on disk restores to finite values."""
    c = config_lib.base_config()
    c.train.update(log_every=2, ckpt_every=2)
    meta = {"block": 0, "unit": "block_00", "signature": {}, "signature_hash": "test"}
    ckpt = ckpt_lib.UnitCheckpoint(str(tmp_path / "u"), meta, every=2, keep=1)
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 6 .*last good checkpoint is step 4"):
        loop.run(_Driver(ckpt, bad_after=5), 0, 6, c, logs.MetricsWriter(""))
    ckpt.wait_until_finished()
    assert ckpt.manager.all_steps() == [4]
    abstract = jax.eval_shape(lambda: {"step": jnp.int32(0), "params": {"w": jnp.ones(3)}})
    assert bool(ckpt_lib.all_finite(ckpt.restore(abstract)))
    ckpt.close()


def test_keeping_no_checkpoint_is_refused():
    c = _cfg(**{"train.keep_checkpoints": 0})
    with pytest.raises(config_lib.ConfigError, match="train.keep_checkpoints=0 must be an integer >= 1"):
        config_lib.validate(c)


# -- the run record and resume refusal ------------------------------------------------------------------------------

def test_meta_holds_the_full_config_the_unit_trained_with(trained):
    meta = _meta(trained)
    assert meta["config"] == json.loads(_cfg().to_json_best_effort())
    assert "history" not in meta


@pytest.mark.parametrize("field,value", [("seed", 1), ("optim.lr", 2e-3), ("data.batch_size", 4),
                                         ("train.steps", 9)])
def test_a_resume_that_would_change_the_result_is_refused_before_anything_is_written(copy, field, value):
    before = open(os.path.join(copy, "config.json")).read()
    with pytest.raises(ckpt_lib.ConfigChangedError, match=rf"(?s){field}: .* != {value}.*allow_config_change"):
        train(_cfg(**{field: value}), copy)
    assert open(os.path.join(copy, "config.json")).read() == before
    assert _meta(copy)["config"][field.split(".")[0]] == json.loads(before)[field.split(".")[0]]


def test_settings_that_do_not_change_the_result_may_change(copy):
    # how a layer is computed (remat, chunked attention, layer chunks) is neither a config change nor another run
    train(_cfg(**{"train.log_every": 1, "train.keep_checkpoints": 3, "blocks.train": "0", "model.remat": "full",
                  "model.attention": "chunked", "model.layer_chunk": 2}), copy)
    assert "history" not in _meta(copy)
    assert _meta(copy)["config"]["train"]["log_every"] == 1


def test_blocks_computed_differently_belong_to_one_run_and_other_shapes_do_not():
    from dblocks.tasks import get_task
    meta = ckpt_lib.unit_meta(get_task(_cfg()), get_task(_cfg()).units("dblocks")[0], _cfg())
    same = get_task(_cfg(**{"model.remat": "full", "model.attention": "chunked", "model.mlp_chunk": 8})).signature()
    assert ckpt_lib.signature_differences(meta, same) is None
    other = get_task(_cfg(**{"model.remat": "full", "model.hidden": 32})).signature()
    assert ckpt_lib.signature_differences(meta, other) == ["model.hidden: 16 != 32"]


def test_an_allowed_change_is_trained_and_recorded(copy):
    train(_cfg(**{"train.steps": 9, "train.allow_config_change": True}), copy)
    meta = _meta(copy)
    assert meta["step"] == 9 and meta["complete"]
    assert meta["history"] == [{"step": 6, "changed": ["train.steps: 6 != 9"]}]
    assert meta["config"]["train"]["steps"] == 9
    assert json.load(open(os.path.join(copy, "config.json")))["train"]["steps"] == 9


def test_a_busy_unit_is_refused_with_config_json_untouched(copy):
    path = os.path.join(copy, "config.json")
    open(path, "w").write('{"marker": 1}')
    with open(os.path.join(copy, "blocks", "block_00", ckpt_lib.LOCK), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)   # another open file: to this process's lock it looks like another trainer
        with pytest.raises(ckpt_lib.UnitBusyError):
            train(_cfg(), copy)
    assert open(path).read() == '{"marker": 1}'


def test_an_unreadable_checkpoint_is_refused_with_config_json_untouched(copy):
    path = os.path.join(copy, "config.json")
    open(path, "w").write('{"marker": 1}')
    unit_dir = os.path.join(copy, "blocks", "block_00")
    for step in ("3", "6"):
        for d, _, files in os.walk(os.path.join(unit_dir, step)):
            for f in files:
                open(os.path.join(d, f), "wb").write(b"garbage")
    with pytest.raises(ckpt_lib.CheckpointUnreadableError, match="no readable checkpoint"):
        train(_cfg(), copy)
    assert open(path).read() == '{"marker": 1}'


def test_a_meta_that_is_json_but_not_an_object_is_a_named_refusal(copy):
    path = os.path.join(copy, "blocks", "block_00", "meta.json")
    open(path, "w").write("[1, 2]")
    with pytest.raises(ckpt_lib.CheckpointUnreadableError, match="meta.json is not a JSON object"):
        train(_cfg(), copy)


def test_sigma_floor_is_part_of_the_block_signature():
    c = tiny_ar.get_config()
    plain = get_task(c).signature()
    assert "sigma_floor" not in plain["blocks"]   # 0 (none): the signatures of runs before it are unchanged
    c.blocks.sigma_floor = 0.1
    assert get_task(c).signature()["blocks"]["sigma_floor"] == 0.1


# -- side files -------------------------------------------------------------------------------------------------------

def test_stale_temporaries_are_removed_when_the_lock_is_taken(copy):
    unit_dir = os.path.join(copy, "blocks", "block_00")
    os.makedirs(os.path.join(unit_dir, "9.orbax-checkpoint-tmp-1234", "d"))
    open(os.path.join(unit_dir, "meta.json.tmp.4242"), "w").write("{")
    meta = ckpt_lib.unit_meta(get_task(_cfg()), get_task(_cfg()).units("dblocks")[0], _cfg())
    ckpt = ckpt_lib.UnitCheckpoint(unit_dir, meta)
    ckpt.close()
    assert sorted(os.listdir(unit_dir)) == [".lock", "3", "6", "meta.json"]


def test_a_partial_metrics_line_is_skipped(tmp_path):
    path = tmp_path / logs.METRICS_FILE
    path.write_text('{"unit": "block_00", "step": 1, "loss": 2.0}\n{"unit": "block_00", "st'
                    '{"unit": "block_00", "step": 2, "loss": 1.5}\n[3]\n{"unit": "block_00", "step": 3, "lo')
    assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [1]
    assert logs.plot_losses(str(tmp_path)) is not None


def test_two_writers_started_in_the_same_second_keep_separate_event_files(tmp_path):
    pytest.importorskip("tensorboardX")
    writers = [logs.MetricsWriter(str(tmp_path)) for _ in range(2)]
    for w in writers:
        w.write({"unit": "block_00", "step": 1, "loss": 1.0})
    for w in writers:
        w.close()
    assert len([f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]) == 2


def test_dblocks_cache_off_turns_every_cache_off(monkeypatch):
    monkeypatch.setenv("DBLOCKS_CACHE", "off")
    assert runtime.cache_dir() is None and runtime.artifact_cache_dir() is None
    monkeypatch.setenv("DBLOCKS_CACHE", "/somewhere")
    assert runtime.artifact_cache_dir() == "/somewhere"


# -- exit statuses ----------------------------------------------------------------------------------------------------

class _XlaError(RuntimeError):
    pass


@pytest.mark.parametrize("error,status", [
    (_XlaError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes."), 6),
    (MemoryError(), 6),
    (_XlaError('RESOURCE_EXHAUSTED: Error writing "params.x" in OCDBT database at local file "/w/b/8"'), 5),
    (PermissionError(13, "Permission denied", "/data/images.npz"), 2),
    (PermissionError(13, "Permission denied", "/w/blocks/block_00/3"), 5),
    (OSError(30, "Read-only file system"), 5),
])
def test_exit_statuses_tell_memory_input_and_workdir_apart(error, status, capsys):
    with pytest.raises(SystemExit) as e, common.user_errors("/w"):
        raise error
    assert e.value.code == status
    assert capsys.readouterr().err.startswith("error: ")


def test_a_stop_signal_before_the_first_step_ends_the_process_within_the_grace():
    """Outside a stepping loop (restoring, compiling) the handler only records the signal (raising there could unwind
    through XLA's compiler); the watcher ends the process with status 4 and the message a grace period later."""
    script = ("import os, signal, time\n"
              "from dblocks import loop\n"
              "with loop.StopSignal() as stop:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.5)\n"
              "    assert stop.signum == signal.SIGTERM   # recorded, nothing raised\n"
              "    time.sleep(30)\n"
              "print('still running')\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == loop.EXIT_INTERRUPTED, proc.stderr[-2000:]
    assert "before training had stepped" in proc.stderr and "still running" not in proc.stdout
    assert time.time() - t0 < 25


def test_the_loop_raises_a_stop_recorded_while_the_units_restored():
    before = signal.getsignal(signal.SIGTERM)
    with loop.StopSignal() as stop:
        stop.signum = signal.SIGTERM     # as the handler records it outside a stepping loop
        with pytest.raises(loop.TrainingInterrupted, match="before training had stepped"):
            stop.check_idle_stop()
        stop.signum = None
    assert signal.getsignal(signal.SIGTERM) == before
