"""Autoregressive language modelling (paper §4.4, §5.5): a causal transformer as B DiffusionBlocks, against the same
transformer trained as an ordinary causal LM (the end-to-end baseline, `diffusion_baseline = False`).

DiffusionBlocks: the target of position i is its token's row of the fixed target space E; sigma is drawn per token
from the block's range; the block reads [clean tokens ; noisy targets] (dblocks.models.ar) and its loss is the
cross-entropy of the logits of each noisy row, weighted per token by lambda(sigma) (config.edm.loss_weighting).
The denoised point for the ODE is the bridge bridge(logits, E) (softmax @ E by default).

Generation: for each new token, z ~ N(0, sigma_max^2 I) runs down the grid (B points by default: one Euler step per
block, block 0 first), each block reading its own K/V cache of the clean prefix; the token is drawn from the final
logits (temperature / top-p, or greedy). The baseline draws from its next-token logits the same way.
Evaluation (`evaluate`): held-out bits per token of the distribution the sampler draws from, next-token accuracy,
and distinct-n / repetition / gen-PPL of generated text (dblocks.tasks.ar_eval).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dblocks import edm as edm_lib
from dblocks import sampling, targets, textgen
from dblocks import text as text_lib
from dblocks import text_metrics, tokenized
from dblocks.data import DatasetMissingError
from dblocks.models import ar as ar_model
from dblocks.tasks import ar_eval
from dblocks.tasks.base import Task, Unit, register

Array = jax.Array


@register
class ARTask(Task):
    name = "ar"
    diffusion_baseline = False   # the e2e baseline is a plain causal LM with cross-entropy

    # -- config ----------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        m, d, s = c.model, c.data, c.sample
        try:
            text_lib.vocab_for(d.name)
        except ValueError as e:
            p.append(f"data.name: {e}")
        if d.get("tokenizer"):
            if not str(d.name).startswith("tfds:"):
                p.append("data.tokenizer (a SentencePiece model) is only used with tfds text data (e.g. tfds:lm1b)")
            else:
                try:
                    self.vocab
                except DatasetMissingError as e:
                    p.append(f"data.tokenizer: {e}")
        if d.seq_len < 2:
            p.append(f"data.seq_len={d.seq_len} must be >= 2")
        if m.hidden % m.heads or (m.hidden // m.heads) % 2:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads} with an even head size")
        if m.get("target_dim", 0) < 0 or m.get("target_norm", 0.0) < 0:
            p.append(f"model.target_dim={m.get('target_dim')} and model.target_norm={m.get('target_norm')} must be "
                     f">= 0 (0 = hidden, and the sigma_data * sqrt(dim) scale contract)")
        if s.solver not in sampling.SOLVERS:
            p.append(f"sample.solver={s.solver!r}; choose one of {sampling.SOLVERS}")
        if s.steps and s.steps < max(2, self.min_steps()):
            p.append(f"sample.steps={s.steps} cannot visit all {self.min_steps()} blocks (0 = one per block)")
        if s.bridge not in targets.BRIDGES:
            p.append(f"sample.bridge={s.bridge!r}; choose one of {targets.BRIDGES}")
        if not s.temperature > 0 or not 0 < s.top_p <= 1:
            p.append(f"sample.temperature={s.temperature} must be > 0 and sample.top_p={s.top_p} in (0, 1]")
        if c.eval.num_draws < 1:
            p.append(f"eval.num_draws={c.eval.num_draws} must be >= 1")
        return p

    def min_steps(self) -> int:
        return int(self.config.blocks.num_blocks)

    def data_signature_fields(self):
        return ("name", "seq_len", "tokenizer")

    # -- data --------------------------------------------------------------------------------------------------------
    @property
    def vocab(self):
        """Characters (CharVocab) or a SentencePiece model: .size, .encode(str), .decode(ids)."""
        if "_vocab" not in self.__dict__:
            d = self.config.data
            self._vocab = (tokenized.load_tokenizer(d.tokenizer) if d.get("tokenizer")
                           else text_lib.vocab_for(d.name))
        return self._vocab

    def source(self, split: str):
        d = self.config.data
        if d.get("tokenizer"):
            return tokenized.packed_source(d.name[5:], split, int(d.seq_len), self.vocab, d.data_dir)
        return text_lib.load_text(d.name, split, int(d.seq_len), d.data_dir, d.get("path", ""))[0]

    def make_batch(self, examples, train):
        return {"tokens": np.asarray(examples["tokens"], np.int32)}

    def dummy_batch(self, n: int = 2) -> dict:
        return {"tokens": np.zeros((n, int(self.config.data.seq_len)), np.int32)}

    @property
    def target_dim(self) -> int:
        m = self.config.model
        return int(m.get("target_dim", 0) or m.hidden)

    @property
    def E(self) -> Array:
        """The fixed target space [V, D]: row v is the clean target of token v (not learned, docs/design.md item 4).
        Row norm: the scale contract, or model.target_norm (targets.fixed_embedding)."""
        if "_E" not in self.__dict__:   # kept as numpy: a jnp constant cached during a trace would leak a tracer
            m = self.config.model
            self._E = targets.fixed_embedding(self.vocab.size, self.target_dim, self.edm.sigma_data,
                                              int(m.get("target_seed", 0)), float(m.get("target_norm", 0.0) or 0.0))
        return jnp.asarray(self._E)

    # -- model and loss ------------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit) -> ar_model.ARModel:
        m = self.config.model
        return ar_model.ARModel(vocab=self.vocab.size, num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads,
                                mlp_ratio=m.mlp_ratio, diffusion=unit.is_block, sigma_min=self.edm.sigma_min)

    def init_params(self, model, rng, batch):
        tokens = jnp.asarray(batch["tokens"])
        if not model.diffusion:
            return model.init(rng, tokens)["params"]
        N, T = tokens.shape
        return model.init(rng, tokens, jnp.zeros((N, T, self.target_dim)), jnp.zeros((N, T)))["params"]

    def noisy_logits(self, model, params, tokens, z, sigma):
        """Teacher-forced denoiser read-out: clean tokens [N, T], noisy targets z [N, T, D], sigma [N, T] ->
        logits [N, T, V] (EDM input scaling c_in and c_noise applied here)."""
        pc = edm_lib.precondition(sigma, self.edm.sigma_data)
        return model.apply({"params": params}, tokens, pc.c_in[..., None] * z, pc.c_noise)

    def loss(self, model, params, batch, rng, train_range, train=True):
        tokens = batch["tokens"]
        if not model.diffusion:
            logits = model.apply({"params": params}, tokens)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
            return ce.mean(), {"ce": ce.mean()}
        return self.denoising_loss(lambda z, s: self.noisy_logits(model, params, tokens, z, s), tokens, rng,
                                   train_range)

    def denoising_loss(self, logits_fn, tokens, rng, train_range):
        """CE of every noisy row against its token, weighted per token by lambda(sigma); sigma per token."""
        k_sigma, k_eps = jax.random.split(rng)
        sigma = edm_lib.sample_sigma(k_sigma, tokens.shape, train_range[0], train_range[1], self.edm.p_mean,
                                     self.edm.p_std)                                   # [N, T]
        y = self.E[tokens]                                                             # [N, T, D]
        z = y + sigma[..., None] * jax.random.normal(k_eps, y.shape)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(z, sigma), tokens)   # [N, T]
        w = edm_lib.loss_weight(sigma, self.edm.sigma_data, self.config.edm.loss_weighting,
                                self.config.edm.max_weight)
        return edm_lib.weighted_mean(ce.reshape(-1), w.reshape(-1)), {"ce": ce.mean()}

    # -- jitted pieces (one set per model shape; blocks of equal shape share them) ---------------------------------
    def _fns(self, model) -> dict:
        cache = self.__dict__.setdefault("_fn_cache", {})
        t_max, E, bridge = int(self.config.data.seq_len), self.E, str(self.config.sample.bridge)
        if (repr(model), bridge) in cache:
            return cache[repr(model), bridge]
        hd = model.hidden // model.heads
        apply = lambda p, *a, method=None: model.apply({"params": p}, *a, method=method)  # noqa: E731

        def prefill(params, tokens):
            P = tokens.shape[1]
            logits, kvs = apply(params, tokens, jnp.arange(P)[None], ar_model.causal_mask(P),
                                method=model.clean_rows)
            empty = ar_model.empty_cache(model.num_layers, tokens.shape[0], t_max, model.heads, hd)
            return logits[:, -1], ar_model.write_cache(empty, kvs, 0)

        def clean_row(params, cache, token, pos):
            logits, kvs = apply(params, token[:, None], jnp.full((1, 1), pos), ar_model.prefix_mask(pos, t_max),
                                cache, method=model.clean_rows)
            return logits[:, 0], ar_model.write_cache(cache, kvs, pos)

        def noisy_row(params, cache, z, sigma, pos):   # z [N, 1, D], sigma [N]
            pc = edm_lib.precondition(sigma, self.edm.sigma_data)
            logits = apply(params, pc.c_in[:, None, None] * z, pc.c_noise[:, None], jnp.full((1, 1), pos),
                           ar_model.prefix_mask(pos, t_max), cache, method=model.noisy_rows)
            return targets.bridge(logits, E, bridge), logits[:, 0]

        def forward(params, tokens, z, sigma):          # teacher-forced, every position: z [N, T, D], sigma [N]
            logits = self.noisy_logits(model, params, tokens, z, jnp.broadcast_to(sigma[:, None], tokens.shape))
            return targets.bridge(logits, E, bridge), logits

        fns = {"prefill": jax.jit(prefill), "clean_row": jax.jit(clean_row), "noisy_row": jax.jit(noisy_row),
               "forward": jax.jit(forward), "lm": jax.jit(lambda p, t: apply(p, t))}
        cache[repr(model), bridge] = fns
        return fns

    def grid(self, run, steps: int | None = None) -> np.ndarray:
        """The inference grid: `steps` points (default sample.steps, 0 = one per block) equally spaced in CDF."""
        steps = int(steps or self.config.sample.steps or max(2, run.num_blocks))
        return sampling.grid_for(steps, self.edm)

    # -- generation -------------------------------------------------------------------------------------------------
    def decoder(self, run, n: int, steps: int | None = None, solver: str | None = None,
                use_cache: bool = True) -> textgen.Decoder:
        """A decoder for n sequences: cached (K/V of the clean prefix) or uncached (recomputes the whole window
        each token; the reference the cache is tested against)."""
        t_max = int(self.config.data.seq_len)
        if run.method == "e2e":
            f = self._fns(run.models[0])
            p = run.params[0]
            if not use_cache:
                def lm_next(ctx, key):
                    padded = np.pad(ctx, ((0, 0), (0, t_max - ctx.shape[1])))
                    return f["lm"](p, padded)[:, ctx.shape[1] - 1]
                return textgen.Decoder(lambda ctx: ctx, lm_next, lambda ctx, tok: np.concatenate(
                    [ctx, tok[:, None]], 1), t_max, 1)

            def lm_prefill(ctx):
                logits, cache = f["prefill"](p, jnp.asarray(ctx))
                return {"cache": cache, "logits": logits, "pos": ctx.shape[1]}

            def lm_append(state, tok):
                logits, cache = f["clean_row"](p, state["cache"], jnp.asarray(tok), state["pos"])
                return {"cache": cache, "logits": logits, "pos": state["pos"] + 1}
            return textgen.Decoder(lm_prefill, lambda s, key: s["logits"], lm_append, t_max, 1)

        grid, solver = self.grid(run, steps), solver or self.config.sample.solver
        fns = [self._fns(m) for m in run.models]
        D = self.target_dim

        def chain(denoise, key, shape):
            z0 = edm_lib.initial_noise(key, shape, self.edm.sigma_max)
            return sampling.sample(denoise, z0, grid, run.partition, solver)

        if not use_cache:
            def db_next(ctx, key):
                pos = ctx.shape[1]
                padded = jnp.asarray(np.pad(ctx, ((0, 0), (0, t_max - pos))))

                def denoise(b, z, s):   # z [N, 1, D]: placed at row pos of an otherwise empty noisy sequence
                    full = jnp.zeros((n, t_max, D)).at[:, pos].set(z[:, 0])
                    d, logits = fns[b]["forward"](run.params[b], padded, full, s)
                    return d[:, pos:pos + 1], logits[:, pos]
                return chain(denoise, key, (n, 1, D)).aux
            return textgen.Decoder(lambda ctx: ctx, db_next, lambda ctx, tok: np.concatenate(
                [ctx, tok[:, None]], 1), t_max, len(grid))

        def db_prefill(ctx):
            caches = [fns[b]["prefill"](run.params[b], jnp.asarray(ctx))[1] for b in range(run.num_blocks)]
            return {"caches": caches, "pos": ctx.shape[1]}

        def db_next_cached(state, key):
            def denoise(b, z, s):
                return fns[b]["noisy_row"](run.params[b], state["caches"][b], z, s, state["pos"])
            return chain(denoise, key, (n, 1, D)).aux

        def db_append(state, tok):
            caches = [fns[b]["clean_row"](run.params[b], state["caches"][b], jnp.asarray(tok), state["pos"])[1]
                      for b in range(run.num_blocks)]
            return {"caches": caches, "pos": state["pos"] + 1}
        return textgen.Decoder(db_prefill, db_next_cached, db_append, t_max, len(grid))

    def generate(self, run, prompts: np.ndarray, max_tokens: int, seed: int = 0, temperature: float | None = None,
                 top_p: float | None = None, greedy: bool | None = None, steps: int | None = None,
                 solver: str | None = None, use_cache: bool = True) -> tuple[np.ndarray, int]:
        """prompts [N, P] -> (new tokens [N, max_tokens], network calls per token)."""
        s = self.config.sample
        dec = self.decoder(run, len(prompts), steps, solver, use_cache)
        out = textgen.generate(dec, prompts, int(max_tokens), jax.random.PRNGKey(seed),
                               float(s.temperature if temperature is None else temperature),
                               float(s.top_p if top_p is None else top_p), bool(s.greedy if greedy is None else greedy))
        return out, dec.calls_per_token

    def write_samples(self, run, out_path, prompt=None, max_tokens=None, num_samples=None, seed=0, temperature=None,
                      top_p=None, greedy=None, steps=None, solver=None, **_):
        """Writes generated text to out_path (an image suffix such as .png becomes .txt): the prompt, then the
        continuation in [[ ]]. Default prompts: passages of the test split."""
        s = self.config.sample
        out_path = os.path.splitext(out_path)[0] + ".txt" if out_path.endswith((".png", ".jpg")) else out_path
        n = int(num_samples or s.num_samples)
        max_tokens = int(max_tokens or s.max_tokens)
        if prompt:
            prompts = np.repeat(self.vocab.encode(prompt)[None], n, axis=0)
        else:
            prompts = ar_eval.test_prompts(self, n, int(self.config.eval.prompt_len), 0)[0]
        t0 = time.perf_counter()
        out, calls = self.generate(run, prompts, max_tokens, seed, temperature, top_p, greedy, steps, solver)
        seconds = time.perf_counter() - t0
        texts = [self.vocab.decode(o) for o in out]
        with open(out_path, "w") as f:
            for k, (pr, t) in enumerate(zip(prompts, texts)):
                f.write(f"=== sample {k} ({run.method}) ===\n{self.vocab.decode(pr)}[[{t}]]\n\n")
        return {"path": out_path, "samples": n, "max_tokens": max_tokens, "block_calls_per_token": calls,
                "seconds": round(seconds, 2), "tokens_per_second": round(n * max_tokens / max(seconds, 1e-9), 1)}

    # -- evaluation -------------------------------------------------------------------------------------------------
    def window_logprobs(self, run, tokens: np.ndarray, key: Array, num_draws: int, steps: int | None = None,
                        solver: str | None = None) -> dict:
        """Teacher-forced log-probabilities of tokens[:, 1:] under the distribution the sampler draws from
        (temperature 1, no top-p). DiffusionBlocks: softmax of the final logits averaged over `num_draws` noise
        draws of the whole chain (all positions at once: noisy rows do not see each other). Returns
        {'logp': [N, T-1], 'argmax': [N, T-1], 'per_step': [calls, N, T-1] (DiffusionBlocks only), 'entropy': mean
        entropy (bits) of one draw's final softmax (what temperature and top-p act on), 'mixture_entropy': of the
        averaged distribution}."""
        tokens = jnp.asarray(tokens)
        if run.method == "e2e":
            logits = self._fns(run.models[0])["lm"](run.params[0], tokens)[:, :-1]
            logp = jax.nn.log_softmax(logits, -1)
            ent = text_metrics.entropy_bits(logp)
            return {"logp": np.asarray(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]),
                    "argmax": np.asarray(jnp.argmax(logits, -1)), "per_step": None, "entropy": ent,
                    "mixture_entropy": ent}
        grid, solver = self.grid(run, steps), solver or self.config.sample.solver
        fns = [self._fns(m) for m in run.models]
        N, T = tokens.shape
        true = tokens[:, 1:, None]
        draws, steps_logp, prob_sum, ents = [], [], 0.0, []
        for d in range(num_draws):
            per_call = []

            def denoise(b, z, s):
                dd, logits = fns[b]["forward"](run.params[b], tokens, z, s)
                lp = jax.nn.log_softmax(logits[:, 1:], -1)
                per_call.append(np.asarray(jnp.take_along_axis(lp, true, -1)[..., 0]))
                return dd, lp
            z0 = edm_lib.initial_noise(jax.random.fold_in(key, d), (N, T, self.target_dim), self.edm.sigma_max)
            res = sampling.sample(denoise, z0, grid, run.partition, solver)
            draws.append(per_call[-1])
            steps_logp.append(np.stack(per_call))
            prob_sum = prob_sum + jnp.exp(res.aux)
            ents.append(text_metrics.entropy_bits(res.aux))
        return {"logp": text_metrics.mixture_logprob(np.stack(draws)), "argmax": np.asarray(jnp.argmax(prob_sum, -1)),
                "per_step": text_metrics.mixture_logprob(np.stack(steps_logp)), "entropy": float(np.mean(ents)),
                "mixture_entropy": text_metrics.mixture_entropy_bits(prob_sum, num_draws)}

    def noisy_readout(self, run) -> bool:
        """Whether the sampler's next-token distribution depends on noise (then it is averaged over draws)."""
        return run.method == "dblocks"

    def training_compute(self, method: str) -> dict:
        """Layer evaluations per training token of one optimizer step (forward; backward runs through the same
        layers). A block runs its L/B layers over 2 rows per token (clean and noisy); B blocks each train as many
        steps as the baseline, which runs L layers over 1 row per token."""
        L, B = int(self.config.model.num_layers), int(self.config.blocks.num_blocks)
        if method == "e2e":
            return {"forward_layer_rows_per_token": L, "backward_layer_rows_per_token": L, "units": 1,
                    "inference_layer_rows_per_token": L}
        steps = int(self.config.sample.steps or B)
        return {"forward_layer_rows_per_token": 2 * L // B, "backward_layer_rows_per_token": 2 * L // B, "units": B,
                "inference_layer_rows_per_token": L + steps * L // B,
                "note": "training: per block step (the B blocks together: 2L layer-rows per token per baseline "
                        "step); inference: the clean row through all B blocks (L) + one noisy row per grid point"}

    def evaluate(self, run, **options) -> dict:
        return ar_eval.evaluate(self, run, **options)

