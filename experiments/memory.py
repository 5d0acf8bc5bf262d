r"""Compiled memory of one block-training step against one end-to-end step of a config (nothing is trained).

  python -m experiments.memory --config experiments/configs/cifar10_dit.py [--json] [--batch_size N]

Works on a CPU for paper-sized configs: XLA's memory analysis of the compiled step is exact on any backend.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from dblocks import config as config_lib
from dblocks import logs
from dblocks import memory
from dblocks.tasks import get_task
from experiments.common import user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")
_BATCH = flags.DEFINE_integer("batch_size", None, "batch size (default: the config's)")
flags.mark_flags_as_required(["config"])


def _mib(b: int) -> str:
    return f"{b / 2**20:10.1f}"


def main(argv):
    del argv
    logs.setup()
    config = _CONFIG.value
    with user_errors():
        config_lib.validate(config)
        report = memory.memory_report(get_task(config), _BATCH.value)
    if _JSON.value:
        print(json.dumps(report))
        return
    b, e = report["block"], report["e2e"]
    print(f"compiled training-step memory, batch {report['batch_size']}, {report['num_layers']} layers, "
          f"B={report['num_blocks']} (MiB)")
    print(f"{'':22s}{'params':>10s}{'opt state':>10s}{'ema':>10s}{'temps':>10s}{'total':>10s}")
    for name, r in ((f"block ({b['layers']} layers)", b), (f"end-to-end ({e['layers']})", e)):
        print(f"{name:22s}{_mib(r['params_bytes'])}{_mib(r['opt_state_bytes'])}{_mib(r['ema_bytes'])}"
              f"{_mib(r['temp_bytes'])}{_mib(r['total_bytes'])}")
    print(f"block / end-to-end = {report['ratio']:.3f}   (ideal 1/B = {1 / report['num_blocks']:.3f})")


if __name__ == "__main__":
    app.run(main)
