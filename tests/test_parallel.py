"""Block-parallel training on the ('block', 'data') mesh (conftest: 8 CPU devices).

The same blocks trained one after another and on the mesh (data axis 2, two blocks at a time, so the last wave is
padded; two of them resumed from the sequential run's checkpoints) end with the same parameters; their checkpoints
assemble; the compiled step's only collectives stay inside 'data' groups (none at all when the data axis has size 1);
and two processes on loopback train the same blocks.
"""
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dblocks import assemble, engine, parallel
from dblocks import train as train_lib
from dblocks.config import ConfigError, validate
from dblocks.tasks import get_task
from experiments.configs import tiny_dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")


def mesh_config(data=2, blocks=2):
    c = tiny_dit.get_config()
    c.parallel.mode, c.parallel.data, c.parallel.blocks = "mesh", data, blocks
    return c


def max_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sequential"))
    return workdir, train_lib.train(tiny_dit.get_config(), workdir, return_params=True)


@pytest.fixture(scope="module")
def mesh_run(sequential, tmp_path_factory):
    """Two blocks at a time on a (2 blocks x 2 data) mesh. Blocks 0 and 1 resume from the step-3 checkpoints of the
    sequential run (a block begun in one mode is finished in the other); block 2 starts fresh in a padded wave."""
    workdir = str(tmp_path_factory.mktemp("mesh"))
    for b in ("block_00", "block_01"):
        shutil.copytree(os.path.join(sequential[0], "blocks", b), os.path.join(workdir, "blocks", b),
                        ignore=shutil.ignore_patterns("6"))
        assert sorted(n for n in os.listdir(os.path.join(workdir, "blocks", b)) if n != ".lock") == ["3", "meta.json"]
    return workdir, train_lib.train(mesh_config(), workdir, return_params=True)


def test_mesh_training_equals_sequential(sequential, mesh_run):
    (_, seq), (_, par) = sequential, mesh_run
    assert sorted(seq) == sorted(par) == ["block_00", "block_01", "block_02"]
    for name in seq:
        assert max_diff(seq[name], par[name]) < 2e-5, name
    # the blocks did train (so equality is not trivial), and differently from each other
    assert max_diff(seq["block_00"], seq["block_01"]) > 1e-3


def test_mesh_checkpoints_assemble_like_sequential(sequential, mesh_run):
    a, b = assemble.load_run(sequential[0]), assemble.load_run(mesh_run[0])
    assert b.method == "dblocks" and b.num_blocks == 3 and all(m["complete"] for m in b.metas)
    assert [m["signature_hash"] for m in a.metas] == [m["signature_hash"] for m in b.metas]
    for i in range(3):
        assert max_diff(a.params[i], b.params[i]) < 2e-5
        assert max_diff(b.params[i], mesh_run[1][f"block_{i:02d}"]) == 0.0


def replica_groups(line: str) -> list[set[int]]:
    """Device groups of one collective in optimized HLO: explicit {{0,1},{2,3}} or iota [G,S]<=[dims]T(perm)."""
    if "source_target_pairs=" in line:
        pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", line).group(1)
        return [set(map(int, p)) for p in re.findall(r"\{?(\d+),(\d+)\}?", pairs)]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        dims = [int(v) for v in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(v) for v in m.group(4).split(",")])
        return [set(r) for r in ids.reshape(int(m.group(1)), int(m.group(2))).tolist()]
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    assert m, f"cannot read the device groups of: {line[:200]}"
    return [set(map(int, g.split(","))) for g in re.findall(r"\{([\d,]+)\}", m.group(1))]


def collectives(blocks: int, data: int) -> tuple[list[str], list[set[int]]]:
    """The collective instructions of the compiled parallel step on a (blocks, data) mesh, and the mesh's data
    groups as partition ids (row-major position in the mesh: the ids HLO's groups use)."""
    c = mesh_config(data, blocks)
    task = get_task(c)
    trainer = engine.Trainer(task, c, "", source=None)
    unit = task.units("dblocks")[0]
    model = trainer.model(unit)
    mesh = parallel.make_mesh(blocks, data)
    hlo = parallel.make_parallel_step(trainer, model, mesh).lower(
        *parallel.abstract_args(trainer, unit, model, mesh)).compile().as_text()
    ops = [ln for ln in hlo.splitlines() if re.search(r"= .*\b(%s)(-start)?\(" % "|".join(COLLECTIVES), ln)]
    groups = [set(range(b * data, (b + 1) * data)) for b in range(blocks)]
    return ops, groups


def test_hlo_collectives_stay_inside_data_groups():
    ops, data_groups = collectives(blocks=4, data=2)
    assert ops, "a block's batch is split over 2 devices: its gradients must be all-reduced"
    assert any("all-reduce" in op for op in ops)
    for op in ops:
        for group in replica_groups(op):
            assert any(group <= g for g in data_groups), f"collective crosses 'block': {group} in {op[:160]}"


def test_hlo_has_no_collectives_without_a_data_axis():
    ops, _ = collectives(blocks=8, data=1)
    assert ops == []


