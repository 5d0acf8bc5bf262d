"""DiT after training: class-conditional sampling with classifier-free guidance, sample grids, and FID.

    D = D_uncond + w (D_cond - D_uncond)          (one doubled batch per block call)

Functions of (task, run, ...): the task (dblocks.tasks.dit) gives the denoiser, the run (dblocks.assemble.Run) the
blocks. Sampler options are explicit arguments; unset ones take the config's `sample` section.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import data as data_lib
from dblocks import edm as edm_lib
from dblocks import images as images_lib
from dblocks import sampling


def _guided(task, model):
    """One jitted guided denoiser per model shape (blocks of equal shape share the compiled function)."""
    def build():
        @jax.jit
        def guided(params, z, sigma, label, guidance):
            null = jnp.full_like(label, task.config.data.num_classes)
            d = task.denoise(model, params, jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]),
                             jnp.concatenate([label, null]))
            d_cond, d_uncond = jnp.split(d, 2)
            return d_uncond + guidance * (d_cond - d_uncond)
        return guided
    return task.jit("guided_denoiser", model, build)


def sampler_options(task, grid_points=None, solver=None, guidance=None, grid_kind=None) -> dict:
    """The sampler settings: explicit values, else the config's sample section."""
    s = task.config.sample
    return {"grid_points": int(grid_points or s.grid_points), "solver": solver or s.solver,
            "guidance": float(s.guidance if guidance is None else guidance),
            "grid_kind": grid_kind or s.grid_kind}


def generate(task, run, labels: np.ndarray, grid_points: int, solver: str, guidance: float, seed: int,
             grid_kind: str = "cdf") -> sampling.SampleResult:
    """Samples one image per label: [N, S, S, C] in about [-1, 1]."""
    labels = jnp.asarray(labels, jnp.int32)
    g = jnp.float32(guidance)

    def denoise(b, z, sigma):
        return _guided(task, run.models[b])(run.params[b], z, sigma, labels, g), None

    d = task.config.data
    z0 = edm_lib.initial_noise(jax.random.PRNGKey(seed), (len(labels), d.image_size, d.image_size, d.channels),
                               task.edm.sigma_max)
    grid = sampling.grid_for(grid_points, task.edm, grid_kind)
    return sampling.sample(denoise, z0, grid, run.partition, solver)


def class_names(config) -> list[str]:
    """Row labels for image grids: Fashion-MNIST's names, the data's own class names (folder:, hf:), or numbers."""
    k = int(config.data.num_classes)
    if config.data.name == "fashion_mnist":
        return list(data_lib.FASHION_MNIST_CLASSES)
    names = [n for n in str(config.data.class_names or "").split(",") if n]
    return names if len(names) == k else [f"class {c}" for c in range(k)]


def write_samples(task, run, out_path: str, grid_points=None, solver=None, guidance=None, per_class=None, seed=0,
                  grid_kind=None, **_) -> dict:
    """A grid of samples, one row per class, as a PNG; returns a summary."""
    opts = sampler_options(task, grid_points, solver, guidance, grid_kind)
    per_class = int(per_class or task.config.sample.per_class)
    classes = int(task.config.data.num_classes)
    labels = np.repeat(np.arange(classes), per_class)
    t0 = time.perf_counter()
    res = generate(task, run, labels, seed=seed, **opts)
    images = np.asarray(jax.device_get(res.denoised))
    seconds = time.perf_counter() - t0
    images_lib.save_grid(images, classes, out_path, row_labels=class_names(task.config))
    return {"path": out_path, "images": len(labels), **opts, "block_calls_per_sample": res.block_calls,
            "seconds": round(seconds, 2), "seconds_per_image": seconds / len(labels)}


def evaluate(task, run, num_samples=10_000, repeats=3, grid_points=None, solver=None, guidance=None, seed=0,
             batch_size=None, limit=None, cache_dir=None, fid_train_steps=1500, grid_kind=None, split="test",
             **_) -> dict:
    """FID (min of `repeats` sets of num_samples class-balanced samples) against `split` ('test', or 'validation'
    for choosing settings), in the features of a classifier trained on this dataset's train split (dblocks.fid; NOT
    Inception: not comparable with the paper's FIDs), plus sampling time per image and block calls per sample.
    `limit` caps the reference set."""
    from dblocks import fid
    d = task.config.data
    opts = sampler_options(task, grid_points, solver, guidance, grid_kind)
    to_batch = lambda ex: (data_lib.to_model_range(ex["image"]), np.asarray(ex["label"], np.int32))  # noqa: E731
    key = dict(task.signature()["data"])   # the data the network trains on: with held-out fractions where they matter
    extractor = fid.load_or_train(cache_dir, key, task.source, to_batch, int(d.num_classes),
                                  steps=int(fid_train_steps))
    ref_src = task.source(split)
    n_ref = len(ref_src) if not limit else min(int(limit), len(ref_src))
    reference = to_batch(ref_src.get(np.arange(n_ref)))[0]
    calls = []

    def sample_fn(r, start, count):
        labels = np.arange(start, start + count) % int(d.num_classes)
        res = generate(task, run, labels, seed=seed * 1_000_003 + r * 10_007 + start, **opts)
        calls.append(res.block_calls)
        return jax.device_get(res.denoised)

    out = fid.evaluate_samples(extractor, reference, sample_fn, int(num_samples), int(repeats),
                               int(batch_size or 500))
    return {"headline": {"name": "fid_min_of_%d" % int(repeats), "value": out["fid_min"],
                         "higher_is_better": False},
            "block_calls_per_sample": int(calls[-1]), **opts,
            "network_batch_note": "with guidance each block call runs the conditional and unconditional branch as "
                                  "one doubled batch",
            "method": run.method, "split": split, **out,
            "feature_net": {k: extractor.meta.get(k) for k in ("path", "test_accuracy", "steps", "features")},
            "fid_features": "dblocks.fid.FeatureNet trained on this dataset (not Inception-v3)"}
