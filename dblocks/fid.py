"""Frechet distance of generated images to a dataset, in the feature space of a classifier this project trains.

FID = ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2}) between Gaussians fitted to two sets of features.
The paper's FIDs use Inception-v3 features (clean-fid / ADM suite) on CIFAR-10 and ImageNet; those weights are not
available offline and are not trained on Fashion-MNIST, so dblocks uses the penultimate layer of a small CNN
trained on the same dataset (`FeatureNet`), saved once as an artifact and reused by every evaluation. Our numbers
are comparable with each other (same artifact, same N), NOT with the paper's or anyone's Inception FIDs.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from dblocks import files, logs
from dblocks.checkpoint import write_json_atomic

Array = jax.Array


# -- the distance -----------------------------------------------------------------------------------------------

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, F] -> (mean [F], covariance [F, F]) in float64."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) (the FID formula).

    tr (C1 C2)^{1/2} is computed as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    C1^{1/2} C2 C1^{1/2} (same spectrum as C1 C2): stable for the singular covariances of small feature sets,
    where a general matrix square root of C1 C2 can return complex values or a negative distance."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    r1 = _sqrt_psd(cov1)
    m = r1 @ cov2 @ r1
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)


# -- the feature network ----------------------------------------------------------------------------------------

class FeatureNet(nn.Module):
    """A small CNN classifier: images [N, S, S, C] in [-1, 1] -> (features [N, F], logits [N, K])."""
    num_classes: int
    features: int = 128

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        for width in (32, 64, 128):
            x = nn.gelu(nn.Conv(width, (3, 3))(x))
            if x.shape[1] > 4:
                x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.mean((1, 2))
        f = nn.gelu(nn.Dense(self.features)(x))
        return f, nn.Dense(self.num_classes)(f)


class FeatureExtractor:
    """A trained FeatureNet: `features(images)` in batches; `meta` says how it was trained and how well."""

    def __init__(self, net: FeatureNet, params, meta: dict):
        self.net, self.params, self.meta = net, params, meta
        self._apply = jax.jit(lambda p, x: net.apply({"params": p}, jnp.clip(x, -1.0, 1.0)))

    def features_and_logits(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """images [N, S, S, C] in [-1, 1] (clipped) -> features [N, F], logits [N, K]. Batches are padded to
        one shape, so one compiled function serves every call."""
        images = np.asarray(images, np.float32)
        n, bs = len(images), min(batch_size, len(images))
        feats, logits = [], []
        for i in range(0, n, bs):
            x = images[i:i + bs]
            pad = bs - len(x)
            f, lg = self._apply(self.params, np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad
                                else x)
            feats.append(np.asarray(f)[:len(x)])
            logits.append(np.asarray(lg)[:len(x)])
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """images [N, S, S, C] in [-1, 1] (clipped) -> [N, F] float32."""
        return self.features_and_logits(images, batch_size)[0]


def artifact_dir(cache_dir: str, dataset_key: dict, steps: int, seed: int, features: int) -> str:
    """One directory per (dataset, training recipe): every run evaluated on this dataset shares it."""
    key = {"dataset": dataset_key, "steps": steps, "seed": seed, "features": features, "version": 2}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = str(dataset_key.get("name", "data")).replace(":", "_").replace("/", "_")
    return os.path.join(cache_dir, f"fid_featnet_{name}_{digest}")


def default_cache_dir() -> str:
    return os.environ.get("DBLOCKS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dblocks"))


def load_or_train(cache_dir: str | None, dataset_key: dict, sources: Callable[[str], Any],
                  to_batch: Callable[[dict], tuple[np.ndarray, np.ndarray]], num_classes: int, steps: int = 1500,
                  batch_size: int = 128, seed: int = 0, features: int = 128) -> FeatureExtractor:
    """Loads the feature network of this dataset from the cache, or trains it on the train split and saves it.

    sources(split) gives a random-access source; to_batch(examples) gives (images in [-1, 1], int labels).
    """
    path = artifact_dir(cache_dir or default_cache_dir(), dataset_key, steps, seed, features)
    net = FeatureNet(num_classes, features)
    train_src = sources("train")
    x0, _ = to_batch(train_src.get(np.arange(2)))
    params_file, meta_file = os.path.join(path, "params.msgpack"), os.path.join(path, "meta.json")
    if os.path.exists(params_file) and os.path.exists(meta_file):
        template = jax.eval_shape(net.init, jax.random.PRNGKey(seed), jnp.asarray(x0))["params"]
        try:
            with open(params_file, "rb") as f:
                params = jax.tree.map(jnp.asarray, serialization.from_bytes(template, f.read()))
            with open(meta_file) as f:
                return FeatureExtractor(net, params, json.load(f))
        except (ValueError, KeyError, TypeError, OSError) as e:   # damaged (e.g. by an older, in-place write)
            logs.log.warning("the FID feature network in %s is unreadable (%s: %s); training it again", path,
                             type(e).__name__, e)
    logs.log.info("training the FID feature network (%d steps) -> %s", steps, path)
    t0 = time.time()
    params = _train(net, jax.jit(net.init)(jax.random.PRNGKey(seed), jnp.asarray(x0))["params"], train_src,
                    to_batch, steps, batch_size, seed)
    ext = FeatureExtractor(net, params, {})
    test_src = sources("test")
    n_test = min(len(test_src), 10_000)
    x, y = to_batch(test_src.get(np.arange(n_test)))
    logits = ext.features_and_logits(x)[1]
    ext.meta = {"dataset": dataset_key, "steps": steps, "batch_size": batch_size, "seed": seed,
                "features": features, "test_accuracy": float(np.mean(logits.argmax(-1) == y)),
                "train_seconds": round(time.time() - t0, 1), "path": path}
    os.makedirs(path, exist_ok=True)
    files.write_atomic(params_file, lambda f: f.write(serialization.to_bytes(params)))
    write_json_atomic(meta_file, ext.meta)   # after the params: a meta.json is never beside half a network
    logs.log.info("FID feature network: test accuracy %.4f", ext.meta["test_accuracy"])
    return ext


def _train(net: FeatureNet, params, src, to_batch, steps: int, batch_size: int, seed: int):
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(100, steps // 10), steps), weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": p}, x)[1], y).mean()
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        x, y = to_batch(src.get(np.sort(rng.choice(len(src), batch_size, replace=False))))
        params, opt, loss = step(params, opt, jnp.asarray(x), jnp.asarray(y))
        if (i + 1) % 500 == 0:
            logs.log.info("[fid featnet] step %d/%d  loss %.4f", i + 1, steps, float(loss))
    return params


# -- the protocol -------------------------------------------------------------------------------------------------

def evaluate_samples(extractor: FeatureExtractor, reference_images: np.ndarray,
                     sample_fn: Callable[[int, int, int], np.ndarray], num_samples: int, repeats: int = 3,
                     batch_size: int = 500) -> dict:
    """FID of `repeats` independent sets of num_samples images against the reference images; the paper reports
    the minimum of 3. sample_fn(repeat, start, count) -> images [count, S, S, C] in [-1, 1].

    seconds_per_image leaves out the first batch (it compiles) when there is more than one batch."""
    mu_ref, cov_ref = gaussian_stats(extractor.features(reference_images, batch_size))
    fids, times, counts = [], [], []
    for r in range(repeats):
        feats = []
        for start in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - start)
            t0 = time.perf_counter()
            images = np.asarray(sample_fn(r, start, count))
            times.append(time.perf_counter() - t0)
            counts.append(count)
            feats.append(extractor.features(images, batch_size))
        fids.append(frechet_distance(*gaussian_stats(np.concatenate(feats)), mu_ref, cov_ref))
        logs.log.info("FID %d/%d: %.3f (%d samples)", r + 1, repeats, fids[-1], num_samples)
    skip = 1 if len(times) > 1 else 0
    return {"fid_min": min(fids), "fids": fids, "num_samples": num_samples, "repeats": repeats,
            "num_reference": int(len(reference_images)),
            "seconds_per_image": float(sum(times[skip:]) / sum(counts[skip:]))}
