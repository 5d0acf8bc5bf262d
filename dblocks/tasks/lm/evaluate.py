"""Evaluation of the language tasks (DiffusionBlocks, plain LM, recurrent-depth), a part of LMTask
(dblocks.tasks.lm.task): `LMEvaluation` is a mixin whose methods use the task's read-outs (dblocks.tasks.lm.inference).

Likelihood, on windows of the held-out split, scoring positions 1..T-1 of each window (every model sees the same
in-window context):
- `sampler_bits`: bits per token of the distribution the sampler draws from (temperature 1, no top-p). For a model
  whose read-out depends on noise (the DiffusionBlocks chain, the recurrent baseline's random s_0) it is the final
  softmax averaged over `sampler_draws` draws: a finite-draw estimate that can only overstate the bits.
- `first_call_bits`: the first block call's read-out alone (block 0 at sigma_max: a plain next-token LM).
- `final_entropy_bits`: mean entropy of one draw's final softmax (what temperature and top-p act on).
- `elbo_bits` (DiffusionBlocks): the continuous-time ELBO of dblocks.lm_elbo, each sigma routed to its block, with
  the prior and decoder terms; `elbo_per_block_bits` splits its diffusion term by block.
Generation, prompts from the held-out split, for each sampling protocol: distinct-n, repetition, character entropy,
gen-PPL under the e2e judge (a run passed in by the caller: experiments.evaluate / compare load it) and under an
interpolated n-gram fitted on the train split (dblocks.ngram), and MAUVE (dblocks.text_metrics.mauve_score) against
the true continuations on features of the e2e judge. The true continuations get the same numbers, as reference.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import lm_elbo, logs, ngram, sampling, text_metrics
from dblocks.tasks.lm.sampler import Sampler

LN2 = float(np.log(2.0))


class LMEvaluation:
    """Likelihood, ELBO and generation scores of a language task's run (a mixin of LMTask; its n-gram judges are
    kept in `self.ngram_judges`, initialised by LMTask)."""

    def score_windows(self, run, windows: np.ndarray, num_draws: int, batch_size: int, seed: int,
                      sampler: Sampler) -> dict:
        """Bits per token, accuracy and per-call bits of the sampler's read-out over windows [n, T] (batched)."""
        logp, correct, per_step, ent, mix_ent = [], [], [], [], []
        key = jax.random.PRNGKey(seed)
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size]
            r = self.window_logprobs(run, w, jax.random.fold_in(key, i), num_draws, sampler)
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
            out["per_step_bits"] = [text_metrics.bits_per_token(s) for s in np.concatenate(per_step, axis=1)]
        return out

    def elbo(self, run, windows: np.ndarray, num_sigmas: int, batch_size: int, seed: int) -> dict:
        """The DiffusionBlocks ELBO in bits per token over positions 1..T-1 of the windows (dblocks.lm_elbo)."""
        fns = [self.block_fns(m, "softmax") for m in run.models]
        E, no_key = self.E, jax.random.PRNGKey(0)     # the softmax bridge draws nothing
        totals, blocks, prior, dec = [], [], [], []
        for i in range(0, len(windows), batch_size):
            w = jnp.asarray(windows[i:i + batch_size])
            r = lm_elbo.elbo_nats(lambda b, z, s: fns[b]["forward"](run.params[b], w, z, s, no_key)[0], E[w], E,
                                  run.partition, self.edm.sigma_min, self.edm.sigma_max,
                                  jax.random.fold_in(jax.random.PRNGKey(seed), i), num_sigmas)
            totals.append(r["total"][:, 1:])
            blocks.append(r["diffusion_per_block"][:, :, 1:].reshape(run.num_blocks, -1))
            prior.append(r["prior"][:, 1:])
            dec.append(r["decoder"][:, 1:])
        per_block = np.concatenate(blocks, axis=1).mean(1) / LN2
        return {"elbo_bits": float(np.concatenate(totals).mean() / LN2),
                "elbo_per_block_bits": [float(v) for v in per_block],
                "elbo_prior_bits": float(np.concatenate(prior).mean() / LN2),
                "elbo_decoder_bits": float(np.concatenate(dec).mean() / LN2),
                "elbo_estimator": {"num_sigmas": len(lm_elbo.strata(run.partition, num_sigmas)),
                                   "description": lm_elbo.ESTIMATOR, "unbiased": True}}

    def sequence_logprobs(self, run, seqs: np.ndarray, start: int, num_draws: int, seed: int = 0) -> np.ndarray:
        """log p of seqs[:, start:] under a model, each token scored with at least half a window of context
        (sliding windows of the trained length T, stride T/2): [N, L - start]."""
        N, L = seqs.shape
        T = int(self.config.data.seq_len)
        h = T // 2
        out = np.full((N, L), np.nan)
        s = 0
        sampler = self.sampler_options(run)
        while True:
            w = seqs[:, s:s + T]
            w = np.pad(w, ((0, 0), (0, T - w.shape[1])))   # right padding cannot change a causal model's scores
            key = jax.random.fold_in(jax.random.PRNGKey(seed), s)
            lp = self.window_logprobs(run, w, key, num_draws, sampler)["logp"]
            for j in range(1, T):
                idx = s + j
                if idx < L and (s == 0 or j >= h) and np.isnan(out[0, idx]):
                    out[:, idx] = lp[:, j - 1]
            if s + T >= L:
                break
            s += h
        return out[:, start:]

    def lm_features(self, run, seqs: np.ndarray) -> np.ndarray:
        """MAUVE features of sequences under a plain LM run (the e2e judge): its log-probabilities at the last position
        and their mean over the last window's positions, [N, 2V]."""
        T = int(self.config.data.seq_len)
        w = jnp.asarray(seqs[:, -T:])
        lp = jax.nn.log_softmax(self.lm_fns(run.models[0])["lm"](run.params[0], w), -1)
        return np.concatenate([np.asarray(lp[:, -1]), np.asarray(lp.mean(1))], axis=1)

    def ngram_judge(self, order: int = 6) -> ngram.NGram:
        """The interpolated n-gram of the train split (fitted once per task object)."""
        if order not in self.ngram_judges:
            self.ngram_judges[order] = ngram.NGram(self.heldout_stream("train"), self.vocab.size, order)
        return self.ngram_judges[order]

    def text_scores(self, prompts: np.ndarray, toks: np.ndarray, judge, ng: ngram.NGram, num_draws: int,
                    seed: int) -> dict:
        """Diversity and judge scores of continuations toks [N, G] of prompts [N, P]."""
        P = prompts.shape[1]
        texts = [self.vocab.decode(t) for t in toks]
        seqs = np.concatenate([prompts, toks], 1)
        out = {**text_metrics.text_summary(texts), "char_entropy_bits": text_metrics.char_entropy_bits(texts),
               "gen_ppl_ngram": text_metrics.perplexity(ng.logprobs(seqs, P))}
        if judge is not None:
            jd = num_draws if judge.task.noisy_readout(judge) else 1
            out["gen_ppl_e2e"] = text_metrics.perplexity(judge.task.sequence_logprobs(judge, seqs, P, jd, seed))
        return out

    def protocols(self, run, temperatures=(0.7, 0.8, 0.9, 1.0)) -> dict[str, dict]:
        """Named sampler settings: 'config' (sample.*), 'paper' (DiffusionBlocks greedy on the default B-point grid
        ending at sigma_min, as the paper's '4 diffusion steps and greedy sampling'; the baseline top-p 0.95 at T = 1),
        and 'T=<t>' temperature rows (top-p 1) for the matched-diversity comparison."""
        out = {"config": {}}
        if run.method == "dblocks":
            out["paper"] = {"grid": "", "grid_points": self.default_grid_points(), "sigma_end": 0.0, "greedy": True}
        else:
            out["paper"] = {"temperature": 1.0, "top_p": 0.95, "greedy": False}
        for t in temperatures:
            out[f"T={t:g}"] = {"temperature": float(t), "top_p": 1.0, "greedy": False}
        return out

    def evaluate(self, run, num_draws=None, max_windows=None, batch_size=None, num_samples=None, max_tokens=None,
                 prompt_len=None, seed=None, judge=None, limit=None, split="test", elbo_sigmas=None, mauve=True,
                 temperatures=(0.7, 0.8, 0.9, 1.0), generation=True, ngram_order=6, **sampler_overrides) -> dict:
        """The task contract's evaluate (dblocks.tasks.base.Task.evaluate) for language models. `judge`: a plain LM
        run (method e2e) that scores generated text, never the evaluated run itself (none when not given); `limit` is an
        alias of max_windows; split 'validation' scores the validation works (for choosing settings); sampler overrides
        (grid, grid_points, sigma_end, solver, bridge, temperature, top_p, greedy) as LMInference.sampler_options."""
        e = self.config.eval
        seed = int(seed or 0)
        sampler = self.sampler_options(run, **sampler_overrides)
        draws = int(num_draws or e.num_draws) if self.noisy_readout(run) else 1
        name = "bits_per_token" if self.config.data.tokenizer else "bits_per_char"
        windows = self.heldout_windows(int(max_windows or limit or e.max_windows), split)
        bs = int(batch_size or e.batch_size)
        sc = self.score_windows(run, windows, draws, bs, seed, sampler)
        called = len(sampling.blocks_called(sampler.grid, run.partition, sampler.solver)) if sampler.grid else None
        compute = self.training_compute(run.method, len(sampler.grid) or None, called)
        out = {"headline": {"name": name, "value": sc["bits"], "higher_is_better": False},
               name: sc["bits"], "sampler_bits": sc["bits"], "sampler_draws": draws,
               "next_token_accuracy": sc["accuracy"], "num_draws": draws, "positions_scored": sc["positions"],
               "method": run.method, "split": split, "final_entropy_bits": sc["entropy"],
               "final_softmax_entropy_bits": sc["entropy"], "mixture_entropy_bits": sc["mixture_entropy"],
               "bridge": sampler.bridge, "sampler": sampler.to_dict(), "grid_points": len(sampler.grid) or None,
               "block_calls_per_token": sampler.calls_per_token,
               "layer_evals_per_sample": compute["inference_layer_rows_per_token"], "training_compute": compute}
        if "per_step_bits" in sc:
            out["per_step"] = {"name": f"{name} of the read-out after each block call", "values": sc["per_step_bits"]}
            out["first_call_bits"] = sc["per_step_bits"][0]
        if run.method == "dblocks":
            out.update(self.elbo(run, windows, int(elbo_sigmas or e.elbo_sigmas), bs, seed))
        if not generation:
            return out

        dirs = [getattr(r, "workdir", None) for r in (run, judge)]
        same_dir = all(d and os.path.isdir(d) for d in dirs) and os.path.samefile(*dirs)
        if judge is run or same_dir:
            judge = None   # a run never judges its own samples: its perplexity of them favours it
        if judge is None:
            logs.log.info("no judge LM for the generated text (pass e2e_workdir=<a plain LM's workdir>, neither "
                          "contestant): gen_ppl_e2e and MAUVE are skipped; the n-gram judge scores it")
        n, G, P = int(num_samples or e.num_samples), int(max_tokens or e.max_tokens), int(prompt_len or e.prompt_len)
        prompts, refs = self.heldout_prompts(n, P, G, split)
        ng = self.ngram_judge(int(ngram_order))
        feats = (lambda toks: judge.task.lm_features(judge, np.concatenate([prompts, toks], 1))) \
            if judge is not None and judge.task.name == "ar" else None
        ref_scores = self.text_scores(prompts, refs, judge, ng, int(num_draws or e.num_draws), seed)
        ref_feats = feats(refs) if feats else None
        rows = {}
        for pname, opts in self.protocols(run, temperatures).items():
            smp = sampler if pname == "config" else self.sampler_options(run, **{**sampler_overrides, **opts})
            gen, _ = self.generate(run, prompts, G, seed, smp)
            row = {"sampler": smp.to_dict(),
                   **self.text_scores(prompts, gen, judge, ng, int(num_draws or e.num_draws), seed)}
            if mauve and feats is not None:
                try:
                    row["mauve"] = text_metrics.mauve_score(ref_feats, feats(gen))
                except ImportError:
                    row["mauve"] = None   # mauve-text not installed
            row["examples"] = [self.vocab.decode(prompts[i]) + "[[" + self.vocab.decode(gen[i]) + "]]"
                               for i in range(min(3, n))]
            rows[pname] = row
        temps = [k for k in rows if k.startswith("T=")]
        if temps:   # matched diversity: the temperature whose samples' character entropy is nearest the reference's
            best = min(temps, key=lambda k: abs(rows[k]["char_entropy_bits"] - ref_scores["char_entropy_bits"]))
            rows["matched"] = {**rows[best], "matched_from": best}
        cfg = rows["config"]
        out["generation"] = {"samples": n, "prompt_tokens": P, "new_tokens": G, "reference": ref_scores,
                             "judge": getattr(judge, "workdir", None), "ngram_order": ng.order,
                             **{k: v for k, v in cfg.items() if k != "examples"}, "examples": cfg["examples"]}
        if "gen_ppl_e2e" in cfg:   # the key the comparison table reads
            out["generation"]["gen_ppl"] = cfg["gen_ppl_e2e"]
        out["generation_protocols"] = rows
        return out

    def ensemble_bits(self, runs: list, windows: np.ndarray, batch_size: int) -> dict:
        """Bits per token of the mixture (average of probabilities) and of the product (normalised average of
        log-probabilities) of plain LM runs, on windows [n, T]."""
        mix, prod = [], []
        for i in range(0, len(windows), batch_size):
            w = jnp.asarray(windows[i:i + batch_size])
            lps = jnp.stack([jax.nn.log_softmax(self.lm_fns(r.models[0])["lm"](r.params[0], w)[:, :-1], -1)
                             for r in runs])
            true = w[:, 1:, None]
            mix_lp = jax.scipy.special.logsumexp(lps, 0) - np.log(len(runs))
            prod_lp = jax.nn.log_softmax(lps.mean(0), -1)
            mix.append(np.asarray(jnp.take_along_axis(mix_lp, true, -1)[..., 0]))
            prod.append(np.asarray(jnp.take_along_axis(prod_lp, true, -1)[..., 0]))
        return {"mixture_bits": text_metrics.bits_per_token(np.concatenate(mix)),
                "product_bits": text_metrics.bits_per_token(np.concatenate(prod)), "members": len(runs)}

