r"""One benchmark command: training-step speed, memory and sampling throughput of a config on this machine.

  python -m experiments.bench --config experiments/configs/cifar100_vit.py [--steps 20] [--json]
  python -m experiments.bench --device [--small]      # the one-chip suite (cifar10_dit, cifar100_vit), <= 5 min
  python -m experiments.bench --config experiments/configs/shakespeare_ar.py --rows decode_dblocks,decode_e2e

For the end-to-end step and the largest block's step: compile time, step time (median of --steps after --warmup),
achieved GFLOP/s (XLA's cost analysis of the compiled step / step time), that rate as a fraction of this machine's
own fp32 matmul rate (measured by the same command), peak RSS, and on an accelerator the device's peak bytes in use
(`memory_stats()`); then sampling throughput at batch --sample_batch through the task's own entry points
(images/s for image configs, tokens/s for language configs) with freshly initialised parameters.
Each measurement runs in its own child process, so peak RSS belongs to that step alone. Steps run on zero data
(the config's shapes), so the data pipeline is not measured. Model options (scan, remat, dtype, attention) come
from the config, or from --model dtype=bfloat16,scan_layers=true,remat=full (configs need not have the keys).
--cpu_devices N (CPU only): the training rows split the host into N devices and the batch over them (data
parallel, gradients all-reduced): the same step and FLOPs; XLA's CPU runtime runs elementwise work on one thread per
device, so on a small CPU this is faster (docs/lab/performance.md).
--device: cifar10_dit and cifar100_vit at their paper batch sizes (with --small: tiny shapes, for a CPU check),
and the block-parallel mesh against data-parallel e2e when several devices are present.
Rows decode_dblocks / decode_e2e (language configs): token generation at batch --sample_batch, --sample_tokens new
tokens after an 8-token prompt, through the Python loop (textgen.generate, a dispatch per block call and a host sync
per token) and the compiled loop (dblocks.tasks.lm.decode) in one process: tokens/s of each, the speedup, and
whether the two drew the same tokens.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dblocks import config as config_lib
from dblocks import logs, memory, runtime, steps
from dblocks.tasks import get_task
from experiments.common import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed training steps per row (median)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps before timing")
_BATCH = flags.DEFINE_integer("batch_size", None, "training batch size (default: the config's)")
_SAMPLE = flags.DEFINE_integer("sample_batch", 64, "sampling batch (0: skip sampling)")
_TOKENS = flags.DEFINE_integer("sample_tokens", 32, "tokens generated per sequence for language configs")
_ROWS = flags.DEFINE_list("rows", ["e2e", "block", "sample_e2e", "sample_dblocks"], "what to measure")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
_DEVICE = flags.DEFINE_bool("device", False, "run the one-chip suite (cifar10_dit, cifar100_vit)")
_SMALL = flags.DEFINE_bool("small", False, "with --device: tiny shapes, to check the suite on a CPU")
_MODEL = flags.DEFINE_list("model", [], "model options key=value (dblocks.models.options), e.g. "
                           "dtype=bfloat16,scan_layers=true,remat=full: set even when the config has no such key")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "training rows on the CPU: split the host into this many devices "
                                    "and shard the batch over them (data parallel; 0 or 1: one device)")
_CHILD = flags.DEFINE_string("child", "", "internal: measure one row in this process and print JSON")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


# -- the machine's own matmul rate ---------------------------------------------------------------------------------

# -- one row, in a child process ------------------------------------------------------------------------------------

def _peaks() -> dict:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:   # noqa: BLE001 - backends without memory stats
        stats = {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def train_row(task, method: str, batch_size: int, n_steps: int, warmup: int) -> dict:
    """Compile + time one unit's training step (the e2e network, or the largest block)."""
    units = task.units(method)
    unit = max(units, key=lambda u: u.num_layers)
    devices = max(1, _CPU_DEVICES.value)
    if devices > 1:
        flops, flops_source = memory.step_flops(task, unit, batch_size)   # the whole batch's, as on one device
        compile_s, compiled, time_fn = _data_parallel(task, unit, batch_size, devices)
    else:
        t0 = time.perf_counter()
        compiled, _, _ = memory.compile_step(task, unit, batch_size)
        compile_s = time.perf_counter() - t0
        flops, flops_source = memory.step_flops(task, unit, batch_size, compiled)   # scanned: an unrolled count
        time_fn = lambda n: memory.time_step(task, unit, batch_size, compiled, n)  # noqa: E731
    mem = compiled.memory_analysis()   # per device
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = time_fn(n_steps + warmup - 1) if n_steps else float("nan")
    # minor page faults per step (the warm-up included): with glibc's malloc on the CPU backend, about one per 4 KiB
    # page of XLA's temporaries (docs/lab/performance.md "The C allocator")
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(n_steps + warmup, 1)
    return {"unit": unit.name, "layers": unit.num_layers, "batch_size": batch_size, "devices": devices,
            "compile_seconds": compile_s,
            "step_seconds": seconds, "flops": flops, "flops_source": flops_source,
            "gflops_per_s": flops / seconds / 1e9,
            "compiled_temp_bytes": int(mem.temp_size_in_bytes), "page_faults_per_step": faults, **_peaks()}


