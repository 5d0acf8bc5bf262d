r"""Evaluates a trained run (DiffusionBlocks or end-to-end; detected from the workdir) on its validation split, or
with --split=test on its test split.

  python -m experiments.evaluate --workdir runs/my_vit                      # validation -> runs/my_vit/eval.json
  python -m experiments.evaluate --workdir runs/my_vit --grid_points 10     # more block calls, still validation
  python -m experiments.evaluate --workdir runs/fmnist_vit --split test     # the figure to report
  python -m experiments.evaluate --workdir runs/fmnist_dit --split test --num_samples 2000 --repeats 3

Choose settings (grid points, solver, guidance, ...) on the validation split, then evaluate the chosen one once on
test, choosing nothing by it. Data without a validation split (Fashion-MNIST trained with data.val_fraction=0, the
default) is refused for --split=validation with what to do (docs/data.md, "Splits").

Task-agnostic: it assembles the run and calls `run.task.evaluate(run, **options)` (contract in
dblocks/tasks/base.py). Only the options given on the command line are passed; a task ignores those it has no use
for. Common options: grid_points (block calls per sample: the noise levels the chain visits, or MDM's unmasking
steps), solver, limit (test examples), num_samples and repeats (generation), batch_size, seed, cache_dir (artifacts
such as the FID feature network); any other as --opt key=value.
"""
from __future__ import annotations

import json

from absl import flags

from dblocks import logs, paths, runtime
from dblocks.evaluation import evaluate_workdir
from experiments.common import run_main
from experiments.options import define_option_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
_METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
_OUT = flags.DEFINE_string("out", None, "output JSON (default WORKDIR/eval.json)")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "use the raw weights instead of their EMA")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"],
                           "evaluation split: validation while choosing settings, test for the reported figure")
_OPTIONS = define_option_flags()
flags.mark_flags_as_required(["workdir"])
paths.refuse_remote_flags(_WORKDIR, _OUT)


def main(argv):
    del argv
    logs.setup()
    runtime.setup()
    result = evaluate_workdir(_WORKDIR.value, _METHOD.value, not _NO_EMA.value, _OUT.value,
                              **{**_OPTIONS(), "split": _SPLIT.value})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
