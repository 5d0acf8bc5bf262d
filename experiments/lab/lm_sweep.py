r"""Sampler sweep for a trained language DiffusionBlocks run: the teacher-forced read-outs of several samplers (grid,
solver, bridge) on one run, in one process (each block's compiled pass is reused across arms), without generation.

  python -m experiments.lab.lm_sweep --workdir runs/lm/db_lik_s0 --split validation --limit 64 --out sweep.json \
      --arm "euler4=solver=euler,bridge=softmax,grid=80;0.45;0.2;0.1" \
      --arm "anc4=solver=ancestral,bridge=sample,grid=80;0.45;0.2;0.1"

An arm is NAME=key=value,... over the sampler options of the language tasks' sampler_options
(dblocks.tasks.lm.inference) (grid levels separated by ';'; grid_points=N with grid= empty for the CDF grid). Each arm
reports sampler_bits (the final softmax averaged over --draws chains), first_call_bits, final_entropy_bits, accuracy and
block calls per token; the ELBO (which does not depend on the sampler) is computed once. Choose settings on --split
validation; report on test.
"""
from __future__ import annotations

import json
import time

from absl import flags

from dblocks import assemble, paths
from dblocks.checkpoint import write_json_atomic
from dblocks.config import ConfigError
from experiments.common import run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained ar or recurrent DiffusionBlocks workdir", required=True)
_ARMS = flags.DEFINE_multi_string("arm", [], "NAME=key=value,... (see the module docstring)")
_SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "held-out split")
_LIMIT = flags.DEFINE_integer("limit", 64, "windows scored")
_DRAWS = flags.DEFINE_integer("draws", 8, "chain draws averaged per position")
_ELBO = flags.DEFINE_bool("elbo", True, "also compute the ELBO (once)")
_OUT = flags.DEFINE_string("out", None, "JSON output")
paths.refuse_remote_flags(_WORKDIR, _OUT)


def parse_arm(spec: str) -> tuple[str, dict]:
    """'NAME=k=v,k=v' -> (NAME, {k: v}); numbers are converted, grid levels separated by ';'."""
    if "=" not in spec:
        raise ConfigError(f"arm {spec!r}: expected NAME=key=value,...")
    name, rest = spec.split("=", 1)
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            if k == "grid":
                opts[k] = v.replace(";", ",")
            elif k in ("grid_points",):
                opts[k] = int(v)
            elif k in ("sigma_end", "temperature", "top_p"):
                opts[k] = float(v)
            elif k == "greedy":
                opts[k] = v.lower() in ("1", "true", "yes")
            else:
                opts[k] = v
        except ValueError:
            raise ConfigError(f"arm {spec!r}: {k}={v!r} is not a number") from None
    return name, opts


def main(argv):
    del argv
    arms = [parse_arm(a) for a in _ARMS.value]   # bad specs fail before anything is loaded
    run = assemble.load_run(_WORKDIR.value)
    task = run.task
    windows = task.heldout_windows(_LIMIT.value, _SPLIT.value)
    bs = int(task.config.eval.batch_size)
    out = {"workdir": _WORKDIR.value, "split": _SPLIT.value, "windows": int(len(windows)), "draws": _DRAWS.value,
           "arms": {}}
    if _ELBO.value and run.method == "dblocks":
        t0 = time.perf_counter()
        out["elbo"] = task.elbo(run, windows, int(task.config.eval.elbo_sigmas), bs, 0)
        print(f"elbo {out['elbo']['elbo_bits']:.3f} bits ({time.perf_counter() - t0:.0f} s)", flush=True)
    for name, opts in arms:
        t0 = time.perf_counter()
        sampler = task.sampler_options(run, **opts)
        sc = task.score_windows(run, windows, _DRAWS.value, bs, 0, sampler)
        row = {"sampler": sampler.to_dict(), "sampler_bits": sc["bits"], "accuracy": sc["accuracy"],
               "final_entropy_bits": sc["entropy"], "mixture_entropy_bits": sc["mixture_entropy"],
               "first_call_bits": sc.get("per_step_bits", [None])[0], "per_step_bits": sc.get("per_step_bits")}
        out["arms"][name] = row
        print(f"{name:>12}: sampler {row['sampler_bits']:.3f}  first {row['first_call_bits']:.3f}  "
              f"final-entropy {row['final_entropy_bits']:.2f}  calls {sampler.calls_per_token}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if _OUT.value:
        write_json_atomic(_OUT.value, out)
    print(json.dumps({k: v["sampler_bits"] for k, v in out["arms"].items()}))


if __name__ == "__main__":
    run_main(main)
