"""The `dblocks` command (pyproject [project.scripts]): `dblocks SUBCOMMAND ARGS` runs `python -m
experiments.SUBCOMMAND ARGS`, from any folder once the package is installed (`pip install -e .`).

A console script does not put the current folder on sys.path, so a user's own `experiments/` folder cannot shadow the
installed entry points here (it can with `python -m experiments.train` run from that folder). Each subcommand keeps
its own flags: `dblocks train --help`.
"""
from __future__ import annotations

import os
import runpy
import sys

SUBCOMMANDS = {
    "train": "train a run's blocks (or its end-to-end baseline); rerun to resume",
    "sample": "samples of a trained run or an exported model (a grid, or --npz / --png_dir for FID tools)",
    "evaluate": "evaluate a trained run on its test split (accuracy, FID, bits, ...)",
    "export": "export a trained run's weights to one .npz (dblocks.load_model)",
    "convert": "convert a trained end-to-end run into DiffusionBlocks",
    "memory": "compiled training-step memory of blocks against end-to-end (compiles only)",
    "bench": "training-step and sampling speed of blocks against end-to-end",
    "compare": "train DiffusionBlocks and the end-to-end baseline and compare them",
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {what}" for name, what in SUBCOMMANDS.items())
    return (f"usage: dblocks SUBCOMMAND [FLAGS]   (dblocks SUBCOMMAND --help lists its flags)\n\n"
            f"DiffusionBlocks in JAX: transformers trained block by block as denoisers.\n\nsubcommands:\n{rows}\n")


def _with_hugepages() -> None:
    """Re-executes the same command line once with glibc's malloc on transparent huge pages, as `python -m
    experiments.X` does (dblocks/hugepages.py); nothing when it is already on, off, or not available."""
    from dblocks import hugepages
    env = hugepages.environ_with_hugepages()
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: list[str] | None = None) -> None:
    """`dblocks SUBCOMMAND ARGS`: runs experiments.SUBCOMMAND as `python -m` would, with argv ['dblocks SUBCOMMAND',
    *ARGS]; exit status 2 for an unknown subcommand."""
    own = argv is None   # the process's own command line, which can be re-executed with huge pages
    argv = sys.argv[1:] if own else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    name, args = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{usage()}", end="", file=sys.stderr)
        sys.exit(2)
    if own:
        _with_hugepages()
    sys.argv = [f"dblocks {name}", *args]
    runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