def _data_parallel(task, unit, batch_size: int, n: int):
    """(compile seconds, compiled step, time_fn) of `unit`'s training step with the state replicated on n CPU
    devices and the batch split over them (XLA partitions the step and all-reduces the gradients): the same step and
    FLOPs as on one device, with the elementwise work that XLA's CPU runtime runs on one thread spread over n."""
    from jax.sharding import NamedSharding, PartitionSpec
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = (NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data")))
    t0 = time.perf_counter()
    compiled, _, _ = memory.compile_step(task, unit, batch_size, shardings)
    compile_s = time.perf_counter() - t0
    return compile_s, compiled, lambda count: memory.time_step(task, unit, batch_size, compiled, count, shardings)


def _fresh_run(task, method: str):
    """An assembled run (dblocks.assemble.Run) with freshly initialised parameters: throughput only."""
    from dblocks import assemble, partition as partition_lib
    units = task.units(method)
    models = [task.make_model(u) for u in units]
    params = [jax.jit(lambda m=m, u=u: task.init_params(m, steps.init_key(0, u.index), task.dummy_batch(2)))()
              for m, u in zip(models, units)]
    part = task.partition() if method == "dblocks" else partition_lib.Partition(
        boundaries=task.full_range(), ranges=(task.full_range(),))
    return assemble.Run("", task.config, task, method, part, units, models, params, [])


def sample_row(task, method: str, n: int, max_tokens: int) -> dict:
    """Throughput of the task's own sampling entry point at batch n (second call timed; the first compiles)."""
    run = _fresh_run(task, method)
    c = task.config
    if task.name in ("dit",):
        labels = np.arange(n) % int(c.data.num_classes)
        fn, unit = (lambda: task.generate(run, labels)), "images"
    elif task.name in ("vit",):
        image = np.zeros((n, c.data.image_size, c.data.image_size, c.data.channels), np.float32)
        fn, unit = (lambda: task.classify(run, image)), "images"
    elif task.name == "mdm":
        fn, unit = (lambda: task.generate(run, n, int(c.sample.grid_points))), "tokens"
        max_tokens = int(c.data.seq_len)
    else:   # ar, recurrent
        prompts = np.zeros((n, 8), np.int32)
        fn, unit = (lambda: task.generate(run, prompts, max_tokens)), "tokens"
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn()))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn()))
    seconds = time.perf_counter() - t0
    count = n if unit == "images" else n * max_tokens
    return {"method": method, "batch": n, "unit": unit, "first_call_seconds": first, "seconds": seconds,
            f"{unit}_per_s": count / seconds, **_peaks()}


def decode_row(task, method: str, n: int, max_tokens: int, repeats: int = 3) -> dict:
    """Tokens/s of the Python decoding loop and of the compiled one (the task's generate, compiled False / True) at
    batch n, same process, same prompts and seed; each path: one untimed call (compiles), then the best of
    `repeats` timed calls."""
    run = _fresh_run(task, method)
    prompts = np.random.default_rng(0).integers(0, task.vocab.size, (n, 8)).astype(np.int32)
    sampler = task.sampler_options(run)
    out, toks = {"method": method, "batch": n, "new_tokens": max_tokens, "sampler": sampler.to_dict()}, {}
    for path, compiled in (("python", False), ("compiled", True)):
        gen = lambda: task.generate(run, prompts, max_tokens, 0, sampler, compiled=compiled)  # noqa
        t0 = time.perf_counter()
        toks[path], out["block_calls_per_token"] = gen()
        first, times = time.perf_counter() - t0, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            gen()
            times.append(time.perf_counter() - t0)
        out[path] = {"first_call_seconds": first, "seconds": min(times), "tokens_per_s": n * max_tokens / min(times)}
    out["speedup"] = out["compiled"]["tokens_per_s"] / out["python"]["tokens_per_s"]
    out["same_tokens"] = bool(np.array_equal(toks["python"], toks["compiled"]))
    return {**out, "load_average": os.getloadavg(), **_peaks()}


