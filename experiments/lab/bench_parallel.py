r"""Block-parallel training on B devices against the end-to-end data-parallel step on the same devices.

  python -m experiments.lab.bench_parallel --config experiments/configs/scale_dit.py --cpu_devices 8 [--json]

Four ways to advance a config's network by one training step of every block (the paper's matched compute: every
block takes as many steps as the baseline):
  dblocks, mesh B x d    the B blocks at once, one per group of d devices (dblocks.parallel; no cross-block traffic)
  e2e, data-parallel     the whole network, its batch split over the same B*d devices (gradients all-reduced)
  dblocks, 1 device      one block at a time (B steps), the sequential engine's memory saving
  e2e, 1 device          the whole network on one device
Per-device memory is XLA's compiled memory analysis of each step (exact on any backend); step times are medians
after warm-up with block_until_ready, all measured in this one run, so their ratios are what to read.
"""
import json
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from dblocks import config as config_lib
from dblocks import engine, logs, parallel
from dblocks import steps as steps_lib
from dblocks.tasks import get_task
from experiments.common import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per row (after warm-up)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per row")
_CPU = flags.DEFINE_integer("cpu_devices", 0, "split the host CPU into this many devices (0: leave as is)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
flags.mark_flags_as_required(["config"])


def measure(trainer: engine.Trainer, units: list, mesh, steps: int, warmup: int) -> dict:
    """Compiles the parallel step of `units` (same shape, one per 'block' row) on `mesh`; its per-device memory
    and median step time."""
    model = trainer.model(units[0])
    step = parallel.make_parallel_step(trainer, model, mesh)
    compiled = step.lower(*parallel.abstract_args(trainer, units[0], model, mesh)).compile()
    m = compiled.memory_analysis()
    st = parallel.stacked_sharding(mesh)
    state = parallel.init_stack(trainer, model, mesh, units)
    batch = parallel.global_batch(trainer, units, 0, parallel.batch_sharding(mesh))
    keys = parallel.put_global(np.stack([np.asarray(steps_lib.step_base_key(0, u.index)) for u in units]), st)
    ranges = parallel.put_global(np.asarray([u.train_range for u in units], np.float32), st)
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, keys, ranges)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return {"devices": mesh.size, "mesh": dict(mesh.shape), "argument_bytes": int(m.argument_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                               + m.temp_size_in_bytes),
            "step_s": float(np.median(times[warmup:])), "loss": float(np.asarray(metrics["loss"]).mean())}


def benchmark(config, steps: int, warmup: int) -> dict:
    task = get_task(config)
    trainer = engine.Trainer(task, config, workdir="", source=task.source("train"))
    blocks, e2e = task.units("dblocks"), task.units("e2e")
    if len({u.num_layers for u in blocks}) != 1:
        raise config_lib.ConfigError("the benchmark needs blocks of one shape (an even split of the layers)")
    b, d = len(blocks), parallel.settings(config)[1]
    n = b * d
    if n > jax.device_count():
        raise config_lib.ConfigError(f"B={b} blocks x parallel.data={d} needs {n} devices; there are "
                                     f"{jax.device_count()} (use --cpu_devices {n} on a CPU)")
    if int(config.data.batch_size) % n:
        raise config_lib.ConfigError(f"data.batch_size={config.data.batch_size} must divide over the {n} devices "
                                     "of the data-parallel baseline")
    rows = {
        "dblocks_mesh": measure(trainer, blocks, parallel.make_mesh(b, d), steps, warmup),
        "e2e_data_parallel": measure(trainer, e2e, parallel.make_mesh(1, n), steps, warmup),
        "dblocks_1_device": measure(trainer, blocks[:1], parallel.make_mesh(1, 1), steps, warmup),
        "e2e_1_device": measure(trainer, e2e, parallel.make_mesh(1, 1), steps, warmup),
    }
    rows["dblocks_1_device"]["all_blocks_step_s"] = b * rows["dblocks_1_device"]["step_s"]
    for r in rows.values():
        r.setdefault("all_blocks_step_s", r["step_s"])
    base = rows["e2e_data_parallel"]
    for r in rows.values():
        r["time_vs_e2e_dp"] = r["all_blocks_step_s"] / base["all_blocks_step_s"]
        r["memory_vs_e2e_dp"] = r["total_bytes"] / base["total_bytes"]
    return {"num_blocks": b, "data": d, "devices": n, "num_layers": int(config.model.num_layers),
            "batch_size": int(config.data.batch_size), "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "steps": steps, "warmup": warmup, "rows": rows}


def print_table(r: dict) -> None:
    b, d, n = r["num_blocks"], r["data"], r["devices"]
    print(f"{r['num_layers']} layers, B={b}, batch {r['batch_size']} per block (and per e2e step), "
          f"{n} {r['backend']} devices ({r['device_kind']}); per-device MiB; time for one step of every block")
    names = {"dblocks_mesh": f"dblocks, mesh {b}x{d}", "e2e_data_parallel": f"e2e, data-parallel 1x{n}",
             "dblocks_1_device": f"dblocks, 1 device ({b} steps)", "e2e_1_device": "e2e, 1 device"}
    print(f"| {'how':28s} | devices | args MiB | temps MiB | total MiB | step ms | vs e2e DP time | vs e2e DP memory |")
    print(f"|{'-' * 30}|---------|----------|-----------|-----------|---------|----------------|------------------|")
    for key, name in names.items():
        x = r["rows"][key]
        print(f"| {name:28s} | {x['devices']:7d} | {x['argument_bytes'] / 2**20:8.2f} | {x['temp_bytes'] / 2**20:9.2f}"
              f" | {x['total_bytes'] / 2**20:9.2f} | {1e3 * x['all_blocks_step_s']:7.1f} | "
              f"{x['time_vs_e2e_dp']:14.2f} | {x['memory_vs_e2e_dp']:16.2f} |")


def main(argv):
    del argv
    if _CPU.value:
        jax.config.update("jax_num_cpu_devices", _CPU.value)
    logs.setup()
    config = _CONFIG.value
    config_lib.validate(config)
    report = benchmark(config, _STEPS.value, _WARMUP.value)
    if _JSON.value:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    run_main(main)
