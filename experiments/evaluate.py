r"""Evaluates a trained run (DiffusionBlocks or end-to-end; detected from the workdir) on its test split.

  python -m experiments.evaluate --workdir runs/fmnist_vit                  # -> runs/fmnist_vit/eval.json
  python -m experiments.evaluate --workdir runs/fmnist_vit --grid_points 10   # more block calls
  python -m experiments.evaluate --workdir runs/fmnist_dit --num_samples 2000 --repeats 3

Task-agnostic: it assembles the run and calls `run.task.evaluate(run, **options)` (contract in
dblocks/tasks/base.py). Only the options given on the command line are passed; a task ignores those it has no use
for. Common options: grid_points (noise levels the chain visits: dit, vit, ar, recurrent), steps (MDM unmasking steps), solver, limit (test examples), num_samples and repeats (generation),
batch_size, seed, cache_dir (artifacts such as the FID feature network); any other as --opt key=value.
"""
from __future__ import annotations

import ast
import json
import os
import time
from typing import Callable

from absl import app, flags

from dblocks import assemble, logs
from dblocks.checkpoint import write_json_atomic
from experiments.common import run_main, user_errors


def define_option_flags() -> Callable[[], dict]:
    """Defines the evaluation-option flags; returns a function that gives {option: value} of those set."""
    defined = [
        flags.DEFINE_integer("grid_points", None, "noise levels the chain visits = block calls with Euler "
                                                  "(dit, vit, ar, recurrent; default: the config's sample.grid_points)"),
        flags.DEFINE_integer("steps", None, "masked diffusion: unmasking steps (default: the config's sample.steps)"),
        flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver"),
        flags.DEFINE_integer("limit", None, "evaluate on the first N test examples only"),
        flags.DEFINE_integer("num_samples", None, "generated samples per FID evaluation (paper: 10,000)"),
        flags.DEFINE_integer("repeats", None, "independent FID evaluations; the minimum is reported (paper: 3)"),
        flags.DEFINE_integer("batch_size", None, "evaluation batch size"),
        flags.DEFINE_integer("seed", None, "evaluation seed"),
        flags.DEFINE_string("cache_dir", None, "artifact cache (FID feature network; default ~/.cache/dblocks)"),
    ]
    opt = flags.DEFINE_multi_string("opt", [], "any other task option, key=value (value parsed as a Python "
                                               "literal when it is one)")

    def options() -> dict:
        out = {f.name: f.value for f in defined if f.value is not None}
        for item in opt.value:
            key, sep, value = item.partition("=")
            if not sep:
                raise app.UsageError(f"--opt {item!r}: use key=value")
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
        return out

    return options


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
    for key in ("headline", "block_calls_per_sample"):
        if key not in result:
            raise RuntimeError(f"task {run.config.task!r}: evaluate() returned no {key!r} (see dblocks/tasks/base.py)")
    write_json_atomic(out or os.path.join(workdir, "eval.json"), result)
    return result


def main(argv):
    del argv
    logs.setup()
    with user_errors():
        result = evaluate_workdir(_WORKDIR.value, _METHOD.value, not _NO_EMA.value, _OUT.value, **_OPTIONS())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    _WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
    _METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
    _OUT = flags.DEFINE_string("out", None, "output JSON (default WORKDIR/eval.json)")
    _NO_EMA = flags.DEFINE_bool("no_ema", False, "use the raw weights instead of their EMA")
    _OPTIONS = define_option_flags()
    flags.mark_flags_as_required(["workdir"])
    run_main(main)
