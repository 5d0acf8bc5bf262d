"""What users of a JAX trainer expect: local-path refusal of URLs, ..."""
import os
import subprocess
import sys

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
