"""Inference for the language tasks (dblocks.tasks.ar, dblocks.tasks.recurrent): the sampler's options, the inference
grid, the cached and uncached token decoders, generation, teacher-forced read-outs of the chain, and sample files.
Functions of (task, run, ...); options are passed down explicitly in a `Sampler`, never written into the config.

The chain for one new token (DiffusionBlocks): z ~ N(0, sigma_max^2 I) runs down the grid (sampling.sample), each
step by the block that owns the sigma it starts from; the last call, at grid[-1], gives the logits the token is drawn
from (temperature / top-p, or greedy). A grid may end above sigma_min (`sample.sigma_end`, or an explicit
`sample.grid`): the token is then drawn from that call's softmax, which is a real distribution inside the band where
the noisy target is informative (docs/language_models.md, "Sampler").
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import sampling, targets, text_metrics, textgen
from dblocks.models import ar as ar_model
from dblocks.tasks import lm_decode

Array = jax.Array


# -- sampler options and the grid ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are drawn. grid: the noise levels the chain visits (empty for a plain LM)."""
    grid: tuple[float, ...] = ()
    solver: str = "euler"
    bridge: str = "softmax"
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    @property
    def calls_per_token(self) -> int:
        """Network (block) evaluations per generated token."""
        if not self.grid:
            return 1
        return 2 * (len(self.grid) - 1) + 1 if self.solver == "heun" else len(self.grid)

    @property
    def stochastic(self) -> bool:
        """Whether the chain draws randomness beyond z_0 (the ancestral solver, the 'sample' bridge)."""
        return self.solver in sampling.STOCHASTIC_SOLVERS or self.bridge == "sample"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "grid": [float(g) for g in self.grid],
                "block_calls_per_token": self.calls_per_token}


