"""Masked diffusion after training: the ELBO in bits per character (each t routed to the block that owns it) and
MD4's ancestral sampler (each step run by the block that owns its t). Functions of (task, run, ...)."""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from dblocks import mdm as mdm_lib


def _logits_fn(task, run):
    """(b, x_t, t) -> logits, one jitted apply per model shape (blocks of equal shape share it)."""
    def fn(b, x_t, t):
        model = run.models[b]
        return task.jit("logits", model, lambda: jax.jit(
            lambda p, x, tt: model.apply({"params": p}, x, tt)))(run.params[b], x_t, t)
    return fn


def _step_fn(task, temperature: float):
    """The jitted unmasking step at one temperature (cached per temperature)."""
    return task.jit(f"unmask_step(temperature={temperature!r})", None, lambda: jax.jit(
        lambda k, x, lg, t, s: mdm_lib.unmask_step(k, x, lg, t, s, task.mask_id, task.schedule, temperature)))


def generate(task, run, num: int, steps: int, seed: int = 0, temperature: float = 1.0) -> mdm_lib.MaskedSample:
    """num sequences of data.seq_len characters from all-[MASK], `steps` ancestral steps."""
    return mdm_lib.sample(_logits_fn(task, run), jax.random.PRNGKey(seed), num, int(task.config.data.seq_len),
                          steps, run.partition, task.mask_id, task.schedule, task.t_min, temperature,
                          step_fn=_step_fn(task, float(temperature)))


def write_samples(task, run, out_path, steps=None, seed=0, num=None, temperature=None, **_):
    """Writes generated text to out_path (an image suffix such as .png becomes .txt) and returns a summary."""
    s = task.config.sample
    steps, num = int(steps or s.steps), int(num or s.num)
    temperature = float(s.temperature if temperature is None else temperature)
    root, ext = os.path.splitext(out_path)
    out_path = root + ".txt" if ext.lower() in (".png", ".jpg", ".jpeg", "") else out_path
    t0 = time.perf_counter()
    res = generate(task, run, num, steps, seed, temperature)
    seconds = time.perf_counter() - t0
    texts = [task.vocab.decode(row) for row in res.tokens]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for i, txt in enumerate(texts):
            f.write(f"=== sample {i} ({run.method}, {steps} steps, temperature {temperature}) ===\n{txt}\n\n")
    return {"path": out_path, "samples": num, "steps": steps, "temperature": temperature,
            "block_calls_per_sample": res.block_calls, "steps_per_block": np.bincount(
                res.blocks, minlength=run.partition.num_blocks).tolist(), "seconds": round(seconds, 2)}


def evaluate(task, run, split: str = "test", t_per_sequence=None, max_sequences=None, limit=None,
             batch_size=None, seed=None, steps=None, num_samples=None, temperature=None, **_) -> dict:
    """Bits per character on `split` from the ELBO (headline, lower is better) with its standard error, and a
    few samples drawn by the blocks' ancestral sampler. max_sequences: that many test windows evenly spaced
    over the split (0 = all; default eval.max_sequences); limit: the first N windows instead. Options other
    tasks use (solver, repeats, ...) are ignored."""
    e, s = task.config.eval, task.config.sample
    k = int(t_per_sequence or e.t_per_sequence)
    seed = int(seed or 0)
    cap = int(e.max_sequences if max_sequences is None else max_sequences)
    tokens = task.source(split).get(np.arange(len(task.source(split))))["tokens"]
    if limit:
        tokens = tokens[: int(limit)]
    elif 0 < cap < len(tokens):   # an evenly spaced subset: the whole split is covered, not just its start
        tokens = tokens[np.linspace(0, len(tokens) - 1, cap).astype(np.int64)]
    t0 = time.perf_counter()
    est = mdm_lib.elbo_bpc(_logits_fn(task, run), tokens, run.partition, task.mask_id, k,
                           int(batch_size or e.batch_size), seed, task.t_min, task.schedule)
    elbo_seconds = time.perf_counter() - t0
    steps, num = int(steps or s.steps), int(num_samples or s.num)
    temperature = float(s.temperature if temperature is None else temperature)
    t0 = time.perf_counter()
    res = generate(task, run, num, steps, seed, temperature)
    sample_seconds = time.perf_counter() - t0
    grid = [(j + 0.5) / k for j in range(k)]
    return {
        "headline": {"name": "bits per character", "value": est.bpc, "higher_is_better": False},
        "bpc": est.bpc, "bpc_stderr": est.stderr, "split": split, "num_sequences": est.num_sequences,
        "seq_len": int(tokens.shape[1]), "t_per_sequence": k, "t_samples": est.num_sequences * k,
        "estimator": (f"stratified Monte Carlo over t in (0,1]: {k} strata per sequence, one t and one mask per "
                      f"stratum, integrand w(t) sum_masked CE / L at max(t, t_min={task.t_min}); each t run by "
                      f"the block that owns it; stderr over sequences"),
        "bpc_per_block": est.per_block,
        "integrand_per_t": {"name": "ELBO integrand (bits/char), mean over each t stratum", "t": grid,
                            "values": est.per_stratum},
        "block_calls_per_sample": res.block_calls,
        "layer_evals_per_sample": int(sum(run.units[b].num_layers for b in res.blocks)),
        "sample_steps": steps, "sample_temperature": temperature,
        "samples": [task.vocab.decode(row) for row in res.tokens],
        "seconds": {"elbo": round(elbo_seconds, 2), "sampling": round(sample_seconds, 2)},
    }
