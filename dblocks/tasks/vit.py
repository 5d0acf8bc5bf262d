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

import jax
import jax.numpy as jnp
import optax

from dblocks import augment
from dblocks import data as data_lib
from dblocks import edm as edm_lib
from dblocks import images as images_lib
from dblocks import sampling
from dblocks import targets
from dblocks.models.vit import ViTClassifier, ViTDenoiser
from dblocks.models.options import model_options
from dblocks.tasks import vit_eval
from dblocks.tasks.base import Task, Unit, register
from dblocks.tasks.image_data import LabelledImages


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

    # -- after training (dblocks.tasks.vit_eval) -------------------------------------------------------------------
    def classify(self, run, image, grid_points=None, bridge=None, solver=None, seed=0, keep_trace=False):
        """Logits of a batch of images through the run's chain (dblocks.tasks.vit_eval.classify)."""
        return vit_eval.classify(self, run, image, grid_points, bridge, solver, seed, keep_trace)

    def write_samples(self, run, out_path, **options) -> dict:
        return vit_eval.write_samples(self, run, out_path, **options)

    def evaluate(self, run, **options) -> dict:
        return vit_eval.evaluate(self, run, **options)
