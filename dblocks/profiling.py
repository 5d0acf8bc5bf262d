"""Speed you can read and a trace you can open: achieved FLOP/s and MFU for the progress line, and a jax.profiler
window over chosen steps.

FLOPs per step come from XLA's cost analysis of the lowered training step (what XLA will run: the forward and backward
passes, rematerialised recomputation included, and the optimizer), so the utilisation is of the hardware, against the
chip's dense bf16 peak from a small table of known GPUs and TPUs. On a CPU, or an unknown chip, FLOP/s is reported
and MFU is not. With `model.scan_layers` XLA counts the scanned layer once, so FLOP/s is not reported
(`experiments.memory` counts such steps by compiling them unrolled).

`train.profile_steps='a,b'` traces steps a..b (as numbered in the progress line) of every unit into
WORKDIR/profile/<unit>/, which TensorBoard's profile plugin and XProf open (`tensorboard --logdir WORKDIR/profile`).
"""
from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Any

import jax

log = logging.getLogger("dblocks")

# (substring of jax's device_kind, dense bf16 FLOP/s of one device), the first match wins: more specific names first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # compiled step -> FLOPs of one call


def peak_flops(device) -> float | None:
    """Dense bf16 FLOP/s of one `device` (a jax Device), or None for a CPU or a chip the table does not know."""
    if device.platform == "cpu":
        return None
    kind = str(device.device_kind)
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def step_cost(driver, batch, config) -> tuple[float, float | None]:
    """(FLOPs of one step per lockstep slot of the loop's `driver`, the peak FLOP/s of the devices one slot uses);
    (0.0, None) when they cannot be known. Lowers the step again (no compile): call it off the timed steps."""
    if "model" in config and bool(config.model.scan_layers):   # a loop driven without a model config: no scan
        log.info("FLOP/s not reported: with model.scan_layers XLA counts the scanned layer once")
        return 0.0, None
    from dblocks.memory import flops_of   # imports the tasks: only when a loop starts
    flops = _FLOPS.get(driver.step_fn)   # units of one shape share a compiled step: lower (trace) it once
    if flops is None:
        try:
            flops = _FLOPS[driver.step_fn] = flops_of(driver.lower(batch))
        except Exception as e:  # noqa: BLE001 - a backend without cost analysis: the run goes on without FLOP/s
            log.info("FLOP/s not reported: no cost analysis (%s)", e)
            return 0.0, None
    slots = len(getattr(driver, "padded", driver.units))
    peak = peak_flops(driver.devices[0])
    return flops / slots, (peak * len(driver.devices) / slots if peak else None)


def throughput(flops_per_step: float, steps_per_s: float, peak: float | None) -> dict:
    """{'flops_per_s', 'mfu'} for the metrics record ({} without FLOPs; no 'mfu' without a peak)."""
    if not flops_per_step or not math.isfinite(steps_per_s):   # no FLOPs, or no timed step yet
        return {}
    out = {"flops_per_s": flops_per_step * steps_per_s}
    if peak:
        out["mfu"] = out["flops_per_s"] / peak
    return out


def describe(speed: dict) -> str:
    """'  12.3 TFLOP/s  MFU 41.0%' for the progress line ('' without FLOPs)."""
    if "flops_per_s" not in speed:
        return ""
    v = speed["flops_per_s"]
    unit, scale = next(((u, x) for u, x in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)) if v >= x),
                       ("", 1.0))
    mfu = f"  MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else ""
    return f"  {v / scale:.3g} {unit}FLOP/s{mfu}"


def parse_steps(spec: Any) -> tuple[int, int] | None:
    """'a,b' -> (a, b) with 1 <= a <= b; '' or None -> None (off); ValueError otherwise."""
    spec = "" if spec is None else str(spec).strip()
    if not spec:
        return None
    try:
        a, b = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"train.profile_steps={spec!r}: use 'a,b' (trace steps a to b, e.g. '10,12') or '' (off)") \
            from None
    if not 1 <= a <= b:
        raise ValueError(f"train.profile_steps={spec!r}: need 1 <= a <= b")
    return a, b


def config_problems(train) -> list[str]:
    """config.train.profile_steps problems, for dblocks.config.validate."""
    try:
        parse_steps(train.profile_steps)
    except ValueError as e:
        return [str(e)]
    return []


class ProfileWindow:
    """Traces the steps numbered a..b (1-based, as logged) of one loop with jax.profiler into
    WORKDIR/profile/<label>/. `before(step)` before a step is dispatched (0-based index), `after(done, outputs)` after
    it; `close()` when the loop ends early."""

    def __init__(self, config, workdir: str, label: str):
        spec = config.train.profile_steps
        self.window = parse_steps(spec) if workdir else None   # no workdir (benchmarks): nowhere to write
        self.dir = os.path.join(workdir, "profile", label)
        self.active = self.done = False

    def before(self, step: int) -> None:
        if self.window is None or self.active or self.done:
            return
        a, b = self.window
        if a <= step + 1 <= b:
            jax.profiler.start_trace(self.dir)
            self.active, self.first = True, step + 1

    def after(self, done: int, outputs: Any) -> None:
        if self.active and done >= self.window[1]:
            jax.block_until_ready(outputs)   # the traced steps finish inside the trace (a sync, once)
            self.close()
            log.info("profile of steps %d-%d written to %s (tensorboard --logdir %s)", self.first, done, self.dir,
                     self.dir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True

