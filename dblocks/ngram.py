"""An interpolated token n-gram model (Jelinek-Mercer with count-dependent weights), fitted in numpy on the train
split: an independent judge of generated text that neither contestant trained.

    p_k(c | ctx_{k-1}) = (n(ctx, c) + beta * p_{k-1}(c | ctx_{k-2})) / (n(ctx) + beta),   p_0 = 1 / V

i.e. weight lambda = n(ctx) / (n(ctx) + beta) on the order-k relative frequency. Contexts are packed into int64
keys (base V), so the order is capped where V^order would overflow.
"""
from __future__ import annotations

import math

import numpy as np


class NGram:
    def __init__(self, stream: np.ndarray, vocab: int, order: int = 6, beta: float = 5.0):
        self.V, self.beta = int(vocab), float(beta)
        self.order = max(1, min(int(order), int(62 * math.log(2) / math.log(max(self.V, 2)))))
        s = np.asarray(stream, np.int64).reshape(-1)
        self.tables = []   # per order k = 1..order: (sorted k-gram keys, counts, sorted context keys, counts)
        for k in range(1, self.order + 1):
            grams = self._keys(s, k)
            g, gc = np.unique(grams, return_counts=True)
            if k > 1:
                c, cc = np.unique(grams // self.V, return_counts=True)
            else:
                c, cc = np.zeros(1, np.int64), np.array([len(grams)])
            self.tables.append((g, gc, c, cc))

    def _keys(self, s: np.ndarray, k: int) -> np.ndarray:
        """Keys of every k-gram s[i-k+1..i], i = k-1..len-1."""
        key = np.zeros(len(s) - k + 1, np.int64)
        for j in range(k):
            key = key * self.V + s[j:len(s) - k + 1 + j]
        return key

    @staticmethod
    def _lookup(keys, counts, q):
        i = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
        return np.where(keys[i] == q, counts[i], 0)

    def logprobs(self, seqs: np.ndarray, start: int = 1) -> np.ndarray:
        """Natural-log probabilities of seqs[:, start:] [N, L - start], each token given the tokens before it in its
        own sequence (up to order - 1 of them)."""
        seqs = np.asarray(seqs, np.int64)
        N, L = seqs.shape
        out = np.zeros((N, L - start))
        for i in range(start, L):
            tok = seqs[:, i]
            p = np.full(N, 1.0 / self.V)
            ctx = np.zeros(N, np.int64)
            for k in range(1, min(self.order, i + 1) + 1):
                g, gc, c, cc = self.tables[k - 1]
                if k > 1:
                    ctx = ctx + seqs[:, i - k + 1] * self.V ** (k - 2)   # context keys grow to the left
                n_ctx = self._lookup(c, cc, ctx) if k > 1 else np.full(N, cc[0])
                n_gram = self._lookup(g, gc, ctx * self.V + tok)
                p = (n_gram + self.beta * p) / (n_ctx + self.beta)
            out[:, i - start] = np.log(p)
        return out
