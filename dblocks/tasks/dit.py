"""Class-conditional image generation with DiT denoisers (paper §4.2): the target y is the image itself.

Loss: EDM-weighted L2, lambda(sigma) per sample, sigma from the unit's range; labels dropped to the null class with
probability class_dropout for classifier-free guidance. Sampling: the blocks' chain with guidance
D = D_uncond + w (D_cond - D_uncond).
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
from dblocks.models.dit import DiT
from dblocks.tasks.base import Task, Unit, register
from dblocks.tasks.image_data import LabelledImages


@register
class DiTTask(LabelledImages, Task):
    name = "dit"

    # -- config --------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        m, d = c.model, c.data
        if not (d.name in ("fashion_mnist", "synthetic") or str(d.name).startswith("tfds:")):
            p.append(f"data.name={d.name!r} is unknown; choose one of {data_lib.IMAGE_DATASETS}")
        if d.image_size % m.patch:
            p.append(f"data.image_size={d.image_size} is not divisible by model.patch={m.patch}")
        if m.hidden % m.heads or m.hidden % 4:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads} and by 4")
        if not 0 <= m.class_dropout < 1:
            p.append(f"model.class_dropout={m.class_dropout} must be in [0, 1)")
        s = c.sample
        if s.solver not in sampling.SOLVERS:
            p.append(f"sample.solver={s.solver!r}; choose one of {sampling.SOLVERS}")
        if s.steps < max(2, int(c.blocks.num_blocks)):
            p.append(f"sample.steps={s.steps} cannot visit all {c.blocks.num_blocks} blocks")
        if s.guidance < 0:
            p.append(f"sample.guidance={s.guidance} must be >= 0")
        return p

    # -- model ---------------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit) -> DiT:
        m, d = self.config.model, self.config.data
        return DiT(num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads, patch=m.patch,
                   image_size=d.image_size, channels=d.channels, num_classes=d.num_classes,
                   mlp_ratio=m.mlp_ratio, dropout=m.dropout)

    def init_params(self, model, rng, batch):
        n = batch["image"].shape[0]
        return model.init({"params": rng}, jnp.asarray(batch["image"]), jnp.zeros((n,)),
                          jnp.asarray(batch["label"]))["params"]

    def denoise(self, model, params, z, sigma, label, train=False, rng=None):
        """D(z, sigma) = c_skip z + c_out F(c_in z, c_noise, label)."""
        pc = edm_lib.precondition(sigma, self.edm.sigma_data)
        x = lambda a: edm_lib.expand_to(a, z)  # noqa: E731
        f = model.apply({"params": params}, x(pc.c_in) * z, pc.c_noise, label, train=train,
                        rngs={"dropout": rng} if train else None)
        return x(pc.c_skip) * z + x(pc.c_out) * f

    def loss(self, model, params, batch, rng, train_range, train=True):
        c = self.config
        k_sigma, k_eps, k_drop, k_flip, k_dropout = jax.random.split(rng, 5)
        y, label = batch["image"], batch["label"]
        n = y.shape[0]
        if c.data.get("flip", False):
            y = jnp.where(jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1)), y[:, :, ::-1], y)
        label = jnp.where(jax.random.uniform(k_drop, (n,)) < c.model.class_dropout, c.data.num_classes, label)
        sigma = edm_lib.sample_sigma(k_sigma, (n,), train_range[0], train_range[1], self.edm.p_mean,
                                     self.edm.p_std)
        z = y + edm_lib.expand_to(sigma, y) * jax.random.normal(k_eps, y.shape)
        d = self.denoise(model, params, z, sigma, label, train=train, rng=k_dropout)
        per_sample = jnp.mean((d - y) ** 2, axis=(1, 2, 3))
        w = edm_lib.loss_weight(sigma, self.edm.sigma_data, c.edm.loss_weighting, c.edm.max_weight)
        return edm_lib.weighted_mean(per_sample, w), {"mse": jnp.mean(per_sample)}

    # -- sampling ------------------------------------------------------------------------------------------------
    def _guided(self, model):
        """One jitted guided denoiser per model shape (blocks of equal shape share the compiled function)."""
        cache = self.__dict__.setdefault("_guided_cache", {})
        if repr(model) in cache:
            return cache[repr(model)]

        @jax.jit
        def guided(params, z, sigma, label, guidance):
            null = jnp.full_like(label, self.config.data.num_classes)
            d = self.denoise(model, params, jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]),
                             jnp.concatenate([label, null]))
            d_cond, d_uncond = jnp.split(d, 2)
            return d_uncond + guidance * (d_cond - d_uncond)
        cache[repr(model)] = guided
        return guided

    def generate(self, run, labels: np.ndarray, steps: int, solver: str, guidance: float, seed: int,
                 grid_kind: str = "cdf") -> sampling.SampleResult:
        """Samples one image per label: [N, S, S, C] in about [-1, 1]."""
        labels = jnp.asarray(labels, jnp.int32)
        g = jnp.float32(guidance)

        def denoise(b, z, sigma):
            return self._guided(run.models[b])(run.params[b], z, sigma, labels, g), None

        d = self.config.data
        z0 = edm_lib.initial_noise(jax.random.PRNGKey(seed), (len(labels), d.image_size, d.image_size, d.channels),
                                   self.edm.sigma_max)
        return sampling.sample(denoise, z0, sampling.grid_for(steps, self.edm, grid_kind), run.partition, solver)

    def write_samples(self, run, out_path, steps=None, solver=None, guidance=None, per_class=None, seed=0,
                      grid_kind="cdf", **_):
        s = self.config.sample
        steps, solver = int(steps or s.steps), solver or s.solver
        guidance = float(s.guidance if guidance is None else guidance)
        per_class = int(per_class or s.per_class)
        classes = int(self.config.data.num_classes)
        labels = np.repeat(np.arange(classes), per_class)
        t0 = time.perf_counter()
        res = self.generate(run, labels, steps, solver, guidance, seed, grid_kind)
        images = np.asarray(jax.device_get(res.denoised))
        seconds = time.perf_counter() - t0
        names = list(data_lib.FASHION_MNIST_CLASSES) if self.config.data.name == "fashion_mnist" else [
            f"class {k}" for k in range(classes)]
        images_lib.save_grid(images, classes, out_path, row_labels=names)
        return {"path": out_path, "images": len(labels), "steps": steps, "solver": solver, "guidance": guidance,
                "block_calls_per_sample": res.block_calls, "seconds": round(seconds, 2),
                "seconds_per_image": seconds / len(labels)}

    # -- evaluation (FID) ----------------------------------------------------------------------------------------
    def evaluate(self, run, num_samples=10_000, repeats=3, steps=None, solver=None, guidance=None, seed=0,
                 batch_size=None, limit=None, cache_dir=None, fid_train_steps=1500, **_) -> dict:
        """FID (min of `repeats` sets of num_samples class-balanced samples) against the test split, in the
        features of a classifier trained on this dataset (dblocks.fid; NOT Inception: not comparable with the
        paper's FIDs), plus sampling time per image and block calls per sample. limit caps the reference set."""
        from dblocks import fid
        d, s = self.config.data, self.config.sample
        steps, solver = int(steps or s.steps), solver or s.solver
        guidance = float(s.guidance if guidance is None else guidance)
        to_batch = lambda ex: (data_lib.to_model_range(ex["image"]), np.asarray(ex["label"], np.int32))  # noqa
        key = {"name": d.name, "image_size": d.image_size, "channels": d.channels, "num_classes": d.num_classes}
        extractor = fid.load_or_train(cache_dir, key, self.source, to_batch, int(d.num_classes),
                                      steps=int(fid_train_steps))
        test = self.source("test")
        n_ref = len(test) if not limit else min(int(limit), len(test))
        reference = to_batch(test.get(np.arange(n_ref)))[0]
        calls = []

        def sample_fn(r, start, count):
            labels = np.arange(start, start + count) % int(d.num_classes)
            res = self.generate(run, labels, steps, solver, guidance, seed=seed * 1_000_003 + r * 10_007 + start)
            calls.append(res.block_calls)
            return jax.device_get(res.denoised)

        out = fid.evaluate_samples(extractor, reference, sample_fn, int(num_samples), int(repeats),
                                   int(batch_size or 500))
        return {"headline": {"name": "fid_min_of_%d" % int(repeats), "value": out["fid_min"],
                             "higher_is_better": False},
                "block_calls_per_sample": int(calls[-1]), "steps": steps, "solver": solver, "guidance": guidance,
                "network_batch_note": "with guidance each block call runs the conditional and unconditional "
                                      "branch as one doubled batch",
                "method": run.method, **out,
                "feature_net": {k: extractor.meta.get(k) for k in ("path", "test_accuracy", "steps", "features")},
                "fid_features": "dblocks.fid.FeatureNet trained on this dataset (not Inception-v3)"}
