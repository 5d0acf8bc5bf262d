"""Test setup: 8 host (CPU) devices before jax is imported, so mesh code is tested on one machine."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavier checks, run on demand with `-m slow`")


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: run with `./launch.sh test -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
