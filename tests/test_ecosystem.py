"""What users of a JAX trainer expect: URLs refused as paths, light dependencies, a `dblocks` command, FLOP/s and a
profiler window, the held-out loss during training, and all devices used by default."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dblocks import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _entry(module: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=120)


# -- 1. object-store workdirs ---------------------------------------------------------------------------------------

def test_url_scheme_is_recognised_and_local_paths_pass():
    assert paths.url_scheme("gs://bucket/run") == "gs" and paths.url_scheme("S3://b") == "s3"
    for local in ("runs/a", "/mnt/bucket/run", "gs:/x", "./gs:", None, "C:\\runs"):
        assert paths.url_scheme(local) is None and paths.remote_path_problem(local, "--workdir") is None
    msg = paths.remote_path_problem("gs://my-bucket/runs/a", "--workdir")
    assert "gcsfuse" in msg and "--workdir=/mnt/my-bucket/runs/a" in msg


@pytest.mark.parametrize("module,args", [
    ("experiments.train", ["--config", os.path.join(ROOT, "experiments/configs/tiny_dit.py"),
                           "--workdir", "gs://my-bucket/run"]),
    ("experiments.sample", ["--workdir", "runs/x", "--npz", "s3://my-bucket/samples.npz"]),
])
def test_url_paths_are_refused_before_anything_is_written(tmp_path, module, args):
    proc = _entry(module, *args, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Mount the bucket" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []   # no local 'gs:' / 's3:' folder, nothing else


# -- 6. lighter dependencies ----------------------------------------------------------------------------------------

def test_hf_data_is_loaded_offline_without_changing_the_process_environment(tmp_path, monkeypatch):
    """hf: data loads in HF offline mode, and the mode is put back afterwards (a stand-in `datasets` module records
    what the load saw; the real package is optional)."""
    import types

    from dblocks import data as data_lib
    seen = {}

    class DatasetDict(dict):
        pass

    def load_from_disk(path):
        seen["env"] = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
        seen["flags"] = (config.HF_DATASETS_OFFLINE, config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
        return DatasetDict(train=[1, 2, 3])

    config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False, HF_HUB_OFFLINE=False)
    hub = types.ModuleType("huggingface_hub.constants")
    hub.HF_HUB_OFFLINE = False
    fake = types.ModuleType("datasets")
    fake.config, fake.DatasetDict, fake.load_from_disk = config, DatasetDict, load_from_disk
    monkeypatch.setitem(sys.modules, "datasets", fake)
    parent = types.ModuleType("huggingface_hub")
    parent.constants = hub
    monkeypatch.setitem(sys.modules, "huggingface_hub", parent)
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", hub)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    data_lib.hf_dataset.cache_clear()
    assert data_lib.hf_dataset(str(tmp_path)) == {"train": [1, 2, 3]}
    data_lib.hf_dataset.cache_clear()
    assert seen == {"env": ("1", "1"), "flags": (True, True, True)}        # offline while loading
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"   # and restored after
    assert (config.HF_DATASETS_OFFLINE, config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE) == (False, False, False)


def test_mauve_is_an_extra_and_skipped_with_a_message_when_missing(monkeypatch, caplog):
    import tomllib

    from dblocks import text_metrics
    proj = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())["project"]
    assert not any(d.startswith("mauve") for d in proj["dependencies"])
    assert proj["optional-dependencies"]["mauve"] == ["mauve-text>=0.4"]
    assert not [ln for ln in open(os.path.join(ROOT, "requirements.txt")) if ln.startswith("mauve")]
    monkeypatch.setitem(sys.modules, "mauve", None)   # import mauve -> ImportError
    with caplog.at_level("WARNING", logger="dblocks"):
        assert text_metrics.mauve_score([[0.0]], [[1.0]]) is None
    assert "pip install 'dblocks[mauve]'" in caplog.text


# -- 7. the `dblocks` console script ----------------------------------------------------------------------------------

def test_console_script_runs_the_entry_points_from_any_folder(tmp_path):
    """`dblocks` as pip installs it ([project.scripts] -> dblocks.cli:main, a wrapper script outside the repo), run
    from a folder that has its own `experiments/` package: the real entry points run, not the user's folder."""
    import tomllib
    scripts = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())["project"]["scripts"]
    assert scripts == {"dblocks": "dblocks.cli:main"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dblocks").write_text("import sys\nfrom dblocks.cli import main\nsys.exit(main())\n")
    project = tmp_path / "my_project"
    (project / "experiments").mkdir(parents=True)
    (project / "experiments" / "__init__.py").write_text("raise SystemExit('the user folder was imported')\n")
    run = lambda *a: subprocess.run([sys.executable, str(tmp_path / "bin" / "dblocks"), *a], cwd=project,  # noqa: E731
                                    env=ENV, capture_output=True, text=True, timeout=120)
    top = run("--help")
    assert top.returncode == 0 and all(f"  {c} " in top.stdout for c in
                                       ("train", "sample", "evaluate", "export", "convert", "memory", "bench",
                                        "compare"))
    sub = run("export", "--help")
    assert "allow_incomplete: export blocks" in sub.stdout and "user folder" not in sub.stderr
    bad = run("trian")
    assert bad.returncode == 2 and "unknown subcommand 'trian'" in bad.stderr


# -- 3 and 4. FLOP/s, a profiler window, and the held-out loss during training ---------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Block 0 of tiny_dit for 6 steps, logging every 2, the held-out loss every 3, a trace of steps 2-3."""
    from dblocks import train as train_lib
    from experiments.configs import tiny_dit
    c = tiny_dit.get_config()
    c.blocks.train = "0"
    c.train.log_every, c.train.eval_every, c.train.profile_steps = 2, 3, "2,3"
    workdir = str(tmp_path_factory.mktemp("eco") / "run")
    params = train_lib.train(c, workdir, return_params=True)["block_00"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return c, workdir, params, records


def test_metrics_have_flops_per_second(tiny_run):
    from dblocks import profiling
    _, _, _, records = tiny_run
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["flops_per_s"] > 0 and "mfu" not in r for r in records)   # a CPU: FLOP/s, no peak, no MFU
    assert profiling.describe({"flops_per_s": 2.5e13, "mfu": 0.41}) == "  25 TFLOP/s  MFU 41.0%"
    assert profiling.throughput(1e9, 2.0, 4e9) == {"flops_per_s": 2e9, "mfu": 0.5}


def test_profile_steps_write_a_trace(tiny_run):
    _, workdir, _, _ = tiny_run
    traces = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "profile", "block_00")) for f in fs
              if f.endswith(".xplane.pb")]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_held_out_loss_at_the_eval_steps(tiny_run):
    """val_loss at the log points that pass a multiple of eval_every (4 and 6, not 2), and at step 6 exactly the
    task's loss of the final parameters on the held-out batch with the unit's fixed noise."""
    c, _, params, records = tiny_run
    assert ["val_loss" in r for r in records] == [False, True, True]
    np.testing.assert_allclose(records[-1]["val_loss"], _expected_val_loss(c, params, 0), rtol=1e-5)
    assert records[-1]["val_loss"] != records[1]["val_loss"]


