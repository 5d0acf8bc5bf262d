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
