r"""Converts a trained end-to-end run into DiffusionBlocks: every block's step-0 checkpoint from its slice of the
e2e layers, with its own copies of the embedders and head (dblocks/convert.py, docs/conversion.md).

  python -m experiments.convert --from runs/fmnist_dit_e2e --to runs/fmnist_dit_conv
  python -m experiments.convert --from W_e2e --to W_blocks --config experiments/configs/fashion_mnist_dit.py
  python -m experiments.train --config experiments/configs/fashion_mnist_dit.py --workdir runs/fmnist_dit_conv

The second step trains each block independently on its own range, starting from the converted weights (a fresh
optimizer); --config (default: the e2e run's own config) sets B, the layer split and the training of the blocks, and
must be the config `experiments.train` is then given.
"""
import json
import logging

from absl import flags
from ml_collections import config_flags

from dblocks import convert, logs, paths
from experiments.common import run_main

_FROM = flags.DEFINE_string("from", None, "a trained end-to-end workdir")
_TO = flags.DEFINE_string("to", None, "the new DiffusionBlocks workdir")
_CONFIG = config_flags.DEFINE_config_file("config", None, "the blocks' config (default: the e2e run's)")
flags.mark_flags_as_required(["from", "to"])
paths.refuse_remote_flags(_FROM, _TO)


def main(argv):
    del argv
    logs.setup(logging.INFO)
    config = _CONFIG.value
    summary = convert.convert(_FROM.value, _TO.value, config)
    for b in summary["blocks"]:
        logs.log.info("%s <- e2e layers %s: %d copied, %d zero-initialised (%s), %d kept at init", b["unit"],
                      b["layers"], b["copied"], len(b["zeros"]), ", ".join(b["zeros"][:6]) or "-", b["init"])
    print(json.dumps({"from": summary["from"], "to": _TO.value, "blocks": len(summary["blocks"])}))


if __name__ == "__main__":
    run_main(main)