def test_replica_group_parser():
    assert replica_groups("x = f32[] all-reduce(y), replica_groups=[4,2]<=[8], to_apply=add") == [
        {0, 1}, {2, 3}, {4, 5}, {6, 7}]
    assert replica_groups("x = f32[] all-reduce(y), replica_groups=[2,4]<=[4,2]T(1,0)") == [{0, 2, 4, 6},
                                                                                          {1, 3, 5, 7}]
    assert replica_groups("x = f32[] all-gather(y), replica_groups={{0,1},{2,3}}, dimensions={0}") == [{0, 1},
                                                                                                     {2, 3}]


def test_bad_parallel_config_is_refused():
    c = mesh_config(data=3)
    with pytest.raises(ConfigError, match="divisible by parallel.data=3"):
        validate(c)
    c = tiny_dit.get_config()
    c.parallel.mode = "pmap"
    with pytest.raises(ConfigError, match="parallel.mode"):
        validate(c)
    with pytest.raises(ConfigError, match="needs 16 devices"):
        parallel.mesh_shape(mesh_config(data=2, blocks=8), 3)
    assert parallel.mesh_shape(mesh_config(data=2, blocks=0), 3) == (3, 2)   # as many as the blocks need
    assert parallel.mesh_shape(mesh_config(data=1, blocks=0), 20) == (8, 1)  # as many as the devices allow


def test_cpu_devices_split_each_step_like_sequential(sequential, tmp_path, caplog):
    """parallel.cpu_devices=2 with the sequential mode: block 0 resumes from the sequential run's step-3 checkpoint
    and finishes with each step's batch split over 2 CPU devices (the mesh trainer, one unit at a time); the
    result equals the sequential run's to float tolerance."""
    workdir = str(tmp_path)
    shutil.copytree(os.path.join(sequential[0], "blocks", "block_00"), os.path.join(workdir, "blocks", "block_00"),
                    ignore=shutil.ignore_patterns("6"))
    c = tiny_dit.get_config()
    c.parallel.cpu_devices, c.blocks.train = 2, "0"
    assert parallel.settings(c) == ("mesh", 2, 1)
    with caplog.at_level("INFO", logger="dblocks"):
        out = train_lib.train(c, workdir, return_params=True)
    assert "split over 2 CPU devices" in caplog.text and "'data': 2" in caplog.text
    assert max_diff(out["block_00"], sequential[1]["block_00"]) < 2e-5


def test_cpu_devices_config_is_checked():
    c = tiny_dit.get_config()
    for bad in (0, -2):
        c.parallel.cpu_devices = bad
        with pytest.raises(ConfigError, match="parallel.cpu_devices"):
            validate(c)
    c.parallel.cpu_devices = 3
    with pytest.raises(ConfigError, match="divisible by parallel.cpu_devices=3"):
        validate(c)
    c.parallel.cpu_devices = 16
    with pytest.raises(ConfigError, match="parallel.cpu_devices=16 exceeds the 8 devices"):
        parallel.mesh_shape(c, 1)
    c.parallel.cpu_devices = 1
    assert parallel.settings(c) == ("sequential", 1, 0)


def test_split_cpu_sets_the_host_device_count_before_the_backend_starts():
    code = ("from dblocks import runtime; import jax; a = runtime.split_cpu(3); n = jax.device_count(); "
            "print(a, n, runtime.split_cpu(2), jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "3", "False", "3"]   # once a backend runs, its devices are kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_loopback(sequential, tmp_path):
    """Two processes with 2 CPU devices each form one (2 blocks x 2 data) mesh through jax.distributed; each feeds
    its share of the batch; the checkpoints they write together assemble into the sequential run's blocks.
    In the default suite (about 30 s): it is the only test of concurrent multi-process Orbax saves (two blocks saving
    the same step collided on Orbax's barrier names until each unit got its own barrier prefix)."""
    workdir = str(tmp_path / "multihost")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    cmd = [sys.executable, "-m", "experiments.train", "--multihost", "--config",
           os.path.join(ROOT, "experiments/configs/tiny_dit.py"), "--workdir", workdir,
           "--config.parallel.mode=mesh", "--config.parallel.data=2"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    assert "2 processes" in outs[0] and "[block_02] step 6/6" in outs[0]
    assert "[block_00] step" not in outs[1]   # only process 0 logs
    run = assemble.load_run(workdir)
    for i in range(3):
        assert max_diff(run.params[i], sequential[1][f"block_{i:02d}"]) < 2e-5


@pytest.mark.slow
def test_the_mesh_step_traces_randaugment():
    """A ViT with RandAugment (lax.switch per image, under vmap inside the shard_map) compiles on the mesh; with
    shard_map's varying-axes check on it failed to trace ('pvary is a invariant->variant collective')."""
    from experiments.configs import tiny_vit
    c = tiny_vit.get_config()
    c.data.randaugment_ops = 2
    c.parallel.mode, c.parallel.data, c.parallel.blocks = "mesh", 2, 2
    validate(c)
    task = get_task(c)
    trainer = engine.Trainer(task, c, "", source=None)
    unit = task.units("dblocks")[0]
    model = trainer.model(unit)
    mesh = parallel.make_mesh(2, 2)
    compiled = parallel.make_parallel_step(trainer, model, mesh).lower(
        *parallel.abstract_args(trainer, unit, model, mesh)).compile()
    assert compiled.as_text()
