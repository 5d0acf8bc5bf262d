"""launch.sh: the TPU-pod subcommands print (--dry-run) or run a complete gcloud sequence; the others still work."""
import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = {"DBLOCKS_TPU_NAME": "pod1", "DBLOCKS_TPU_ZONE": "us-central1-a", "DBLOCKS_TPU_TYPE": "v5litepod-16",
       "DBLOCKS_TPU_PROJECT": "my-proj"}


@pytest.fixture
def env(tmp_path):
    """A PATH whose `gcloud` only records its arguments, so nothing here can reach Google Cloud."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "%s\\0" "$a"; done >> "$GCLOUD_LOG"\n'
                    'printf "\\n" >> "$GCLOUD_LOG"\n')
    fake.chmod(0o755)
    return {**os.environ, **POD, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path),
            "GCLOUD_LOG": str(tmp_path / "gcloud.log")}


def launch(env, *args, check=True):
    p = subprocess.run(["./launch.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def gcloud_calls(env) -> list[list[str]]:
    if not os.path.exists(env["GCLOUD_LOG"]):
        return []
    with open(env["GCLOUD_LOG"]) as f:
        return [line.strip("\0").split("\0") for line in f.read().split("\0\n") if line.strip("\0\n")]


def remote(argv: list[str]) -> str:
    (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    return cmd


def test_dry_run_up_prints_the_whole_v5e_sequence_and_runs_nothing(env):
    lines = [shlex.split(ln) for ln in launch(env, "tpu", "up", "--dry-run").stdout.splitlines()]
    assert gcloud_calls(env) == [] and not os.path.exists(os.path.join(env["TMPDIR"], "dblocks-code.tar.gz"))
    create, tar, scp, untar, setup = lines
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == "pod1"
    assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--zone=us-central1-a",
            "--project=my-proj"} <= set(create)
    assert tar[0] == "tar" and "--exclude=./.venv" in tar and tar[-3:] == ["-C", ROOT, "."]
    assert scp[4] == "scp" and scp[5] == tar[2] and scp[6] == "pod1:dblocks-code.tar.gz" and "--worker=all" in scp
    for line in (untar, setup):
        assert line[4:6] == ["ssh", "pod1"] and "--worker=all" in line and "--zone=us-central1-a" in line
    assert "tar -xzf ~/dblocks-code.tar.gz -C ~/dblocks" in remote(untar)
    steps = remote(setup)
    assert "./launch.sh setup" in steps and 'jax[tpu]==' in steps and "DBLOCKS_PYTHON=python3.11" in steps


def test_dry_run_train_runs_the_mesh_trainer_on_every_worker(env):
    out = launch(env, "tpu", "train", "--config", "experiments/configs/fashion_mnist_dit.py", "--workdir",
                 "/mnt/dblocks/run 1", "--config.parallel.data=4", "--dry-run").stdout
    (line,) = [shlex.split(ln) for ln in out.splitlines()]
    assert line[4:6] == ["ssh", "pod1"] and "--worker=all" in line
    cmd = shlex.split(remote(line))
    i = cmd.index("-m")
    assert cmd[i + 1:i + 10] == ["experiments.train", "--config", "experiments/configs/fashion_mnist_dit.py",
                                 "--workdir", "/mnt/dblocks/run 1", "--config.parallel.data=4", "--multihost",
                                 "--config.parallel.mode=mesh", ">"]
    assert cmd[:3] == ["cd", "~/dblocks", "&&"] and "nohup" in cmd


def test_without_dry_run_the_printed_commands_are_run(env):
    for action in ("train", "logs", "stop", "delete"):
        extra = ["--config", "c.py", "--workdir", "/mnt/w"] if action == "train" else []
        printed = shlex.split(launch(env, "tpu", action, *extra, "--dry-run").stdout)
        launch(env, "tpu", action, *extra)
        assert gcloud_calls(env)[-1] == printed[1:], action
    verbs = [c[3] for c in gcloud_calls(env)]
    assert verbs == ["ssh", "ssh", "ssh", "delete"]
    assert "--worker=0" in gcloud_calls(env)[1] and "kill" in remote(gcloud_calls(env)[2])


def test_mount_needs_a_bucket(env):
    p = launch(env, "tpu", "mount", "--dry-run", check=False)
    assert p.returncode == 2 and "DBLOCKS_TPU_BUCKET" in p.stderr
    out = launch({**env, "DBLOCKS_TPU_BUCKET": "bkt"}, "tpu", "mount", "--dry-run").stdout
    assert "gcsfuse --implicit-dirs bkt /mnt/dblocks" in out and "--worker=all" in out


def test_other_subcommands_unchanged(env):
    out = launch(env, "help").stdout
    for sub in ("setup", "demo [WORKDIR]", "test [PYTEST ARGS]", "train|sample|evaluate|compare|memory", "tpu ACTION"):
        assert sub in out
    assert launch(env, "nonsense", check=False).returncode == 2
    assert launch(env, "tpu", "nonsense", check=False).returncode == 2
