"""The evaluation-option flags shared by experiments.evaluate and experiments.compare."""
from __future__ import annotations

import ast
from typing import Callable

from absl import app, flags

from dblocks import sampling


def define_option_flags() -> Callable[[], dict]:
    """Defines the evaluation-option flags; returns a function that gives {option: value} of those set."""
    defined = [
        flags.DEFINE_integer("grid_points", None, "block calls per sample: the noise levels the chain visits (with "
                                                  "Euler), or masked diffusion's unmasking steps (default: the "
                                                  "config's sample.grid_points)"),
        flags.DEFINE_enum("solver", None, list(sampling.ALL_SOLVERS), "solver (ancestral: language models only)"),
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
