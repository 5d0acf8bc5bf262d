"""glibc's malloc on transparent huge pages: when the tunable is added, and that entry points re-execute with it."""
import os
import subprocess
import sys

import pytest

from dblocks import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON = "glibc.malloc.hugetlb=1"


def test_the_tunable_is_added_only_where_it_helps():
    linux = dict(platform="linux", thp="madvise")
    assert hugepages.environ_with_hugepages({}, **linux)["GLIBC_TUNABLES"] == ON
    assert hugepages.environ_with_hugepages({}, platform="linux", thp="always")["GLIBC_TUNABLES"] == ON
    # other tunables are kept, in order
    env = hugepages.environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}, **linux)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + ON and env["X"] == "1"
    # nothing to do: THP off or unknown, not Linux, opted out, another allocator, the user's own setting
    for env, kw in [({}, dict(platform="linux", thp="never")), ({}, dict(platform="linux", thp=None)),
                    ({}, dict(platform="darwin", thp="madvise")), ({"DBLOCKS_HUGEPAGES": "0"}, linux),
                    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, linux),
                    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, linux)]:
        assert hugepages.environ_with_hugepages(env, **kw) is None, (env, kw)


def test_active_and_thp_mode(tmp_path):
    assert hugepages.active({"GLIBC_TUNABLES": "a=1:" + ON})
    assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not hugepages.active({"GLIBC_TUNABLES": ON, "LD_PRELOAD": "libjemalloc.so.2"})
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "absent")) is None


def _entry_point_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DBLOCKS_HUGEPAGES", "LD_PRELOAD")}
    return {**env, **extra}


@pytest.mark.skipif(hugepages.environ_with_hugepages({}) is None, reason="transparent huge pages off or not Linux")
def test_an_entry_point_reexecutes_itself_with_the_tunable(tmp_path):
    """`python -m experiments.train` with a config it refuses (exit 2): the log line says huge pages, and the
    process that printed it had the tunable; DBLOCKS_HUGEPAGES=0 leaves it off."""
    cmd = [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/tiny_dit.py", "--workdir",
           str(tmp_path / "w"), "--config.parallel.cpu_devices=3"]
    on = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=_entry_point_env())
    off = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=_entry_point_env(DBLOCKS_HUGEPAGES="0"))
    assert on.returncode == off.returncode == 2, (on.stderr[-1500:], off.stderr[-1500:])
    on_log, off_log = on.stdout + on.stderr, off.stdout + off.stderr
    assert "allocator glibc on transparent huge pages" in on_log, on_log[-1500:]
    assert "on transparent huge pages" not in off_log and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in off_log
    assert not (tmp_path / "w").exists()


def test_imports_do_not_reexecute():
    """Importing the experiments package (tests, notebooks, `python -m pytest`) never re-executes anything."""
    code = "import os, experiments; print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=_entry_point_env())
    assert out.returncode == 0, out.stderr
    assert ON not in out.stdout
