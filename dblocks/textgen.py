"""Token-by-token decoding shared by the autoregressive models (plain LM, DiffusionBlocks, recurrent-depth).

A model supplies a `Decoder`: `prefill` reads a context into a state (a K/V cache), `next_logits` gives the logits
of the next position (for DiffusionBlocks this runs the whole chain of blocks; it may use randomness), `append`
adds the drawn token to the state. `generate` runs the loop and draws each token with temperature / top-p / greedy.
The context window is the trained sequence length: when it is full, the state is rebuilt from the last half.

This Python loop (a dispatch per block call, a host sync per token) is the reference. A cached decoder also carries
its pure form (`compiled`, a dblocks.tasks.lm.decode.Compiled), from which dblocks.tasks.lm.decode.generate decodes
each window in one compiled loop and draws the same tokens for the same key; that is the default of the tasks'
generation (LMTask.generate, dblocks.tasks.lm.inference).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass
class Decoder:
    prefill: Callable[[np.ndarray], Any]            # tokens [N, P] (1 <= P <= t_max) -> state
    next_logits: Callable[[Any, Array], Array]      # (state, key) -> logits [N, V] of the next position
    append: Callable[[Any, np.ndarray], Any]        # (state, tokens [N]) -> state with one more position
    t_max: int                                      # positions the model was trained on
    calls_per_token: int                            # network (block) evaluations per generated token
    compiled: Any = None                            # lm.decode.Compiled: the traceable form (cached decoders only)


_PAIRWISE_TOP_P = 256   # vocabularies up to this size filter top-p by pairwise comparison ([N, V, V]), larger by sort


def sample_token(logits: Array, key: Array, temperature: float = 1.0, top_p: float = 1.0,
                 greedy: bool = False) -> Array:
    """logits [N, V] -> tokens [N]: argmax if greedy, else a draw from softmax(logits / temperature) restricted to
    the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if greedy:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0 and logits.shape[-1] <= _PAIRWISE_TOP_P:
        # the same set without a sort: token j is kept when the tokens ranked before it (higher logit, or equal
        # logit and lower index, as the stable argsort below ranks them) hold less than top_p. XLA's sort on the CPU
        # took 494 us for [64, 65], this 172 us (docs/lab/performance.md, "Where the decoding loop's time went").
        probs, idx = jax.nn.softmax(logits, axis=-1), jnp.arange(logits.shape[-1])
        li, lk = logits[:, :, None], logits[:, None, :]                      # [N, j, k]
        before = (lk > li) | ((lk == li) & (idx[None, None, :] < idx[None, :, None]))
        keep = jnp.sum(jnp.where(before, probs[:, None, :], 0.0), axis=-1) < top_p
        logits = jnp.where(keep, logits, -jnp.inf)
    elif top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p   # the first one is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1)


_sample_token = jax.jit(sample_token, static_argnames=("temperature", "top_p", "greedy"))


def generate(decoder: Decoder, prompt: np.ndarray, max_tokens: int, key: Array, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False) -> np.ndarray:
    """prompt [N, P] int -> the new tokens [N, max_tokens]."""
    context = np.asarray(prompt, np.int32)[:, -decoder.t_max:]
    state, n = decoder.prefill(context), context.shape[1]
    out = []
    for t in range(max_tokens):
        if n == decoder.t_max:   # window full: keep the last half
            context = context[:, -(decoder.t_max // 2):]
            state, n = decoder.prefill(context), context.shape[1]
        k_chain, k_draw = jax.random.split(jax.random.fold_in(key, t))
        logits = decoder.next_logits(state, k_chain)
        tok = np.asarray(_sample_token(logits, k_draw, temperature=float(temperature), top_p=float(top_p),
                                       greedy=bool(greedy)), np.int32)
        out.append(tok)
        context = np.concatenate([context, tok[:, None]], axis=1)
        state, n = decoder.append(state, tok), n + 1
    return np.stack(out, axis=1) if out else np.zeros((len(context), 0), np.int32)
