r"""Images/s of the DiT sampler (random-init blocks, guidance 2), this tree's sampling.py against an older one.

  git archive 7d57d47 dblocks | tar -x -C /tmp/old
  python -m experiments.bench_sampler --old /tmp/old/dblocks --config tiny_dit --points 20 --batch 64

The old sampling.py, partition.py and edm.py are loaded as separate modules beside the new ones (docs/solvers.md).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import sampling
from dblocks.tasks import dit_eval, get_task


def _load(name: str, path: str, subs=()) -> types.ModuleType:
    src = open(path).read()
    for a, b in subs:
        src = src.replace(a, b)
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)  # noqa: S102 - a checked-out older version of this project
    return mod


def old_sampler(old_dir: str):
    edm = _load("old_edm", os.path.join(old_dir, "edm.py"))
    imp = [("from dblocks import edm as edm_lib", "import old_edm as edm_lib")]
    part = _load("old_part", os.path.join(old_dir, "partition.py"), imp)
    samp = _load("old_sampling", os.path.join(old_dir, "sampling.py"),
                 imp + [("from dblocks import partition as partition_lib", "import old_part as partition_lib")])
    del edm
    return samp.sample, part.Partition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default=None, help="an older dblocks/ folder to compare against")
    parser.add_argument("--config", default="tiny_dit")
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    task = get_task(importlib.import_module(f"experiments.configs.{args.config}").get_config())
    models = [task.make_model(u) for u in task.units("dblocks")]
    params = [task.init_params(m, jax.random.PRNGKey(i), task.dummy_batch(2)) for i, m in enumerate(models)]
    part, d = task.partition(), task.config.data
    labels = jnp.asarray(np.arange(args.batch) % int(d.num_classes), jnp.int32)
    g = jnp.float32(2.0)

    def denoise(b, z, s):
        return dit_eval._guided(task, models[b])(params[b], z, s, labels, g), None

    z0 = edm_lib.initial_noise(jax.random.PRNGKey(0), (args.batch, d.image_size, d.image_size, d.channels), 80.0)
    grid = sampling.grid_for(args.points, task.edm)
    variants = [("after", sampling.sample, part)]
    if args.old:
        fn, cls = old_sampler(args.old)
        variants.insert(0, ("before", fn, cls(part.boundaries, part.ranges, part.gamma)))
    for name, fn, p in variants:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(denoise, z0, grid, p, args.solver).denoised)
            times.append(time.perf_counter() - t0)
        print(f"{args.config} {args.solver} {args.points} points batch {args.batch} {name}: "
              f"{args.batch / min(times[1:]):.1f} images/s (best after warm-up; times {np.round(times, 2).tolist()})")


if __name__ == "__main__":
    main()
