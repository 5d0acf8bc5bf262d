"""Inference for the recurrent-depth baseline (Huginn): a random initial state s_0, K core iterations, one K/V cache
slot per iteration. Functions of (task, run, ...); the DiffusionBlocks version decodes through dblocks.tasks.ar_infer.
The cached decoder is written as pure functions of (params, state), so it also decodes compiled
(dblocks.tasks.lm_decode): row j's s_0 comes from fold_in(base, j) on both paths, so they draw the same tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import text_metrics, textgen
from dblocks.tasks import lm_decode
from dblocks.models import ar as ar_model


def huginn_fns(task, model) -> dict:
    t_max, K, H = int(task.config.data.seq_len), model.iterations, model.hidden
    s0 = lambda key, n, s: model.init_std * jax.random.normal(key, (n, s, H))  # noqa: E731

    def lm(params, tokens, key):
        return model.apply({"params": params}, tokens, s0=s0(key, *tokens.shape))

    def prefill(params, tokens, key):
        logits, kvs = model.apply({"params": params}, tokens, s0(key, *tokens.shape), K, method=model.recur)
        empty = ar_model.empty_cache(model.num_layers, tokens.shape[0], t_max, model.heads, H // model.heads,
                                     kvs[0][0].dtype)
        return logits[:, -1], ar_model.write_cache(empty, kvs, 0)

    def clean_row(params, cache, token, pos, key):
        logits, kvs = model.apply({"params": params}, token[:, None], s0(key, token.shape[0], 1), K,
                                  jnp.full((1, 1), pos), ar_model.prefix_mask(pos, t_max), cache, method=model.recur)
        return logits[:, 0], ar_model.write_cache(cache, kvs, pos)

    return {"lm": task.jit("huginn.lm", model, lambda: jax.jit(lm)),
            "prefill": task.jit("huginn.prefill", model, lambda: jax.jit(prefill)),
            "clean_row": task.jit("huginn.clean_row", model, lambda: jax.jit(clean_row))}


def huginn_decoder(task, run, n: int, use_cache: bool = True) -> textgen.Decoder:
    """K iterations per token; s_0 of row j is drawn from fold_in(base, j) in both the cached and uncached path."""
    model, p, t_max = run.models[0], run.params[0], int(task.config.data.seq_len)
    f = huginn_fns(task, model)
    base = jax.random.PRNGKey(int(task.config.seed) + 1)
    calls = int(task.config.recurrent.mean_iterations)
    if not use_cache:   # recomputes the window
        rows = task.jit(f"huginn.rows.{n}", model, lambda: jax.jit(jax.vmap(
            lambda k: model.init_std * jax.random.normal(k, (n, model.hidden)), out_axes=1)))
        lm = task.jit("huginn.lm_s0", model, lambda: jax.jit(lambda pp, padded, s: model.apply(
            {"params": pp}, padded, s0=s)))

        def next_uncached(ctx, key):
            P = ctx.shape[1]
            s = rows(jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(t_max)))   # [N, t_max, H]
            return lm(p, jnp.asarray(np.pad(ctx, ((0, 0), (0, t_max - P)))), s)[:, P - 1]
        return textgen.Decoder(lambda ctx: ctx, next_uncached, lambda ctx, tok: np.concatenate([ctx, tok[:, None]], 1),
                               t_max, calls)

    def append(pp, state, tok):
        pos = state["pos"]
        logits, cache = f["clean_row"](pp, state["cache"], tok, pos, jax.random.fold_in(base, pos))
        return {"cache": cache, "logits": logits, "pos": pos + 1}

    def first(pp, ctx):
        logits, cache = f["prefill"](pp, jnp.asarray(ctx[:, :1]), jax.random.fold_in(base, 0))
        return {"cache": cache, "logits": logits, "pos": 1}

    def prefill(ctx):   # row by row, so each row's s_0 matches the uncached path
        state = first(p, ctx)
        for j in range(1, ctx.shape[1]):
            state = append(p, state, jnp.asarray(ctx[:, j]))
        return state
    jit = lambda name, build: task.jit(name, model, build)  # noqa: E731
    name = f"huginn.{n}.{int(task.config.seed)}"
    return lm_decode.decoder(p, prefill, lambda pp, s, key: s["logits"], append, t_max, calls, jit, name,
                             lm_decode.row_by_row_prefill(jit, name, first, append, p))


def huginn_window_logprobs(task, run, tokens, key, num_draws: int) -> dict:
    """As ar_infer.window_logprobs, for the baseline: its read-out averaged over `num_draws` draws of s_0."""
    f, tokens = huginn_fns(task, run.models[0]), jnp.asarray(tokens)
    logps, prob_sum, ents = [], 0.0, []
    for d in range(num_draws):
        lp = jax.nn.log_softmax(f["lm"](run.params[0], tokens, jax.random.fold_in(key, d))[:, :-1], -1)
        logps.append(np.asarray(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]))
        prob_sum = prob_sum + jnp.exp(lp)
        ents.append(text_metrics.entropy_bits(lp))
    return {"logp": text_metrics.mixture_logprob(np.stack(logps)), "argmax": np.asarray(jnp.argmax(prob_sum, -1)),
            "per_step": None, "entropy": float(np.mean(ents)),
            "mixture_entropy": text_metrics.mixture_entropy_bits(prob_sum, num_draws)}