def _with_model_options(config, pairs: list[str]):
    """A copy of config with model options set from 'key=value' strings."""
    if not pairs:
        return config
    import copy
    config = copy.deepcopy(config)
    with config.unlocked():
        for pair in pairs:
            k, v = pair.split("=", 1)
            config.model[k] = {"true": True, "false": False}.get(v.lower(), v)
    return config


def child_main(config, row: str) -> dict:
    task = get_task(_with_model_options(config, _MODEL.value))
    batch = int(_BATCH.value or config.data.batch_size)
    if row in ("e2e", "block"):
        return train_row(task, "e2e" if row == "e2e" else "dblocks", batch, _STEPS.value, _WARMUP.value)
    if row.startswith("decode_"):
        return decode_row(task, row.split("_", 1)[1], int(_SAMPLE.value), int(_TOKENS.value))
    return sample_row(task, row.split("_", 1)[1], int(_SAMPLE.value), int(_TOKENS.value))


# -- the parent: one child per row ------------------------------------------------------------------------------------

def _run_child(config_path: str, overrides: list[str], row: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench", "--config", config_path, f"--child={row}", *overrides, *extra]
    env = {**os.environ, "DBLOCKS_CACHE": "off"}   # compile time is a real compile, not a cache hit
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def bench(config_path: str, overrides: list[str], rows: list[str], extra: list[str]) -> dict:
    info = runtime.device_info()
    before = runtime.matmul_rate()
    out = {"config": config_path, "overrides": overrides, "device": info}
    for row in rows:
        out[row] = _run_child(config_path, overrides, row, extra)
    # the reference is measured before and after the rows and the higher rate kept: on a shared machine it moves
    # by 10-30 % within minutes, and the higher one gives the lower (conservative) fractions
    after = runtime.matmul_rate()
    out["matmul"] = {**max(before, after, key=lambda m: m["gflops"]),
                     "gflops_before": before["gflops"], "gflops_after": after["gflops"]}
    for row in rows:
        if "gflops_per_s" in out[row]:
            out[row]["fraction_of_matmul"] = out[row]["gflops_per_s"] / out["matmul"]["gflops"]
    return out


def table(report: dict) -> str:
    m, d = report["matmul"], report["device"]
    lines = [f"{report['config']} {' '.join(report['overrides'])}",
             f"{d['backend']} x{d['devices']} ({d['device_kind']}), jax {d['jax']}, malloc "
             f"{d.get('allocator', '?')}; fp32 matmul {m['n']}^3: "
             f"{m['gflops']:.0f} GFLOP/s" + (f" (the higher of {m['gflops_before']:.0f} before and "
                                             f"{m['gflops_after']:.0f} after the rows)" if "gflops_after" in m else ""),
             f"{'':8s}{'layers':>7s}{'batch':>7s}{'compile s':>10s}{'step s':>9s}{'GFLOP/step':>11s}{'GFLOP/s':>9s}"
             f"{'of matmul':>10s}{'peak RSS MiB':>13s}{'faults/step':>12s}{'dev peak MiB':>13s}"]
    for row in ("e2e", "block"):
        r = report.get(row)
        if not r:
            continue
        if "error" in r:
            lines.append(f"{row:8s} error: {r['error']}")
            continue
        dev = f"{r['device_peak_bytes'] / 2**20:13.0f}" if "device_peak_bytes" in r else f"{'-':>13s}"
        name = row if r.get("devices", 1) == 1 else f"{row}/{r['devices']}d"
        lines.append(f"{name:8s}{r['layers']:7d}{r['batch_size']:7d}{r['compile_seconds']:10.1f}"
                     f"{r['step_seconds']:9.3f}{r['flops'] / 1e9:11.1f}{r['gflops_per_s']:9.1f}"
                     f"{r['fraction_of_matmul']:10.1%}{r['peak_rss_bytes'] / 2**20:13.0f}"
                     f"{r.get('page_faults_per_step', float('nan')):12.0f}{dev}")
    for row in ("sample_e2e", "sample_dblocks"):
        r = report.get(row)
        if not r:
            continue
        if "error" in r:
            lines.append(f"{row:15s} error: {r['error']}")
            continue
        key = f"{r['unit']}_per_s"
        lines.append(f"{row:15s} batch {r['batch']}: {r[key]:10.1f} {r['unit']}/s ({r['seconds']:.2f} s; first "
                     f"call {r['first_call_seconds']:.1f} s; peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB)")
    for row in ("decode_dblocks", "decode_e2e"):
        r = report.get(row)
        if not r:
            continue
        if "error" in r:
            lines.append(f"{row:15s} error: {r['error']}")
            continue
        py, co = r["python"], r["compiled"]
        lines.append(f"{row:15s} batch {r['batch']}, {r['new_tokens']} tokens, {r['block_calls_per_token']}"
                     f" calls/token: python {py['tokens_per_s']:.1f} tokens/s, compiled {co['tokens_per_s']:.1f} "
                     f"tokens/s, speedup {r['speedup']:.1f}x (same tokens: {r['same_tokens']}; first call "
                     f"{py['first_call_seconds']:.1f} / {co['first_call_seconds']:.1f} s; load "
                     f"{r['load_average'][0]:.1f})")
    return "\n".join(lines)


def _config_overrides(argv: list[str]) -> list[str]:
    return [a for a in sys.argv[1:] if a.startswith("--config.")]


def device_suite(small: bool) -> dict:
    """cifar10_dit and cifar100_vit at their paper batch sizes (tiny with small=True), e2e and block steps, and
    sampling; with several devices also the mesh scaling of experiments.lab.bench_parallel."""
    tiny = ["--config.model.num_layers=3", "--config.model.hidden=32", "--config.model.heads=2",
            "--config.model.mlp_ratio=2.0", "--config.data.batch_size=8", "--config.data.name=synthetic"]
    suite = {}
    extra = ["--steps=5", "--warmup=1", "--sample_batch=8"] if small else ["--steps=10", "--warmup=2"]
    for name in ("cifar10_dit", "cifar100_vit"):
        path = os.path.join(CONFIGS, f"{name}.py")
        overrides = (tiny if small else ["--config.data.name=synthetic"])
        suite[name] = bench(path, overrides, ["e2e", "block", "sample_dblocks"], extra)
    if jax.device_count() > 1:
        cmd = [sys.executable, "-m", "experiments.lab.bench_parallel", "--config",
               os.path.join(CONFIGS, "scale_dit.py"), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        suite["mesh"] = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip().splitlines()[-1:]}
    return suite


def main(argv):
    del argv
    if _CHILD.value:   # before the backend starts
        runtime.split_cpu(_CPU_DEVICES.value)
    logs.setup()
    runtime.setup()
    if _CHILD.value:
        print(json.dumps(child_main(_CONFIG.value, _CHILD.value)))
        return
    if _DEVICE.value:
        suite = device_suite(_SMALL.value)
        if _JSON.value:
            print(json.dumps(suite))
        else:
            print("\n\n".join(table(r) for k, r in suite.items() if k != "mesh"))
            if "mesh" in suite:
                print("\nmesh scaling (experiments.lab.bench_parallel):", json.dumps(suite["mesh"]))
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (or --device)")
    config_lib.validate(_CONFIG.value)
    n, batch = _CPU_DEVICES.value, int(_BATCH.value or _CONFIG.value.data.batch_size)
    if n < 0 or (n > 1 and batch % n):
        raise config_lib.ConfigError(f"--cpu_devices={n}: must be >= 0 and divide the batch size {batch}")
    if n > 1 and jax.default_backend() != "cpu":
        raise config_lib.ConfigError(f"--cpu_devices splits the host CPU; this backend is {jax.default_backend()}")
    path = next(a.split("=", 1)[1] if "=" in a else sys.argv[sys.argv.index(a) + 1]
                for a in sys.argv[1:] if a.split("=")[0] == "--config")
    extra = [f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}", f"--sample_batch={_SAMPLE.value}",
             f"--sample_tokens={_TOKENS.value}", f"--cpu_devices={_CPU_DEVICES.value}"] + (
                 [f"--batch_size={_BATCH.value}"] if _BATCH.value else [])
    rows = [r for r in _ROWS.value if _SAMPLE.value or not r.startswith("sample")]
    report = bench(path, _config_overrides(sys.argv) + [f"--model={','.join(_MODEL.value)}"] * bool(_MODEL.value),
                   rows, extra)
    print(json.dumps(report) if _JSON.value else table(report))


if __name__ == "__main__":
    run_main(main)
