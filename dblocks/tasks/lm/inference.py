"""Inference of the language tasks, a part of LMTask (dblocks.tasks.lm.task): the sampler's options, the cached and
uncached token decoders, generation, teacher-forced read-outs of the chain, held-out prompts and sample files.
Options are passed down explicitly in a `Sampler` (dblocks.tasks.lm.sampler), never written into the config.

`LMInference` is a mixin: its methods read what LMTask provides (config, edm, E, target_dim, jit, source, vocab,
default_grid_points, precondition_logits, noisy_logits), and the recurrent task overrides `decoder` and
`window_logprobs` for its Huginn baseline.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import sampling, targets, text_metrics, textgen
from dblocks.models import ar as ar_model
from dblocks.tasks.lm import decode as lm_decode
from dblocks.tasks.lm.sampler import Sampler, make_grid, run_chain

Array = jax.Array


def _append_ctx(ctx, tok):
    return np.concatenate([ctx, tok[:, None]], 1)


class LMInference:
    """Decoding, generation and teacher-forced read-outs of a language task's run (a mixin of LMTask)."""

    def noisy_readout(self, run) -> bool:
        """Whether the sampler's next-token distribution depends on noise (then it is averaged over draws)."""
        return run.method == "dblocks"

    def sampler_options(self, run, grid=None, grid_points=None, sigma_end=None, solver=None, bridge=None,
                        temperature=None, top_p=None, greedy=None, **_) -> Sampler:
        """A Sampler from the config's sample.* with the given overrides (None = the config's value). The grid: an
        explicit `grid`, else `grid_points` points (0 = the task's default) equal in CDF down to `sigma_end`."""
        s = self.config.sample
        pick = lambda v, key: s[key] if v is None else v  # noqa: E731
        common = dict(temperature=float(pick(temperature, "temperature")), top_p=float(pick(top_p, "top_p")),
                      greedy=bool(pick(greedy, "greedy")))
        if run.method == "e2e":
            return Sampler(**common)
        g = make_grid(self.edm, pick(grid, "grid"), int(pick(grid_points, "grid_points") or self.default_grid_points()),
                      pick(sigma_end, "sigma_end"))
        return Sampler(grid=tuple(float(v) for v in g), solver=str(pick(solver, "solver")),
                       bridge=str(pick(bridge, "bridge")), **common)

    # -- jitted pieces of one model shape ------------------------------------------------------------------------------

    def lm_fns(self, model) -> dict:
        """A plain causal LM (or a DiffusionBlocks block's clean rows): full pass, prefill and one clean row."""
        t_max = int(self.config.data.seq_len)
        hd = model.hidden // model.heads
        apply = lambda p, *a, method=None: model.apply({"params": p}, *a, method=method)  # noqa: E731

        def prefill(params, tokens):
            P = tokens.shape[1]
            logits, kvs = apply(params, tokens, jnp.arange(P)[None], ar_model.causal_mask(P), method=model.clean_rows)
            empty = ar_model.empty_cache(model.num_layers, tokens.shape[0], t_max, model.heads, hd, kvs[0][0].dtype)
            return logits[:, -1], ar_model.write_cache(empty, kvs, 0)

        def clean_row(params, cache, token, pos):
            logits, kvs = apply(params, token[:, None], jnp.full((1, 1), pos), ar_model.prefix_mask(pos, t_max), cache,
                                method=model.clean_rows)
            return logits[:, 0], ar_model.write_cache(cache, kvs, pos)

        return {"lm": self.jit("lm.full", model, lambda: jax.jit(lambda p, t: apply(p, t))),
                "prefill": self.jit("lm.prefill", model, lambda: jax.jit(prefill)),
                "clean_row": self.jit("lm.clean_row", model, lambda: jax.jit(clean_row))}

    def block_fns(self, model, bridge: str) -> dict:
        """A denoiser block: one noisy row against the cache, and the teacher-forced pass (per-token sigma [N, T])."""
        t_max, E = int(self.config.data.seq_len), self.E

        # the T layout's row for position pos is the clean row of token pos - 1 (at its position, reading the cache
        # before it); the 2T layout's noisy row sits at position pos and reads the whole clean prefix
        shift = 1 if getattr(model, "layout", "2t") == "t" else 0

        def noisy_row(params, cache, z, sigma, pos, key, prev):   # z [N, 1, D], sigma [N]; key: the 'sample' bridge's;
            def apply(zz, cn):                                     # prev [N]: the token at pos - 1
                # the chain calls a block at one level for every row (sigma is a grid point), so the noise conditioning
                # (noise embedder, every layer's AdaLN Linear) runs on one row and is broadcast over the N rows
                # (docs/lab/performance.md, "Where the decoding loop's time went")
                return model.apply({"params": params}, zz, cn[:1], jnp.full((1, 1), pos - shift),
                                   ar_model.prefix_mask(pos - shift, t_max), cache, prev, method=model.noisy_rows)
            logits = self.precondition_logits(apply, z, sigma[:, None])
            return targets.bridge(logits, E, bridge, key), logits[:, 0]

        def forward(params, tokens, z, sigma, key):          # z [N, T, D], sigma [N, T]
            logits = self.noisy_logits(model, params, tokens, z, sigma)
            return targets.bridge(logits, E, bridge, key), logits

        return {**self.lm_fns(model),
                "noisy_row": self.jit(f"ar.noisy_row.{bridge}", model, lambda: jax.jit(noisy_row)),
                "forward": self.jit(f"ar.forward.{bridge}", model, lambda: jax.jit(forward))}

    # -- decoders ------------------------------------------------------------------------------------------------------

    def lm_decoder(self, run, n: int, use_cache: bool = True) -> textgen.Decoder:
        """The plain causal LM: cached (K/V of the prefix) or uncached (recomputes the window each token)."""
        t_max, f, p = int(self.config.data.seq_len), self.lm_fns(run.models[0]), run.params[0]
        if not use_cache:
            def lm_next(ctx, key):
                return f["lm"](p, np.pad(ctx, ((0, 0), (0, t_max - ctx.shape[1]))))[:, ctx.shape[1] - 1]
            return textgen.Decoder(lambda ctx: ctx, lm_next, _append_ctx, t_max, 1)

        def prefill(ctx):
            logits, cache = f["prefill"](p, jnp.asarray(ctx))
            return {"cache": cache, "logits": logits, "pos": ctx.shape[1]}

        def append(pp, state, tok):   # pure in (params, state): also traced by the compiled decoder
            logits, cache = f["clean_row"](pp, state["cache"], tok, state["pos"])
            return {"cache": cache, "logits": logits, "pos": state["pos"] + 1}
        return lm_decode.decoder(p, prefill, lambda pp, s, key: s["logits"], append, t_max, 1,
                                 lm_decode.jit_for(self.jit, run.models), f"lm.{n}")

    def decoder(self, run, n: int, sampler: Sampler | None = None, use_cache: bool = True) -> textgen.Decoder:
        """A decoder for n sequences: the LM for e2e runs, else the chain of blocks (each with its own K/V cache of the
        clean prefix; uncached = the reference the cache is tested against). sampler: the config's by default."""
        if run.method == "e2e":
            return self.lm_decoder(run, n, use_cache)
        sampler = sampler or self.sampler_options(run)
        t_max, D = int(self.config.data.seq_len), self.target_dim
        fns = [self.block_fns(m, sampler.bridge) for m in run.models]
        grid = np.asarray(sampler.grid)

        def chain(denoise, key):   # denoise(b, z, s, key): key = the bridge's key for this call
            return run_chain(sampler, run.partition, denoise, key, (n, 1, D), self.edm.sigma_max).aux

        if not use_cache:
            def next_uncached(ctx, key):
                pos = ctx.shape[1]
                padded = jnp.asarray(np.pad(ctx, ((0, 0), (0, t_max - pos))))

                def denoise(b, z, s, k):   # z [N, 1, D] placed at row pos of an otherwise empty noisy sequence
                    full = jnp.zeros((n, t_max, D)).at[:, pos].set(z[:, 0])
                    d, logits = fns[b]["forward"](run.params[b], padded, full, jnp.broadcast_to(s[:, None], (n, t_max)),
                                                  k)
                    return d[:, pos:pos + 1], logits[:, pos]
                return chain(denoise, key)
            return textgen.Decoder(lambda ctx: ctx, next_uncached, _append_ctx, t_max, sampler.calls_per_token)

        # only the blocks the grid calls keep a cache of the clean prefix; the others' entries stay None (never run)
        called = set(sampling.blocks_called(grid, run.partition, sampler.solver))

        def prefill(ctx):
            return {"caches": [fns[b]["prefill"](run.params[b], jnp.asarray(ctx))[1] if b in called else None
                               for b in range(run.num_blocks)],
                    "pos": ctx.shape[1], "last": jnp.asarray(ctx[:, -1], jnp.int32)}

        def next_cached(ps, state, key):   # pure in (params, state): also traced by the compiled decoder
            def denoise(b, z, s, k):
                return fns[b]["noisy_row"](ps[b], state["caches"][b], z, s, state["pos"], k, state["last"])
            return chain(denoise, key)

        def append(ps, state, tok):
            return {"caches": [fns[b]["clean_row"](ps[b], state["caches"][b], tok, state["pos"])[1] if b in called
                               else None for b in range(run.num_blocks)], "pos": state["pos"] + 1,
                    "last": jnp.asarray(tok, jnp.int32)}
        return lm_decode.decoder(tuple(run.params), prefill, next_cached, append, t_max, sampler.calls_per_token,
                                 lm_decode.jit_for(self.jit, run.models), f"db.{n}.{sampler!r}.{run.partition!r}")

    def generate(self, run, prompts: np.ndarray, max_tokens: int, seed: int = 0, sampler: Sampler | None = None,
                 use_cache: bool = True, compiled: bool = True, **options) -> tuple[np.ndarray, int]:
        """prompts [N, P] -> (new tokens [N, max_tokens], block calls per token). sampler: the given one, else
        `sampler_options(run, **options)`. compiled: each window decoded in one compiled loop
        (dblocks.tasks.lm.decode; cached decoders); False: the Python loop of textgen.generate, the reference (the
        same tokens for the same seed)."""
        sampler = sampler or self.sampler_options(run, **options)
        dec = self.decoder(run, len(prompts), sampler, use_cache)
        gen = lm_decode.generate if compiled and dec.compiled is not None else textgen.generate
        out = gen(dec, prompts, int(max_tokens), jax.random.PRNGKey(seed), sampler.temperature, sampler.top_p,
                  sampler.greedy)
        return out, dec.calls_per_token

    # -- held-out data -------------------------------------------------------------------------------------------------

    def heldout_stream(self, split: str = "test") -> np.ndarray:
        """The whole split as one token stream."""
        src = self.source(split)
        return np.asarray(src.get(np.arange(len(src)))["tokens"]).reshape(-1)

    def heldout_windows(self, max_windows: int, split: str = "test") -> np.ndarray:
        """Up to max_windows windows of a split, evenly spaced over it: [n, T]."""
        src = self.source(split)
        idx = np.unique(np.linspace(0, len(src) - 1, min(int(max_windows), len(src))).astype(int))
        return np.asarray(src.get(idx)["tokens"], np.int32)

    def heldout_prompts(self, n: int, prompt_len: int, cont_len: int,
                        split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """n prompts of prompt_len tokens from evenly spaced places of a split, and their true continuations of cont_len
        tokens: ([n, prompt_len], [n, cont_len])."""
        stream = self.heldout_stream(split)
        starts = np.linspace(0, len(stream) - prompt_len - cont_len - 1, n).astype(int)
        prompts = np.stack([stream[s:s + prompt_len] for s in starts]).astype(np.int32)
        conts = np.stack([stream[s + prompt_len:s + prompt_len + cont_len] for s in starts]).astype(np.int32)
        return prompts, conts

    def write_samples(self, run, out_path, prompt=None, max_tokens=None, num_samples=None, seed=0, **options) -> dict:
        """Writes generated text to out_path (an image suffix such as .png becomes .txt): the prompt, then the
        continuation in [[ ]]. Default prompts: passages of the test split. Sampler options as `sampler_options`."""
        s = self.config.sample
        out_path = os.path.splitext(out_path)[0] + ".txt" if out_path.endswith((".png", ".jpg")) else out_path
        n, max_tokens = int(num_samples or s.num_samples), int(max_tokens or s.max_tokens)
        if prompt:
            prompts = np.repeat(self.vocab.encode(prompt)[None], n, axis=0)
        else:
            prompts = self.heldout_prompts(n, int(self.config.eval.prompt_len), 0)[0]
        sampler = self.sampler_options(run, **options)
        t0 = time.perf_counter()
        out, calls = self.generate(run, prompts, max_tokens, int(seed or 0), sampler)
        seconds = time.perf_counter() - t0
        with open(out_path, "w") as f:
            for k, (pr, o) in enumerate(zip(prompts, out)):
                f.write(f"=== sample {k} ({run.method}) ===\n{self.vocab.decode(pr)}[[{self.vocab.decode(o)}]]\n\n")
        return {"path": out_path, "samples": n, "max_tokens": max_tokens, "block_calls_per_token": calls,
                "sampler": sampler.to_dict(), "seconds": round(seconds, 2),
                "tokens_per_second": round(n * max_tokens / max(seconds, 1e-9), 1)}

    # -- teacher-forced read-outs --------------------------------------------------------------------------------------

    def window_logprobs(self, run, tokens: np.ndarray, key: Array, num_draws: int,
                        sampler: Sampler | None = None) -> dict:
        """Teacher-forced log-probabilities of tokens[:, 1:] under the distribution the sampler draws from
        (temperature 1, no top-p). DiffusionBlocks: the final call's softmax averaged over `num_draws` noise draws of
        the whole chain (all positions at once: noisy rows do not see each other). Returns {'logp': [N, T-1],
        'argmax': [N, T-1], 'per_step': [calls, N, T-1] (DiffusionBlocks only), 'entropy': mean entropy (bits) of one
        draw's final softmax (what temperature and top-p act on), 'mixture_entropy': of the averaged distribution}."""
        tokens = jnp.asarray(tokens)
        true = tokens[:, 1:, None]
        if run.method == "e2e":
            logp = jax.nn.log_softmax(self.lm_fns(run.models[0])["lm"](run.params[0], tokens)[:, :-1], -1)
            ent = text_metrics.entropy_bits(logp)
            return {"logp": np.asarray(jnp.take_along_axis(logp, true, -1)[..., 0]),
                    "argmax": np.asarray(jnp.argmax(logp, -1)), "per_step": None, "entropy": ent,
                    "mixture_entropy": ent}
        sampler = sampler or self.sampler_options(run)
        fns = [self.block_fns(m, sampler.bridge) for m in run.models]
        N, T = tokens.shape
        draws, steps_logp, prob_sum, ents = [], [], 0.0, []
        for d in range(num_draws):
            per_call = []

            def denoise(b, z, s, k):
                dd, logits = fns[b]["forward"](run.params[b], tokens, z, jnp.broadcast_to(s[:, None], (N, T)), k)
                lp = jax.nn.log_softmax(logits[:, 1:], -1)
                per_call.append(np.asarray(jnp.take_along_axis(lp, true, -1)[..., 0]))
                return dd, lp
            res = run_chain(sampler, run.partition, denoise, jax.random.fold_in(key, d), (N, T, self.target_dim),
                            self.edm.sigma_max)
            draws.append(per_call[-1])
            steps_logp.append(np.stack(per_call))
            prob_sum = prob_sum + jnp.exp(res.aux)
            ents.append(text_metrics.entropy_bits(res.aux))
        return {"logp": text_metrics.mixture_logprob(np.stack(draws)), "argmax": np.asarray(jnp.argmax(prob_sum, -1)),
                "per_step": text_metrics.mixture_logprob(np.stack(steps_logp)), "entropy": float(np.mean(ents)),
                "mixture_entropy": text_metrics.mixture_entropy_bits(prob_sum, num_draws)}
