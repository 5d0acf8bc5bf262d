"""What one optimizer step of a unit is: the optimizer, the train state, the pure step, and the unit's keys.

Both trainers (sequential, `dblocks.engine`; mesh, `dblocks.parallel`) build their steps from here, so a unit's
randomness and update are the same by construction whichever trainer runs it:
  init key  = fold_in(fold_in(PRNGKey(seed), b), 0)
  step keys = fold_in(fold_in(fold_in(PRNGKey(seed), b), 1), step)     (step read from the state, inside the jit)
With train.microbatches = k > 1 the step key's draws are made once for the whole batch and sliced per microbatch, so
k microbatches give the whole batch's step to float tolerance (`accumulated_loss_and_grad`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
State = dict[str, Any]   # {'step', 'params', 'opt_state', 'ema'}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; nothing from the bad interval is saved."""


# -- optimizer ------------------------------------------------------------------------------------------------

def lr_schedule(optim, steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio (or constant). Per unit: each block runs its own
    `steps` (matched compute with the baseline)."""
    warmup = max(int(optim.warmup_steps), 0)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, steps,
                                                  end_value=optim.lr * optim.min_lr_ratio)
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(warmup, 1)),
                                 optax.constant_schedule(optim.lr)], [warmup])


def make_optimizer(optim, steps: int) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, global-norm clipping (grad_clip > 0), no weight decay on 1-D leaves (biases, norms)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    chain.append(optax.adamw(lr_schedule(optim, steps), b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain)


def ema_decay_at(decay: float, step: Array, warmup: bool) -> Array:
    """EMA decay after `step` updates: min(decay, (1 + step) / (10 + step)) with warm-up, so the average forgets its
    initialisation within a few hundred steps even at decay 0.9999 (without it, 0.9999 over 9,765 steps keeps 38 %
    of the initial weights); the plain constant `decay` without."""
    if not warmup:
        return jnp.float32(decay)
    t = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


# -- state and step ----------------------------------------------------------------------------------------------

def init_state(params, tx: optax.GradientTransformation, ema_decay: float) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params) if ema_decay > 0 else {}}


def make_train_step(task, model: nn.Module, tx: optax.GradientTransformation, optim
                    ) -> Callable[[State, dict, Array, Array], tuple[State, dict]]:
    """step(state, batch, base_key, train_range) -> (state, metrics). The step's key is fold_in(base_key,
    state['step']), computed inside, so the loop never touches keys on the host. Pure: jit it, vmap it over a block
    axis, or lower it for the memory report. With config.train.microbatches = k > 1 the gradient is accumulated over
    k microbatches inside the step (`accumulated_loss_and_grad`), one optimizer update per step."""
    ema_decay, warmup = float(optim.ema_decay), bool(optim.ema_warmup)
    k = int(task.config.train.microbatches)

    def step(state: State, batch: dict, base_key: Array, train_range: Array):
        rng = jax.random.fold_in(base_key, state["step"])
        if k == 1:
            def loss_fn(params):
                return task.loss(model, params, batch, rng, train_range, train=True)

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        else:
            loss, metrics, grads = accumulated_loss_and_grad(task, model, state["params"], batch, rng, train_range,
                                                             k)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = state["ema"]
        if ema_decay > 0:
            d = ema_decay_at(ema_decay, state["step"], warmup)
            ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    return step


def microbatched(tree, k: int):
    """[N, ...] leaves -> [k, N/k, ...]: microbatch m holds samples m, m + k, m + 2k, ... A strided split, so a
    batch sharded over devices in contiguous chunks gives every device an equal part of every microbatch (no data
    moves between devices)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), tree)


def accumulated_loss_and_grad(task, model: nn.Module, params, batch: dict, rng: Array, train_range: Array,
                              k: int) -> tuple[Array, dict, Any]:
    """Loss, metrics and gradient of the whole batch, computed over k microbatches by `lax.scan` (float32 sums),
    so only one microbatch's activations are live at a time.

    The step's randomness is drawn once for the whole batch (task.draw: noise level, noise, augmentation per
    sample) and sliced, so each sample gets exactly the draws the whole-batch step gives it; with every task's loss
    a mean over samples, the mean of the k microbatches' losses and gradients is the whole batch's to float
    tolerance. What the network draws itself (dropout) is drawn per microbatch, from fold_in(model_rng, m), so with
    dropout the masks differ from the whole-batch step's (same distribution). Metrics are microbatch means: a ratio
    metric (MDM's ce_masked) is then a mean of ratios."""
    inputs, model_rng = task.draw(model, batch, rng, train_range, True)
    grad_fn = jax.value_and_grad(lambda p, x, r: task.loss_on(model, p, x, r, True), has_aux=True)
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    abstract = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], microbatched(inputs, k)), model_rng)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), abstract)

    def body(total, xs):
        m, micro = xs
        out = grad_fn(params, micro, jax.random.fold_in(model_rng, m))
        return jax.tree.map(jnp.add, total, f32(out)), None

    ((loss, metrics), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), microbatched(inputs, k)))
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
    return loss / k, jax.tree.map(lambda v: v / k, metrics), grads


# -- keys ---------------------------------------------------------------------------------------------------------

def unit_key(seed: int, index: int) -> Array:
    """fold_in(seed, b): a unit's randomness depends on nothing but the seed and its own index."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def init_key(seed: int, index: int) -> Array:
    return jax.random.fold_in(unit_key(seed, index), 0)


def step_base_key(seed: int, index: int) -> Array:
    return jax.random.fold_in(unit_key(seed, index), 1)
