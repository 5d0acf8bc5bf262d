"""Metrics for language models and the text they generate: bits per token from log-probabilities, the log-probability
of a mixture over noise draws, distinct-n and repetition rate. Pure functions of numbers and strings.

Distinct-n and repetition are computed on whitespace-separated words (for a character model, character n-grams mostly
measure spelling; word n-grams measure what a reader sees as repetition).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

import numpy as np
from scipy.special import logsumexp

LN2 = math.log(2.0)


def bits_per_token(logp_true: np.ndarray) -> float:
    """Mean of -log2 p(true token) over all entries of `logp_true` (natural-log probabilities)."""
    logp_true = np.asarray(logp_true, np.float64)
    return float(-logp_true.mean() / LN2)


def mixture_logprob(logps: np.ndarray, axis: int = 0) -> np.ndarray:
    """log of the average of p over `axis` (e.g. noise draws of a sampler), computed stably in log space:
    log((1/D) sum_d p_d) = logsumexp_d(log p_d) - log D."""
    logps = np.asarray(logps, np.float64)
    return logsumexp(logps, axis=axis) - math.log(logps.shape[axis])


def entropy_bits(logp) -> float:
    """Mean entropy in bits of distributions given as log-probabilities [..., V] (natural log)."""
    logp = np.asarray(logp, np.float64)
    return float(np.mean(-np.sum(np.exp(logp) * logp, axis=-1)) / LN2)


def mixture_entropy_bits(prob_sum, num: int) -> float:
    """Mean entropy in bits of the average of `num` distributions whose probabilities sum to prob_sum [..., V]."""
    return entropy_bits(np.log(np.maximum(np.asarray(prob_sum, np.float64) / num, 1e-30)))


def perplexity(logp_true: np.ndarray) -> float:
    """exp of the mean negative log-likelihood per token."""
    return float(math.exp(-float(np.mean(np.asarray(logp_true, np.float64)))))


def ngrams(items: Sequence, n: int) -> list[tuple]:
    return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all texts divided by all word n-grams (1.0 = no n-gram occurs twice); nan when
    the texts hold no n-gram."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return float(len(set(grams)) / len(grams)) if grams else float("nan")


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Mean over texts of the fraction of word n-grams that already occurred earlier in the same text
    (0 = no repeats; a text looping on one phrase approaches 1). Texts with no n-gram are skipped."""
    rates = []
    for t in texts:
        grams = ngrams(t.split(), n)
        if grams:
            rates.append(sum(c - 1 for c in Counter(grams).values()) / len(grams))
    return float(np.mean(rates)) if rates else float("nan")


def text_summary(texts: Sequence[str], ns: Sequence[int] = (1, 2, 3), rep_n: int = 3) -> dict:
    """distinct-n for each n and the repetition rate, in one dict."""
    out = {f"distinct_{n}": distinct_n(texts, n) for n in ns}
    out[f"repetition_{rep_n}"] = repetition_rate(texts, rep_n)
    return out


def char_entropy_bits(texts: Sequence[str]) -> float:
    """Entropy in bits of the character frequencies over all texts (a diversity measure of a sampler's output)."""
    counts = np.array(list(Counter("".join(texts)).values()), np.float64)
    if counts.size == 0:
        return float("nan")
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 1, scaling: float = 5.0) -> float | None:
    """MAUVE (Pillutla et al. 2021) between reference features p [n, d] and sample features q [m, d], from the PyPI
    package `mauve-text` (the optional extra `dblocks[mauve]`: GPL-3.0, with faiss and scikit-learn; it needs no
    torch when given features). None, with a warning, when it is not installed: the other metrics still run."""
    try:
        import mauve   # noqa: PLC0415 (optional third-party dependency)
    except ImportError:
        logging.getLogger("dblocks").warning("MAUVE skipped: the optional package mauve-text is not installed "
                                             "(pip install 'dblocks[mauve]', or pip install mauve-text)")
        return None
    out = mauve.compute_mauve(p_features=np.asarray(p_features, np.float32), q_features=np.asarray(q_features,
                              np.float32), seed=seed, mauve_scaling_factor=scaling, verbose=False,
                              num_buckets="auto")
    return float(out.mauve)
