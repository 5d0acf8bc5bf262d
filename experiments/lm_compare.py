"""The language-model part of experiments.compare: capacity-matched references trained by the same engine and data,
and the stable summary keys of compare.json.

References (all plain causal LMs, method 'e2e', train.steps as the comparison):
- ref_e2e: the L-layer LM, the comparison's own e2e run;
- ref_shallow: an L/B-layer LM (seed 0), WORKDIR/ref_shallow_s0;
- ref_ensemble: the mixture (average of probabilities) of B such L/B-layer LMs, seeds 0..B-1, WORKDIR/ref_shallow_s<k>;
  the product (normalised mean of log-probabilities) is reported too.
The recurrent task's reference is its own network run once as a plain LM of prelude + core + coda layers (B = 1).
"""
from __future__ import annotations

import os

from dblocks import assemble, logs
from dblocks.tasks import get_task

LM_TASKS = ("ar", "recurrent")
KEYS = ("elbo_bits", "first_call_bits", "sampler_bits", "sampler_draws", "final_entropy_bits", "next_token_accuracy",
        "block_calls_per_token", "elbo_per_block_bits")
GEN_KEYS = ("mauve", "gen_ppl_ngram", "gen_ppl_e2e", "char_entropy_bits", "distinct_1", "distinct_2", "repetition_3")


def shallow_config(config, seed: int):
    """The L/B-layer plain LM of a comparison, with the given seed (an 'ar' config even for the recurrent task)."""
    c = config.copy_and_resolve_references()
    L, B = int(config.model.num_layers), max(1, int(config.blocks.num_blocks))
    if c.task == "recurrent":
        c.task = "ar"
        for k in ("prelude", "core", "coda"):
            if k in c.model:
                del c.model[k]
    else:
        c.model.num_layers = L // B
    c.method, c.seed = "e2e", int(seed)
    c.blocks.num_blocks, c.blocks.layers = 1, ""
    return c


def train_references(config, workdir: str, train_timed, seeds: int | None = None) -> dict:
    """Trains the shallow LMs (seeds 0..B-1; 1 for the recurrent task) with `train_timed(config, workdir)`."""
    B = int(config.blocks.num_blocks)
    n = int(seeds if seeds is not None else (B if config.task == "ar" else 1))
    out = {}
    for k in range(n):
        wd = os.path.join(workdir, f"ref_shallow_s{k}")
        logs.log.info("=== reference: %d-layer LM, seed %d, into %s", int(shallow_config(config, k).model.num_layers),
                      k, wd)
        out[wd] = train_timed(shallow_config(config, k), wd)
    return out


def reference_bits(config, workdir: str, options: dict) -> dict:
    """ref_shallow_bits (seed 0) and ref_ensemble_bits (mixture of all seeds) on the comparison's held-out windows."""
    wds = sorted(d for d in os.listdir(workdir)
                 if d.startswith("ref_shallow_s") and os.path.isdir(os.path.join(workdir, d)))
    if not wds:
        return {}
    runs = [assemble.load_run(os.path.join(workdir, d), method="e2e") for d in wds]
    task = runs[0].task
    e = get_task(config).config.eval
    windows = task.heldout_windows(int(options.get("max_windows") or options.get("limit") or e.max_windows),
                                   options.get("split", "test"))
    bs = int(options.get("batch_size") or e.batch_size)
    single = task.ensemble_bits(runs[:1], windows, bs)["mixture_bits"]
    ens = task.ensemble_bits(runs, windows, bs)
    return {"ref_shallow_bits": single, "ref_shallow_layers": int(task.config.model.num_layers),
            "ref_ensemble_bits": ens["mixture_bits"], "ref_ensemble_product_bits": ens["product_bits"],
            "ref_ensemble_members": ens["members"]}


def summary(runs: dict, refs: dict) -> dict:
    """compare.json's 'lm' block: per method the likelihood keys and, per protocol, the generation keys."""
    out = {"ref_e2e_bits": runs["e2e"]["eval"].get("sampler_bits"), **refs}
    for method, r in runs.items():
        ev = r["eval"]
        m = {k: ev.get(k) for k in KEYS if k in ev}
        prot = ev.get("generation_protocols") or {}
        m["protocols"] = {p: {k: row.get(k) for k in GEN_KEYS if k in row} | {"sampler": row.get("sampler")}
                          for p, row in prot.items()}
        out[method] = m
    ref = (runs["e2e"]["eval"].get("generation") or {}).get("reference")
    if ref:
        out["reference_text"] = {k: ref.get(k) for k in GEN_KEYS if k in ref}
    return out


def markdown(lm: dict, B: int) -> list[str]:
    """Rows of the language-model table."""
    d, e = lm.get("dblocks", {}), lm.get("e2e", {})
    f = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["", "| language model (bits/char, held-out) | DiffusionBlocks | end-to-end |", "|---|---|---|"]
    for k in ("elbo_bits", "first_call_bits", "sampler_bits", "final_entropy_bits", "next_token_accuracy"):
        lines.append(f"| {k} | {f(d.get(k))} | {f(e.get(k))} |")
    for k in ("ref_shallow_bits", "ref_ensemble_bits", "ref_ensemble_product_bits"):
        if k in lm:
            lines.append(f"| {k} ({lm.get('ref_shallow_layers')} layers, {lm.get('ref_ensemble_members')} seeds) | "
                         f"{f(lm[k])} | |")
    for p in ("paper", "matched", "config"):
        for k in GEN_KEYS:
            dv, ev = d.get("protocols", {}).get(p, {}).get(k), e.get("protocols", {}).get(p, {}).get(k)
            if dv is not None or ev is not None:
                lines.append(f"| {p}: {k} | {f(dv)} | {f(ev)} |")
    return lines
