"""Class-conditional image generation with DiT denoisers (paper §4.2): the target y is the image itself.

Loss: EDM-weighted L2, lambda(sigma) per sample, sigma from the unit's range; labels dropped to the null class with
probability class_dropout for classifier-free guidance. Sampling: the blocks' chain with guidance
D = D_uncond + w (D_cond - D_uncond).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dblocks import data as data_lib
from dblocks import edm as edm_lib
from dblocks import images as images_lib
from dblocks import partition as partition_lib
from dblocks import sampling
from dblocks.models.dit import DiT
from dblocks.models.options import model_options
from dblocks.tasks import dit_eval
from dblocks.tasks.base import Task, Unit, register
from dblocks.tasks.image_data import LabelledImages


@register
class DiTTask(LabelledImages, Task):
    name = "dit"
    defaults = {"sample": {"grid_kind": "cdf"},   # sigma grid of the sampler: equal-CDF ('cdf') or 'karras'
                "model": {"out_conv": 0}}   # a convolution after unpatchify (0 = none, the paper's DiT)

    # -- config --------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        m, d = c.model, c.data
        if not data_lib.is_image_dataset(d.name):
            p.append(f"data.name={d.name!r} is unknown; choose one of {data_lib.IMAGE_DATASETS}")
        if d.image_size % m.patch:
            p.append(f"data.image_size={d.image_size} is not divisible by model.patch={m.patch}")
        if m.hidden % m.heads or m.hidden % 4:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads} and by 4")
        oc = m.out_conv
        if not (isinstance(oc, int) and oc >= 0 and (oc == 0 or oc % 2 == 1)):
            p.append(f"model.out_conv={oc!r} must be 0 (none) or an odd kernel size such as 3")
        if not 0 <= m.class_dropout < 1:
            p.append(f"model.class_dropout={m.class_dropout} must be in [0, 1)")
        s = c.sample
        if s.solver not in sampling.SOLVERS:
            p.append(f"sample.solver={s.solver!r}; choose one of {sampling.SOLVERS}")
        kind = s.grid_kind
        if kind not in sampling.GRID_KINDS:
            p.append(f"sample.grid_kind={kind!r}; choose one of {sampling.GRID_KINDS}")
        if s.grid_points < max(2, int(c.blocks.num_blocks)):
            p.append(f"sample.grid_points={s.grid_points} cannot visit all {c.blocks.num_blocks} blocks")
        elif c.method == "dblocks" and not p:
            try:   # e.g. a 6-point Karras grid steps over the middle block of 3
                partition_lib.check_grid(sampling.grid_for(int(s.grid_points), self.edm, kind), self.partition())
            except ValueError as e:
                p.append(f"sample.grid_points={s.grid_points} on the {kind} grid: {e}")
        if s.guidance < 0:
            p.append(f"sample.guidance={s.guidance} must be >= 0")
        return p

    # -- model ---------------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit) -> DiT:
        m, d = self.config.model, self.config.data
        return DiT(num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads, patch=m.patch,
                   image_size=d.image_size, channels=d.channels, num_classes=d.num_classes,
                   mlp_ratio=m.mlp_ratio, dropout=m.dropout, out_conv=int(m.out_conv),
                   **model_options(m))

    def init_params(self, model, rng, batch):
        n = batch["image"].shape[0]
        return model.init({"params": rng}, images_lib.to_model_range(jnp.asarray(batch["image"])), jnp.zeros((n,)),
                          jnp.asarray(batch["label"]))["params"]

    def denoise(self, model, params, z, sigma, label, train=False, rng=None):
        """D(z, sigma) = c_skip z + c_out F(c_in z, c_noise, label)."""
        pc = edm_lib.precondition(sigma, self.edm.sigma_data)
        x = lambda a: edm_lib.expand_to(a, z)  # noqa: E731
        f = model.apply({"params": params}, x(pc.c_in) * z, pc.c_noise, label, train=train,
                        rngs={"dropout": rng} if train else None)
        return x(pc.c_skip) * z + x(pc.c_out) * f

    def draw(self, model, batch, rng, train_range, train=True):
        c = self.config
        k_sigma, k_eps, k_drop, k_flip, k_dropout = jax.random.split(rng, 5)
        y, label = images_lib.to_model_range(batch["image"]), batch["label"]
        n = y.shape[0]
        if train and c.data.flip:
            y = jnp.where(jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1)), y[:, :, ::-1], y)
        if train:   # classifier-free guidance: labels dropped to the null class
            label = jnp.where(jax.random.uniform(k_drop, (n,)) < c.model.class_dropout, c.data.num_classes, label)
        sigma = edm_lib.sample_sigma(k_sigma, (n,), train_range[0], train_range[1], self.edm.p_mean,
                                     self.edm.p_std)
        z = y + edm_lib.expand_to(sigma, y) * jax.random.normal(k_eps, y.shape)
        return {"y": y, "z": z, "sigma": sigma, "label": label}, k_dropout

    def loss_on(self, model, params, inputs, rng, train=True):
        y, sigma = inputs["y"], inputs["sigma"]
        d = self.denoise(model, params, inputs["z"], sigma, inputs["label"], train=train, rng=rng)
        per_sample = jnp.mean((d - y) ** 2, axis=(1, 2, 3))
        w = edm_lib.loss_weight(sigma, self.edm.sigma_data, self.config.edm.loss_weighting, self.config.edm.max_weight)
        return edm_lib.weighted_mean(per_sample, w), {"mse": jnp.mean(per_sample)}

    # -- after training (dblocks.tasks.dit_eval) -------------------------------------------------------------------
    def generate(self, run, labels, grid_points=None, solver=None, guidance=None, seed=0, grid_kind=None):
        """Samples one image per label (dblocks.tasks.dit_eval.generate; unset options from config.sample)."""
        return dit_eval.generate(self, run, labels, seed=seed,
                                 **dit_eval.sampler_options(self, grid_points, solver, guidance, grid_kind))

    def write_samples(self, run, out_path, **options) -> dict:
        return dit_eval.write_samples(self, run, out_path, **options)

    def evaluate(self, run, **options) -> dict:
        return dit_eval.evaluate(self, run, **options)
