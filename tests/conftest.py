"""Test setup: 8 host (CPU) devices before jax is imported, so mesh code is tested on one machine."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile without LLVM's expensive passes (-O0): the suite is mostly compile time on a 2-core machine, and this cuts
# it by about 40 %. What the tests check does not depend on it: results are compared with tolerances, or between
# programs compiled the same way (subprocesses inherit it). JAX_DISABLE_MOST_OPTIMIZATIONS=0 restores full -O2.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier checks, run on demand with `-m slow`")
    config.addinivalue_line("markers", "faults: fault injection (kill -9, SIGTERM, corrupt or full workdirs), run on "
                                       "demand with `./launch.sh test -m faults`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    for item in items:
        for mark in ("slow", "faults"):
            if mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"{mark}: run with `./launch.sh test -m {mark}`"))
