"""Training paths no tiny default config exercises: the EMA, the optimizer, uneven blocks, the log-uniform partition,
the NaN stop, the sigma range a unit's step draws inside the trainer, and the recurrent baseline's truncated backprop.
Each test here was seen to fail with the bug it names put back (docs/reliability.md)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dblocks import assemble, edm, engine, steps
from dblocks import partition as partition_lib
from dblocks.models import ar as ar_model
from dblocks.tasks import get_task
from dblocks.train import train
from experiments.configs import tiny_dit, tiny_recurrent


def _cfg(**overrides):
    c = tiny_dit.get_config()
    c.update_from_flattened_dict(overrides)
    return c


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- EMA ---------------------------------------------------------------------------------------------------------------

def test_ema_follows_the_ramp_step_by_step():
    """The step's EMA is min(decay, (1 + t) / (10 + t)) after t updates, replayed by hand on a tiny DiT unit."""
    c = _cfg(**{"optim.ema_decay": 0.999, "data.batch_size": 4})
    task = get_task(c)
    unit = task.units("dblocks")[0]
    model = task.make_model(unit)
    tx = steps.make_optimizer(c.optim, int(c.train.steps))
    batch = task.dummy_batch(4)
    state = steps.init_state(task.init_params(model, jax.random.PRNGKey(0), batch), tx, 0.999)
    step = jax.jit(steps.make_train_step(task, model, tx, c.optim))
    expected = state["params"]
    for t in range(5):
        state, _ = step(state, batch, jax.random.PRNGKey(1), jnp.asarray(unit.train_range, jnp.float32))
        d = min(0.999, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, ...: far below 0.999 early on
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state["ema"], expected)
    assert not _leaves_equal(state["ema"], state["params"])
    # the ramp's point: at decay 0.9999 over 9,765 steps a constant decay keeps 0.9999**9765 = 37.7 % of the
    # initialisation, the ramp keeps prod (1+t)/(10+t) < 1e-30
    assert abs(0.9999 ** 9765 - 0.377) < 1e-3
    ramp = np.minimum(0.9999, (1 + np.arange(9765)) / (10 + np.arange(9765)))
    assert np.exp(np.sum(np.log(ramp))) < 1e-30


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ema"))
    return wd, train(_cfg(**{"optim.ema_decay": 0.9}), wd, return_params=True)


def test_load_run_uses_the_ema_by_default(ema_run):
    wd, finals = ema_run
    ema, raw = assemble.load_run(wd), assemble.load_run(wd, use_ema=False)
    for b, name in enumerate(["block_00", "block_01", "block_02"]):
        assert _leaves_equal(raw.params[b], finals[name])           # use_ema=False: the trained parameters
        assert not _leaves_equal(ema.params[b], finals[name])        # default: the average, which differs
        assert jax.tree.structure(ema.params[b]) == jax.tree.structure(finals[name])


# -- optimizer ------------------------------------------------------------------------------------------------------

def _optim(**kw):
    o = ml_collections.ConfigDict(dict(lr=0.1, weight_decay=0.5, b1=0.9, b2=0.999, warmup_steps=4,
                                       schedule="cosine", min_lr_ratio=0.1, grad_clip=0.0, ema_decay=0.0))
    o.update(kw)
    return o


def test_schedule_warmup_cosine_and_min_lr():
    lr = steps.lr_schedule(_optim(), 20)
    np.testing.assert_allclose([lr(0), lr(2), lr(4)], [0.0, 0.05, 0.1], rtol=1e-6)         # linear warm-up
    mid = 4 + 8  # half-way through the 16 cosine steps: lr_min + (lr - lr_min) / 2
    np.testing.assert_allclose(lr(mid), 0.01 + 0.5 * 0.09, rtol=1e-5)
    np.testing.assert_allclose([lr(20), lr(25)], [0.01, 0.01], rtol=1e-5)                   # min_lr_ratio 0.1
    const = steps.lr_schedule(_optim(schedule="constant"), 20)
    np.testing.assert_allclose([const(2), const(4), const(19)], [0.05, 0.1, 0.1], rtol=1e-6)


