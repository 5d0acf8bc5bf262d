r"""Trains a DiffusionBlocks run (all blocks, or those named by --config.blocks.train) or its end-to-end baseline.

  python -m experiments.train --config experiments/configs/fashion_mnist_dit.py --workdir runs/fmnist_dit
  python -m experiments.train --config ... --workdir W --config.blocks.train=1      # one block (any host, any time)
  python -m experiments.train --config ... --workdir W --config.method=e2e          # the end-to-end baseline

Running the same command again resumes every unfinished block from its latest checkpoint.
Blocks side by side on a device mesh, and multi-host runs (docs/scale_out.md):

  python -m experiments.train --config ... --workdir W --config.parallel.mode=mesh [--config.parallel.data=2]
  python -m experiments.train --multihost --config ... --workdir W --config.parallel.mode=mesh   # on every host

Every field of a config, with its default and meaning: `python -m experiments.train --config C --help_config`.
On a multi-core CPU, --config.parallel.cpu_devices=2 (or the core count) splits each step's batch over that many
host devices: faster steps, the same losses to float tolerance (docs/lab/performance.md "Two CPU devices").
"""
import logging
import os

import jax
from absl import flags
from ml_collections import config_flags

from dblocks import assemble, logs, parallel, paths, runtime
from dblocks import train as train_lib
from dblocks import config as config_lib
from experiments.common import run_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first (one process per host; "
                                "also done when JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set)")
_HELP_CONFIG = flags.DEFINE_bool("help_config", False, "print every field of the config (defaults included) with its "
                                  "value and meaning, then exit")
flags.mark_flags_as_required(["config"])


def _workdir_given(f: dict) -> bool:
    """--workdir is required (unless --help_config) and not blank."""
    if f["help_config"]:
        return True
    if f["workdir"] is None:
        raise flags.ValidationError("--workdir is required")
    if not f["workdir"].strip():
        raise flags.ValidationError("--workdir is empty: name the folder the run writes into")
    return True


flags.register_multi_flags_validator(["workdir", "help_config"], _workdir_given)
paths.refuse_remote_flags(_WORKDIR)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train; then, when every unit of the run is finished, plot the losses and write samples."""
    train_lib.train(config, workdir)
    out = {}
    if jax.process_count() > 1:  # one process writes shared files; sample afterwards with experiments.sample
        if config.train.plot_at_end and jax.process_index() == 0:
            out["loss_plot"] = logs.plot_losses(workdir)
        return out
    if config.train.plot_at_end:
        out["loss_plot"] = logs.plot_losses(workdir)
    if config.train.sample_at_end:
        try:
            run = assemble.load_run(workdir, method=config.method)
        except assemble.AssemblyError as e:
            logs.log.info("not sampling yet: %s", e)
            return out
        path = os.path.join(workdir, "samples.png" if config.method == "dblocks" else "samples_e2e.png")
        out["samples"] = run.task.write_samples(run, path)
        logs.log.info("samples: %s", out["samples"])
    return out


def main(argv):
    del argv
    config = _CONFIG.value
    if _HELP_CONFIG.value:
        print(config_lib.describe(config))
        return
    runtime.split_cpu(config.parallel.cpu_devices)  # before any backend starts
    parallel.init_distributed(_MULTIHOST.value)  # before anything touches a device
    logs.setup(logging.INFO if jax.process_index() == 0 else logging.WARNING)  # process 0 logs
    runtime.setup()   # compilation cache; backend, devices and jax version in the log
    if jax.process_count() > 1 and parallel.settings(config)[0] != "mesh":
        raise config_lib.ConfigError(f"{jax.process_count()} processes need --config.parallel.mode=mesh (the "
                                     f"sequential engine trains on one device of one process)")
    train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    run_main(main)
