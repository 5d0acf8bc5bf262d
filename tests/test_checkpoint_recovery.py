"""What UnitCheckpoint does with a damaged unit directory: fall back past a bad step (kept aside, never deleted),
refuse when no good step or a readable meta is left, refuse a second trainer (the subprocess versions, with kill -9,
SIGTERM and full disks, are in tests/test_faults.py)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dblocks import checkpoint as ckpt_lib
from dblocks import engine
from dblocks.tasks import get_task
from dblocks.train import train
from experiments.configs import tiny_dit


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    train(tiny_dit.get_config(), wd)   # steps 3 and 6 of every block on disk
    return wd


@pytest.fixture
def copy(trained, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(trained, dst)
    return dst


def _unit(workdir: str, b: int = 2):
    c = tiny_dit.get_config()
    task = get_task(c)
    unit = task.units("dblocks")[b]
    trainer = engine.Trainer(task, c, workdir, task.source("train"))
    abstract = trainer.abstract_state(unit, trainer.model(unit))
    return ckpt_lib.UnitCheckpoint(os.path.join(workdir, unit.subdir()), ckpt_lib.unit_meta(task, unit, c)), abstract


def _corrupt(step_dir: str) -> None:
    rng = np.random.default_rng(0)
    for d, _, files in os.walk(step_dir):
        for f in files if os.path.basename(d) == "d" else []:
            with open(os.path.join(d, f), "wb") as fh:
                fh.write(rng.bytes(2000))


def test_unreadable_latest_step_falls_back_and_is_kept_aside(copy):
    _corrupt(os.path.join(copy, "blocks", "block_02", "6"))
    ckpt, abstract = _unit(copy)
    assert ckpt.latest_step() == 6
    state = ckpt.restore(abstract, 6)
    ckpt.close()
    assert int(state["step"]) == 3                                   # the newest good step
    unit_dir = os.path.join(copy, "blocks", "block_02")
    assert os.listdir(os.path.join(unit_dir, "quarantine")) == ["6"]  # moved aside, not deleted
    assert "6" not in os.listdir(unit_dir)


def test_inconsistent_step_fails_the_integrity_check(copy):
    """Step 6's directory holds step 3's data (it reads fine, but its step counter says 3): not trusted."""
    unit_dir = os.path.join(copy, "blocks", "block_01")
    shutil.rmtree(os.path.join(unit_dir, "6"))
    shutil.copytree(os.path.join(unit_dir, "3"), os.path.join(unit_dir, "6"))
    ckpt, abstract = _unit(copy, 1)
    raw = ckpt.manager.restore(6, args=ocp.args.StandardRestore(abstract))
    assert ckpt_lib.state_problems(raw, abstract, 6) == ["its step counter says 3"]
    assert int(ckpt.restore(abstract)["step"]) == 3
    ckpt.close()
    assert os.listdir(os.path.join(unit_dir, "quarantine")) == ["6"]


def test_no_good_step_is_refused_and_nothing_is_moved(copy):
    for s in ("3", "6"):
        _corrupt(os.path.join(copy, "blocks", "block_02", s))
    ckpt, abstract = _unit(copy)
    with pytest.raises(ckpt_lib.CheckpointUnreadableError, match=r"(?s)no readable checkpoint.*step 6.*step 3"):
        ckpt.restore(abstract)
    ckpt.close()
    assert sorted(os.listdir(os.path.join(copy, "blocks", "block_02"))) == [".lock", "3", "6", "meta.json"]


def test_truncated_meta_is_a_clear_refusal(copy):
    path = os.path.join(copy, "blocks", "block_00", "meta.json")
    text = open(path).read()
    open(path, "w").write(text[:40])
    with pytest.raises(ckpt_lib.CheckpointUnreadableError, match="(?s)meta.json is not valid JSON.*delete that file"):
        train(tiny_dit.get_config(), copy)


def test_meta_ahead_of_every_checkpoint_is_not_a_silent_restart(copy):
    for s in ("3", "6"):
        shutil.rmtree(os.path.join(copy, "blocks", "block_00", s))
    with pytest.raises(ckpt_lib.CheckpointUnreadableError, match="reached step 6, but no checkpoint is on disk"):
        train(tiny_dit.get_config(), copy)
    assert json.load(open(os.path.join(copy, "blocks", "block_00", "meta.json")))["step"] == 6


def test_a_second_process_training_the_unit_is_refused(copy):
    unit_dir = os.path.join(copy, "blocks", "block_02")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({os.path.join(unit_dir, '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid test holder\\n'); f.flush(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ckpt_lib.UnitBusyError, match="being trained by another process"):
            _unit(copy)
    finally:
        holder.kill()
        holder.wait()
    ckpt, _ = _unit(copy)   # free again once the holder is gone (the kernel drops a dead process's lock)
    ckpt.close()


def test_a_step_holding_nan_is_quarantined_and_the_previous_one_restored(copy):
    """A step whose values are not all finite (written past dblocks' save check, e.g. by an older version) reads
    fine but is not trusted: restore moves it aside and resumes from the newest finite step."""
    ckpt, abstract = _unit(copy, 0)
    state = ckpt.restore(abstract)
    bad = {**state, "step": state["step"] + 3,
           "params": jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), state["params"])}
    ckpt.save(9, bad, force=True)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 9
    restored = ckpt.restore(abstract)
    ckpt.close()
    assert int(restored["step"]) == 6
    assert os.listdir(os.path.join(copy, "blocks", "block_00", "quarantine")) == ["9"]
