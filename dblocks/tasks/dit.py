"""Class-conditional image generation with DiT denoisers (paper §4.2): the target y is the image itself.

Loss: EDM-weighted L2, lambda(sigma) per sample, sigma from the unit's range; labels dropped to the null class with
probability class_dropout for classifier-free guidance. Sampling: the blocks' chain with guidance

    D = D_uncond + w (D_cond - D_uncond)          (one doubled batch per block call)

After training: sample grids and FID. Sampler options are explicit arguments; unset ones take the config's `sample`
section.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import data as data_lib
from dblocks import edm as edm_lib
from dblocks import images as images_lib
from dblocks import partition as partition_lib
from dblocks import sampling
from dblocks.models.dit import DiT
from dblocks.models.options import model_options
from dblocks.tasks.base import Task, Unit, register
from dblocks.tasks.image_data import LabelledImages, class_names


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

    # -- after training: sampling, sample grids, FID ------------------------------------------------------------------
    def guided_denoiser(self, model):
        """One jitted guided denoiser (params, z, sigma, label, guidance) -> D per model shape (blocks of equal shape
        share the compiled function)."""
        def build():
            @jax.jit
            def guided(params, z, sigma, label, guidance):
                null = jnp.full_like(label, self.config.data.num_classes)
                d = self.denoise(model, params, jnp.concatenate([z, z]), jnp.concatenate([sigma, sigma]),
                                 jnp.concatenate([label, null]))
                d_cond, d_uncond = jnp.split(d, 2)
                return d_uncond + guidance * (d_cond - d_uncond)
            return guided
        return self.jit("guided_denoiser", model, build)

    def sampler_options(self, grid_points=None, solver=None, guidance=None, grid_kind=None) -> dict:
        """The sampler settings: explicit values, else the config's sample section."""
        s = self.config.sample
        return {"grid_points": int(grid_points or s.grid_points), "solver": solver or s.solver,
                "guidance": float(s.guidance if guidance is None else guidance),
                "grid_kind": grid_kind or s.grid_kind}

    def generate(self, run, labels, grid_points=None, solver=None, guidance=None, seed=0,
                 grid_kind=None) -> sampling.SampleResult:
        """Samples one image per label: [N, S, S, C] in about [-1, 1] (SampleResult.denoised)."""
        opts = self.sampler_options(grid_points, solver, guidance, grid_kind)
        labels = jnp.asarray(labels, jnp.int32)
        g = jnp.float32(opts["guidance"])

        def denoise(b, z, sigma):
            return self.guided_denoiser(run.models[b])(run.params[b], z, sigma, labels, g), None

        d = self.config.data
        z0 = edm_lib.initial_noise(jax.random.PRNGKey(seed), (len(labels), d.image_size, d.image_size, d.channels),
                                   self.edm.sigma_max)
        grid = sampling.grid_for(opts["grid_points"], self.edm, opts["grid_kind"])
        return sampling.sample(denoise, z0, grid, run.partition, opts["solver"])

    def write_samples(self, run, out_path, grid_points=None, solver=None, guidance=None, per_class=None, seed=0,
                      grid_kind=None, **_) -> dict:
        """A grid of samples, one row per class, as a PNG; returns a summary."""
        opts = self.sampler_options(grid_points, solver, guidance, grid_kind)
        per_class = int(per_class or self.config.sample.per_class)
        classes = int(self.config.data.num_classes)
        labels = np.repeat(np.arange(classes), per_class)
        t0 = time.perf_counter()
        res = self.generate(run, labels, seed=seed, **opts)
        images = np.asarray(jax.device_get(res.denoised))
        seconds = time.perf_counter() - t0
        images_lib.save_grid(images, classes, out_path, row_labels=class_names(self.config))
        return {"path": out_path, "images": len(labels), **opts, "block_calls_per_sample": res.block_calls,
                "seconds": round(seconds, 2), "seconds_per_image": seconds / len(labels)}

    def evaluate(self, run, num_samples=10_000, repeats=3, grid_points=None, solver=None, guidance=None, seed=0,
                 batch_size=None, limit=None, cache_dir=None, fid_train_steps=1500, grid_kind=None, split="test",
                 **_) -> dict:
        """FID (min of `repeats` sets of num_samples class-balanced samples) against `split` ('test', or
        'validation' for choosing settings), in the features of a classifier trained on this dataset's train split
        (dblocks.fid; NOT Inception: not comparable with the paper's FIDs), plus sampling time per image and block
        calls per sample. `limit` caps the reference set."""
        from dblocks import fid
        d = self.config.data
        opts = self.sampler_options(grid_points, solver, guidance, grid_kind)
        to_batch = lambda ex: (data_lib.to_model_range(ex["image"]), np.asarray(ex["label"], np.int32))  # noqa: E731
        key = dict(self.signature()["data"])   # the data the network trains on: with held-out fractions if they matter
        extractor = fid.load_or_train(cache_dir, key, self.source, to_batch, int(d.num_classes),
                                      steps=int(fid_train_steps))
        ref_src = self.source(split)
        n_ref = len(ref_src) if not limit else min(int(limit), len(ref_src))
        reference = to_batch(ref_src.get(np.arange(n_ref)))[0]
        calls = []

        def sample_fn(r, start, count):
            labels = np.arange(start, start + count) % int(d.num_classes)
            res = self.generate(run, labels, seed=seed * 1_000_003 + r * 10_007 + start, **opts)
            calls.append(res.block_calls)
            return jax.device_get(res.denoised)

        out = fid.evaluate_samples(extractor, reference, sample_fn, int(num_samples), int(repeats),
                                   int(batch_size or 500))
        return {"headline": {"name": "fid_min_of_%d" % int(repeats), "value": out["fid_min"],
                             "higher_is_better": False},
                "block_calls_per_sample": int(calls[-1]), **opts,
                "network_batch_note": "with guidance each block call runs the conditional and unconditional branch "
                                      "as one doubled batch",
                "method": run.method, "split": split, **out,
                "feature_net": {k: extractor.meta.get(k) for k in ("path", "test_accuracy", "steps", "features")},
                "fid_features": "dblocks.fid.FeatureNet trained on this dataset (not Inception-v3)"}
