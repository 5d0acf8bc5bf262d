"""Memory preflight: compile each unit's training step before anything is written, and refuse a step that cannot fit.

A step too large for the device otherwise fails minutes in, after the workdir, the config and the first checkpoint
directories exist, with an allocator error that names no remedy. The compiled step's memory (dblocks.memory:
state + temporaries, exact on every backend) is compared with what the device has: `bytes_limit` of its memory
stats on GPU / TPU, MemAvailable of the host on CPU, or config.train.memory_limit_gb when set. A step that does not
fit is a `DoesNotFitError` (exit status 2) whose message gives both figures and the options that would make it fit,
each with its own compiled figure. The compiled executables of the steps that fit are handed to the sequential
trainer, so the check costs no second compile there.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import jax
import numpy as np

from dblocks import engine, logs, memory, parallel
from dblocks.config import ConfigError
from dblocks.models import options as model_options
from dblocks.tasks import Task, Unit, get_task

GB = 1e9


class DoesNotFitError(ConfigError):
    """The training step of a unit needs more memory than the device has; the message says what would fit."""


def available_bytes(config) -> tuple[int, str]:
    """(bytes one device has for a step, where the figure comes from)."""
    limit = float(config.train.memory_limit_gb or 0.0)
    if limit > 0:
        return int(limit * GB), "train.memory_limit_gb"
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    return host_available_bytes(), "the host's available memory"


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (free memory plus what the kernel can reclaim), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def devices_of(config, units: list[Unit]) -> tuple[int, int]:
    """(batch per device, devices that share one memory) of this run's training: a data-parallel run splits each
    unit's batch `data` ways; on the CPU backend every device of the mesh (blocks x data) is the same host memory."""
    mode, data, _ = parallel.settings(config)
    batch = int(config.data.batch_size) // data
    if jax.default_backend() != "cpu":
        return batch, 1
    return batch, (parallel.mesh_shape(config, len(units))[0] * data if mode == "mesh" else 1)


def check(task: Task, units: list[Unit], config, source) -> dict[tuple, Any]:
    """Compiles the step of each distinct unit shape for one device; raises DoesNotFitError for the first that
    cannot fit. Returns the compiled steps by engine.step_key, for the sequential trainer to train with (a
    data-parallel run's steps are other programs: then {})."""
    have, where = available_bytes(config)
    batch, shared = devices_of(config, units)
    example = task.make_batch(source.get(np.arange(batch)), train=True)
    compiled: dict[tuple, Any] = {}
    for unit in units:
        key = engine.step_key(task.make_model(unit))
        if key in compiled:
            continue
        compiled[key], need = compile_bytes(task, unit, example)
        if need * shared > have:
            raise DoesNotFitError(refusal(unit, config, example, shared, need * shared, have, where))
        logs.log.info("memory preflight: %s's step needs %.3g GB of %.3g GB (%s)", unit.name, need * shared / GB,
                      have / GB, where)
    return compiled if parallel.settings(config)[0] == "sequential" else {}


def compile_bytes(task: Task, unit: Unit, example: dict) -> tuple[Any, int]:
    """(compiled one-device step for batches like `example`, its bytes: state + temporaries; dblocks.memory)."""
    compiled, _, _ = memory.compile_step(task, unit, len(jax.tree.leaves(example)[0]), example=example)
    m = compiled.memory_analysis()
    return compiled, int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                         + m.temp_size_in_bytes)


def refusal(unit: Unit, config, example: dict, shared: int, need: int, have: int, where: str) -> str:
    """The refusal's message: both figures, then one line per option that would make the step smaller."""
    lines = [f"the training step of {unit.name} needs {need / GB:.3g} GB; {where} is {have / GB:.3g} GB.",
             "What it needs with each option (compiled; options combine), or --config.train.preflight=False to try "
             "anyway:"]
    for option, figure in suggestions(unit, config, example, shared, need, have):
        lines.append(f"  {option}" + (f"   ({figure / GB:.3g} GB)" if figure is not None else ""))
    return "\n".join(lines)


def suggestions(unit: Unit, config, example: dict, shared: int, need: int, have: int
                ) -> list[tuple[str, int | None]]:
    """[(command-line options, bytes of the step with them; None where not compiled)]: remat, an attention with
    memory linear in the sequence, gradient accumulation, more (smaller) blocks."""
    figure = lambda u, method=None, **sections: _figure(config, u, example, shared, method, **sections)  # noqa
    m, out = config.model, []
    if not (m.get("scan_layers", False) and str(m.get("remat", "none")) == "full"):
        out.append(("--config.model.scan_layers=True --config.model.remat=full",
                    figure(unit, model=dict(scan_layers=True, remat="full"))))
    if "chunked" not in model_options.ATTENTION:
        out.append(("an attention whose memory is linear in the sequence length (model.attention)", None))
    elif m.get("attention", "xla") != "chunked":
        out.append(("--config.model.attention=chunked", figure(unit, model=dict(attention="chunked"))))
    k = _microbatches(config, unit, example, shared, need, have)
    if k:
        out.append((f"--config.train.microbatches={k[0]}", k[1]))
    B = int(config.blocks.num_blocks)
    if config.method == "e2e":
        out.append((f"--config.method=dblocks (blocks.num_blocks={B}: each block trains 1/{B} of the layers)",
                    figure(None, "dblocks")))
    else:
        more = next((b for b in range(B + 1, int(config.model.num_layers) + 1) if config.model.num_layers % b == 0),
                    None)
        if more:
            out.append((f"--config.blocks.num_blocks={more}", figure(None, blocks=dict(num_blocks=more, layers=""))))
    return out


def _figure(config, unit: Unit | None, example: dict, shared: int, method: str | None = None,
            **sections) -> int | None:
    """Bytes of the step with config fields changed; unit None: the largest block of the changed config."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.method = method or c.method
        for section, fields in sections.items():
            c[section].update(fields)
    task = get_task(c)
    units = [unit] if unit is not None else list({u.num_layers: u for u in task.units(c.method)}.values())
    try:
        return max(compile_bytes(task, u, example)[1] for u in units) * shared
    except Exception as e:  # noqa: BLE001 - a variant this model cannot build leaves its figure out, not the refusal
        logs.log.info("memory preflight: no figure for %s: %s", sections or method, e)
        return None


def _microbatches(config, unit: Unit, example: dict, shared: int, one: int, have: int
                  ) -> tuple[int, int | None] | None:
    """(a microbatch count that fits, its bytes), from two compiles: with `one` the bytes of the whole batch's step,
    the step at 2 microbatches gives the part of the memory that scales with the batch, hence the count to compile
    and confirm. None: the batch per device cannot be split."""
    batch = len(jax.tree.leaves(example)[0])
    valid = [k for k in range(2, batch + 1) if batch % k == 0]
    if not valid:
        return None
    two = _figure(config, unit, example, shared, train=dict(microbatches=valid[0]))
    if two is None or two <= have or two >= one:
        return valid[0], two
    scaled = (one - two) * valid[0] / (valid[0] - 1)   # bytes ~ fixed + scaled / k
    fixed = one - scaled
    k = next((k for k in valid if fixed + scaled / k <= have), valid[-1])
    return k, _figure(config, unit, example, shared, train=dict(microbatches=k))
