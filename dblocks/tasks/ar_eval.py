"""Honest evaluation of autoregressive language models (DiffusionBlocks, plain LM, recurrent-depth), shared by the
'ar' and 'recurrent' tasks.

- Held-out bits per token of the distribution the sampler draws from (temperature 1, no top-p), on windows of the
  test split, scoring positions 1..T-1 of each window (every model sees the same in-window context). For a model
  whose read-out depends on noise (DiffusionBlocks' chain, the recurrent model's random initial state) this is the
  softmax of the final logits averaged over `num_draws` draws: a finite-draw estimate of the mixture, which can only
  overstate the bits (log of an average of finitely many draws is biased low).
- Next-token accuracy: argmax of that averaged distribution.
- Generated text (prompts from the test split): distinct-n, repetition rate, and gen-PPL, the perplexity per token of
  the samples under the end-to-end model of the same comparison (option `e2e_workdir`; the e2e run judges itself).
  The true continuations of the same prompts get the same numbers, as the reference point.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from dblocks import text_metrics


def test_stream(task, split: str = "test") -> np.ndarray:
    src = task.source(split)
    return np.asarray(src.get(np.arange(len(src)))["tokens"]).reshape(-1)


def test_windows(task, max_windows: int, split: str = "test") -> np.ndarray:
    """Up to max_windows windows of the test split, evenly spaced over it: [n, T]."""
    src = task.source(split)
    idx = np.unique(np.linspace(0, len(src) - 1, min(int(max_windows), len(src))).astype(int))
    return np.asarray(src.get(idx)["tokens"], np.int32)


def test_prompts(task, n: int, prompt_len: int, cont_len: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """n prompts of prompt_len tokens from evenly spaced places of the test split, and their true continuations of
    cont_len tokens: ([n, prompt_len], [n, cont_len])."""
    stream = test_stream(task, split)
    starts = np.linspace(0, len(stream) - prompt_len - cont_len - 1, n).astype(int)
    prompts = np.stack([stream[s:s + prompt_len] for s in starts]).astype(np.int32)
    conts = np.stack([stream[s + prompt_len:s + prompt_len + cont_len] for s in starts]).astype(np.int32)
    return prompts, conts


def score_windows(task, run, windows: np.ndarray, num_draws: int, batch_size: int, seed: int = 0,
                  steps: int | None = None) -> dict:
    """Bits per token, accuracy and per-call bits over windows [n, T] (batched)."""
    logp, correct, per_step, ent, mix_ent = [], [], [], [], []
    key = jax.random.PRNGKey(seed)
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        r = task.window_logprobs(run, w, jax.random.fold_in(key, i), num_draws, steps=steps)
        logp.append(r["logp"])
        correct.append(r["argmax"] == w[:, 1:])
        ent.append(r["entropy"])
        mix_ent.append(r["mixture_entropy"])
        if r["per_step"] is not None:
            per_step.append(r["per_step"])
    out = {"bits": text_metrics.bits_per_token(np.concatenate(logp)),
           "accuracy": float(np.concatenate(correct).mean()), "positions": int(sum(x.size for x in logp)),
           "entropy": float(np.mean(ent)), "mixture_entropy": float(np.mean(mix_ent))}
    if per_step:
        steps_lp = np.concatenate(per_step, axis=1)
        out["per_step_bits"] = [text_metrics.bits_per_token(s) for s in steps_lp]
    return out


def sequence_logprobs(task, run, seqs: np.ndarray, start: int, num_draws: int, seed: int = 0) -> np.ndarray:
    """log p of seqs[:, start:] under a model, each token scored with at least half a window of context
    (sliding windows of the trained length T, stride T/2): [N, L - start]."""
    N, L = seqs.shape
    T = int(task.config.data.seq_len)
    h = T // 2
    out = np.full((N, L), np.nan)
    s = 0
    while True:
        w = seqs[:, s:s + T]
        w = np.pad(w, ((0, 0), (0, T - w.shape[1])))   # right padding cannot change a causal model's scores
        lp = task.window_logprobs(run, w, jax.random.fold_in(jax.random.PRNGKey(seed), s), num_draws)["logp"]
        for j in range(1, T):
            idx = s + j
            if idx < L and (s == 0 or j >= h) and np.isnan(out[0, idx]):
                out[:, idx] = lp[:, j - 1]
        if s + T >= L:
            break
        s += h
    return out[:, start:]


def evaluate(task, run, num_draws=None, max_windows=None, batch_size=None, num_samples=None, max_tokens=None,
             prompt_len=None, e2e_workdir=None, seed=None, temperature=None, top_p=None, greedy=None, steps=None,
             judge=None, limit=None, bridge=None, split="test", **_) -> dict:
    """The task contract's evaluate (dblocks.tasks.base.Task.evaluate) for autoregressive models. `limit` is an
    alias of max_windows (test windows scored); e2e_workdir names the judge of gen-PPL (default: the run itself if
    it is e2e, else a finished sibling WORKDIR/../e2e or WORKDIR_e2e); bridge overrides sample.bridge; split
    'validation' scores the validation works instead of the test works (for choosing settings)."""
    e, s = task.config.eval, task.config.sample
    if bridge:   # an option overrides the run's sample.bridge (softmax | renorm | argmax)
        s.bridge = str(bridge)
    seed = int(seed or 0)
    max_windows = max_windows or limit
    draws = int(num_draws or e.num_draws) if task.noisy_readout(run) else 1
    name = "bits_per_token" if task.config.data.get("tokenizer") else "bits_per_char"
    sc = score_windows(task, run, test_windows(task, int(max_windows or e.max_windows), split), draws,
                       int(batch_size or e.batch_size), seed, steps)
    out = {"headline": {"name": name, "value": sc["bits"], "higher_is_better": False},
           name: sc["bits"], "next_token_accuracy": sc["accuracy"], "num_draws": draws,
           "positions_scored": sc["positions"], "method": run.method, "split": split,
           "final_softmax_entropy_bits": sc["entropy"], "mixture_entropy_bits": sc["mixture_entropy"],
           "bridge": str(s.bridge),
           "grid_points": len(task.grid(run, steps)) if run.method == "dblocks" else None}
    if "per_step_bits" in sc:
        out["per_step"] = {"name": f"{name} of the read-out after each block call", "values": sc["per_step_bits"]}

    n, G, P = int(num_samples or e.num_samples), int(max_tokens or e.max_tokens), int(prompt_len or e.prompt_len)
    prompts, refs = test_prompts(task, n, P, G, split)
    gen, calls = task.generate(run, prompts, G, seed, temperature, top_p, greedy, steps)
    out["block_calls_per_sample"] = calls   # network evaluations per generated token
    out["layer_evals_per_sample"] = task.training_compute(run.method)["inference_layer_rows_per_token"]
    texts, ref_texts = [task.vocab.decode(g) for g in gen], [task.vocab.decode(r) for r in refs]
    g = {"samples": n, "prompt_tokens": P, "new_tokens": G,
         "sampler": {"temperature": float(s.temperature if temperature is None else temperature),
                     "top_p": float(s.top_p if top_p is None else top_p),
                     "greedy": bool(s.greedy if greedy is None else greedy)},
         **text_metrics.text_summary(texts), "reference": text_metrics.text_summary(ref_texts),
         "examples": [task.vocab.decode(prompts[i]) + "[[" + texts[i] + "]]" for i in range(min(2, n))]}
    judge_run = judge if judge is not None else _judge(run, e2e_workdir)
    if judge_run is not None:
        jd = int(num_draws or e.num_draws) if judge_run.task.noisy_readout(judge_run) else 1
        for key, toks in (("gen", gen), ("ref", refs)):
            lp = sequence_logprobs(judge_run.task, judge_run, np.concatenate([prompts, toks], 1), P, jd, seed)
            g[f"{key}_ppl"] = text_metrics.perplexity(lp)
        g["judge"] = judge_run.workdir
    out["generation"] = g
    out["training_compute"] = task.training_compute(run.method)
    return out


def _judge(run, e2e_workdir):
    """The end-to-end run that scores generated text: the given workdir, the run itself when it is e2e, or a
    finished e2e run next to it (experiments.compare's WORKDIR/e2e, or the configs' WORKDIR_e2e)."""
    from dblocks import assemble
    if e2e_workdir:
        return assemble.load_run(e2e_workdir, method="e2e")
    if run.method == "e2e":
        return run
    here = os.path.abspath(run.workdir)
    for cand in (os.path.join(os.path.dirname(here), "e2e"), here + "_e2e"):
        if os.path.isdir(os.path.join(cand, "e2e")):
            try:
                return assemble.load_run(cand, method="e2e")
            except assemble.AssemblyError:
                pass   # unfinished or another config: no judge
    return None

