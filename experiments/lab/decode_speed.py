r"""Token decoding speed of `task.generate` (docs/lab/performance.md): untrained parameters
(random, non-zero: `dblocks.assemble.random_run`) of an ar or recurrent --config, its default sampler, 64 (or --batch)
prompts of 8 tokens, 96 new tokens; one compiling call, then the best of 3.

  python -m experiments.lab.decode_speed --config experiments/configs/shakespeare_ar.py --method dblocks --batch 64
  python -m experiments.lab.decode_speed --config experiments/configs/shakespeare_recurrent.py --method e2e

Prints one JSON line (tokens/s, block calls per token, load average). Single runs on a 2-core CPU move by +-20 %:
compare variants run alternately on an idle machine.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from dblocks import assemble
from dblocks.config import ConfigError
from experiments.common import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "an ar or recurrent config file", lock_config=True)
_METHOD = flags.DEFINE_enum("method", "dblocks", ["dblocks", "e2e"], "the blocks or the end-to-end baseline")
_BATCH = flags.DEFINE_integer("batch", 64, "prompts decoded at once", lower_bound=1)
_TOKENS = flags.DEFINE_integer("tokens", 96, "new tokens per prompt", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls (the best is reported)", lower_bound=1)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    config = _CONFIG.value
    if config.task not in ("ar", "recurrent"):
        raise ConfigError(f"--config is a {config.task!r} config; decoding speed needs 'ar' or 'recurrent'")
    run = assemble.random_run(config, _METHOD.value)
    prompts = np.random.default_rng(0).integers(0, 60, (_BATCH.value, 8)).astype(np.int32)
    _, calls = run.task.generate(run, prompts, _TOKENS.value, seed=0)
    times = []
    for s in range(_REPEATS.value):
        t0 = time.perf_counter()
        run.task.generate(run, prompts, _TOKENS.value, seed=s + 1)
        times.append(time.perf_counter() - t0)
    name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
    print(json.dumps({"config": name, "method": _METHOD.value, "batch": _BATCH.value, "new_tokens": _TOKENS.value,
                      "block_calls_per_token": int(calls),
                      "tokens_per_s": round(_BATCH.value * _TOKENS.value / min(times), 1),
                      "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    run_main(main)
