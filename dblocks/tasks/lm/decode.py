"""Compiled token decoding for the language models: a run of tokens in one jitted `lax.fori_loop`, the K/V caches in
the loop's carry, one host sync per segment instead of one per token.

A cached decoder of the language tasks (dblocks.tasks.lm.inference: plain LM, DiffusionBlocks, the recurrent
DiffusionBlocks model; dblocks.tasks.lm.recurrent: Huginn) is written once, as pure functions of (params, state,
...), and serves both paths: the reference Python loop of `dblocks.textgen.generate` calls them with the run's
parameters bound, and `generate` here traces them into one program per sampler:

    for each token t (global index, so keys do not depend on segment boundaries):
        k_chain, k_draw = split(fold_in(key, t))            # the Python loop's order
        logits = next_logits(params, state, k_chain)        # DiffusionBlocks: the whole chain over the static grid,
                                                            # each call by its static block (sampling.sample traced)
        token = textgen.sample_token(logits, k_draw, temperature, top_p, greedy)
        state = append(params, state, token)                # the clean row written to each called block's cache

so the compiled path draws exactly the tokens the Python path draws for the same key (tests/test_decode.py). The
window rule of textgen.generate is kept: a segment runs up to the end of the window (t_max positions), then the host
re-prefills from the last half. Parameters are arguments of the program, never constants baked into it; the program
is cached with the task's `jit` under a name that holds everything else it depends on.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import textgen

Array = jax.Array

# XLA's copy insertion, by default, copies every cache of the loop carry once or twice per iteration: the cache is
# read (attention over [cache; new row]) and then updated in place (the new row's K/V), and without region analysis
# the two are not proven ordered. With it the caches stay in place (measured: no cache-sized copy left in the loop
# body; without it the LM copied its whole cache twice per token). Set per program, not globally.
_REGION_ANALYSIS = {"cpu": "xla_cpu_copy_insertion_use_region_analysis",
                    "gpu": "xla_gpu_copy_insertion_use_region_analysis",
                    "cuda": "xla_gpu_copy_insertion_use_region_analysis",
                    "rocm": "xla_gpu_copy_insertion_use_region_analysis"}


# YNNPACK's fusions (XLA's CPU default in jax 0.10) cost more than they give on the decoding loop's small
# operands: each token is ~100 matmuls of 64 rows or fewer, and the fused library calls' dispatch and threading
# dominate. Without them the compiled loop decoded 1.3-1.6x more tokens/s at batch 64 on the 2-core CPU
# (docs/lab/performance.md, "Where the decoding loop's time went"). Per program: training keeps the default. A
# jax without the option compiles without it.
_CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def _cpu_decode_options() -> tuple:
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_DECODE_OPTIONS)(jnp.zeros(2)).block_until_ready()
    except Exception:   # noqa: BLE001 - "No such compile option" on a jax that lacks it
        return ()
    return tuple(_CPU_DECODE_OPTIONS.items())


def _jit(fn):
    """jax.jit with copy insertion's region analysis on, where the backend has the option, and on the CPU without
    YNNPACK's fusions."""
    backend = jax.default_backend()
    options = {_REGION_ANALYSIS[backend]: True} if backend in _REGION_ANALYSIS else {}
    if backend == "cpu":
        options.update(_cpu_decode_options())
    return jax.jit(fn, compiler_options=options or None)


@dataclasses.dataclass
class Compiled:
    """The pure form of a cached decoder (the `compiled` field of a textgen.Decoder)."""
    params: Any                                      # the run's parameters, passed to the program as an argument
    next_logits: Callable[[Any, Any, Array], Array]  # (params, state, key) -> logits [N, V]; traceable
    append: Callable[[Any, Any, Array], Any]         # (params, state, tokens [N] int32) -> state; traceable
    jit: Callable[[str, Callable[[], Callable]], Callable]   # the task's cache: (name, build) -> jitted function
    name: str                                        # what the traced functions close over (sampler, grid, n, ...)
    prefill: Callable[[np.ndarray], Any] | None = None   # a compiled prefill giving the same state (Huginn)

    def segment(self, t_max: int, temperature: float, top_p: float, greedy: bool) -> Callable:
        """The jitted loop (params, state, key, t0, count, out [N, t_max]) -> out with tokens t0 .. t0+count-1 of
        the generation in columns 0 .. count-1."""
        def build():
            def run(params, state, key, t0, count, out):
                def body(i, carry):
                    st, buf = carry
                    k_chain, k_draw = jax.random.split(jax.random.fold_in(key, t0 + i))
                    logits = self.next_logits(params, st, k_chain)
                    tok = textgen.sample_token(logits, k_draw, temperature, top_p, greedy).astype(jnp.int32)
                    return self.append(params, st, tok), jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], i, 1)
                return jax.lax.fori_loop(0, count, body, (state, out))[1]
            return _jit(run)
        return self.jit(f"decode.segment.{self.name}.t{t_max}.T{temperature}.p{top_p}.g{greedy}", build)


