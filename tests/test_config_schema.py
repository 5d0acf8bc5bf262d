"""The config schema: every field a task reads has a default in the config module or the task's `defaults`, a
meaning for --help_config, and a default never changes a run's signature."""
import glob
import importlib
import os
import subprocess
import sys

from dblocks import config as config_lib
from dblocks.tasks import get_task
from experiments.configs import tiny_ar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def _leaves(node, prefix=""):
    for k, v in node.items():
        if hasattr(v, "items"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_field_of_every_config_has_a_meaning():
    missing = {}
    for name in CONFIGS:
        task = get_task(importlib.import_module(f"experiments.configs.{name}").get_config())
        missing.update({k: name for k in _leaves(task.config) if k not in config_lib.FIELD_HELP})
    assert not missing, f"fields without a line in dblocks.config.FIELD_HELP: {missing}"


def test_a_task_reads_its_defaults_and_signs_what_was_written():
    c = tiny_ar.get_config()
    del c.model["loss_chunk"], c.blocks["sigma_floor"]
    task = get_task(c)
    assert task.config.model.loss_chunk == 0 and task.config.blocks.sigma_floor == 0.0
    assert "loss_chunk" not in task.signature()["model"]          # an older run's hash is unchanged
    assert "loss_chunk" not in c.model                            # the caller's config is not modified
    explicit = tiny_ar.get_config()
    assert get_task(explicit).config.model.loss_chunk == explicit.model.loss_chunk   # a set field wins


def test_help_config_prints_every_field_with_its_default():
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config", "experiments/configs/tiny_dit.py",
                          "--help_config"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    lines = out.stdout.splitlines()
    assert "sample.grid_kind = 'cdf'  # sigma grid: 'cdf' (equal CDF, the paper's) or 'karras'" in lines
    assert any(ln.startswith("data.flip = False  # ") for ln in lines)     # a default the config file leaves out
    assert len(lines) == len(list(_leaves(get_task(importlib.import_module(
        "experiments.configs.tiny_dit").get_config()).config)))
