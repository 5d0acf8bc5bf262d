"""Recurrent-depth language modelling (paper §4.5, §5.6): a Huginn-style prelude / core / coda model
(dblocks.models.recurrent), trained two ways on the same data and evaluated like the autoregressive task.

Baseline (method 'e2e', Huginn): each step draws a number of core iterations r = k + r', r' ~ Poisson(exp(tau)),
tau ~ N(log(K - k) - s^2/2, s), s = 0.5 (Huginn's log-normal Poisson; mean r = K), runs r' iterations without
gradients and back-propagates through the last k (truncated backprop). Generation runs K iterations from a random
initial state s_0, one K/V cache slot per iteration; its cached decoder is written as pure functions of (params,
state), so it also decodes compiled (dblocks.tasks.lm.decode): row j's s_0 comes from fold_in(base, j) on both
paths, so they draw the same tokens.
DiffusionBlocks (method 'dblocks', B = 1): the whole network is one denoiser trained in a single pass with sigma from
the whole range (per token, the shared language-task loss of LMTask); generation runs K Euler steps, each one pass of
core and coda for the new token (the prelude reads only clean tokens and is cached), through LMTask's decoder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dblocks import text_metrics, textgen
from dblocks.models import ar as ar_model
from dblocks.models.options import model_options
from dblocks.models.recurrent import RecurrentModel
from dblocks.tasks.base import Unit, register
from dblocks.tasks.lm import decode as lm_decode
from dblocks.tasks.lm.task import LMTask

DEPTH_STD = 0.5   # Huginn's sigma of the log-normal Poisson depth distribution


@register
class RecurrentTask(LMTask):
    name = "recurrent"
    defaults = {"recurrent": {"noisy_prelude": False}}   # the noisy row also runs the prelude (DiffusionBlocks)

    def validate(self) -> list[str]:
        c, p = self.config, super().validate()
        m, r = c.model, c.recurrent
        if int(c.blocks.num_blocks) != 1:
            p.append(f"blocks.num_blocks={c.blocks.num_blocks}: the recurrent model is one denoiser (B=1)")
        if m.num_layers != m.prelude + m.core + m.coda:
            p.append(f"model.num_layers={m.num_layers} must equal prelude + core + coda = "
                     f"{m.prelude + m.core + m.coda}")
        if min(m.prelude, m.coda) < 0 or m.core < 1:
            p.append("model.core must be >= 1 and model.prelude, model.coda >= 0")
        if not 1 <= r.backprop_iterations < r.mean_iterations:
            p.append(f"recurrent.backprop_iterations={r.backprop_iterations} must be in [1, recurrent.mean_iterations"
                     f"={r.mean_iterations})")
        return p

    def min_grid_points(self) -> int:
        return 2

    def default_grid_points(self) -> int:
        return int(self.config.recurrent.mean_iterations)

    def make_model(self, unit: Unit) -> RecurrentModel:
        m = self.config.model
        return RecurrentModel(vocab=self.vocab.size, hidden=m.hidden, heads=m.heads, prelude=m.prelude, core=m.core,
                              coda=m.coda, mlp_ratio=m.mlp_ratio, diffusion=unit.is_block,
                              iterations=int(self.config.recurrent.mean_iterations),
                              init_std=float(self.config.recurrent.init_std), sigma_min=self.edm.sigma_min,
                              prev_token=bool(m.prev_token),
                              noisy_prelude=bool(self.config.recurrent.noisy_prelude), **model_options(m))

    # -- the baseline's training: random depth, truncated backprop ---------------------------------------------------
    def sample_depth(self, key) -> jax.Array:
        """Iterations without gradient, r' ~ Poisson(exp(tau)) with mean K - k (the k backprop ones come after)."""
        r = self.config.recurrent
        mean = float(r.mean_iterations - r.backprop_iterations)
        k1, k2 = jax.random.split(key)
        tau = jnp.log(mean) - DEPTH_STD ** 2 / 2 + DEPTH_STD * jax.random.normal(k1)
        return jax.random.poisson(k2, jnp.exp(tau))

    def draw(self, model, batch, rng, train_range, train=True):
        """The baseline's initial state s_0 [N, T, hidden] and its depth (one per step, repeated per sample)."""
        if model.diffusion:
            return super().draw(model, batch, rng, train_range, train)
        tokens = batch["tokens"]
        N, T = tokens.shape
        k_s, k_r = jax.random.split(rng)
        s = model.init_std * jax.random.normal(k_s, (N, T, model.hidden))
        return {"tokens": tokens, "s0": s, "extra": jnp.full((N,), self.sample_depth(k_r))}, rng

    def loss_on(self, model, params, inputs, rng, train=True):
        tokens = inputs["tokens"]
        if model.diffusion:
            return self.denoising_loss(lambda z, s, **kw: self.noisy_logits(model, params, tokens, z, s, **kw),
                                       inputs)
        T = tokens.shape[1]
        apply = lambda p, *a, method: model.apply({"params": p}, *a, method=method)  # noqa: E731
        pos, mask = jnp.arange(T)[None], ar_model.causal_mask(T)
        e, _ = apply(params, tokens, pos, mask, method=model.prelude_rows)
        s, extra = inputs["s0"], inputs["extra"][0]
        frozen, e_frozen = jax.lax.stop_gradient(params), jax.lax.stop_gradient(e)
        s = jax.lax.fori_loop(0, extra, lambda i, s: apply(frozen, s, e_frozen, pos, mask,
                                                           method=model.core_rows)[0], s)
        for _ in range(int(self.config.recurrent.backprop_iterations)):
            s, _ = apply(params, s, e, pos, mask, method=model.core_rows)
        logits, _ = apply(params, s, pos, mask, method=model.coda_rows)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return ce.mean(), {"ce": ce.mean(), "iterations": extra + self.config.recurrent.backprop_iterations}

    # -- the baseline's read-out and generation: K iterations from a random s_0 -------------------------------------
    def huginn_fns(self, model) -> dict:
        """The baseline's jitted pieces: full pass, prefill and one clean row, each from s_0 drawn from a key."""
        t_max, K, H = int(self.config.data.seq_len), model.iterations, model.hidden
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
                                      jnp.full((1, 1), pos), ar_model.prefix_mask(pos, t_max), cache,
                                      method=model.recur)
            return logits[:, 0], ar_model.write_cache(cache, kvs, pos)

        return {"lm": self.jit("huginn.lm", model, lambda: jax.jit(lm)),
                "prefill": self.jit("huginn.prefill", model, lambda: jax.jit(prefill)),
                "clean_row": self.jit("huginn.clean_row", model, lambda: jax.jit(clean_row))}

    def huginn_decoder(self, run, n: int, use_cache: bool = True) -> textgen.Decoder:
        """K iterations per token; s_0 of row j is drawn from fold_in(base, j) in both the cached and uncached path."""
        model, p, t_max = run.models[0], run.params[0], int(self.config.data.seq_len)
        f = self.huginn_fns(model)
        base = jax.random.PRNGKey(int(self.config.seed) + 1)
        calls = int(self.config.recurrent.mean_iterations)
        if not use_cache:   # recomputes the window
            rows = self.jit(f"huginn.rows.{n}", model, lambda: jax.jit(jax.vmap(
                lambda k: model.init_std * jax.random.normal(k, (n, model.hidden)), out_axes=1)))
            lm = self.jit("huginn.lm_s0", model, lambda: jax.jit(lambda pp, padded, s: model.apply(
                {"params": pp}, padded, s0=s)))

            def next_uncached(ctx, key):
                P = ctx.shape[1]
                s = rows(jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(t_max)))   # [N, t_max, H]
                return lm(p, jnp.asarray(np.pad(ctx, ((0, 0), (0, t_max - P)))), s)[:, P - 1]
            return textgen.Decoder(lambda ctx: ctx, next_uncached,
                                   lambda ctx, tok: np.concatenate([ctx, tok[:, None]], 1), t_max, calls)

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
        jit = lambda name, build: self.jit(name, model, build)  # noqa: E731
        name = f"huginn.{n}.{int(self.config.seed)}"
        return lm_decode.decoder(p, prefill, lambda pp, s, key: s["logits"], append, t_max, calls, jit, name,
                                 lm_decode.row_by_row_prefill(jit, name, first, append, p))

    def huginn_window_logprobs(self, run, tokens, key, num_draws: int) -> dict:
        """As LMTask.window_logprobs, for the baseline: its read-out averaged over `num_draws` draws of s_0."""
        f, tokens = self.huginn_fns(run.models[0]), jnp.asarray(tokens)
        logps, prob_sum, ents = [], 0.0, []
        for d in range(num_draws):
            lp = jax.nn.log_softmax(f["lm"](run.params[0], tokens, jax.random.fold_in(key, d))[:, :-1], -1)
            logps.append(np.asarray(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]))
            prob_sum = prob_sum + jnp.exp(lp)
            ents.append(text_metrics.entropy_bits(lp))
        return {"logp": text_metrics.mixture_logprob(np.stack(logps)), "argmax": np.asarray(jnp.argmax(prob_sum, -1)),
                "per_step": None, "entropy": float(np.mean(ents)),
                "mixture_entropy": text_metrics.mixture_entropy_bits(prob_sum, num_draws)}

    def decoder(self, run, n, sampler=None, use_cache=True):
        if run.method == "e2e":
            return self.huginn_decoder(run, n, use_cache)
        return super().decoder(run, n, sampler, use_cache)

    def window_logprobs(self, run, tokens, key, num_draws, sampler=None):
        if run.method == "e2e":
            return self.huginn_window_logprobs(run, tokens, key, num_draws)
        return super().window_logprobs(run, tokens, key, num_draws, sampler)

    def noisy_readout(self, run) -> bool:
        return True   # the baseline's s_0 is random too

    def training_compute(self, method: str, grid_points: int | None = None, clean_blocks: int | None = None) -> dict:
        """Layer evaluations per token of one training step, forward and backward (a layer over one row = 1)."""
        m, r = self.config.model, self.config.recurrent
        P, C, D, K, k = m.prelude, m.core, m.coda, r.mean_iterations, r.backprop_iterations
        if method == "e2e":
            return {"forward_layer_rows_per_token": P + K * C + D, "backward_layer_rows_per_token": P + k * C + D,
                    "inference_layer_rows_per_token": P + K * C + D,
                    "note": f"mean {K} core iterations, backprop through the last {k}"}
        K = int(grid_points or self.config.sample.grid_points or K)
        noisy = (P if r.noisy_prelude else 0) + C + D
        return {"forward_layer_rows_per_token": (P + C + D) + noisy,
                "backward_layer_rows_per_token": (P + C + D) + noisy,
                "inference_layer_rows_per_token": (P + C + D) + K * noisy,
                "note": f"single pass: clean row through prelude+core+coda, noisy row through {noisy} layers; "
                        f"generation: {K} block calls per token"}