def test_optimizer_uses_the_schedule_and_decays_only_matrices():
    """With zero gradients AdamW's update is -lr_t * wd * p on decayed leaves: it reveals lr_t, and that biases and
    1-D leaves are not decayed."""
    tx = steps.make_optimizer(_optim(), 20)
    params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}, "norm": {"scale": jnp.ones((2,))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt_state, lr = tx.init(params), steps.lr_schedule(_optim(), 20)
    for t in range(8):
        updates, opt_state = tx.update(zeros, opt_state, params)
        np.testing.assert_allclose(updates["dense"]["kernel"], -lr(t) * 0.5 * params["dense"]["kernel"], rtol=1e-5,
                                   atol=1e-9)
        np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
        np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
        params = optax.apply_updates(params, updates)


def test_gradient_clipping_is_applied():
    """Adam is invariant to one global gradient scale, so clipping shows on the second step, after a small and then
    a large gradient: with clipping both are cut to norm <= 1 and the update equals clip-then-AdamW by hand."""
    params = {"w": jnp.ones((2, 2))}
    grads = [{"w": jnp.full((2, 2), 0.1)}, {"w": jnp.array([[30.0, -40.0], [0.0, 0.0]])}]

    def run(tx):
        s, out = tx.init(params), None
        for g in grads:
            out, s = tx.update(g, s, params)
        return out["w"]

    clipped = run(steps.make_optimizer(_optim(grad_clip=1.0, weight_decay=0.0, schedule="constant"), 20))
    unclipped = run(steps.make_optimizer(_optim(grad_clip=0.0, weight_decay=0.0, schedule="constant"), 20))
    lr = steps.lr_schedule(_optim(schedule="constant"), 20)
    by_hand = run(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, 0.9, 0.999, weight_decay=0.0)))
    np.testing.assert_allclose(clipped, by_hand, rtol=1e-6)
    assert float(jnp.max(jnp.abs(clipped - unclipped))) > 1e-3


# -- uneven blocks, log-uniform partition, the sigma each unit draws ---------------------------------------------------

@pytest.mark.slow
def test_uneven_layers_train_and_sample(tmp_path):
    c = _cfg(**{"blocks.num_blocks": 2, "blocks.layers": "1,2", "train.steps": 3, "train.ckpt_every": 3})
    finals = train(c, str(tmp_path), return_params=True)
    run = assemble.load_run(str(tmp_path))
    assert [u.num_layers for u in run.units] == [1, 2]
    # the second block really has two transformer layers: more parameters, not a copy of the first's shapes
    sizes = [sum(x.size for x in jax.tree.leaves(finals[n])) for n in ("block_00", "block_01")]
    assert sizes[1] > sizes[0]
    summary = run.task.write_samples(run, str(tmp_path / "samples.png"), per_class=1)
    assert os.path.getsize(tmp_path / "samples.png") > 0
    assert summary.get("images", 4) == 4


@pytest.fixture
def drawn_sigmas(monkeypatch):
    """Records (train_range lo, hi, drawn sigmas) of every edm.sample_sigma call inside the compiled steps."""
    seen = []
    original = edm.sample_sigma

    def recording(key, shape, lo, hi, p_mean, p_std):
        s = original(key, shape, lo, hi, p_mean, p_std)
        jax.debug.callback(lambda a, b, x: seen.append((float(a), float(b), np.asarray(x))), lo, hi, s)
        return s

    monkeypatch.setattr(edm, "sample_sigma", recording)
    return seen


@pytest.mark.slow
def test_loguniform_partition_trains_and_each_unit_draws_from_its_own_range(tmp_path, drawn_sigmas):
    c = _cfg(**{"blocks.partition": "loguniform", "train.steps": 2, "train.ckpt_every": 2, "train.log_every": 2,
                "optim.warmup_steps": 1})
    train(c, str(tmp_path))
    jax.effects_barrier()
    part = partition_lib.make_partition(3, get_task(c).edm, gamma=0.05, kind="loguniform")
    bounds = np.log(np.asarray(part.boundaries))
    np.testing.assert_allclose(np.diff(bounds), (bounds[-1] - bounds[0]) / 3, rtol=1e-6)
    assert len(drawn_sigmas) == 3 * 2   # 3 blocks x 2 steps, in training order
    for i, (lo, hi, sigma) in enumerate(drawn_sigmas):
        b = i // 2
        np.testing.assert_allclose([lo, hi], part.ranges[b], rtol=1e-6)
        assert sigma.min() >= lo * (1 - 1e-6) and sigma.max() <= hi * (1 + 1e-6), (b, sigma, part.ranges[b])
    run = assemble.load_run(str(tmp_path))
    np.testing.assert_allclose(run.partition.boundaries, part.boundaries, rtol=1e-6)
    for b, m in enumerate(run.metas):
        np.testing.assert_allclose(m["train_range"], part.ranges[b], rtol=1e-6)
    run.task.write_samples(run, str(tmp_path / "samples.png"), per_class=1)
    assert os.path.getsize(tmp_path / "samples.png") > 0


