r"""Compiled memory and FLOPs of the end-to-end and the block training step, each without and with remat
(nothing is trained unless --time is given).

  python -m experiments.memory --config experiments/configs/cifar10_dit.py [--json] [--batch_size N]
      [--remat full|dots] [--time [--time_steps 3]] [--vocab_size 32000]

Four rows: e2e, e2e + remat, block (the largest), block + remat. "remat" = scanned layers + the policy --remat
(model.scan_layers=True, model.remat=...). Other model options given as --config.model.x=v (e.g. attention=chunked,
mlp_chunk=256: docs/performance.md, "Attention and MLP in O(T) memory") apply to all four rows. Memory is split
into state (parameters, optimizer state, EMA, batch: arguments + outputs - donated aliases) and temporaries
(activations and workspaces). Works on a CPU for paper-sized configs: XLA's memory and cost analyses of the
compiled step are exact on any backend. --time also runs each step on zero data on this machine (slow for paper
configs).
"""
import json

from absl import flags
from ml_collections import config_flags

from dblocks import config as config_lib
from dblocks import logs
from dblocks import memory
from dblocks.tasks import get_task
from experiments.common import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
_BATCH = flags.DEFINE_integer("batch_size", None, "batch size (default: the config's)")
_REMAT = flags.DEFINE_string("remat", "full", "remat policy of the '+ remat' rows: full, dots, or a "
                             "jax.checkpoint_policies name")
_TIME = flags.DEFINE_bool("time", False, "also measure the step time on this machine (runs the steps)")
_TIME_STEPS = flags.DEFINE_integer("time_steps", 3, "timed steps per row with --time (median; after 1 warm-up)")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "language configs: a stand-in vocabulary of this size (e.g. 32000 "
                               "for lm1b_ar when its SentencePiece model is not on this machine)")
flags.mark_flags_as_required(["config"])


def _mib(b: float) -> str:
    return f"{b / 2**20:11.1f}"


def table(report: dict, model=None) -> str:
    """The four-row table as text (MiB, GFLOP, seconds); `model` (config.model): its attention and chunk options
    are named in the header."""
    chunks = ""
    if model is not None:
        chunks = (f"; attention {model.get('attention', 'xla')} (chunk {model.get('attention_chunk', 128)}), "
                  f"mlp_chunk {model.get('mlp_chunk', 0)}")
    lines = [f"compiled training-step memory, batch {report['batch_size']}, {report['num_layers']} layers, "
             f"B={report['num_blocks']}{'; V=' + str(report['vocab_size']) if report.get('vocab_size') else ''}; "
             f"remat = scanned layers + policy '{report['remat_policy']}'{chunks} (MiB)",
             f"{'':26s}{'params':>11s}{'opt state':>11s}{'state':>11s}{'temps':>11s}{'total':>11s}"
             f"{'GFLOP/step':>12s}{'s/step':>9s}"]
    for key, label in (("e2e", "end-to-end ({})"), ("e2e_remat", "end-to-end + remat ({})"),
                       ("block", "block ({})"), ("block_remat", "block + remat ({})")):
        if key not in report:
            continue
        r = report[key]
        t = f"{r['step_seconds']:9.2f}" if "step_seconds" in r else f"{'-':>9s}"
        lines.append(f"{label.format(r['layers']):26s}{_mib(r['params_bytes'])}{_mib(r['opt_state_bytes'])}"
                     f"{_mib(r['state_bytes'])}{_mib(r['temp_bytes'])}{_mib(r['total_bytes'])}"
                     f"{r['flops'] / 1e9:12.1f}{t}")
    if "ratio" in report:
        lines.append(f"block / end-to-end = {report['ratio']:.3f}; with remat {report.get('remat_ratio', 0):.3f}; "
                     f"block / (end-to-end + remat) = "
                     f"{report['block_step_bytes'] / report['e2e_remat_step_bytes']:.3f}   "
                     f"(ideal 1/B = {1 / report['num_blocks']:.3f})")
    return "\n".join(lines)


def main(argv):
    del argv
    logs.setup()
    config = _CONFIG.value
    config_lib.validate(config)
    report = memory.memory_report(get_task(config), _BATCH.value, _REMAT.value,
                                  _TIME_STEPS.value if _TIME.value else 0, vocab_size=_VOCAB.value)
    print(json.dumps(report) if _JSON.value else table(report, config.model))


if __name__ == "__main__":
    run_main(main)
