"""Autoregressive language modelling (paper §4.4, §5.5): a causal transformer as B DiffusionBlocks, against the same
transformer trained as an ordinary causal LM (the end-to-end baseline, method 'e2e').

DiffusionBlocks: the target of position i is its token's row of the fixed target space E; sigma is drawn per token
from the block's range; the block reads [clean tokens ; noisy targets] (dblocks.models.ar) and its loss is the
cross-entropy of the logits of each noisy row, weighted per token by lambda(sigma) (config.edm.loss_weighting).
With the prior head the network reads no z, and model.ar_layout='t' drops the noisy rows: the block is the causal LM
over the T clean rows with a sigma-conditioned head (half the rows; docs/language_models.md, "T-row layout").
The shared language-task pieces (data, E and the scale contract, the optional analytic likelihood term, the
partition, the loss, generation and evaluation) are in LMTask (dblocks.tasks.lm.task).
"""
from __future__ import annotations

import optax

from dblocks import losses
from dblocks.models import ar as ar_model
from dblocks.models.options import model_options
from dblocks.tasks.base import Unit, register
from dblocks.tasks.lm.task import LMTask

LAYOUTS = ("2t", "t")


@register
class ARTask(LMTask):
    name = "ar"
    defaults = {"model": {"ar_layout": "2t"}}   # rows of a block: [clean ; noisy] ('2t') or one sequence ('t')

    def validate(self) -> list[str]:
        p, m = super().validate(), self.config.model
        layout = str(m.ar_layout)
        if layout not in LAYOUTS:
            p.append(f"model.ar_layout={layout!r}; choose one of {LAYOUTS}")
        elif layout == "t" and self.config.method == "dblocks" and not self.prior_head:
            p.append("model.ar_layout='t' needs model.lm_head='prior': the T-row layout has no noisy rows, so its "
                     "network cannot read z (use '2t' with the posterior head)")
        return p

    @property
    def layout(self) -> str:
        """The denoiser's rows: '2t' ([clean ; noisy]) or 't' (the clean rows only; prior head)."""
        return str(self.config.model.ar_layout)

    def make_model(self, unit: Unit) -> ar_model.ARModel:
        m = self.config.model
        return ar_model.ARModel(vocab=self.vocab.size, num_layers=unit.num_layers, hidden=m.hidden, heads=m.heads,
                                mlp_ratio=m.mlp_ratio, diffusion=unit.is_block, sigma_min=self.edm.sigma_min,
                                prev_token=bool(m.prev_token), layout=self.layout, **model_options(m))

    def loss_on(self, model, params, inputs, rng, train=True):
        tokens = inputs["tokens"]
        if not model.diffusion:
            chunk = int(self.config.model.loss_chunk)
            if chunk:   # dblocks.losses: the [N, T, V] logits are never held whole
                h, head = model.apply({"params": params}, tokens, features=True), params["head"]["Dense_1"]
                ce = losses.chunked_cross_entropy(h[:, :-1], head["kernel"], head["bias"], tokens[:, 1:], chunk)
            else:
                logits = model.apply({"params": params}, tokens)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
            return ce.mean(), {"ce": ce.mean()}
        chunk = int(self.config.model.loss_chunk)
        prior_ce = None
        if chunk and self.prior_head:   # the prior head's CE needs no likelihood term: chunk it as the LM's
            def prior_ce(z, sigma):
                h = model.apply({"params": params}, tokens, *self.network_inputs(z, sigma), features=True)
                head = params["head"]["Dense_1"]
                return losses.chunked_cross_entropy(h, head["kernel"], head["bias"], tokens, chunk)
        return self.denoising_loss(lambda z, s, **kw: self.noisy_logits(model, params, tokens, z, s, **kw), inputs,
                                   prior_ce)

    def training_compute(self, method: str, grid_points: int | None = None, clean_blocks: int | None = None) -> dict:
        """Layer evaluations per training token of one optimizer step (forward; backward runs through the same
        layers). A block runs its L/B layers over 2 rows per token (clean and noisy) in the 2T layout, over 1 in the
        T layout; B blocks each train as many steps as the baseline, which runs L layers over 1 row per token. At
        inference the clean row goes through the `clean_blocks` blocks the grid calls (default all B;
        dblocks.sampling.blocks_called), and each block call runs one row through the block."""
        L, B = int(self.config.model.num_layers), int(self.config.blocks.num_blocks)
        if method == "e2e":
            return {"forward_layer_rows_per_token": L, "backward_layer_rows_per_token": L, "units": 1,
                    "inference_layer_rows_per_token": L}
        rows = 1 if self.layout == "t" else 2
        calls = int(grid_points or self.config.sample.grid_points or self.default_grid_points())
        return {"forward_layer_rows_per_token": rows * L // B, "backward_layer_rows_per_token": rows * L // B,
                "units": B, "inference_layer_rows_per_token": int(clean_blocks or B) * L // B + calls * L // B,
                "note": f"training: per block step (the B blocks together: {rows}L layer-rows per token per baseline "
                        f"step, layout {self.layout}); inference: the clean row through each block the grid calls + "
                        f"one row per block call"}
