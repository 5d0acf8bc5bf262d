r"""Samples from a trained run (DiffusionBlocks or end-to-end; detected from the workdir).

  python -m experiments.sample --workdir runs/fmnist_dit --out grid.png [--steps 50] [--solver heun] [--guidance 2]

Each step of the equal-CDF grid is run by the block that owns its sigma, highest noise first.
"""
import json

from absl import app, flags

from dblocks import assemble, logs
from experiments.common import user_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
_OUT = flags.DEFINE_string("out", None, "output file (default WORKDIR/samples.png)")
_METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
_STEPS = flags.DEFINE_integer("steps", None, "grid points (default: the config's sample.steps; paper 50)")
_SOLVER = flags.DEFINE_enum("solver", None, ["euler", "heun"], "ODE solver (paper: euler)")
_GUIDANCE = flags.DEFINE_float("guidance", None, "classifier-free guidance scale (paper: 2.0)")
_PER_CLASS = flags.DEFINE_integer("per_class", None, "samples per class (one grid row per class)")
_GRID = flags.DEFINE_enum("grid", "cdf", ["cdf", "karras"], "sigma grid: equal-CDF (paper) or Karras rho=7")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "use the raw weights instead of their EMA")
_PROMPT = flags.DEFINE_string("prompt", None, "text tasks: the prompt (default: passages of the test split)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "text tasks: tokens to generate per sample")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    logs.setup()
    with user_errors():
        run = assemble.load_run(_WORKDIR.value, method=_METHOD.value, use_ema=not _NO_EMA.value)
        out = _OUT.value or f"{_WORKDIR.value}/samples{'_e2e' if run.method == 'e2e' else ''}.png"
        summary = run.task.write_samples(run, out, steps=_STEPS.value, solver=_SOLVER.value,
                                         guidance=_GUIDANCE.value, per_class=_PER_CLASS.value, seed=_SEED.value,
                                         grid_kind=_GRID.value, prompt=_PROMPT.value,
                                         max_tokens=_MAX_TOKENS.value)
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