def parse_grid(spec) -> tuple[float, ...]:
    """sample.grid: '' (none), '80,0.45,0.2,0.1' or a sequence of floats -> a strictly decreasing tuple."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return ()
    vals = tuple(float(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    if len(vals) < 2 or any(v <= 0 for v in vals) or any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{spec!r} must be at least 2 positive, strictly decreasing noise levels")
    return vals


def make_grid(task, grid=None, grid_points: int | None = None, sigma_end: float | None = None) -> np.ndarray:
    """The inference grid: an explicit `grid`, else `grid_points` points (0 = the task's default) equally spaced in
    the CDF of the log-normal truncated to [sigma_end, sigma_max] (sigma_end 0 = sigma_min)."""
    explicit = parse_grid(grid)
    if explicit:
        return np.asarray(explicit, np.float64)
    n = int(grid_points or task.default_grid_points())
    end = float(sigma_end or task.edm.sigma_min)
    return sampling.grid_for(n, dataclasses.replace(task.edm, sigma_min=end))


def sampler_options(task, run, grid=None, grid_points=None, sigma_end=None, solver=None, bridge=None,
                    temperature=None, top_p=None, greedy=None, steps=None, **_) -> Sampler:
    """A Sampler from the config's sample.* with the given overrides (None = the config's value; `steps`, the
    evaluate command's generic --steps, means grid_points here)."""
    s = task.config.sample
    grid_points = steps if grid_points is None else grid_points
    pick = lambda v, key: s[key] if v is None else v  # noqa: E731
    common = dict(temperature=float(pick(temperature, "temperature")), top_p=float(pick(top_p, "top_p")),
                  greedy=bool(pick(greedy, "greedy")))
    if run.method == "e2e":
        return Sampler(**common)
    g = make_grid(task, pick(grid, "grid"), pick(grid_points, "grid_points"), pick(sigma_end, "sigma_end"))
    return Sampler(grid=tuple(float(v) for v in g), solver=str(pick(solver, "solver")),
                   bridge=str(pick(bridge, "bridge")), **common)


# -- jitted pieces of one model shape ---------------------------------------------------------------------------------

def lm_fns(task, model) -> dict:
    """A plain causal LM (or a DiffusionBlocks block's clean rows): full pass, prefill and one clean row."""
    t_max = int(task.config.data.seq_len)
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

    return {"lm": task.jit("lm.full", model, lambda: jax.jit(lambda p, t: apply(p, t))),
            "prefill": task.jit("lm.prefill", model, lambda: jax.jit(prefill)),
            "clean_row": task.jit("lm.clean_row", model, lambda: jax.jit(clean_row))}


def block_fns(task, model, bridge: str) -> dict:
    """A denoiser block: one noisy row against the cache, and the teacher-forced pass (per-token sigma [N, T])."""
    t_max, E = int(task.config.data.seq_len), task.E

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
        logits = task.precondition_logits(apply, z, sigma[:, None])
        return targets.bridge(logits, E, bridge, key), logits[:, 0]

    def forward(params, tokens, z, sigma, key):          # z [N, T, D], sigma [N, T]
        logits = task.noisy_logits(model, params, tokens, z, sigma)
        return targets.bridge(logits, E, bridge, key), logits

    return {**lm_fns(task, model),
            "noisy_row": task.jit(f"ar.noisy_row.{bridge}", model, lambda: jax.jit(noisy_row)),
            "forward": task.jit(f"ar.forward.{bridge}", model, lambda: jax.jit(forward))}


# -- the chain ---------------------------------------------------------------------------------------------------------

def chain_keys(sampler: Sampler, key: Array) -> tuple[Array, Array | None, Array | None]:
    """(z_0's key, the solver's key, the bridge's key). A deterministic chain draws only z_0, from `key` itself (as
    before the stochastic options existed); a stochastic one splits `key` in three. The bridge's key for the c-th
    block call of the chain is fold_in(bridge key, c); the solver's for step i is fold_in(solver key, i)."""
    if not sampler.stochastic:
        return key, None, None
    k_z0, k_steps, k_bridge = jax.random.split(key, 3)
    return k_z0, k_steps, k_bridge


def run_chain(sampler: Sampler, partition, denoise, key: Array, shape, sigma_max: float) -> sampling.SampleResult:
    """One chain from z_0 ~ N(0, sigma_max^2 I) of `shape` down the sampler's grid. denoise(b, z, sigma, key)."""
    k_z0, k_steps, k_bridge = chain_keys(sampler, key)
    calls = iter(range(1 << 30))
    dummy = jax.random.PRNGKey(0)

    def with_key(b, z, s):
        c = next(calls)
        return denoise(b, z, s, dummy if k_bridge is None else jax.random.fold_in(k_bridge, c))
    z0 = edm_lib.initial_noise(k_z0, shape, sigma_max)
    return sampling.sample(with_key, z0, np.asarray(sampler.grid), partition, sampler.solver,
                           key=k_steps if sampler.solver in sampling.STOCHASTIC_SOLVERS else None)


# -- decoders ----------------------------------------------------------------------------------------------------------

def _append_ctx(ctx, tok):
    return np.concatenate([ctx, tok[:, None]], 1)


def lm_decoder(task, run, n: int, use_cache: bool = True) -> textgen.Decoder:
    """The plain causal LM: cached (K/V of the prefix) or uncached (recomputes the window each token)."""
    t_max, f, p = int(task.config.data.seq_len), lm_fns(task, run.models[0]), run.params[0]
    if not use_cache:
        def lm_next(ctx, key):
            return f["lm"](p, np.pad(ctx, ((0, 0), (0, t_max - ctx.shape[1]))))[:, ctx.shape[1] - 1]
        return textgen.Decoder(lambda ctx: ctx, lm_next, _append_ctx, t_max, 1)

    def prefill(ctx):
        logits, cache = f["prefill"](p, jnp.asarray(ctx))
        return {"cache": cache, "logits": logits, "pos": ctx.shape[1]}

    def append(pp, state, tok):   # pure in (params, state): also traced by the compiled decoder (lm_decode)
        logits, cache = f["clean_row"](pp, state["cache"], tok, state["pos"])
        return {"cache": cache, "logits": logits, "pos": state["pos"] + 1}
    return lm_decode.decoder(p, prefill, lambda pp, s, key: s["logits"], append, t_max, 1,
                             lm_decode.jit_for(task, run.models), f"lm.{n}")


def decoder(task, run, n: int, sampler: Sampler, use_cache: bool = True) -> textgen.Decoder:
    """A decoder for n sequences: the LM for e2e runs, else the chain of blocks (each with its own K/V cache of the
    clean prefix; uncached = the reference the cache is tested against)."""
    if run.method == "e2e":
        return lm_decoder(task, run, n, use_cache)
    t_max, D = int(task.config.data.seq_len), task.target_dim
    fns = [block_fns(task, m, sampler.bridge) for m in run.models]
    grid = np.asarray(sampler.grid)

    def chain(denoise, key):   # denoise(b, z, s, key): key = the bridge's key for this call
        return run_chain(sampler, run.partition, denoise, key, (n, 1, D), task.edm.sigma_max).aux

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

    def next_cached(ps, state, key):   # pure in (params, state): also traced by the compiled decoder (lm_decode)
        def denoise(b, z, s, k):
            return fns[b]["noisy_row"](ps[b], state["caches"][b], z, s, state["pos"], k, state["last"])
        return chain(denoise, key)

    def append(ps, state, tok):
        return {"caches": [fns[b]["clean_row"](ps[b], state["caches"][b], tok, state["pos"])[1] if b in called
                           else None for b in range(run.num_blocks)], "pos": state["pos"] + 1,
                "last": jnp.asarray(tok, jnp.int32)}
    return lm_decode.decoder(tuple(run.params), prefill, next_cached, append, t_max, sampler.calls_per_token,
                             lm_decode.jit_for(task, run.models), f"db.{n}.{sampler!r}.{run.partition!r}")


def generate(task, run, prompts: np.ndarray, max_tokens: int, seed: int, sampler: Sampler,
             use_cache: bool = True, compiled: bool = True) -> tuple[np.ndarray, int]:
    """prompts [N, P] -> (new tokens [N, max_tokens], block calls per token). compiled: each window decoded in one
    compiled loop (dblocks.tasks.lm_decode; cached decoders); False: the Python loop of textgen.generate, the
    reference (the same tokens for the same seed)."""
    dec = task.decoder(run, len(prompts), sampler, use_cache)
    gen = lm_decode.generate if compiled and dec.compiled is not None else textgen.generate
    out = gen(dec, prompts, int(max_tokens), jax.random.PRNGKey(seed), sampler.temperature, sampler.top_p,
              sampler.greedy)
    return out, dec.calls_per_token


# -- held-out data ---------------------------------------------------------------------------------------------------

def heldout_stream(task, split: str = "test") -> np.ndarray:
    """The whole split as one token stream."""
    src = task.source(split)
    return np.asarray(src.get(np.arange(len(src)))["tokens"]).reshape(-1)


def heldout_windows(task, max_windows: int, split: str = "test") -> np.ndarray:
    """Up to max_windows windows of a split, evenly spaced over it: [n, T]."""
    src = task.source(split)
    idx = np.unique(np.linspace(0, len(src) - 1, min(int(max_windows), len(src))).astype(int))
    return np.asarray(src.get(idx)["tokens"], np.int32)


def heldout_prompts(task, n: int, prompt_len: int, cont_len: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """n prompts of prompt_len tokens from evenly spaced places of a split, and their true continuations of cont_len
    tokens: ([n, prompt_len], [n, cont_len])."""
    stream = heldout_stream(task, split)
    starts = np.linspace(0, len(stream) - prompt_len - cont_len - 1, n).astype(int)
    prompts = np.stack([stream[s:s + prompt_len] for s in starts]).astype(np.int32)
    conts = np.stack([stream[s + prompt_len:s + prompt_len + cont_len] for s in starts]).astype(np.int32)
    return prompts, conts


def write_samples(task, run, out_path, prompt=None, max_tokens=None, num_samples=None, seed=0, **options) -> dict:
    """Writes generated text to out_path (an image suffix such as .png becomes .txt): the prompt, then the
    continuation in [[ ]]. Default prompts: passages of the test split. Sampler options as `sampler_options`."""
    s = task.config.sample
    out_path = os.path.splitext(out_path)[0] + ".txt" if out_path.endswith((".png", ".jpg")) else out_path
    n, max_tokens = int(num_samples or s.num_samples), int(max_tokens or s.max_tokens)
    if prompt:
        prompts = np.repeat(task.vocab.encode(prompt)[None], n, axis=0)
    else:
        prompts = heldout_prompts(task, n, int(task.config.eval.prompt_len), 0)[0]
    sampler = sampler_options(task, run, **options)
    t0 = time.perf_counter()
    out, calls = generate(task, run, prompts, max_tokens, int(seed or 0), sampler)
    seconds = time.perf_counter() - t0
    with open(out_path, "w") as f:
        for k, (pr, o) in enumerate(zip(prompts, out)):
            f.write(f"=== sample {k} ({run.method}) ===\n{task.vocab.decode(pr)}[[{task.vocab.decode(o)}]]\n\n")
    return {"path": out_path, "samples": n, "max_tokens": max_tokens, "block_calls_per_token": calls,
            "sampler": sampler.to_dict(), "seconds": round(seconds, 2),
            "tokens_per_second": round(n * max_tokens / max(seconds, 1e-9), 1)}


# -- teacher-forced read-outs ----------------------------------------------------------------------------------------

def window_logprobs(task, run, tokens: np.ndarray, key: Array, num_draws: int, sampler: Sampler) -> dict:
    """Teacher-forced log-probabilities of tokens[:, 1:] under the distribution the sampler draws from
    (temperature 1, no top-p). DiffusionBlocks: the final call's softmax averaged over `num_draws` noise draws of
    the whole chain (all positions at once: noisy rows do not see each other). Returns {'logp': [N, T-1],
    'argmax': [N, T-1], 'per_step': [calls, N, T-1] (DiffusionBlocks only), 'entropy': mean entropy (bits) of one
    draw's final softmax (what temperature and top-p act on), 'mixture_entropy': of the averaged distribution}."""
    tokens = jnp.asarray(tokens)
    true = tokens[:, 1:, None]
    if run.method == "e2e":
        logp = jax.nn.log_softmax(lm_fns(task, run.models[0])["lm"](run.params[0], tokens)[:, :-1], -1)
        ent = text_metrics.entropy_bits(logp)
        return {"logp": np.asarray(jnp.take_along_axis(logp, true, -1)[..., 0]),
                "argmax": np.asarray(jnp.argmax(logp, -1)), "per_step": None, "entropy": ent, "mixture_entropy": ent}
    fns = [block_fns(task, m, sampler.bridge) for m in run.models]
    N, T = tokens.shape
    draws, steps_logp, prob_sum, ents = [], [], 0.0, []
    for d in range(num_draws):
        per_call = []

        def denoise(b, z, s, k):
            dd, logits = fns[b]["forward"](run.params[b], tokens, z, jnp.broadcast_to(s[:, None], (N, T)), k)
            lp = jax.nn.log_softmax(logits[:, 1:], -1)
            per_call.append(np.asarray(jnp.take_along_axis(lp, true, -1)[..., 0]))
            return dd, lp
        res = run_chain(sampler, run.partition, denoise, jax.random.fold_in(key, d), (N, T, task.target_dim),
                        task.edm.sigma_max)
        draws.append(per_call[-1])
        steps_logp.append(np.stack(per_call))
        prob_sum = prob_sum + jnp.exp(res.aux)
        ents.append(text_metrics.entropy_bits(res.aux))
    return {"logp": text_metrics.mixture_logprob(np.stack(draws)), "argmax": np.asarray(jnp.argmax(prob_sum, -1)),
            "per_step": text_metrics.mixture_logprob(np.stack(steps_logp)), "entropy": float(np.mean(ents)),
            "mixture_entropy": text_metrics.mixture_entropy_bits(prob_sum, num_draws)}
