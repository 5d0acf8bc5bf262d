"""The fixed target space E for discrete targets (class labels, tokens), docs/design.md item 4.

E is not learned: its rows come from a seed, so every block has the same E without sharing a parameter (a learned
label embedding would be a parameter every block writes, breaking block independence). The scale contract
(docs/method.md §5): every row has norm sigma_data * sqrt(dim), i.e. per-coordinate RMS sigma_data, the scale the
EDM preconditioning assumes. The sampler's bridge from logits back to the target space uses the same E.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BRIDGES = ("softmax", "renorm", "argmax", "sample")


def fixed_embedding(num: int, dim: int, sigma_data: float, seed: int = 0, norm: float = 0.0) -> np.ndarray:
    """[num, dim] float32: orthogonal rows when num <= dim, else near-orthogonal Gaussian rows; each row of
    norm sigma_data * sqrt(dim) (the scale contract), or `norm` when it is > 0 (config model.target_norm; 1.0 = the
    paper's L2-normalised embeddings). The norm decides below which sigma the noisy target gives itself away, hence
    what each block must learn from its input (docs/classification.md)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((max(num, dim), dim))
    if num <= dim:
        q, _ = np.linalg.qr(g[:dim].T)   # [dim, dim] orthonormal columns
        rows = q.T[:num]
    else:
        rows = g[:num]
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows * (norm if norm > 0 else sigma_data * np.sqrt(dim))).astype(np.float32)


def bridge(logits: jax.Array, E: jax.Array, kind: str = "softmax", key: jax.Array | None = None) -> jax.Array:
    """Logits [..., num] -> a point of the target space [..., dim] for the next ODE step.

    softmax: E-expectation under softmax(logits) (the paper's); shrinks toward 0 when the model is unsure.
    renorm:  the same, rescaled to the row norm of E (keeps train/inference scales equal).
    argmax:  the row of the most likely class.
    sample:  the row of a class drawn from softmax(logits) with `key` (for the ancestral sampler: a clean sample,
             not the posterior mean, so each step lands on the noisy marginal; `edm.ancestral_step`).
    """
    if kind == "softmax":
        return jax.nn.softmax(logits, axis=-1) @ E
    if kind == "renorm":
        d = jax.nn.softmax(logits, axis=-1) @ E
        target = jnp.linalg.norm(E, axis=-1).mean()
        return d * (target / jnp.maximum(jnp.linalg.norm(d, axis=-1, keepdims=True), 1e-6))
    if kind == "argmax":
        return E[jnp.argmax(logits, axis=-1)]
    if kind == "sample":
        if key is None:
            raise ValueError("bridge 'sample' needs a key")
        return E[jax.random.categorical(key, logits, axis=-1)]
    raise ValueError(f"unknown bridge {kind!r}; choose one of {BRIDGES}")
