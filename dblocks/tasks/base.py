"""The contract between a task (images, classification, text) and the block-training engine.

The engine knows nothing about images or text. A task supplies: its data, its noise partition, a model for a
given number of layers, the loss of one training step and, for sampling and evaluation, a denoiser/read-out.
A *unit* is what one optimizer trains: block b of a DiffusionBlocks run, or the whole network for the end-to-end
baseline (`method='e2e'`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dblocks import order
from dblocks import edm as edm_lib
from dblocks import partition as partition_lib
from dblocks.models import options as options_lib

Array = jax.Array
METHODS = ("dblocks", "e2e")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently trained piece: a block (index b) or the end-to-end network (index 0, name 'e2e')."""
    name: str                     # 'block_00', ..., or 'e2e'; also the checkpoint directory name
    index: int                    # block index b (0 = highest noise); 0 for e2e
    num_layers: int
    train_range: tuple[float, float]   # noise levels (sigma or t) it is trained on

    @property
    def is_block(self) -> bool:
        return self.name != "e2e"

    def subdir(self) -> str:
        return f"blocks/{self.name}" if self.is_block else "e2e"


def block_layers(config) -> list[int]:
    """Layers per block: config.blocks.layers (e.g. '2,4,6' for the Table 7 ablation) or an even split."""
    L, B = int(config.model.num_layers), int(config.blocks.num_blocks)
    spec = str(config.blocks.layers or "")
    if spec:
        return [int(v) for v in spec.split(",")]
    return [L // B] * B


def with_defaults(config: ml_collections.ConfigDict, defaults: dict[str, dict]) -> ml_collections.ConfigDict:
    """A copy of `config` with every field of `defaults` ({section: {field: value}}) that it does not set."""
    out = config.copy_and_resolve_references()
    out.unlock()
    for section, fields in defaults.items():
        if section not in out:
            out[section] = ml_collections.ConfigDict()
        for k, v in fields.items():
            if k not in out[section]:
                out[section][k] = v
    return out


class Task:
    """Base class of tasks. Subclasses set `name` and implement the methods that raise NotImplementedError.

    A task is one object for all its work: the training side (config checks, data, model, loss) and, after
    training, its sampler (`generate`), sample files (`write_samples`) and evaluation (`evaluate`) of an assembled
    run. Each task keeps these in its own class (the language tasks' in dblocks/tasks/lm/); the commands call only
    the methods declared here."""
    name = ""
    # The fields this task reads that a config file may leave out, with their defaults ({section: {field: value}}).
    # A subclass declares only its own; `all_defaults` merges them along the class hierarchy.
    defaults: dict[str, dict] = {"model": dict(options_lib.DEFAULTS)}   # how the model computes

    def __init__(self, config):
        self.declared = config                                           # as written: what the signature hashes
        self.config = with_defaults(config, self.all_defaults())         # what the task reads: every field set
        self.edm = edm_lib.EDM.from_config(config.edm)
        self._jitted: dict[tuple, Callable] = {}

    def jit(self, name: str, model: nn.Module | None, build: Callable[[], Callable]) -> Callable:
        """A jitted function of a model, cached: `build()` (which returns the jitted function) runs once per
        (name, model class, model config), so blocks of the same shape share one compiled function. With model
        None the function depends on `name` alone (put any static setting into the name)."""
        key = (name, type(model).__name__, repr(model))
        if key not in self._jitted:
            self._jitted[key] = build()
        return self._jitted[key]

    # -- validation and identity ------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Task-specific config problems (empty when fine). Called before anything is compiled."""
        return []

    @classmethod
    def all_defaults(cls) -> dict[str, dict]:
        """The `defaults` of this class and of every base class (a subclass's value wins)."""
        out: dict[str, dict] = {}
        for klass in reversed(cls.__mro__):
            for section, fields in vars(klass).get("defaults", {}).items():
                out.setdefault(section, {}).update(fields)
        return out

    def signature(self) -> dict:
        """Config fields that every block of one run must share; hashed into each block's meta. Taken from the
        config as written, so a field that a later version gives a default does not change an older run's hash."""
        c = self.declared
        blocks = {k: c.blocks[k] for k in ("num_blocks", "gamma", "partition", "layers")}
        floor = float(self.config.blocks.sigma_floor or 0.0) if "sigma_floor" in self.config.blocks else 0.0
        if floor:   # the LM tasks' sigma floor changes every block's range; 0 (none) keeps old hashes
            blocks["sigma_floor"] = floor
        return {"task": self.name, "model": c.model.to_dict(), "edm": c.edm.to_dict(), "blocks": blocks,
                "data": {k: c.data[k] for k in self.data_signature_fields() if k in c.data},
                "batch_order": order.BATCH_ORDER}

    def data_signature_fields(self) -> tuple[str, ...]:
        return ("name",)

    # -- noise partition ----------------------------------------------------------------------------------------
    def partition(self) -> partition_lib.Partition:
        b = self.config.blocks
        return partition_lib.make_partition(int(b.num_blocks), self.edm, float(b.gamma), str(b.partition))

    def full_range(self) -> tuple[float, float]:
        return (self.edm.sigma_min, self.edm.sigma_max)

    def units(self, method: str) -> list[Unit]:
        if method == "e2e":
            return [Unit("e2e", 0, int(self.config.model.num_layers), self.full_range())]
        part = self.partition()
        return [Unit(f"block_{b:02d}", b, n, part.ranges[b]) for b, n in enumerate(block_layers(self.config))]

    # -- data ----------------------------------------------------------------------------------------------------
    def source(self, split: str):
        """Random-access data source of a split (see dblocks.data)."""
        raise NotImplementedError

    def make_batch(self, examples: dict[str, np.ndarray], train: bool) -> dict[str, np.ndarray]:
        """Raw examples -> model-ready numpy batch (normalisation, augmentation)."""
        return examples

    # -- model and loss ------------------------------------------------------------------------------------------
    def make_model(self, unit: Unit) -> nn.Module:
        raise NotImplementedError

    def init_params(self, model: nn.Module, rng: Array, batch: dict) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, params, batch: dict, rng: Array, train_range: Array,
             train: bool = True) -> tuple[Array, dict]:
        """Scalar loss and metrics of one step: `loss_on(draw(...))`. train_range is a traced [2] (lo, hi), so one
        compiled step serves all blocks of the same shape."""
        inputs, model_rng = self.draw(model, batch, rng, train_range, train)
        return self.loss_on(model, params, inputs, model_rng, train)

    def draw(self, model: nn.Module, batch: dict, rng: Array, train_range: Array,
             train: bool = True) -> tuple[dict, Array]:
        """The step's randomness applied to the whole batch, before any parameter is read: (inputs, model_rng).
        Every leaf of `inputs` has the batch's leading axis N (noise level, noisy target, augmented image per
        sample), so a slice of the inputs is exactly the slice of the full batch's draw; model_rng is what the
        network itself draws from (dropout). Gradient accumulation (dblocks.steps) draws once for the batch and
        runs `loss_on` per microbatch, which is how k microbatches reproduce the whole batch's step."""
        raise NotImplementedError

    def loss_on(self, model: nn.Module, params, inputs: dict, rng: Array, train: bool = True) -> tuple[Array, dict]:
        """Scalar loss and metrics of drawn `inputs` (`draw`); the loss is a mean over the N samples (weighted per
        sample), so the mean of k equal microbatches' losses is the whole batch's."""
        raise NotImplementedError

    # -- after training ------------------------------------------------------------------------------------------
    def generate(self, run, *inputs, **options) -> Any:
        """The task's sampler on an assembled run (`dblocks.assemble.Run`): images for class labels (dit:
        `generate(run, labels, ...)` -> SampleResult), token sequences (mdm: `generate(run, num, grid_points, ...)`),
        continuations of prompts (ar, recurrent: `generate(run, prompts, max_tokens, ...)` -> (tokens, calls)).
        Every sampler calls its step count `grid_points`: the noise levels (masking times) at which a block is called.
        The classifier (vit) has `classify` instead."""
        raise NotImplementedError(f"the {self.name!r} task has no generator")

    def write_samples(self, run, out_path: str, **options) -> dict:
        """Writes something a person can look at (an image grid, text) and returns a summary."""
        raise NotImplementedError

    def evaluate(self, run, **options) -> dict:
        """Evaluates an assembled run (`dblocks.assemble.Run`, either method) on the test split. Returns a
        JSON-able dict that holds at least:
          'headline': {'name': str, 'value': float, 'higher_is_better': bool}   e.g. accuracy, FID, bits/char
          'block_calls_per_sample': int          network (block) evaluations per generated/classified sample, or
          'block_calls_per_token': int           for language models: evaluations per generated token
        and any diagnostics (lists are fine: e.g. 'per_step': {'name': ..., 'values': [...]} for a plot)."""
        raise NotImplementedError

    def dummy_batch(self, n: int = 2) -> dict:
        """A batch of n examples with the right shapes and dtypes (zeros), for init and compile-only uses."""
        raise NotImplementedError


TASKS: dict[str, Callable[[Any], Task]] = {}


def register(cls):
    TASKS[cls.name] = cls
    return cls
