"""ViT classification after training: the blocks' chain over the label space, test accuracy, and a picture.

At inference the blocks run once each (by default), highest noise first, on a grid equal in CDF:
z_0 ~ N(0, sigma_max^2), D = bridge(logits) = softmax(logits) @ E, Euler step; the logits of the last call are the
prediction. The end-to-end baseline is one forward pass of the plain ViT classifier.
Functions of (task, run, ...); sampler options are explicit arguments, unset ones from the config's `sample`.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import images as images_lib
from dblocks import sampling, targets
from dblocks.models.vit import ViTClassifier
from dblocks.tasks.dit_eval import class_names


def _forward(task, model):
    """One jitted forward per model shape: logits of the classifier, or of a block at (z, sigma)."""
    if isinstance(model, ViTClassifier):
        return task.jit("classify", model, lambda: jax.jit(lambda params, image: model.apply({"params": params},
                                                                                               image)))
    return task.jit("block_logits", model, lambda: jax.jit(
        lambda params, image, z, sigma: task.logits(model, params, image, z, sigma)))


def sampler_options(task, grid_points=None, bridge=None, solver=None) -> dict:
    s = task.config.sample
    return {"grid_points": int(grid_points or s.grid_points), "bridge": bridge or s.bridge, "solver": solver or s.solver}


def classify(task, run, image, grid_points=None, bridge=None, solver=None, seed: int = 0,
             keep_trace: bool = False) -> sampling.SampleResult:
    """Logits (SampleResult.aux, [N, K]) of a batch of images [N, S, S, C] through the run's chain.
    For the e2e baseline: one forward pass (block_calls 1)."""
    image = jnp.asarray(image)
    if run.method == "e2e":
        logits = _forward(task, run.models[0])(run.params[0], image)
        return sampling.SampleResult(None, logits, [logits], 1, np.zeros(1, np.int32))
    opts = sampler_options(task, grid_points, bridge, solver)

    def denoise(b, z, sigma):
        logits = _forward(task, run.models[b])(run.params[b], image, z, sigma)
        return targets.bridge(logits, task.E, opts["bridge"]), logits

    z0 = edm_lib.initial_noise(jax.random.PRNGKey(seed), (image.shape[0], task.target_dim), task.edm.sigma_max)
    return sampling.sample(denoise, z0, sampling.grid_for(opts["grid_points"], task.edm), run.partition,
                           opts["solver"], keep_trace)


def block_alone_correct(task, run, b: int, image, label, key) -> int:
    """Block b fed the true label embedding plus noise from its own training range: correct predictions."""
    n = label.shape[0]
    lo, hi = run.units[b].train_range
    k_sigma, k_eps = jax.random.split(key)
    sigma = edm_lib.sample_sigma(k_sigma, (n,), lo, hi, task.edm.p_mean, task.edm.p_std)
    z = task.E[label] + sigma[:, None] * jax.random.normal(k_eps, (n, task.target_dim))
    logits = _forward(task, run.models[b])(run.params[b], jnp.asarray(image), z, sigma)
    return int(jnp.sum(jnp.argmax(logits, -1) == label))


def evaluate(task, run, grid_points=None, bridge=None, solver=None, seed=0, limit=None, batch_size=None,
             split="test", **_) -> dict:
    """Top-1 accuracy on `split` ('test', or 'validation' for choosing settings) through the sampler; per-block
    accuracy alone; accuracy after each block call."""
    src = task.source(split)
    n = len(src) if not limit else min(int(limit), len(src))
    bs = int(batch_size or 500)
    opts = sampler_options(task, grid_points, bridge, solver)
    correct, per_step, per_block, calls, res = 0, None, np.zeros(run.num_blocks), 1, None
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n, bs)):
        batch = task.make_batch(src.get(np.arange(start, min(start + bs, n))), train=False)
        label = jnp.asarray(batch["label"])
        res = classify(task, run, batch["image"], seed=seed * 100_003 + i, keep_trace=True, **opts)
        calls = res.block_calls
        hits = np.asarray([int(jnp.sum(jnp.argmax(t, -1) == label)) for t in res.trace])
        per_step = hits if per_step is None else per_step + hits
        correct += int(hits[-1])
        if run.method == "dblocks":
            keys = jax.random.split(jax.random.PRNGKey(seed * 7919 + i), run.num_blocks)
            per_block += [block_alone_correct(task, run, b, batch["image"], label, keys[b])
                          for b in range(run.num_blocks)]
    out = {"headline": {"name": "top1_accuracy", "value": correct / n, "higher_is_better": True},
           "block_calls_per_sample": calls,
           "layer_evals_per_sample": int(sum(u.num_layers for u in run.units)) if run.method == "dblocks"
           else int(run.units[0].num_layers),
           "num_examples": n, "split": split, "method": run.method, "seconds": round(time.perf_counter() - t0, 2)}
    if run.method == "dblocks":
        grid = sampling.grid_for(opts["grid_points"], task.edm)
        out.update(**opts,
                   per_step={"name": "accuracy after each block call", "values": (per_step / n).tolist(),
                             "sigmas": [float(g) for g in grid] if opts["solver"] == "euler" else None,
                             "blocks": [int(b) for b in res.blocks]},
                   per_block={"name": "block alone, true label + noise of its training range",
                              "values": (per_block / n).tolist(),
                              "ranges": [list(u.train_range) for u in run.units]})
    return out


def write_samples(task, run, out_path, grid_points=None, per_class=None, seed=0, **_) -> dict:
    """A grid of test images, one row per true class, and their predicted classes (in the summary)."""
    src, k = task.source("test"), int(task.config.data.num_classes)
    per_class = int(per_class or task.config.sample.per_class)
    labels = np.asarray(src.get(np.arange(min(len(src), 50 * k * per_class)))["label"])
    idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(k)])
    if len(idx) != k * per_class:
        from dblocks.config import ConfigError   # here, not at import: dblocks.config imports the tasks
        short = [class_names(task.config)[c] for c in range(k) if np.sum(labels == c) < per_class]
        raise ConfigError(f"sample.per_class={per_class}: the test split has fewer images of class(es) {short[:5]} "
                          f"for the sample grid; lower --config.sample.per_class (the training itself is saved)")
    batch = task.make_batch(src.get(idx), train=False)
    res = classify(task, run, batch["image"], grid_points, seed=seed)
    pred = np.asarray(jnp.argmax(res.aux, -1))
    names = class_names(task.config)
    images_lib.save_grid(batch["image"], k, out_path, row_labels=names)
    return {"path": out_path, "images": len(idx), "accuracy": float(np.mean(pred == batch["label"])),
            "predicted": [[names[p] for p in pred[r * per_class:(r + 1) * per_class]] for r in range(k)],
            "block_calls_per_sample": res.block_calls}