def _expected_val_loss(c, params, index):
    import jax

    from dblocks import validation
    from dblocks.tasks import get_task
    task = get_task(c)
    unit = task.units("dblocks")[index]
    return float(validation.make_eval_loss(task, task.make_model(unit))(
        params, validation.heldout_batch(task, int(c.data.batch_size)), validation.eval_key(c.seed, unit.index),
        jax.numpy.asarray(unit.train_range, jax.numpy.float32)))


@pytest.mark.slow
def test_held_out_loss_of_blocks_trained_side_by_side_on_the_mesh(tmp_path):
    from dblocks import train as train_lib
    from experiments.configs import tiny_dit
    c = tiny_dit.get_config()
    c.blocks.train, c.parallel.mode = "0,1", "mesh"
    c.train.steps, c.train.log_every, c.train.eval_every, c.optim.warmup_steps = 3, 3, 3, 1
    params = train_lib.train(c, str(tmp_path), return_params=True)
    records = {r["unit"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    for i, name in enumerate(("block_00", "block_01")):
        np.testing.assert_allclose(records[name]["val_loss"], _expected_val_loss(c, params[name], i), rtol=1e-5)
    assert records["block_00"]["val_loss"] != records["block_01"]["val_loss"]


def test_no_held_out_split_means_no_val_loss_not_a_crash(caplog):
    from dblocks import validation
    from dblocks.data import DatasetMissingError

    class NoTestSplit:
        def source(self, split):
            raise DatasetMissingError(f"no {split} split")

    with caplog.at_level("WARNING", logger="dblocks"):
        assert validation.heldout_batch(NoTestSplit(), 8) == {}
    assert "no held-out loss during training" in caplog.text


def test_profile_steps_and_eval_every_are_validated():
    from dblocks import config as config_lib
    from experiments.configs import tiny_dit
    for field, value, message in (("profile_steps", "3", "use 'a,b'"), ("profile_steps", "4,2", "1 <= a <= b"),
                                  ("eval_every", -1, "eval_every=-1")):
        c = tiny_dit.get_config()
        c.train[field] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(c)


# -- 2. all devices by default ----------------------------------------------------------------------------------------

def test_auto_mode_uses_the_mesh_with_several_accelerators_and_says_why_not(monkeypatch):
    import jax

    from dblocks import config as config_lib
    from dblocks import parallel
    from experiments.configs import tiny_dit
    c = tiny_dit.get_config()
    assert c.parallel.mode == "auto"
    config_lib.validate(c)
    assert jax.device_count() == 8 and parallel.auto_mode(c)[0] == "sequential"   # 8 forced CPU devices
    assert "host CPU devices" in parallel.auto_mode(c)[1] and "cpu_devices" in parallel.auto_mode(c)[1]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")   # 8 accelerators, as auto_mode sees them
    assert parallel.auto_mode(c) == ("mesh", "3 blocks to train on 8 gpu devices")
    assert parallel.settings(c)[0] == "mesh"
    c.blocks.train = "1"
    mode, why = parallel.auto_mode(c)
    assert mode == "sequential" and "--config.parallel.data=8" in why
    c.blocks.train, c.method = "all", "e2e"
    assert parallel.auto_mode(c)[0] == "sequential"


@pytest.mark.slow
def test_a_run_on_two_cpu_devices_names_them_and_says_why_it_uses_one(tmp_path):
    """The default (parallel.mode=auto) on 2 forced CPU devices: the start-up log names the devices and says why
    it trains on one of them, and how to use both."""
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                           os.path.join(ROOT, "experiments/configs/tiny_dit.py"), "--workdir", str(tmp_path / "w"),
                           "--config.blocks.train=0", "--config.train.steps=2", "--config.optim.warmup_steps=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = [ln for ln in proc.stdout.splitlines() if "device(s) visible" in ln]   # the log goes to stdout
    assert len(plan) == 1, proc.stdout[-3000:]
    assert "2 cpu device(s) visible" in plan[0] and "parallel.mode=auto -> sequential" in plan[0]
    assert "--config.parallel.cpu_devices=N" in plan[0] and "training on cpu:0" in plan[0]
