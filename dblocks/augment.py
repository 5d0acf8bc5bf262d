"""Image augmentation inside the jitted step: random horizontal flip and a RandAugment subset, in JAX.

Randomness comes from the step's rng, so a unit's augmentations are a function of (seed, unit, step) like its
batches, and the CPU data path stays trivial. RandAugment (Cubuk et al. 2020) as torchvision's defaults
(num_ops=2, magnitude 9 of 30), with 13 of its 14 ops: identity, brightness, color, contrast, sharpness,
posterize, solarize, autocontrast, rotate, shear x/y, translate x/y. Equalize (histogram equalisation) is left out.
Every op is computed for every image and one is selected (lax.switch under vmap, AUG_CHUNK images at a time):
cheap next to a ViT forward pass.
Images are [N, S, S, C] floats in [-1, 1].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

Array = jax.Array
OPS = ("identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast",
       "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def random_flip(key: Array, images: Array) -> Array:
    """Horizontal flip of each image with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def _gray(x: Array) -> Array:
    if x.shape[-1] == 3:
        return jnp.sum(x * jnp.asarray([0.299, 0.587, 0.114]), -1, keepdims=True)
    return x


def _blend(a: Array, b: Array, factor) -> Array:
    """b + factor (a - b): factor 1 gives a, 0 gives b (PIL ImageEnhance)."""
    return jnp.clip(b + factor * (a - b), 0.0, 1.0)


def _smooth(x: Array) -> Array:
    """PIL's SMOOTH filter (3x3, centre weight 5, total 13), border pixels kept."""
    k = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], x.dtype) / 13.0
    pad = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    S0, S1 = x.shape[:2]
    out = sum(k[i, j] * pad[i:i + S0, j:j + S1] for i in range(3) for j in range(3))
    return out.at[0].set(x[0]).at[-1].set(x[-1]).at[:, 0].set(x[:, 0]).at[:, -1].set(x[:, -1])


def _affine(x: Array, matrix: Array) -> Array:
    """Output pixel (r, c) reads input at matrix @ (r - centre, c - centre) + centre; bilinear, black outside."""
    S0, S1 = x.shape[:2]
    ctr = jnp.asarray([(S0 - 1) / 2, (S1 - 1) / 2])
    rr, cc = jnp.meshgrid(jnp.arange(S0, dtype=jnp.float32), jnp.arange(S1, dtype=jnp.float32), indexing="ij")
    src = jnp.einsum("ij,jhw->ihw", matrix, jnp.stack([rr - ctr[0], cc - ctr[1]])) + ctr[:, None, None]
    chans = [map_coordinates(x[..., k], [src[0], src[1]], order=1, mode="constant", cval=0.0)
             for k in range(x.shape[-1])]
    return jnp.stack(chans, -1)


def _op_branches(x: Array, mag: Array, sign: Array) -> list:
    """One function per op; mag in [0, 1] is the fraction of each op's maximum (torchvision's ranges)."""
    s = sign * mag
    size = x.shape[1]

    def rot(deg):
        t = deg * math.pi / 180
        return jnp.asarray([[jnp.cos(t), -jnp.sin(t)], [jnp.sin(t), jnp.cos(t)]])

    return [
        lambda: x,
        lambda: _blend(x, jnp.zeros_like(x), 1 + 0.9 * s),
        lambda: _blend(x, jnp.broadcast_to(_gray(x), x.shape), 1 + 0.9 * s),
        lambda: _blend(x, jnp.full_like(x, jnp.mean(_gray(x))), 1 + 0.9 * s),
        lambda: _blend(x, _smooth(x), 1 + 0.9 * s),
        lambda: jnp.floor(x * 255 / 2 ** jnp.round(4 * mag)) * 2 ** jnp.round(4 * mag) / 255,  # 8 - round(4m) bits
        lambda: jnp.where(x >= 1.0 - mag, 1.0 - x, x),
        lambda: (x - x.min((0, 1))) / jnp.maximum(x.max((0, 1)) - x.min((0, 1)), 1e-3),
        lambda: _affine(x, rot(30.0 * s)),
        lambda: _affine(x, jnp.asarray([[1.0, 0.0], [0.3 * s, 1.0]])),
        lambda: _affine(x, jnp.asarray([[1.0, 0.3 * s], [0.0, 1.0]])),
        lambda: _translate(x, 0.0, s * 0.45 * size),
        lambda: _translate(x, s * 0.45 * size, 0.0),
    ]


def _translate(x: Array, dr, dc) -> Array:
    S0, S1 = x.shape[:2]
    rr, cc = jnp.meshgrid(jnp.arange(S0, dtype=jnp.float32), jnp.arange(S1, dtype=jnp.float32), indexing="ij")
    chans = [map_coordinates(x[..., k], [rr - dr, cc - dc], order=1, mode="constant", cval=0.0)
             for k in range(x.shape[-1])]
    return jnp.stack(chans, -1)


def apply_op(x: Array, op: Array, mag: Array, sign: Array) -> Array:
    """One op (index into OPS) on one image [S, S, C] in [0, 1]."""
    branches = _op_branches(x, mag, sign)
    return jax.lax.switch(op, [lambda _, f=f: f() for f in branches], None)


AUG_CHUNK = 16   # images augmented at once: the same values as the whole batch, about a tenth of its temporaries


def rand_augment(key: Array, images: Array, num_ops: int = 2, magnitude: float = 9.0,
                 num_bins: int = 31) -> Array:
    """RandAugment on [N, S, S, C] in [-1, 1]: num_ops ops per image, each uniform over OPS, random sign."""
    if num_ops <= 0:
        return images
    mag = jnp.float32(magnitude / (num_bins - 1))
    x = (images + 1.0) / 2.0
    n = images.shape[0]
    for k in jax.random.split(key, num_ops):
        k_op, k_sign = jax.random.split(k)
        ops = jax.random.randint(k_op, (n,), 0, len(OPS))
        signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (n,)), 1.0, -1.0)
        # AUG_CHUNK images at a time (a vmap inside lax.map): every op of every image at once kept ~40 gather
        # index/weight arrays of the whole batch alive, the peak of a ViT step once its layers are chunked
        x = jax.lax.map(lambda a: apply_op(a[0], a[1], mag, a[2]), (x, ops, signs), batch_size=AUG_CHUNK)
    return x * 2.0 - 1.0
