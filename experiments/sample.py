r"""Samples from a trained run (DiffusionBlocks or end-to-end; detected from the workdir) or an exported model.

  python -m experiments.sample --workdir runs/fmnist_dit --out grid.png [--grid_points 50] [--solver heun] [--guidance 2]
  python -m experiments.sample --model fmnist_dit.npz --out grid.png          # an experiments.export file
  python -m experiments.sample --workdir runs/cifar10_dit --npz samples.npz --num 50000   # for FID tools

Each step of the equal-CDF grid is run by the block that owns its sigma, highest noise first. --npz writes
`arr_0` (uint8 [N, H, W, C]) and `arr_1` (int32 class labels, balanced), the layout of the guided-diffusion / ADM
evaluator's sample batches; clean-fid, torch-fidelity and pytorch-fidelity read it after unpacking to PNGs, or directly.
"""
import json

from absl import app, flags

from dblocks import assemble, export, logs, paths, sampling
from experiments.common import run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
_MODEL = flags.DEFINE_string("model", None, "an exported model (.npz from experiments.export) instead of a workdir")
_OUT = flags.DEFINE_string("out", None, "output file (default WORKDIR/samples.png)")
_NPZ = flags.DEFINE_string("npz", None, "image generation: write --num samples as arrays to this .npz (no grid)")
_NUM = flags.DEFINE_integer("num", 10_000, "with --npz: number of samples (class-balanced)")
_BATCH = flags.DEFINE_integer("batch_size", 250, "with --npz: samples per sampler call")
_METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
_GRID_POINTS = flags.DEFINE_integer("grid_points", None, "EDM tasks: noise levels the chain visits (default: the "
                                    "config's sample.grid_points; paper 50)")
_STEPS = flags.DEFINE_integer("steps", None, "MDM: unmasking steps (for the other tasks, as --grid_points)")
_SOLVER = flags.DEFINE_enum("solver", None, list(sampling.ALL_SOLVERS),
                             "solver (paper: euler; ancestral: language models only)")
_GUIDANCE = flags.DEFINE_float("guidance", None, "classifier-free guidance scale (paper: 2.0)")
_PER_CLASS = flags.DEFINE_integer("per_class", None, "samples per class (one grid row per class)")
_GRID = flags.DEFINE_enum("grid", None, list(sampling.GRID_KINDS), "sigma grid: equal-CDF (paper) or Karras rho=7 "
                           "(default: the config's sample.grid_kind, else cdf)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "use the raw weights instead of their EMA")
_PROMPT = flags.DEFINE_string("prompt", None, "text tasks: the prompt (default: passages of the test split)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "text tasks: tokens to generate per sample")
paths.refuse_remote_flags(_WORKDIR, _MODEL, _OUT, _NPZ)


def load(workdir: str | None, model: str | None, method: str | None, use_ema: bool) -> assemble.Run:
    """The run to sample: an exported model, or a workdir's blocks."""
    if bool(workdir) == bool(model):
        raise app.UsageError("give exactly one of --workdir and --model")
    if model:
        return export.load_model(model)
    return assemble.load_run(workdir, method=method, use_ema=use_ema)


def write_npz(run: assemble.Run, path: str, num: int, seed: int, batch_size: int, **options) -> dict:
    import numpy as np
    images, labels = export.sample_images(run, num, seed=seed, batch_size=batch_size, **options)
    np.savez(path, arr_0=images, arr_1=labels)
    return {"path": path, "images": int(len(images)), "shape": list(images.shape[1:]), "dtype": "uint8"}


def main(argv):
    del argv
    logs.setup()
    run = load(_WORKDIR.value, _MODEL.value, _METHOD.value, not _NO_EMA.value)
    steps = _GRID_POINTS.value or _STEPS.value
    sampler = {"steps": steps, "grid_points": steps, "solver": _SOLVER.value, "guidance": _GUIDANCE.value,
               "grid_kind": _GRID.value}
    if _NPZ.value:
        summary = write_npz(run, _NPZ.value, _NUM.value, _SEED.value, _BATCH.value, **sampler)
    else:
        base = _WORKDIR.value or _MODEL.value.removesuffix(".npz")
        out = _OUT.value or (f"{base}/samples{'_e2e' if run.method == 'e2e' else ''}.png" if _WORKDIR.value
                             else f"{base}_samples.png")
        summary = run.task.write_samples(run, out, per_class=_PER_CLASS.value, seed=_SEED.value,
                                         prompt=_PROMPT.value, max_tokens=_MAX_TOKENS.value, **sampler)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_main(main)
