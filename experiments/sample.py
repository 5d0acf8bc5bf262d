r"""Samples from a trained run (DiffusionBlocks or end-to-end; detected from the workdir) or an exported model.

  python -m experiments.sample --workdir runs/fmnist_dit --out grid.png \
      [--grid_points 50] [--solver heun] [--guidance 2]
  python -m experiments.sample --model fmnist_dit.npz --out grid.png          # an experiments.export file
  python -m experiments.sample --workdir runs/cifar10_dit --npz samples.npz --png_dir samples/ --num 10000  # for FID

Each step of the equal-CDF grid is run by the block that owns its sigma, highest noise first. --npz writes
`arr_0` (uint8 [N, H, W, C]) and `arr_1` (int32 class labels, balanced), the layout of the guided-diffusion (ADM)
evaluator's sample batches, which reads it directly. --png_dir writes the same N images as PNG files
(000000.png, ...), the folder that clean-fid and torch-fidelity read (docs/fid.md has the commands).
"""
import json

from absl import app, flags

from dblocks import assemble, export, logs, paths, sampling
from experiments.common import run_main

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained workdir")
_MODEL = flags.DEFINE_string("model", None, "an exported model (.npz from experiments.export) instead of a workdir")
_OUT = flags.DEFINE_string("out", None, "output file (default WORKDIR/samples.png)")
_NPZ = flags.DEFINE_string("npz", None, "image generation: write --num samples as arrays to this .npz (no grid)")
_PNG_DIR = flags.DEFINE_string("png_dir", None, "image generation: write --num samples as PNG files into this folder "
                                "(for clean-fid / torch-fidelity; with or without --npz)")
_NUM = flags.DEFINE_integer("num", 10_000, "with --npz / --png_dir: number of samples (class-balanced)")
_BATCH = flags.DEFINE_integer("batch_size", 250, "with --npz / --png_dir: samples per sampler call")
_METHOD = flags.DEFINE_enum("method", None, ["dblocks", "e2e"], "which run of the workdir (default: detected)")
_GRID_POINTS = flags.DEFINE_integer("grid_points", None, "block calls per sample: the noise levels the chain visits "
                                    "(paper 50 for DiT), or masked diffusion's unmasking steps (default: the config's "
                                    "sample.grid_points)")
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
paths.refuse_remote_flags(_WORKDIR, _MODEL, _OUT, _NPZ, _PNG_DIR)


def load(workdir: str | None, model: str | None, method: str | None, use_ema: bool) -> assemble.Run:
    """The run to sample: an exported model, or a workdir's blocks."""
    if bool(workdir) == bool(model):
        raise app.UsageError("give exactly one of --workdir and --model")
    if model:
        return export.load_model(model)
    return assemble.load_run(workdir, method=method, use_ema=use_ema)


def write_images(run: assemble.Run, num: int, seed: int, batch_size: int, npz: str | None, png_dir: str | None,
                 **options) -> dict:
    """`num` class-balanced samples to an .npz (arr_0 images, arr_1 labels) and / or a folder of PNGs."""
    import numpy as np
    images, labels = export.sample_images(run, num, seed=seed, batch_size=batch_size, **options)   # uint8 [N, H, W, C]
    out = {"images": int(len(images)), "shape": list(images.shape[1:]), "dtype": "uint8"}
    if npz:
        np.savez(npz, arr_0=images, arr_1=labels)
        out["npz"] = npz
    if png_dir:
        out["png_dir"] = write_pngs(images, png_dir)
    return out


def write_pngs(images, folder: str) -> str:
    """uint8 images [N, H, W, C] (C = 1 or 3) as folder/000000.png, ...: grayscale or RGB, losslessly."""
    import os

    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(os.path.join(folder, f"{i:06d}.png"))
    return folder


def main(argv):
    del argv
    logs.setup()
    run = load(_WORKDIR.value, _MODEL.value, _METHOD.value, not _NO_EMA.value)
    sampler = {"grid_points": _GRID_POINTS.value, "solver": _SOLVER.value, "guidance": _GUIDANCE.value,
               "grid_kind": _GRID.value}
    if _NPZ.value or _PNG_DIR.value:
        summary = write_images(run, _NUM.value, _SEED.value, _BATCH.value, _NPZ.value, _PNG_DIR.value, **sampler)
    else:
        base = _WORKDIR.value or _MODEL.value.removesuffix(".npz")
        out = _OUT.value or (f"{base}/samples{'_e2e' if run.method == 'e2e' else ''}.png" if _WORKDIR.value
                             else f"{base}_samples.png")
        summary = run.task.write_samples(run, out, per_class=_PER_CLASS.value, seed=_SEED.value,
                                         prompt=_PROMPT.value, max_tokens=_MAX_TOKENS.value, **sampler)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_main(main)
