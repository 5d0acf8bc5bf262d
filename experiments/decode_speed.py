r"""Token decoding speed of a source tree's own `task.generate`, for comparisons across commits
(docs/performance.md, "Compiled decoding"): untrained parameters (random, non-zero) of `shakespeare_ar` or
--config, the config's default sampler, 64 (or --batch) prompts of 8 tokens, 96 new tokens; one compiling call,
then the best of 3.

  git archive 7d57d47 | tar -x -C /tmp/old          # the code to compare with
  python -m experiments.decode_speed --src /tmp/old --method dblocks --batch 64
  python -m experiments.decode_speed --method dblocks --batch 64       # this checkout

Prints one JSON line (tokens/s, block calls per token, load average). Run the two alternately on an idle machine:
single runs on the 2-core CPU move by +-20 %. The parameters come from each tree's `tests/test_ar.random_run`, so
pytest must be importable (it is in requirements.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="", help="a checkout of dblocks to measure (default: this one)")
    ap.add_argument("--config", default="shakespeare_ar", help="a module of experiments/configs (AR or recurrent)")
    ap.add_argument("--method", default="dblocks", choices=["dblocks", "e2e"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.batch < 1 or a.tokens < 1 or a.repeats < 1:
        ap.error("--batch, --tokens and --repeats must be >= 1")
    if a.src:
        if not os.path.isfile(os.path.join(a.src, "dblocks", "__init__.py")):
            ap.error(f"--src {a.src!r}: no dblocks package there")
        for m in [m for m in sys.modules if m.split(".")[0] in ("dblocks", "experiments", "tests")
                  and m != __name__]:
            del sys.modules[m]   # the other tree's packages, not this one's
        sys.path.insert(0, os.path.abspath(a.src))
    import importlib

    import numpy as np

    import dblocks
    from tests.test_ar import random_run
    try:
        config = importlib.import_module(f"experiments.configs.{a.config}").get_config()
    except ModuleNotFoundError:
        ap.error(f"--config {a.config!r}: no such module in experiments/configs of that tree")
    if config.task not in ("ar", "recurrent"):
        ap.error(f"--config {a.config!r} is a {config.task!r} config; decoding speed needs 'ar' or 'recurrent'")
    run = random_run(config, a.method)
    prompts = np.random.default_rng(0).integers(0, 60, (a.batch, 8)).astype(np.int32)
    _, calls = run.task.generate(run, prompts, a.tokens, seed=0)
    times = []
    for s in range(a.repeats):
        t0 = time.perf_counter()
        run.task.generate(run, prompts, a.tokens, seed=s + 1)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"src": os.path.dirname(os.path.dirname(os.path.abspath(dblocks.__file__))),
                      "config": a.config, "method": a.method, "batch": a.batch, "new_tokens": a.tokens,
                      "block_calls_per_token": int(calls),
                      "tokens_per_s": round(a.batch * a.tokens / min(times), 1), "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