def decoder(params, prefill: Callable[[np.ndarray], Any], next_logits: Callable, append: Callable, t_max: int,
            calls_per_token: int, jit: Callable, name: str, compiled_prefill: Callable | None = None
            ) -> textgen.Decoder:
    """A textgen.Decoder whose Python path is next_logits / append with `params` bound, and whose compiled path
    (`generate` below) traces the same functions."""
    return textgen.Decoder(prefill, lambda state, key: next_logits(params, state, key),
                           lambda state, tok: append(params, state, jnp.asarray(tok, jnp.int32)), t_max,
                           calls_per_token,
                           compiled=Compiled(params, next_logits, append, jit, name, compiled_prefill))


def _carry(state):
    """The prefilled state as loop carry: Python ints (positions) become int32 scalars."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32) if isinstance(x, (int, np.integer)) else x, state)


def generate(dec: textgen.Decoder, prompt: np.ndarray, max_tokens: int, key: Array, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False) -> np.ndarray:
    """As textgen.generate (same tokens for the same key), with each window's tokens decoded in one compiled loop.
    prompt [N, P] int -> the new tokens [N, max_tokens]."""
    comp, t_max = dec.compiled, dec.t_max
    segment = comp.segment(t_max, float(temperature), float(top_p), bool(greedy))
    prefill = comp.prefill or dec.prefill
    context = np.asarray(prompt, np.int32)[:, -t_max:]
    N = context.shape[0]
    state, n = prefill(context), context.shape[1]
    out, t = [], 0
    while t < max_tokens:
        if n == t_max:   # window full: keep the last half (textgen.generate's rule)
            context = context[:, -(t_max // 2):]
            state, n = prefill(context), context.shape[1]
        count = min(max_tokens - t, t_max - n)
        toks = segment(comp.params, _carry(state), key, jnp.int32(t), jnp.int32(count),
                       jnp.zeros((N, t_max), jnp.int32))
        toks = np.asarray(toks)[:, :count]     # the one host sync of the segment
        out.append(toks)
        context = np.concatenate([context, toks], axis=1)
        state, n, t = None, n + count, t + count
    return np.concatenate(out, axis=1) if out else np.zeros((N, 0), np.int32)


def row_by_row_prefill(jit: Callable, name: str, first: Callable, append: Callable, params) -> Callable:
    """A compiled prefill that reads the context one row at a time (first(params, tokens [N, 1]) -> state, then
    append(params, state, tokens [N]) for each further row) in one fori_loop: the state the Python loop of
    appends builds, without a dispatch per row (for Huginn, whose rows each draw their own s_0)."""
    def build():
        def run(p, ctx):
            state = _carry(first(p, ctx[:, :1]))
            return jax.lax.fori_loop(1, ctx.shape[1], lambda j, st: append(p, st, ctx[:, j]), state)
        return _jit(run)
    fn = jit(f"decode.prefill.{name}", build)
    return lambda ctx: fn(params, jnp.asarray(ctx, jnp.int32))


def jit_for(jit: Callable, models) -> Callable:
    """A task's cache of jitted functions (`Task.jit`) for a run's models: keyed by the model when all blocks have
    one shape, else by every block's model config."""
    reprs = {repr(m) for m in models}
    if len(reprs) == 1:
        return lambda name, build: jit(name, models[0], build)
    return lambda name, build: jit(f"{name}|{'|'.join(repr(m) for m in models)}", None, build)
