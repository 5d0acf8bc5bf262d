"""Held-out loss during training: every `train.eval_every` steps, each unit's loss on held-out examples over its own
noise range (a block's own sigma range, the whole range for the end-to-end network), logged as `val_loss` beside the
training loss (progress line, metrics.jsonl, TensorBoard).

The held-out batch (the first data.batch_size examples of the validation split, else the test split) and its noise (a
key folded from the unit's own key) are fixed, so successive values differ only through the parameters: a curve, not a
noisy sample. The loss is computed on the device at a log point and fetched with that log point's metrics: no host sync
is added.
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from dblocks import steps

# The held-out split the loss is computed on: validation where the data has one (carved from train by
# data.val_fraction when the source has none, docs/data.md "Splits"), else test, which then only shows the curve:
# nothing is chosen by it.
HELDOUT_SPLITS = ("validation", "test")


def eval_every(config) -> int:
    """config.train.eval_every (absent in configs saved before it existed: 0, off)."""
    return int(config.train.eval_every)


def config_problems(train) -> list[str]:
    """config.train.eval_every problems, for dblocks.config.validate."""
    v = train.eval_every
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        return [f"train.eval_every={v!r} must be an integer >= 0 (0 = no held-out loss during training)"]
    return []


def due(done: int, last: int, every: int) -> bool:
    """Whether the log point after step `done` evaluates: a multiple of `every` was passed since step `last`."""
    return every > 0 and done // every > last // every


def eval_key(seed: int, index: int):
    """The unit's fixed evaluation noise: fold_in(unit key, 2) (init uses 0, training steps 1)."""
    return jax.random.fold_in(steps.unit_key(seed, index), 2)


def make_eval_loss(task, model):
    """loss(params, batch, key, train_range) -> scalar: the task's loss without dropout on the unit's range."""
    def loss(params, batch, key, train_range):
        return task.loss(model, params, batch, key, train_range, train=False)[0]
    return loss


def heldout_batch(task, batch_size: int) -> dict:
    """The first `batch_size` held-out examples (repeated when the split is smaller), as an evaluation batch; {}
    with a warning when the data has no held-out split (the run goes on without val_loss)."""
    from dblocks.data import DatasetMissingError
    problems = []
    for split in HELDOUT_SPLITS:
        try:
            source = task.source(split)
        except (DatasetMissingError, ValueError, FileNotFoundError) as e:
            problems.append(f"{split}: {e}")
            continue
        logging.getLogger("dblocks").info("held-out loss during training on the %s split (%d examples)", split,
                                          len(source))
        break
    else:
        logging.getLogger("dblocks").warning("no held-out loss during training: no held-out split can be read (%s)",
                                             "; ".join(problems))
        return {}
    idx = np.arange(batch_size) % len(source)
    return task.make_batch(source.get(idx), train=False)
