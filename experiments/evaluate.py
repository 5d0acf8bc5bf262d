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

import json

from absl import flags

from dblocks import logs, runtime
from dblocks.evaluation import evaluate_workdir
from experiments.common import run_main
from experiments.options import define_option_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
_METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
_OUT = flags.DEFINE_string("out", None, "output JSON (default WORKDIR/eval.json)")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "use the raw weights instead of their EMA")
_OPTIONS = define_option_flags()
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logs.setup()
    runtime.setup()
    result = evaluate_workdir(_WORKDIR.value, _METHOD.value, not _NO_EMA.value, _OUT.value, **_OPTIONS())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