# -- the NaN stop ----------------------------------------------------------------------------------------------------

def test_nan_loss_stops_with_the_last_good_step_and_saves_nothing_from_the_bad_ones(tmp_path, monkeypatch):
    original = engine.Trainer.batch

    def poisoned(self, unit, step):  # block 0's data turns NaN from step 4 on (after the step-3 checkpoint)
        b = original(self, unit, step)
        return {**b, "image": b["image"] * np.nan} if unit.index == 0 and step >= 4 else b

    monkeypatch.setattr(engine.Trainer, "batch", poisoned)
    # NaN pixels make the uint8 batch float32; the preflight's executable is compiled for uint8, a jitted step retraces
    with pytest.raises(steps.NonFiniteLossError, match=r"block_00.*last good checkpoint is step 3"):
        train(_cfg(**{"train.preflight": False}), str(tmp_path))
    unit_dir = tmp_path / "blocks" / "block_00"
    assert sorted(p for p in os.listdir(unit_dir) if p.isdigit()) == ["3"]   # nothing from steps 4..6
    assert not os.path.exists(tmp_path / "blocks" / "block_01" / "meta.json")   # no later unit started (locked only)


def test_nan_before_any_checkpoint_says_none_yet(tmp_path):
    with pytest.raises(steps.NonFiniteLossError, match="none yet"):
        train(_cfg(**{"optim.lr": 1e4, "optim.grad_clip": 0.0, "optim.warmup_steps": 0,
                      "train.ckpt_every": 6, "train.log_every": 6}), str(tmp_path))
    assert not [p for p in os.listdir(tmp_path / "blocks" / "block_00") if p.isdigit()]


# -- the recurrent baseline's truncated backprop ---------------------------------------------------------------------

@pytest.mark.slow
def test_recurrent_baseline_backprops_only_through_the_last_iterations(monkeypatch):
    """With the no-gradient depth fixed at 3, the task's gradient equals a by-hand pass whose first 3 core
    iterations are constants, and differs from full backprop through all 3 + k: the frozen iterations contribute
    no gradient."""
    c = tiny_recurrent.get_config()
    c.method = "e2e"
    task = get_task(c)
    unit = task.units("e2e")[0]
    model = task.make_model(unit)
    batch = task.make_batch(task.source("train").get(np.arange(4)), train=True)
    params = task.init_params(model, jax.random.PRNGKey(0), batch)
    # away from the initialisation, whose zero-initialised head and gates pass no gradient to the core at all
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), params)
    monkeypatch.setattr(type(task), "sample_depth", lambda self, key: 3)   # static: a scan JAX can differentiate
    rng, k = jax.random.PRNGKey(5), int(c.recurrent.backprop_iterations)
    tokens = jnp.asarray(batch["tokens"])
    N, T = tokens.shape
    pos, mask = jnp.arange(T)[None], ar_model.causal_mask(T)

    def by_hand(p, frozen_has_grad: bool):
        apply = lambda q, *a, method: model.apply({"params": q}, *a, method=method)  # noqa: E731
        e, _ = apply(p, tokens, pos, mask, method=model.prelude_rows)
        k_s, _ = jax.random.split(rng)
        s = model.init_std * jax.random.normal(k_s, (N, T, model.hidden))
        pf, ef = (p, e) if frozen_has_grad else (jax.lax.stop_gradient(p), jax.lax.stop_gradient(e))
        for _ in range(3):
            s, _ = apply(pf, s, ef, pos, mask, method=model.core_rows)
        for _ in range(k):
            s, _ = apply(p, s, e, pos, mask, method=model.core_rows)
        logits, _ = apply(p, s, pos, mask, method=model.coda_rows)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    train_range = jnp.asarray(unit.train_range, jnp.float32)
    loss, g_task = jax.jit(jax.value_and_grad(lambda p: task.loss(model, p, batch, rng, train_range)[0]))(params)
    np.testing.assert_allclose(loss, jax.jit(by_hand, static_argnums=1)(params, False), rtol=1e-5)
    g_trunc = jax.jit(jax.grad(lambda p: by_hand(p, False)))(params)
    g_full = jax.jit(jax.grad(lambda p: by_hand(p, True)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_task, g_trunc)
    assert float(optax.tree.norm(g_task)) > 1e-3
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_task), jax.tree.leaves(g_full)))
    assert diff > 1e-4   # full backprop differs: the comparison can see gradient through the frozen iterations
