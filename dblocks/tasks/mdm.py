"""Masked-diffusion language modelling (MD4, paper §5.3 / App. D) as DiffusionBlocks: the noise level is the masking
time t, not sigma, and the target is the character sequence itself.

Training: t ~ U(unit's t range), stratified over the batch; every token masked with probability 1 - alpha(t); loss
w(t) * (CE summed over masked tokens) / L per sequence, weighted per sample (`edm.weighted_mean`). Block b trains on
its own t range of `mdm.t_partition` (block 0 = t near 1); the end-to-end baseline is the same network with all
layers over [t_min, 1]. Evaluation: bits per character from the ELBO, each t routed to the block that owns it.
Sampling: MD4's ancestral sampler from all-[MASK], each step run by the block that owns its t; `grid_points` (as
for the other tasks) counts the masking times at which a block is called, i.e. the block calls per sample. The EDM
fields of the config are not used by this task.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import mdm as mdm_lib
from dblocks import text as text_lib
from dblocks.models.mdm import MDMTransformer
from dblocks.models.options import model_options
from dblocks.tasks.base import Task, Unit, register


@register
class MDMTask(Task):
    name = "mdm"
    defaults = {"data": {"seq_len": 0}}   # characters per training window (required: 0 is refused)

    def __init__(self, config):
        super().__init__(config)
        self._sources: dict[str, object] = {}

    @property
    def vocab(self) -> text_lib.CharVocab:
        return text_lib.vocab_for(self.config.data.name)

    @property
    def mask_id(self) -> int:
        return self.vocab.size

    @property
    def schedule(self) -> str:
        return str(self.config.mdm.schedule)

    @property
    def t_min(self) -> float:
        return float(self.config.mdm.t_min)

    # -- config --------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        for section in ("model", "mdm", "eval", "sample"):
            if section not in c:
                p.append(f"config has no '{section}' section (see experiments/configs/tiny_mdm.py)")
        if p:
            return p
        m, d, s, e = c.model, c.data, c.sample, c.eval
        try:
            text_lib.vocab_for(str(d.name))
        except ValueError as err:
            p.append(f"data.name: {err}")
        if int(d.seq_len) < 2:
            p.append(f"data.seq_len={d.seq_len} must be >= 2")
        if m.hidden % m.heads or (m.hidden // m.heads) % 2:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads} into even head sizes "
                     f"(rotary positions)")
        if not 0 <= m.dropout < 1:
            p.append(f"model.dropout={m.dropout} must be in [0, 1)")
        if c.mdm.schedule not in mdm_lib.SCHEDULES:
            p.append(f"mdm.schedule={c.mdm.schedule!r}; choose one of {mdm_lib.SCHEDULES}")
        else:
            first = mdm_lib.equal_alpha_boundaries(max(int(c.blocks.num_blocks), 1), c.mdm.schedule)[1]
            if not 0 < c.mdm.t_min < first:
                p.append(f"mdm.t_min={c.mdm.t_min} must be in (0, {first:.4g}), below the first block boundary")
        if c.blocks.partition != "equiprobable":
            p.append(f"blocks.partition={c.blocks.partition!r}: masked diffusion partitions t into equal shares of "
                     f"alpha; use 'equiprobable'")
        if s.grid_points < int(c.blocks.num_blocks) + 1:
            p.append(f"sample.grid_points={s.grid_points} cannot visit all {c.blocks.num_blocks} blocks; use at "
                     f"least {int(c.blocks.num_blocks) + 1}")
        if s.num < 1 or s.temperature < 0:
            p.append(f"sample.num={s.num} must be >= 1 and sample.temperature={s.temperature} >= 0")
        if e.t_per_sequence < 1 or e.batch_size < 1 or e.max_sequences < 0:
            p.append(f"eval.t_per_sequence={e.t_per_sequence} and eval.batch_size={e.batch_size} must be >= 1, "
                     f"eval.max_sequences={e.max_sequences} >= 0 (0 = the whole split)")
        return p

    def data_signature_fields(self):
        return ("name", "seq_len")

    def signature(self) -> dict:
        return {**super().signature(), "mdm": self.config.mdm.to_dict()}

    # -- partition in t ------------------------------------------------------------------------------------------
    def partition(self):
        b = self.config.blocks
        return mdm_lib.t_partition(int(b.num_blocks), float(b.gamma), self.t_min, self.schedule)

    def full_range(self) -> tuple[float, float]:
        return (self.t_min, 1.0)

    # -- data ----------------------------------------------------------------------------------------------------
    def source(self, split: str):
        if split not in self._sources:
            d = self.config.data
            self._sources[split], _ = text_lib.load_text(d.name, split, int(d.seq_len), d.data_dir, d.path)
        return self._sources[split]

    def make_batch(self, examples, train):
        return {"tokens": np.asarray(examples["tokens"], np.int32)}

    def dummy_batch(self, n: int = 2) -> dict:
        return {"tokens": np.zeros((n, int(self.config.data.seq_len)), np.int32)}

    # -- model and loss ------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit) -> MDMTransformer:
        m = self.config.model
        return MDMTransformer(vocab_size=self.vocab.size, num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads,
                              mlp_ratio=m.mlp_ratio, dropout=m.dropout, **model_options(m))

    def init_params(self, model, rng, batch):
        tokens = jnp.asarray(batch["tokens"])
        return model.init({"params": rng}, tokens, jnp.full((tokens.shape[0],), 0.5))["params"]

    def draw(self, model, batch, rng, train_range, train=True):
        k_t, k_mask, k_drop = jax.random.split(rng, 3)
        tokens = batch["tokens"]
        t = mdm_lib.sample_t(k_t, tokens.shape[0], train_range[0], train_range[1])   # stratified over the batch
        x_t, masked = mdm_lib.forward_mask(k_mask, tokens, t, self.mask_id, self.schedule)
        return {"tokens": tokens, "t": t, "x_t": x_t, "masked": masked}, k_drop

    def loss_on(self, model, params, inputs, rng, train=True):
        tokens, t, masked = inputs["tokens"], inputs["t"], inputs["masked"]
        logits = model.apply({"params": params}, inputs["x_t"], t, train=train,
                             rngs={"dropout": rng} if train else None)
        ce_sum = mdm_lib.masked_ce(logits, tokens, masked)                     # [N] nats
        per_sample = ce_sum / tokens.shape[-1]
        loss = edm_lib.weighted_mean(per_sample, mdm_lib.loss_weight(t, self.schedule))
        n_masked = jnp.sum(masked)
        return loss, {"ce_masked": jnp.sum(ce_sum) / jnp.maximum(n_masked, 1), "mask_rate": jnp.mean(masked)}

    # -- after training: the ELBO in bits per character, and MD4's ancestral sampler ---------------------------------
    def logits_fn(self, run):
        """(b, x_t, t) -> logits of block b, one jitted apply per model shape (blocks of equal shape share it)."""
        def fn(b, x_t, t):
            model = run.models[b]
            return self.jit("logits", model, lambda: jax.jit(
                lambda p, x, tt: model.apply({"params": p}, x, tt)))(run.params[b], x_t, t)
        return fn

    def unmask_step(self, temperature: float):
        """The jitted unmasking step at one temperature (cached per temperature)."""
        return self.jit(f"unmask_step(temperature={temperature!r})", None, lambda: jax.jit(
            lambda k, x, lg, t, s: mdm_lib.unmask_step(k, x, lg, t, s, self.mask_id, self.schedule, temperature)))

    def generate(self, run, num: int, grid_points: int, seed: int = 0,
                 temperature: float = 1.0) -> mdm_lib.MaskedSample:
        """num sequences of data.seq_len characters from all-[MASK], in `grid_points` ancestral steps (block
        calls)."""
        return mdm_lib.sample(self.logits_fn(run), jax.random.PRNGKey(seed), num, int(self.config.data.seq_len),
                              grid_points, run.partition, self.mask_id, self.schedule, self.t_min, temperature,
                              step_fn=self.unmask_step(float(temperature)))

    def write_samples(self, run, out_path, grid_points=None, seed=0, num=None, temperature=None, **_) -> dict:
        """Writes generated text to out_path (an image suffix such as .png becomes .txt) and returns a summary."""
        s = self.config.sample
        grid_points, num = int(grid_points or s.grid_points), int(num or s.num)
        temperature = float(s.temperature if temperature is None else temperature)
        root, ext = os.path.splitext(out_path)
        out_path = root + ".txt" if ext.lower() in (".png", ".jpg", ".jpeg", "") else out_path
        t0 = time.perf_counter()
        res = self.generate(run, num, grid_points, seed, temperature)
        seconds = time.perf_counter() - t0
        texts = [self.vocab.decode(row) for row in res.tokens]
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for i, txt in enumerate(texts):
                f.write(f"=== sample {i} ({run.method}, {grid_points} steps, temperature {temperature}) ===\n"
                        f"{txt}\n\n")
        return {"path": out_path, "samples": num, "grid_points": grid_points, "temperature": temperature,
                "block_calls_per_sample": res.block_calls, "steps_per_block": np.bincount(
                    res.blocks, minlength=run.partition.num_blocks).tolist(), "seconds": round(seconds, 2)}

    def evaluate(self, run, split: str = "test", t_per_sequence=None, max_sequences=None, limit=None,
                 batch_size=None, seed=None, grid_points=None, num_samples=None, temperature=None, **_) -> dict:
        """Bits per character on `split` from the ELBO (headline, lower is better) with its standard error, and a
        few samples drawn by the blocks' ancestral sampler. max_sequences: that many test windows evenly spaced
        over the split (0 = all; default eval.max_sequences); limit: the first N windows instead. Options other
        tasks use (solver, repeats, ...) are ignored."""
        e, s = self.config.eval, self.config.sample
        k = int(t_per_sequence or e.t_per_sequence)
        seed = int(seed or 0)
        cap = int(e.max_sequences if max_sequences is None else max_sequences)
        tokens = self.source(split).get(np.arange(len(self.source(split))))["tokens"]
        if limit:
            tokens = tokens[: int(limit)]
        elif 0 < cap < len(tokens):   # an evenly spaced subset: the whole split is covered, not just its start
            tokens = tokens[np.linspace(0, len(tokens) - 1, cap).astype(np.int64)]
        t0 = time.perf_counter()
        est = mdm_lib.elbo_bpc(self.logits_fn(run), tokens, run.partition, self.mask_id, k,
                               int(batch_size or e.batch_size), seed, self.t_min, self.schedule)
        elbo_seconds = time.perf_counter() - t0
        grid_points, num = int(grid_points or s.grid_points), int(num_samples or s.num)
        temperature = float(s.temperature if temperature is None else temperature)
        t0 = time.perf_counter()
        res = self.generate(run, num, grid_points, seed, temperature)
        sample_seconds = time.perf_counter() - t0
        grid = [(j + 0.5) / k for j in range(k)]
        return {
            "headline": {"name": "bits per character", "value": est.bpc, "higher_is_better": False},
            "bpc": est.bpc, "bpc_stderr": est.stderr, "split": split, "num_sequences": est.num_sequences,
            "seq_len": int(tokens.shape[1]), "t_per_sequence": k, "t_samples": est.num_sequences * k,
            "estimator": (f"stratified Monte Carlo over t in (0,1]: {k} strata per sequence, one t and one mask per "
                          f"stratum, integrand w(t) sum_masked CE / L at max(t, t_min={self.t_min}); each t run by "
                          f"the block that owns it; stderr over sequences"),
            "bpc_per_block": est.per_block,
            "integrand_per_t": {"name": "ELBO integrand (bits/char), mean over each t stratum", "t": grid,
                                "values": est.per_stratum},
            "block_calls_per_sample": res.block_calls,
            "layer_evals_per_sample": int(sum(run.units[b].num_layers for b in res.blocks)),
            "sample_grid_points": grid_points, "sample_temperature": temperature,
            "samples": [self.vocab.decode(row) for row in res.tokens],
            "seconds": {"elbo": round(elbo_seconds, 2), "sampling": round(sample_seconds, 2)},
        }
