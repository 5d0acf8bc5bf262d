r"""Exports a trained run to one .npz: the weights of every block (their EMA unless --no_ema), the config and the
partition, without optimizer state. Load it with `dblocks.load_model(path)`.

  python -m experiments.export --workdir runs/fmnist_dit --out fmnist_dit.npz [--method e2e] [--no_ema]
"""
import json

from absl import flags

from dblocks import export, logs, paths
from experiments.common import run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
_OUT = flags.DEFINE_string("out", None, "the .npz to write")
_METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "export the raw weights instead of their EMA")
_ALLOW_INCOMPLETE = flags.DEFINE_bool("allow_incomplete", False, "export blocks that have not finished training")
flags.mark_flags_as_required(["workdir", "out"])
paths.refuse_remote_flags(_WORKDIR, _OUT)


def main(argv):
    del argv
    logs.setup()
    summary = export.export_workdir(_WORKDIR.value, _OUT.value, method=_METHOD.value, use_ema=not _NO_EMA.value,
                                    allow_incomplete=_ALLOW_INCOMPLETE.value)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_main(main)
