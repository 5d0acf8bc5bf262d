r"""Images/s of the DiT sampler: `task.generate` over random-init blocks (docs/lab/solvers.md, "Throughput").

  python -m experiments.lab.bench_sampler --config experiments/configs/tiny_dit.py --points 20 --batch 64

Guidance 2 (one doubled batch per block call), the config's grid kind, --solver on --points grid points; the best
of --repeats timed calls after one that compiles.
"""
from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from dblocks import assemble, sampling
from dblocks.config import ConfigError
from experiments.common import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "a dit config file", lock_config=True)
_POINTS = flags.DEFINE_integer("points", 20, "grid points of the chain", lower_bound=2)
_BATCH = flags.DEFINE_integer("batch", 64, "images per call", lower_bound=1)
_SOLVER = flags.DEFINE_enum("solver", "euler", list(sampling.SOLVERS), "the ODE solver")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls (the best is reported)", lower_bound=1)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = _CONFIG.value
    if config.task != "dit":
        raise ConfigError(f"--config is a {config.task!r} config; the image sampler needs 'dit'")
    run = assemble.random_run(config, "dblocks")
    labels = np.arange(_BATCH.value) % int(config.data.num_classes)
    times = []
    for _ in range(_REPEATS.value + 1):
        t0 = time.perf_counter()
        res = run.task.generate(run, labels, grid_points=_POINTS.value, solver=_SOLVER.value, guidance=2.0)
        jax.block_until_ready(res.denoised)
        times.append(time.perf_counter() - t0)
    print(f"{config_flags.get_config_filename(flags.FLAGS['config'])} {_SOLVER.value} {_POINTS.value} points "
          f"batch {_BATCH.value}: {_BATCH.value / min(times[1:]):.1f} images/s "
          f"(best after warm-up; times {np.round(times, 2).tolist()})")


if __name__ == "__main__":
    run_main(main)
