"""Image classification with ViT DiffusionBlocks (paper §4.1) and its plain ViT baseline.

What is diffused is the label's row of the fixed target space E (dblocks.targets; docs/design.md item 4):
z = E[y] + sigma * eps. Block b (a whole ViTDenoiser) reads the patches and one token holding c_in * z, is
conditioned on sigma through AdaLN-Zero, and returns class logits; its loss is the cross-entropy weighted per sample
by lambda(sigma) (config.edm.loss_weighting). At inference the blocks run once each, highest noise first, on a
grid equal in CDF: z_0 ~ N(0, sigma_max^2), D = bridge(logits) = softmax(logits) @ E, Euler step; the logits of the
last call (at sigma_min) are the prediction. The end-to-end baseline (method='e2e') is a plain ViT classifier
(CLS token, all L layers, cross-entropy, no diffusion), trained by the same engine and optimizer.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dblocks import augment
from dblocks import data as data_lib
from dblocks import edm as edm_lib
from dblocks import images as images_lib
from dblocks import sampling
from dblocks import targets
from dblocks.models.vit import ViTClassifier, ViTDenoiser
from dblocks.tasks.base import Task, Unit, register
from dblocks.tasks.image_data import LabelledImages


@register
class ViTTask(LabelledImages, Task):
    name = "vit"

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        self.target_dim = int(m.get("target_dim", 0) or m.hidden)
        self.E = jnp.asarray(targets.fixed_embedding(int(config.data.num_classes), self.target_dim,
                                                     self.edm.sigma_data, int(m.get("target_seed", 0)),
                                                     float(m.get("target_norm", 0.0) or 0.0)))

    # -- config --------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        m, d, s = c.model, c.data, c.sample
        if not (d.name in ("fashion_mnist", "synthetic") or str(d.name).startswith("tfds:")):
            p.append(f"data.name={d.name!r} is unknown; choose one of {data_lib.IMAGE_DATASETS}")
        if d.image_size % m.patch:
            p.append(f"data.image_size={d.image_size} is not divisible by model.patch={m.patch}")
        if m.hidden % m.heads:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads}")
        if d.num_classes < 2:
            p.append(f"data.num_classes={d.num_classes} must be >= 2")
        if m.get("target_dim", 0) < 0 or m.get("target_norm", 0.0) < 0:
            p.append(f"model.target_dim={m.get('target_dim')} and model.target_norm={m.get('target_norm')} must be "
                     ">= 0 (0 = defaults: dim = model.hidden, norm = sigma_data * sqrt(dim))")
        if not 0 <= m.dropout < 1:
            p.append(f"model.dropout={m.dropout} must be in [0, 1)")
        if d.get("randaugment_ops", 0) < 0 or not 0 <= d.get("randaugment_magnitude", 9) <= 30:
            p.append("data.randaugment_ops must be >= 0 and data.randaugment_magnitude in [0, 30]")
        if s.solver not in sampling.SOLVERS:
            p.append(f"sample.solver={s.solver!r}; choose one of {sampling.SOLVERS}")
        if s.bridge not in targets.BRIDGES:
            p.append(f"sample.bridge={s.bridge!r}; choose one of {targets.BRIDGES}")
        if s.steps < max(2, int(c.blocks.num_blocks)):
            p.append(f"sample.steps={s.steps} cannot visit all {c.blocks.num_blocks} blocks (use >= "
                     f"{max(2, int(c.blocks.num_blocks))})")
        return p

    # -- model ---------------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit):
        m, d = self.config.model, self.config.data
        cls = ViTDenoiser if unit.is_block else ViTClassifier
        return cls(num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads, patch=m.patch,
                   num_classes=d.num_classes, mlp_ratio=m.mlp_ratio, dropout=m.dropout)

    def init_params(self, model, rng, batch):
        image = jnp.asarray(batch["image"])
        if isinstance(model, ViTClassifier):
            return model.init({"params": rng}, image)["params"]
        n = image.shape[0]
        return model.init({"params": rng}, image, jnp.zeros((n, self.target_dim)), jnp.zeros((n,)))["params"]

    def logits(self, model, params, image, z, sigma, train=False, rng=None):
        """Block logits [N, K] at noisy label embeddings z [N, dim] and per-sample sigma [N]."""
        pc = edm_lib.precondition(sigma, self.edm.sigma_data)
        return model.apply({"params": params}, image, pc.c_in[:, None] * z, pc.c_noise, train=train,
                           rngs={"dropout": rng} if train else None)

    def augment(self, rng, image):
        d = self.config.data
        k_flip, k_ra = jax.random.split(rng)
        if d.get("flip", False):
            image = augment.random_flip(k_flip, image)
        return augment.rand_augment(k_ra, image, int(d.get("randaugment_ops", 0)),
                                    float(d.get("randaugment_magnitude", 9)))

    def loss(self, model, params, batch, rng, train_range, train=True):
        k_aug, k_sigma, k_eps, k_drop = jax.random.split(rng, 4)
        image, label = batch["image"], batch["label"]
        if train:
            image = self.augment(k_aug, image)
        if isinstance(model, ViTClassifier):
            logits = model.apply({"params": params}, image, train=train, rngs={"dropout": k_drop} if train else None)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
            return jnp.mean(ce), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == label)}
        n = label.shape[0]
        sigma = edm_lib.sample_sigma(k_sigma, (n,), train_range[0], train_range[1], self.edm.p_mean,
                                     self.edm.p_std)
        z = self.E[label] + sigma[:, None] * jax.random.normal(k_eps, (n, self.target_dim))
        logits = self.logits(model, params, image, z, sigma, train=train, rng=k_drop)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)          # [N]
        c = self.config.edm
        w = edm_lib.loss_weight(sigma, self.edm.sigma_data, c.loss_weighting, c.max_weight)
        metrics = {"ce": jnp.mean(ce), "accuracy": jnp.mean(jnp.argmax(logits, -1) == label)}
        return edm_lib.weighted_mean(ce, w), metrics

    # -- inference -----------------------------------------------------------------------------------------------
    def _jitted(self, model):
        """One jitted forward per model shape (blocks of equal shape share the compiled function)."""
        cache = self.__dict__.setdefault("_jit_cache", {})
        if repr(model) not in cache:
            if isinstance(model, ViTClassifier):
                cache[repr(model)] = jax.jit(lambda params, image: model.apply({"params": params}, image))
            else:
                cache[repr(model)] = jax.jit(lambda params, image, z, sigma: self.logits(model, params, image, z,
                                                                                         sigma))
        return cache[repr(model)]

    def classify(self, run, image, steps: int | None = None, bridge: str | None = None, solver: str | None = None,
                 seed: int = 0, keep_trace: bool = False) -> sampling.SampleResult:
        """Logits (SampleResult.aux, [N, K]) of a batch of images [N, S, S, C] through the run's chain.
        For the e2e baseline: one forward pass (block_calls 1)."""
        image = jnp.asarray(image)
        if run.method == "e2e":
            logits = self._jitted(run.models[0])(run.params[0], image)
            return sampling.SampleResult(None, logits, [logits], 1, np.zeros(1, np.int32))
        s = self.config.sample
        steps, bridge, solver = int(steps or s.steps), bridge or s.bridge, solver or s.solver

        def denoise(b, z, sigma):
            logits = self._jitted(run.models[b])(run.params[b], image, z, sigma)
            return targets.bridge(logits, self.E, bridge), logits

        z0 = edm_lib.initial_noise(jax.random.PRNGKey(seed), (image.shape[0], self.target_dim), self.edm.sigma_max)
        return sampling.sample(denoise, z0, sampling.grid_for(steps, self.edm), run.partition, solver, keep_trace)

    def block_alone_accuracy(self, run, b: int, image, label, key) -> float:
        """Block b fed the true label embedding plus noise from its own training range: correct predictions."""
        n = label.shape[0]
        lo, hi = run.units[b].train_range
        k_sigma, k_eps = jax.random.split(key)
        sigma = edm_lib.sample_sigma(k_sigma, (n,), lo, hi, self.edm.p_mean, self.edm.p_std)
        z = self.E[label] + sigma[:, None] * jax.random.normal(k_eps, (n, self.target_dim))
        logits = self._jitted(run.models[b])(run.params[b], jnp.asarray(image), z, sigma)
        return int(jnp.sum(jnp.argmax(logits, -1) == label))

    def evaluate(self, run, steps=None, bridge=None, solver=None, seed=0, limit=None, batch_size=None,
                 **_) -> dict:
        """Top-1 test accuracy through the sampler; per-block accuracy alone; accuracy after each step."""
        src = self.source("test")
        n = len(src) if not limit else min(int(limit), len(src))
        bs = int(batch_size or 500)
        s = self.config.sample
        steps, bridge, solver = int(steps or s.steps), bridge or s.bridge, solver or s.solver
        correct, per_step, per_block, calls = 0, None, np.zeros(run.num_blocks), 1
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, n, bs)):
            batch = self.make_batch(src.get(np.arange(start, min(start + bs, n))), train=False)
            label = jnp.asarray(batch["label"])
            res = self.classify(run, batch["image"], steps, bridge, solver, seed=seed * 100_003 + i, keep_trace=True)
            calls = res.block_calls
            hits = np.asarray([int(jnp.sum(jnp.argmax(t, -1) == label)) for t in res.trace])
            per_step = hits if per_step is None else per_step + hits
            correct += int(hits[-1])
            if run.method == "dblocks":
                keys = jax.random.split(jax.random.PRNGKey(seed * 7919 + i), run.num_blocks)
                per_block += [self.block_alone_accuracy(run, b, batch["image"], label, keys[b])
                              for b in range(run.num_blocks)]
        seconds = time.perf_counter() - t0
        out = {"headline": {"name": "top1_accuracy", "value": correct / n, "higher_is_better": True},
               "block_calls_per_sample": calls,
               "layer_evals_per_sample": int(sum(u.num_layers for u in run.units)) if run.method == "dblocks"
               else int(run.units[0].num_layers),
               "num_examples": n, "method": run.method, "seconds": round(seconds, 2)}
        if run.method == "dblocks":
            grid = sampling.grid_for(steps, self.edm)
            out.update(steps=steps, bridge=bridge, solver=solver,
                       per_step={"name": "accuracy after each block call", "values": (per_step / n).tolist(),
                                 "sigmas": [float(g) for g in grid] if solver == "euler" else None,
                                 "blocks": [int(b) for b in res.blocks]},
                       per_block={"name": "block alone, true label + noise of its training range",
                                  "values": (per_block / n).tolist(),
                                  "ranges": [list(u.train_range) for u in run.units]})
        return out

    def write_samples(self, run, out_path, steps=None, per_class=None, seed=0, **_):
        """A grid of test images, one row per true class, and their predicted classes (in the summary)."""
        src, k = self.source("test"), int(self.config.data.num_classes)
        per_class = int(per_class or self.config.sample.get("per_class", 8))
        labels = np.asarray(src.get(np.arange(min(len(src), 50 * k * per_class)))["label"])
        idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(k)])
        if len(idx) != k * per_class:
            raise ValueError(f"the test split has fewer than {per_class} images of some class")
        batch = self.make_batch(src.get(idx), train=False)
        res = self.classify(run, batch["image"], steps, seed=seed)
        pred = np.asarray(jnp.argmax(res.aux, -1))
        names = list(data_lib.FASHION_MNIST_CLASSES) if self.config.data.name == "fashion_mnist" else [
            f"class {c}" for c in range(k)]
        images_lib.save_grid(batch["image"], k, out_path, row_labels=names)
        return {"path": out_path, "images": len(idx), "accuracy": float(np.mean(pred == batch["label"])),
                "predicted": [[names[p] for p in pred[r * per_class:(r + 1) * per_class]] for r in range(k)],
                "block_calls_per_sample": res.block_calls}
