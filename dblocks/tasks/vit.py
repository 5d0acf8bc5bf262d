"""Image classification with ViT DiffusionBlocks (paper §4.1) and its plain ViT baseline.

What is diffused is the label's row of the fixed target space E (dblocks.targets; docs/design.md item 4):
z = E[y] + sigma * eps. Block b (a whole ViTDenoiser) reads the patches and one token holding c_in * z, is
conditioned on sigma through AdaLN-Zero, and returns class logits; its loss is the cross-entropy weighted per sample
by lambda(sigma) (config.edm.loss_weighting). At inference the blocks run once each, highest noise first, on a
grid equal in CDF: z_0 ~ N(0, sigma_max^2), D = bridge(logits) = softmax(logits) @ E, Euler step; the logits of the
last call (at sigma_min) are the prediction. The end-to-end baseline (method='e2e') is a plain ViT classifier
(CLS token, all L layers, cross-entropy, no diffusion), trained by the same engine and optimizer: its inference is
one forward pass. After training: test accuracy (through the chain, per block call and per block alone) and a picture
of test images with their predicted classes. Sampler options are explicit arguments, unset ones from the config's
`sample`.
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
from dblocks.models.options import model_options
from dblocks.tasks.base import Task, Unit, register
from dblocks.tasks.image_data import LabelledImages, class_names


@register
class ViTTask(LabelledImages, Task):
    name = "vit"
    defaults = {"model": {"target_dim": 0,      # label embedding width (0 = model.hidden)
                          "target_norm": 0.0,   # norm of each label's row of E (0 = the scale contract's)
                          "target_seed": 0},    # seed of E's rows
                "data": {"randaugment_ops": 0, "randaugment_magnitude": 9},   # RandAugment in training (0 ops: off)
                "sample": {"per_class": 8}}     # sample grids: images per class

    def __init__(self, config):
        super().__init__(config)
        m = self.config.model
        self.target_dim = int(m.target_dim or m.hidden)
        self.E = jnp.asarray(targets.fixed_embedding(int(self.config.data.num_classes), self.target_dim,
                                                     self.edm.sigma_data, int(m.target_seed), float(m.target_norm)))

    # -- config --------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        m, d, s = c.model, c.data, c.sample
        if not data_lib.is_image_dataset(d.name):
            p.append(f"data.name={d.name!r} is unknown; choose one of {data_lib.IMAGE_DATASETS}")
        if d.image_size % m.patch:
            p.append(f"data.image_size={d.image_size} is not divisible by model.patch={m.patch}")
        if m.hidden % m.heads:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads}")
        if d.num_classes < 2:
            p.append(f"data.num_classes={d.num_classes} must be >= 2")
        if m.target_dim < 0 or m.target_norm < 0:
            p.append(f"model.target_dim={m.target_dim} and model.target_norm={m.target_norm} must be "
                     ">= 0 (0 = defaults: dim = model.hidden, norm = sigma_data * sqrt(dim))")
        if not 0 <= m.dropout < 1:
            p.append(f"model.dropout={m.dropout} must be in [0, 1)")
        if d.randaugment_ops < 0 or not 0 <= d.randaugment_magnitude <= 30:
            p.append("data.randaugment_ops must be >= 0 and data.randaugment_magnitude in [0, 30]")
        if s.solver not in sampling.SOLVERS:
            p.append(f"sample.solver={s.solver!r}; choose one of {sampling.SOLVERS}")
        bridges = tuple(b for b in targets.BRIDGES if b != "sample")   # 'sample': the LMs' ancestral sampler
        if s.bridge not in bridges:
            p.append(f"sample.bridge={s.bridge!r}; choose one of {bridges}")
        if s.grid_points < max(2, int(c.blocks.num_blocks)):
            p.append(f"sample.grid_points={s.grid_points} cannot visit all {c.blocks.num_blocks} blocks (use >= "
                     f"{max(2, int(c.blocks.num_blocks))})")
        return p

    # -- model ---------------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit):
        m, d = self.config.model, self.config.data
        cls = ViTDenoiser if unit.is_block else ViTClassifier
        return cls(num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads, patch=m.patch,
                   num_classes=d.num_classes, mlp_ratio=m.mlp_ratio, dropout=m.dropout, **model_options(m))

    def init_params(self, model, rng, batch):
        image = images_lib.to_model_range(jnp.asarray(batch["image"]))
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
        if d.flip:
            image = augment.random_flip(k_flip, image)
        return augment.rand_augment(k_ra, image, int(d.randaugment_ops), float(d.randaugment_magnitude))

    def draw(self, model, batch, rng, train_range, train=True):
        k_aug, k_sigma, k_eps, k_drop = jax.random.split(rng, 4)
        image, label = images_lib.to_model_range(batch["image"]), batch["label"]
        if train:
            image = self.augment(k_aug, image)
        if isinstance(model, ViTClassifier):
            return {"image": image, "label": label}, k_drop
        n = label.shape[0]
        sigma = edm_lib.sample_sigma(k_sigma, (n,), train_range[0], train_range[1], self.edm.p_mean,
                                     self.edm.p_std)
        z = self.E[label] + sigma[:, None] * jax.random.normal(k_eps, (n, self.target_dim))
        return {"image": image, "label": label, "sigma": sigma, "z": z}, k_drop

    def loss_on(self, model, params, inputs, rng, train=True):
        image, label = inputs["image"], inputs["label"]
        if isinstance(model, ViTClassifier):
            logits = model.apply({"params": params}, image, train=train, rngs={"dropout": rng} if train else None)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
            return jnp.mean(ce), {"accuracy": jnp.mean(jnp.argmax(logits, -1) == label)}
        sigma = inputs["sigma"]
        logits = self.logits(model, params, image, inputs["z"], sigma, train=train, rng=rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)          # [N]
        c = self.config.edm
        w = edm_lib.loss_weight(sigma, self.edm.sigma_data, c.loss_weighting, c.max_weight)
        metrics = {"ce": jnp.mean(ce), "accuracy": jnp.mean(jnp.argmax(logits, -1) == label)}
        return edm_lib.weighted_mean(ce, w), metrics

    # -- after training: the chain over the label space, accuracy, a picture ------------------------------------------
    def forward(self, model):
        """One jitted forward per model shape: logits of the classifier (params, image), or of a block
        (params, image, z, sigma)."""
        if isinstance(model, ViTClassifier):
            return self.jit("classify", model, lambda: jax.jit(
                lambda params, image: model.apply({"params": params}, image)))
        return self.jit("block_logits", model, lambda: jax.jit(
            lambda params, image, z, sigma: self.logits(model, params, image, z, sigma)))

    def sampler_options(self, grid_points=None, bridge=None, solver=None) -> dict:
        s = self.config.sample
        return {"grid_points": int(grid_points or s.grid_points), "bridge": bridge or s.bridge,
                "solver": solver or s.solver}

    def classify(self, run, image, grid_points=None, bridge=None, solver=None, seed: int = 0,
                 keep_trace: bool = False) -> sampling.SampleResult:
        """Logits (SampleResult.aux, [N, K]) of a batch of images [N, S, S, C] through the run's chain.
        For the e2e baseline: one forward pass (block_calls 1)."""
        image = jnp.asarray(image)
        if run.method == "e2e":
            logits = self.forward(run.models[0])(run.params[0], image)
            return sampling.SampleResult(None, logits, [logits], 1, np.zeros(1, np.int32))
        opts = self.sampler_options(grid_points, bridge, solver)

        def denoise(b, z, sigma):
            logits = self.forward(run.models[b])(run.params[b], image, z, sigma)
            return targets.bridge(logits, self.E, opts["bridge"]), logits

        z0 = edm_lib.initial_noise(jax.random.PRNGKey(seed), (image.shape[0], self.target_dim), self.edm.sigma_max)
        return sampling.sample(denoise, z0, sampling.grid_for(opts["grid_points"], self.edm), run.partition,
                               opts["solver"], keep_trace)

    def block_alone_correct(self, run, b: int, image, label, key) -> int:
        """Block b fed the true label embedding plus noise from its own training range: correct predictions."""
        n = label.shape[0]
        lo, hi = run.units[b].train_range
        k_sigma, k_eps = jax.random.split(key)
        sigma = edm_lib.sample_sigma(k_sigma, (n,), lo, hi, self.edm.p_mean, self.edm.p_std)
        z = self.E[label] + sigma[:, None] * jax.random.normal(k_eps, (n, self.target_dim))
        logits = self.forward(run.models[b])(run.params[b], jnp.asarray(image), z, sigma)
        return int(jnp.sum(jnp.argmax(logits, -1) == label))

    def evaluate(self, run, grid_points=None, bridge=None, solver=None, seed=0, limit=None, batch_size=None,
                 split="test", **_) -> dict:
        """Top-1 accuracy on `split` ('test', or 'validation' for choosing settings) through the sampler; per-block
        accuracy alone; accuracy after each block call."""
        src = self.source(split)
        n = len(src) if not limit else min(int(limit), len(src))
        bs = int(batch_size or 500)
        opts = self.sampler_options(grid_points, bridge, solver)
        correct, per_step, per_block, calls, res = 0, None, np.zeros(run.num_blocks), 1, None
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, n, bs)):
            batch = self.make_batch(src.get(np.arange(start, min(start + bs, n))), train=False)
            label = jnp.asarray(batch["label"])
            res = self.classify(run, batch["image"], seed=seed * 100_003 + i, keep_trace=True, **opts)
            calls = res.block_calls
            hits = np.asarray([int(jnp.sum(jnp.argmax(t, -1) == label)) for t in res.trace])
            per_step = hits if per_step is None else per_step + hits
            correct += int(hits[-1])
            if run.method == "dblocks":
                keys = jax.random.split(jax.random.PRNGKey(seed * 7919 + i), run.num_blocks)
                per_block += [self.block_alone_correct(run, b, batch["image"], label, keys[b])
                              for b in range(run.num_blocks)]
        out = {"headline": {"name": "top1_accuracy", "value": correct / n, "higher_is_better": True},
               "block_calls_per_sample": calls,
               "layer_evals_per_sample": int(sum(u.num_layers for u in run.units)) if run.method == "dblocks"
               else int(run.units[0].num_layers),
               "num_examples": n, "split": split, "method": run.method,
               "seconds": round(time.perf_counter() - t0, 2)}
        if run.method == "dblocks":
            grid = sampling.grid_for(opts["grid_points"], self.edm)
            out.update(**opts,
                       per_step={"name": "accuracy after each block call", "values": (per_step / n).tolist(),
                                 "sigmas": [float(g) for g in grid] if opts["solver"] == "euler" else None,
                                 "blocks": [int(b) for b in res.blocks]},
                       per_block={"name": "block alone, true label + noise of its training range",
                                  "values": (per_block / n).tolist(),
                                  "ranges": [list(u.train_range) for u in run.units]})
        return out

    def write_samples(self, run, out_path, grid_points=None, per_class=None, seed=0, **_) -> dict:
        """A grid of test images, one row per true class, and their predicted classes (in the summary)."""
        src, k = self.source("test"), int(self.config.data.num_classes)
        per_class = int(per_class or self.config.sample.per_class)
        labels = np.asarray(src.get(np.arange(min(len(src), 50 * k * per_class)))["label"])
        idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(k)])
        names = class_names(self.config)
        if len(idx) != k * per_class:
            from dblocks.config import ConfigError   # here, not at import: dblocks.config imports the tasks
            short = [names[c] for c in range(k) if np.sum(labels == c) < per_class]
            raise ConfigError(f"sample.per_class={per_class}: the test split has fewer images of class(es) "
                              f"{short[:5]} for the sample grid; lower --config.sample.per_class (the training "
                              f"itself is saved)")
        batch = self.make_batch(src.get(idx), train=False)
        res = self.classify(run, batch["image"], grid_points, seed=seed)
        pred = np.asarray(jnp.argmax(res.aux, -1))
        images_lib.save_grid(batch["image"], k, out_path, row_labels=names)
        return {"path": out_path, "images": len(idx), "accuracy": float(np.mean(pred == batch["label"])),
                "predicted": [[names[p] for p in pred[r * per_class:(r + 1) * per_class]] for r in range(k)],
                "block_calls_per_sample": res.block_calls}
