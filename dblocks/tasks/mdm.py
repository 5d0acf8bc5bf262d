"""Masked-diffusion language modelling (MD4, paper §5.3 / App. D) as DiffusionBlocks: the noise level is the masking
time t, not sigma, and the target is the character sequence itself.

Training: t ~ U(unit's t range), stratified over the batch; every token masked with probability 1 - alpha(t); loss
w(t) * (CE summed over masked tokens) / L per sequence, weighted per sample (`edm.weighted_mean`). Block b trains on
its own t range of `mdm.t_partition` (block 0 = t near 1); the end-to-end baseline is the same network with all
layers over [t_min, 1]. Evaluation: bits per character from the ELBO, each t routed to the block that owns it.
Sampling: MD4's ancestral sampler, each step run by the block that owns its t. The EDM fields of the config are
not used by this task.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dblocks import edm as edm_lib
from dblocks import mdm as mdm_lib
from dblocks import text as text_lib
from dblocks.models.mdm import MDMTransformer
from dblocks.models.options import model_options
from dblocks.tasks import mdm_eval
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
        if s.steps < int(c.blocks.num_blocks) + 1:
            p.append(f"sample.steps={s.steps} cannot visit all {c.blocks.num_blocks} blocks; use at least "
                     f"{int(c.blocks.num_blocks) + 1}")
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

    # -- after training (dblocks.tasks.mdm_eval) -------------------------------------------------------------------
    def generate(self, run, num: int, steps: int, seed: int = 0, temperature: float = 1.0) -> mdm_lib.MaskedSample:
        return mdm_eval.generate(self, run, num, steps, seed, temperature)

    def write_samples(self, run, out_path, **options) -> dict:
        return mdm_eval.write_samples(self, run, out_path, **options)

    def evaluate(self, run, **options) -> dict:
        return mdm_eval.evaluate(self, run, **options)
