"""What the autoregressive ('ar') and recurrent-depth ('recurrent') language tasks share on the training side: text
data, the fixed target space E, the scale contract, the noise partition (optionally by information), the denoiser
read-out with the optional analytic likelihood term, and the per-token denoising loss.

Scale contract for token targets (docs/language_models.md, "Scale contract"): row v of E is the clean target of
token v, of norm r (model.target_norm; 0 = sigma_data * sqrt(D)). With model.match_sigma_data the EDM input scaling
uses the rows' per-coordinate RMS, sigma_data = r / sqrt(D), so c_in = 1 / sqrt(sigma^2 + sigma_data^2) gives inputs
of unit variance per coordinate at every sigma; the training targets, the bridge rows and the likelihood term all
use the same E. `sigma_data` below is that one value.

Analytic likelihood (model.likelihood): the Bayes-optimal denoiser of a fixed E is
softmax(LM(context) + log N(z; E_v, sigma^2 I)), so the task adds (<z, E_v> - |E_v|^2 / 2) / sigma^2 (raw z, not
scaled by c_in) to the network's logits, and the network only has to learn the next-token LM.

Sampling, decoding and evaluation are methods of the same object, from its two parts LMInference
(dblocks.tasks.lm.inference) and LMEvaluation (dblocks.tasks.lm.evaluate).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dblocks import edm as edm_lib
from dblocks import information, ngram, partition as partition_lib, sampling, targets
from dblocks import text as text_lib
from dblocks import tokenized
from dblocks.data import DatasetMissingError
from dblocks.tasks.base import Task
from dblocks.tasks.lm.evaluate import LMEvaluation
from dblocks.tasks.lm.inference import LMInference
from dblocks.tasks.lm.sampler import parse_grid

Array = jax.Array


def likelihood_logits(z: Array, sigma: Array, E: Array) -> Array:
    """log N(z; E_v, sigma^2 I) up to a v-independent constant: (<z, E_v> - |E_v|^2 / 2) / sigma^2.
    z [..., D] (raw, not c_in-scaled), sigma [...] -> [..., V]."""
    half_sq = 0.5 * jnp.sum(E * E, axis=-1)
    return (z @ E.T - half_sq) / (sigma[..., None] ** 2)


class LMTask(LMInference, LMEvaluation, Task):
    """Base of the language tasks; subclasses add make_model, loss_on and training_compute."""
    defaults = {
        "data": {"tokenizer": ""},          # a SentencePiece model for tfds:/text:/jsonl:/hf: text ('' = characters)
        "model": {"target_dim": 0,          # width of the token embedding E (0 = model.hidden)
                  "target_norm": 0.0,       # norm of each token's row of E (0 = the scale contract's)
                  "target_seed": 0,         # seed of E's rows
                  "match_sigma_data": False,   # sigma_data taken from E's rows (the scale contract)
                  "likelihood": False,      # the analytic likelihood term <z, E>/sigma^2 in the logits
                  "prev_token": False,      # the noisy row also reads the previous token
                  "lm_head": "posterior",   # 'posterior' (reads z) or 'prior' (next-token prior + likelihood)
                  "loss_chunk": 0},         # rows per chunk of the chunked cross-entropy (0 = whole logits)
        "blocks": {"sigma_floor": 0.0},     # lowest sigma any block trains on (0 = sigma_min)
        "sample": {"grid": "",              # noise levels of the chain, e.g. '80,0.45,0.2' ('' = CDF grid)
                   "grid_points": 0,        # points of the CDF grid (0 = one per block)
                   "sigma_end": 0.0,        # where the chain stops (0 = sigma_min)
                   "solver": "euler", "bridge": "softmax",   # ODE solver; logits -> target space bridge
                   "temperature": 1.0, "top_p": 1.0, "greedy": False},   # how the token is drawn
        "eval": {"elbo_sigmas": 32},        # noise levels of the ELBO's quadrature
    }

    def __init__(self, config):
        super().__init__(config)
        self._partition: partition_lib.Partition | None = None   # built on first use (may read the train split)
        self._unigram: np.ndarray | None = None                  # train-split token frequencies, on first use
        self.ngram_judges: dict[int, ngram.NGram] = {}           # n-gram judges of the train split, by order

    # -- config ----------------------------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        c, p = self.config, []
        m, d, s = c.model, c.data, c.sample
        try:
            text_lib.vocab_for(d.name)
        except ValueError as e:
            p.append(f"data.name: {e}")
        if d.tokenizer:
            if not str(d.name).startswith(("tfds:",) + text_lib.USER_TEXT_PREFIXES):
                p.append("data.tokenizer (a SentencePiece model) is used with tfds:, text:, jsonl: or hf: text data, "
                         f"not data.name={d.name!r}")
            else:
                try:
                    self.vocab  # noqa: B018 - loading the vocabulary is the check
                except DatasetMissingError as e:
                    p.append(f"data.tokenizer: {e}")
        if d.seq_len < 2:
            p.append(f"data.seq_len={d.seq_len} must be >= 2")
        if m.hidden % m.heads or (m.hidden // m.heads) % 2:
            p.append(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads} with an even head size")
        if m.target_dim < 0 or m.target_norm < 0:
            p.append(f"model.target_dim={m.target_dim} and model.target_norm={m.target_norm} must be "
                     f">= 0 (0 = hidden, and the sigma_data * sqrt(dim) scale contract)")
        if s.solver not in sampling.ALL_SOLVERS:
            p.append(f"sample.solver={s.solver!r}; choose one of {sampling.ALL_SOLVERS}")
        gp = int(s.grid_points or 0)
        if gp and gp < max(2, self.min_grid_points()):
            p.append(f"sample.grid_points={gp} cannot visit all {self.min_grid_points()} blocks (0 = one per block)")
        try:
            parse_grid(s.grid)
        except ValueError as e:
            p.append(f"sample.grid: {e}")
        if s.bridge not in targets.BRIDGES:
            p.append(f"sample.bridge={s.bridge!r}; choose one of {targets.BRIDGES}")
        if not s.temperature > 0 or not 0 < s.top_p <= 1:
            p.append(f"sample.temperature={s.temperature} must be > 0 and sample.top_p={s.top_p} in (0, 1]")
        if c.eval.num_draws < 1:
            p.append(f"eval.num_draws={c.eval.num_draws} must be >= 1")
        head = str(m.lm_head)
        if head not in ("posterior", "prior"):
            p.append(f"model.lm_head={head!r}; choose 'posterior' or 'prior'")
        elif head == "prior" and not m.likelihood:
            p.append("model.lm_head='prior' needs model.likelihood=True (the posterior is the prior plus the "
                     "analytic likelihood term)")
        chunk = int(m.loss_chunk or 0)
        if chunk < 0:
            p.append(f"model.loss_chunk={chunk} must be >= 0 (0 = the whole logits at once)")
        elif chunk and c.method == "dblocks" and head != "prior":
            p.append(f"model.loss_chunk={chunk} needs model.lm_head='prior' for DiffusionBlocks: the posterior head's "
                     f"loss adds the likelihood term to the whole [N, T, V] logits (or set loss_chunk=0)")
        if float(c.blocks.sigma_floor or 0.0) < 0:
            p.append(f"blocks.sigma_floor={c.blocks.sigma_floor} must be >= 0 (0 = none)")
        return p

    def min_grid_points(self) -> int:
        return int(self.config.blocks.num_blocks)

    def default_grid_points(self) -> int:
        return max(2, int(self.config.blocks.num_blocks))

    def data_signature_fields(self):
        return ("name", "seq_len", "tokenizer")

    # -- data --------------------------------------------------------------------------------------------------------
    @functools.cached_property
    def vocab(self):
        """Characters (CharVocab) or a SentencePiece model: .size, .encode(str), .decode(ids)."""
        d = self.config.data
        return tokenized.load_tokenizer(d.tokenizer) if d.tokenizer else text_lib.vocab_for(d.name)

    def set_vocab(self, vocab) -> None:
        """Replaces the vocabulary (anything with .size: a stand-in for compile-only measurements when the tokenizer
        file is not on this machine, dblocks.memory); what is built from it (E, the unigram, the partition) follows."""
        self.__dict__["vocab"] = vocab
        self.__dict__.pop("target_rows", None)
        self._unigram, self._partition = None, None

    def source(self, split: str):
        d = self.config.data
        if d.tokenizer and d.name.startswith("tfds:"):
            return tokenized.packed_source(d.name[5:], split, int(d.seq_len), self.vocab, d.data_dir)
        if d.tokenizer:
            return tokenized.user_source(d.name, split, int(d.seq_len), self.vocab)
        return text_lib.load_text(d.name, split, int(d.seq_len), d.data_dir, d.path)[0]

    def make_batch(self, examples, train):
        return {"tokens": np.asarray(examples["tokens"], np.int32)}

    def init_params(self, model, rng, batch):
        """The plain LM reads tokens; a denoiser also reads noisy targets [N, T, D] and per-token c_noise."""
        tokens = jnp.asarray(batch["tokens"])
        if not model.diffusion:
            return model.init(rng, tokens)["params"]
        N, T = tokens.shape
        return model.init(rng, tokens, jnp.zeros((N, T, self.target_dim)), jnp.zeros((N, T)))["params"]

    def dummy_batch(self, n: int = 2) -> dict:
        return {"tokens": np.zeros((n, int(self.config.data.seq_len)), np.int32)}

    # -- the target space and the scale contract -------------------------------------------------------------------
    @property
    def target_dim(self) -> int:
        m = self.config.model
        return int(m.target_dim or m.hidden)

    @property
    def target_norm(self) -> float:
        """Row norm r of E: model.target_norm, or the contract sigma_data * sqrt(D) when it is 0."""
        r = float(self.config.model.target_norm or 0.0)
        return r if r > 0 else self.edm.sigma_data * float(np.sqrt(self.target_dim))

    @property
    def sigma_data(self) -> float:
        """The sigma_data of the input scaling: the rows' per-coordinate RMS r / sqrt(D) with model.match_sigma_data
        (the scale contract), else edm.sigma_data (how runs before the option were trained)."""
        if self.config.model.match_sigma_data:
            return self.target_norm / float(np.sqrt(self.target_dim))
        return self.edm.sigma_data

    @functools.cached_property
    def target_rows(self) -> np.ndarray:
        """E as numpy [V, D], computed once (a jnp constant cached during a trace would leak a tracer)."""
        m = self.config.model
        return targets.fixed_embedding(self.vocab.size, self.target_dim, self.edm.sigma_data, int(m.target_seed),
                                       float(m.target_norm or 0.0))

    @property
    def E(self) -> Array:
        """The fixed target space [V, D]: row v is the clean target of token v (not learned, docs/design.md item 4)."""
        return jnp.asarray(self.target_rows)

    @property
    def likelihood(self) -> bool:
        return bool(self.config.model.likelihood)

    # -- the noise partition ------------------------------------------------------------------------------------------
    def unigram(self) -> np.ndarray:
        """Train-split token frequencies [V] (add-one smoothed), for the information partition."""
        if self._unigram is None:
            src = self.source("train")
            toks = np.asarray(src.get(np.arange(len(src)))["tokens"]).reshape(-1)
            counts = np.bincount(toks, minlength=self.vocab.size).astype(np.float64) + 1.0
            self._unigram = counts / counts.sum()
        return self._unigram

    def partition(self) -> partition_lib.Partition:
        """The config's partition; 'information' places the boundaries where z removes equal shares of the token's
        uncertainty (dblocks.information, from E and the train unigram only); blocks.sigma_floor raises each block's
        lowest training sigma (inference ownership is unchanged)."""
        b = self.config.blocks
        kind, B = str(b.partition), int(b.num_blocks)
        if self._partition is not None:
            return self._partition
        bounds = None
        if kind == "information":
            bounds = information.information_boundaries(np.asarray(self.E), self.unigram(), B, self.edm.sigma_min,
                                                         self.edm.sigma_max)
        extra = {"boundaries": bounds} if bounds is not None else {}
        part = partition_lib.make_partition(B, self.edm, float(b.gamma), kind, **extra)
        floor = float(b.sigma_floor or 0.0)
        if floor > 0:
            part = information.with_sigma_floor(part, floor)
        self._partition = part
        return part

    # -- the denoiser read-out and the loss -------------------------------------------------------------------------
    @property
    def prior_head(self) -> bool:
        """model.lm_head == 'prior': the network reads no z and its logits are the next-token prior (see
        denoising_loss); the denoiser's posterior is formed analytically with the likelihood term."""
        return str(self.config.model.lm_head) == "prior"

    def network_inputs(self, z: Array, sigma: Array) -> tuple[Array, Array]:
        """What the network reads for raw noisy targets z [..., D] at sigma [...]: (c_in z, c_noise). With the prior
        head it is given zeros in place of c_in z, so its logits do not depend on z."""
        pc = edm_lib.precondition(sigma, self.sigma_data)
        zin = pc.c_in[..., None] * z
        return (jnp.zeros_like(zin) if self.prior_head else zin), pc.c_noise

    def precondition_logits(self, apply, z: Array, sigma: Array, prior_only: bool = False) -> Array:
        """The block's logits for raw noisy targets z [..., D] at sigma [...]: `apply(*network_inputs(z, sigma))`,
        plus the analytic likelihood term when model.likelihood is set (not with prior_only)."""
        logits = apply(*self.network_inputs(z, sigma))
        if self.likelihood and not prior_only:
            logits = logits + likelihood_logits(z, sigma, self.E)
        return logits

    def noisy_logits(self, model, params, tokens, z, sigma, prior_only: bool = False):
        """Teacher-forced denoiser read-out: clean tokens [N, T], noisy targets z [N, T, D], sigma [N, T] ->
        logits [N, T, V]."""
        return self.precondition_logits(lambda zz, cn: model.apply({"params": params}, tokens, zz, cn), z, sigma,
                                        prior_only)

    def noisy_targets(self, tokens: Array, rng: Array, train_range: Array) -> dict:
        """A denoiser's draws for tokens [N, T]: sigma per token [N, T] from the unit's range and the noisy targets
        z = E[tokens] + sigma * eps [N, T, D]."""
        k_sigma, k_eps = jax.random.split(rng)
        sigma = edm_lib.sample_sigma(k_sigma, tokens.shape, train_range[0], train_range[1], self.edm.p_mean,
                                     self.edm.p_std)                                   # [N, T]
        y = self.E[tokens]                                                             # [N, T, D]
        z = y + sigma[..., None] * jax.random.normal(k_eps, y.shape)
        return {"tokens": tokens, "sigma": sigma, "z": z}

    def draw(self, model, batch, rng, train_range, train=True):
        """A denoiser's noisy targets (`noisy_targets`); the plain LM draws nothing."""
        if not model.diffusion:
            return {"tokens": batch["tokens"]}, rng
        return self.noisy_targets(batch["tokens"], rng, train_range), rng

    def denoising_loss(self, logits_fn, inputs: dict, prior_ce_fn=None):
        """CE of every noisy row against its token, weighted per token by lambda(sigma); inputs from
        `noisy_targets` (sigma per token).

        With the prior head (model.lm_head='prior') the CE is that of the network's own logits, the prior
        p(v | context), instead of the posterior's. For a network that does not read z both losses have the same
        minimiser (the posterior softmax(prior + likelihood) is exact for the true prior, and the posterior's CE is
        H(v | z) plus a KL that vanishes there), but the posterior's CE gives the prior almost no gradient wherever
        z already reveals the token, which is most of a low-noise block's range (docs/language_models.md).
        prior_ce_fn(z, sigma) -> [N, T], if given, computes that CE itself (the AR task's chunked cross-entropy)."""
        tokens, sigma, z = inputs["tokens"], inputs["sigma"], inputs["z"]
        if self.prior_head and prior_ce_fn is not None:
            ce = prior_ce_fn(z, sigma)                                                 # [N, T]
        else:
            logits = logits_fn(z, sigma, prior_only=True) if self.prior_head else logits_fn(z, sigma)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)      # [N, T]
        w = edm_lib.loss_weight(sigma, self.sigma_data, self.config.edm.loss_weighting, self.config.edm.max_weight)
        return edm_lib.weighted_mean(ce.reshape(-1), w.reshape(-1)), {"ce": ce.mean()}
