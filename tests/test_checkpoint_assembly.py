"""Per-block checkpoints and assembly: what is refused, and sampling from an assembled run."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from dblocks import assemble, steps
from dblocks import checkpoint as ckpt_lib
from dblocks import train as train_lib
from dblocks.checkpoint import CheckpointMismatchError
from experiments.configs import tiny_dit


def _cfg(**overrides):
    c = tiny_dit.get_config()
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    train_lib.train(_cfg(), wd)
    return wd


def _copy(src, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def test_assembly_loads_all_blocks_and_samples(trained, tmp_path):
    run = assemble.load_run(trained)
    assert run.method == "dblocks" and run.num_blocks == 3
    assert [m["block"] for m in run.metas] == [0, 1, 2]
    out = str(tmp_path / "grid.png")
    summary = run.task.write_samples(run, out, grid_points=6, per_class=2)
    assert os.path.getsize(out) > 0
    assert summary["block_calls_per_sample"] == 6 and summary["images"] == 8


def test_assembly_restores_only_the_weights(trained, monkeypatch):
    """Assembly reads each block's parameters and step counter, not its Adam moments (the 1.8B chain's sampling
    peaked above any block's training when it restored the whole train state), and the parameters are those a
    full restore of the same step gives."""
    restored = []
    full_restore = ckpt_lib.UnitCheckpoint.restore

    def spy(self, abstract_state, step=None, partial=False):
        state = full_restore(self, abstract_state, step, partial)
        restored.append(state)
        return state

    monkeypatch.setattr(ckpt_lib.UnitCheckpoint, "restore", spy)
    run = assemble.load_run(trained)
    monkeypatch.undo()
    assert [sorted(s) for s in restored] == [["params", "step"]] * 3   # no opt_state (nor an empty ema) was read
    tx = steps.make_optimizer(run.config.optim, int(run.config.train.steps))
    for u, model, params in zip(run.units, run.models, run.params):
        abstract = jax.eval_shape(lambda: steps.init_state(
            run.task.init_params(model, jax.random.PRNGKey(0), run.task.dummy_batch()), tx, 0.0))
        ckpt = ckpt_lib.UnitCheckpoint(os.path.join(trained, u.subdir()), ckpt_lib.unit_meta(run.task, u, run.config),
                                       read_only=True)
        full = ckpt.restore(abstract)
        ckpt.close()
        assert jax.tree.leaves(full["opt_state"])   # the full state does hold Adam's moments
        assert jax.tree.structure(full["params"]) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_heun_and_karras_sampling_run(trained):
    run = assemble.load_run(trained)
    labels = np.arange(4)
    res = run.task.generate(run, labels, grid_points=5, solver="heun", guidance=1.0, seed=0)
    assert res.block_calls == 2 * 4 + 1
    assert np.all(np.isfinite(np.asarray(res.denoised)))
    res_k = run.task.generate(run, labels, grid_points=12, solver="euler", guidance=1.0, seed=0, grid_kind="karras")
    assert res_k.denoised.shape == (4, 8, 8, 1)
    with pytest.raises(ValueError, match=r"never runs block\(s\) \[1\]"):  # rho=7 skips the middle block
        run.task.generate(run, labels, grid_points=6, solver="euler", guidance=1.0, seed=0, grid_kind="karras")


def test_missing_block_is_refused(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    shutil.rmtree(os.path.join(wd, "blocks", "block_01"))
    with pytest.raises(assemble.AssemblyError, match=r"block_01 is missing.*blocks.train=1"):
        assemble.load_run(wd)


def test_block_from_another_config_is_refused(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    path = os.path.join(wd, "blocks", "block_02", "meta.json")
    meta = json.load(open(path))
    meta["signature"]["blocks"]["gamma"] = 0.1
    meta["signature_hash"] = "0123456789abcdef"
    json.dump(meta, open(path, "w"))
    with pytest.raises(assemble.AssemblyError, match=r"block_02 was trained with a different config.*gamma"):
        assemble.load_run(wd)


def test_unfinished_block_is_refused(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    path = os.path.join(wd, "blocks", "block_00", "meta.json")
    meta = json.load(open(path))
    meta["complete"] = False
    json.dump(meta, open(path, "w"))
    with pytest.raises(assemble.AssemblyError, match="unfinished"):
        assemble.load_run(wd)
    assert assemble.load_run(wd, allow_incomplete=True).num_blocks == 3


def test_training_into_a_workdir_of_another_config_is_refused_and_harmless(trained, tmp_path):
    wd = _copy(trained, tmp_path)
    before = sorted(os.listdir(os.path.join(wd, "blocks", "block_00")))
    with pytest.raises(CheckpointMismatchError, match="different config"):
        train_lib.train(_cfg(**{"model.hidden": 32}), wd)
    assert sorted(os.listdir(os.path.join(wd, "blocks", "block_00"))) == before
    assert assemble.load_run(wd).num_blocks == 3  # the original run is intact


def test_not_a_workdir(tmp_path):
    with pytest.raises(assemble.AssemblyError, match="not a dblocks workdir"):
        assemble.load_run(str(tmp_path))


def test_sample_cli_writes_a_grid(trained, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "cli.png"
    proc = subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", trained, "--out", str(out),
                           "--grid_points", "4", "--per_class", "1", "--solver", "heun"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["block_calls_per_sample"] == 2 * 3 + 1 and out.exists()
