"""Evaluating a trained workdir: assemble its run, call the task's evaluate, write the result as JSON.

The library behind `experiments.evaluate` and `experiments.compare` (task-agnostic: the contract of
`Task.evaluate` is in dblocks/tasks/base.py).
"""
from __future__ import annotations

import os
import time

from dblocks import assemble
from dblocks.checkpoint import write_json_atomic


def evaluate_workdir(workdir: str, method: str | None = None, use_ema: bool = True, out: str | None = None,
                     **options) -> dict:
    """Assembles the run of `workdir`, evaluates it and writes the result (default WORKDIR/eval.json)."""
    run = assemble.load_run(workdir, method=method, use_ema=use_ema)
    t0 = time.perf_counter()
    extra = {}
    if options.get("e2e_workdir"):   # the judge of generated text (language tasks); a task never assembles runs
        extra["judge"] = assemble.load_run(options["e2e_workdir"], method="e2e", use_ema=use_ema)
    result = run.task.evaluate(run, **options, **extra)
    result = {**result, "task": run.config.task, "method": run.method, "workdir": os.path.abspath(workdir),
              "options": options, "eval_wall_seconds": round(time.perf_counter() - t0, 2)}
    for keys in (("headline",), ("block_calls_per_sample", "block_calls_per_token")):
        if not any(k in result for k in keys):
            raise RuntimeError(f"task {run.config.task!r}: evaluate() returned none of {keys} (see "
                               f"dblocks/tasks/base.py)")
    write_json_atomic(out or os.path.join(workdir, "eval.json"), result)
    return result
