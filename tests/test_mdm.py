"""Masked diffusion: the t partition (equal alpha mass, routing), masking rate, loss weight, the ELBO estimator on a
source with a known answer, the ancestral sampler, and the task trained and evaluated through the engine."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import assemble
from dblocks import train as train_lib
from dblocks import config as config_lib
from dblocks import mdm
from experiments.configs import tiny_mdm


# -- partition in t ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("B", [1, 3, 4])
def test_partition_gives_equal_alpha_mass(schedule, B):
    p = mdm.t_partition(B, gamma=0.0, t_min=1e-3, schedule=schedule)
    bounds = np.array(p.boundaries)
    assert bounds[0] == 1e-3 and bounds[-1] == 1.0 and np.all(np.diff(bounds) > 0)
    full = np.concatenate([[0.0], bounds[1:]])     # the block owning t_min also owns [0, t_min] at evaluation
    mass = -np.diff(np.asarray(mdm.alpha(full, schedule), np.float64))
    np.testing.assert_allclose(mass, np.full(B, 1.0 / B), atol=1e-6)
    if schedule == "linear":
        np.testing.assert_allclose(bounds[1:-1], np.arange(1, B) / B, atol=1e-12)
    elif B > 1:  # not equal widths in t: the test above is not trivial
        assert np.ptp(np.diff(full)) > 0.05


def test_overlap_in_log_t_and_clamp():
    p = mdm.t_partition(3, gamma=0.05, t_min=1e-3)
    lo_b, hi_b = 1 / 3, 2 / 3
    a = (hi_b / lo_b) ** 0.05
    np.testing.assert_allclose(p.ranges[1], [lo_b / a, hi_b * a], rtol=1e-9)            # middle block
    np.testing.assert_allclose(p.ranges[0], [(2 / 3) / 1.5 ** 0.05, 1.0], rtol=1e-9)    # clamped at 1
    np.testing.assert_allclose(p.ranges[2], [1e-3, (1 / 3) * (1 / 3 / 1e-3) ** 0.05], rtol=1e-9)  # clamped at t_min
    for b in range(3):   # each block's range contains the interval it owns
        own = p.interval(b)
        assert p.ranges[b][0] <= own[0] and p.ranges[b][1] >= own[1]
    assert mdm.t_partition(1, 0.05, 1e-3).ranges == ((1e-3, 1.0),)   # B=1: the end-to-end range
    with pytest.raises(ValueError, match="t_min"):
        mdm.t_partition(3, 0.05, t_min=0.5)


def test_block_of_routes_t_near_one_to_block_zero():
    p = mdm.t_partition(3, gamma=0.05, t_min=1e-3)
    t = jnp.array([1.0, 0.9, 0.67, 0.5, 0.34, 0.3, 0.01, 1e-3, 1e-5])
    np.testing.assert_array_equal(p.block_of(t), [0, 0, 0, 1, 1, 2, 2, 2, 2])
    for b in range(3):
        lo, hi = p.interval(b)
        inside = np.linspace(lo, hi, 50)[1:-1]
        assert np.all(np.asarray(p.block_of(inside)) == b)
    # a level on a boundary belongs to the noisier block (as for sigma)
    assert int(p.block_of(jnp.float32(2 / 3))) == 0 and int(p.block_of(jnp.float32(1 / 3))) == 1


# -- forward process and loss weight -----------------------------------------------------------------------------

def test_masking_rate_matches_alpha():
    tokens = jnp.zeros((6, 40_000), jnp.int32)
    t = jnp.array([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    x_t, masked = mdm.forward_mask(jax.random.PRNGKey(0), tokens, t, mask_id=7)
    rate = np.asarray(masked.mean(axis=1))
    expected = 1 - np.asarray(mdm.alpha(t))
    np.testing.assert_allclose(rate, expected, atol=4 * np.sqrt(0.25 / 40_000))
    assert rate[0] == 0 and rate[-1] == 1
    np.testing.assert_array_equal(np.asarray(x_t) == 7, np.asarray(masked))
    tc = jnp.array([0.2, 0.7])
    _, mc = mdm.forward_mask(jax.random.PRNGKey(1), tokens[:2], tc, 7, schedule="cosine")
    np.testing.assert_allclose(np.asarray(mc.mean(1)), 1 - np.asarray(mdm.alpha(tc, "cosine")), atol=0.01)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    t = jnp.array([0.01, 0.2, 0.5, 0.8, 0.99])
    d_alpha = jax.vmap(jax.grad(lambda s: mdm.alpha(s, schedule)))(t)
    np.testing.assert_allclose(mdm.loss_weight(t, schedule), -d_alpha / (1 - mdm.alpha(t, schedule)), rtol=1e-5)
    if schedule == "linear":
        np.testing.assert_allclose(mdm.loss_weight(t), 1 / t, rtol=1e-6)


def test_integrand_with_uniform_predictions():
    """With uniform logits every masked token costs ln V, so the integrand is w(t) * n_masked * ln V / L per
    sequence, and its mean over masks is ln V at every t (the weight undoes the masking rate)."""
    V, L = 5, 4096
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, L), 0, V)
    t = jnp.array([0.05, 0.4, 0.9])
    _, masked = mdm.forward_mask(jax.random.PRNGKey(1), tokens, t, V)
    vals = mdm.integrand(jnp.zeros((3, L, V)), tokens, masked, t)
    np.testing.assert_allclose(vals, masked.sum(1) * math.log(V) / (t * L), rtol=1e-5)
    np.testing.assert_allclose(vals, math.log(V), rtol=0.1)


def test_sample_t_is_stratified_inside_the_range():
    t = np.asarray(mdm.sample_t(jax.random.PRNGKey(3), 64, 0.2, 0.6))
    assert t.min() >= 0.2 and t.max() <= 0.6
    np.testing.assert_array_equal(np.sort(np.floor((t - 0.2) / 0.4 * 64)), np.arange(64))


# -- the ELBO on a source with a known answer --------------------------------------------------------------------

V_M = 3
P_M = np.array([[0.80, 0.15, 0.05], [0.10, 0.60, 0.30], [0.25, 0.25, 0.50]])


def _stationary(P):
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def _markov_sequences(n, L, seed=0):
    rng = np.random.default_rng(seed)
    pi = _stationary(P_M)
    x = np.zeros((n, L), np.int32)
    x[:, 0] = rng.choice(V_M, n, p=pi)
    for i in range(1, L):
        u = rng.uniform(size=n)[:, None]
        x[:, i] = (u > np.cumsum(P_M[x[:, i - 1]], axis=1)).sum(1)
    logp = np.log(pi[x[:, 0]]) + np.log(P_M[x[:, :-1], x[:, 1:]]).sum(1)
    return x, -logp / L / math.log(2)      # exact bits per character of each sequence


def _oracle_logits(x_t):
    """The true posterior p(x_i | unmasked tokens) of the Markov source, by forward-backward: the 'model' that
    predicts the true data distribution. Its ELBO equals -log p(x) exactly (every unmasking order is a chain rule)."""
    x_t = np.asarray(x_t)
    n, L = x_t.shape
    emit = np.where((x_t == V_M)[..., None], 1.0, np.eye(V_M)[np.minimum(x_t, V_M - 1)])   # [n, L, V]
    fwd, bwd = np.zeros((n, L, V_M)), np.ones((n, L, V_M))
    fwd[:, 0] = _stationary(P_M) * emit[:, 0]
    fwd[:, 0] /= fwd[:, 0].sum(1, keepdims=True)
    for i in range(1, L):
        fwd[:, i] = (fwd[:, i - 1] @ P_M) * emit[:, i]
        fwd[:, i] /= fwd[:, i].sum(1, keepdims=True)
    for i in range(L - 2, -1, -1):
        bwd[:, i] = (bwd[:, i + 1] * emit[:, i + 1]) @ P_M.T
        bwd[:, i] /= bwd[:, i].sum(1, keepdims=True)
    post = fwd * bwd
    return jnp.asarray(np.log(post / post.sum(-1, keepdims=True) + 1e-30), jnp.float32)


def test_elbo_of_the_true_model_is_the_true_entropy():
    tokens, exact = _markov_sequences(600, 24)
    part = mdm.t_partition(3, gamma=0.05, t_min=1e-3)
    calls = []

    def oracle(b, x_t, t):
        assert np.all(np.asarray(part.block_of(t)) == b), "a t was run by a block that does not own it"
        calls.append(b)
        return _oracle_logits(x_t)

    est = mdm.elbo_bpc(oracle, tokens, part, mask_id=V_M, t_per_sequence=6, batch_size=200, seed=1)
    assert est.num_sequences == 600 and est.t_per_sequence == 6 and est.values.shape == (600, 6)
    assert 0 < est.stderr < 0.03
    assert abs(est.bpc - exact.mean()) < 4 * est.stderr, (est.bpc, exact.mean(), est.stderr)
    assert sorted(set(calls)) == [0, 1, 2] and len(calls) == 6 * 3   # K=6 strata, 2 per block: one block per batch
    np.testing.assert_allclose(sum(est.per_block), est.bpc, rtol=1e-9)
    # a model that ignores the context (uniform) is measurably worse: the test can fail
    uniform = mdm.elbo_bpc(lambda b, x, t: jnp.zeros(x.shape + (V_M,)), tokens, part, V_M, 6, 200, seed=1)
    assert uniform.bpc - est.bpc > 10 * est.stderr
    np.testing.assert_allclose(uniform.bpc, math.log2(V_M), rtol=0.05)


# -- sampler -----------------------------------------------------------------------------------------------------

def test_sampler_fills_every_mask_and_routes_steps():
    part = mdm.t_partition(3, gamma=0.05, t_min=1e-3)
    V, seen = 11, []

    def random_logits(b, x, t):
        seen.append((b, float(t[0])))
        lo, hi = part.interval(b)
        assert np.all((np.asarray(t) >= lo) & (np.asarray(t) <= hi))   # t lies in the running block's own interval
        return jnp.asarray(rng.normal(size=x.shape + (V,)), jnp.float32)

    rng = np.random.default_rng(0)
    res = mdm.sample(random_logits, jax.random.PRNGKey(0), num=5, length=40, steps=12, partition=part, mask_id=V)
    assert res.tokens.shape == (5, 40) and res.tokens.min() >= 0 and res.tokens.max() < V   # no [MASK] left
    # each step is run by the block owning the interval it covers; a step starting on a boundary (t = 2/3, 1/3)
    # covers the lower block's interval, so 12 steps split 4/4/4 (the old start-level rule gave 5/4/3)
    assert res.block_calls == 12 and list(np.bincount(res.blocks)) == [4, 4, 4]
    for steps, shares in ((6, [2, 2, 2]), (9, [3, 3, 3]), (64, [22, 21, 21]), (7, [3, 2, 2])):
        blocks = mdm.step_blocks(mdm.sampling_grid(steps), part)
        assert list(np.bincount(blocks, minlength=3)) == shares, steps
    assert list(np.bincount(mdm.step_blocks(mdm.sampling_grid(6, "cosine"), mdm.t_partition(3, 0.05, 1e-3, "cosine")),
                            minlength=3)) == [2, 2, 2]
    assert [b for b, _ in seen] == sorted(b for b, _ in seen)          # highest noise first, each block once in turn
    assert seen[0][1] == 1.0 and np.all(np.diff([t for _, t in seen]) < 0)
    with pytest.raises(ValueError, match="never runs block"):
        mdm.sample(random_logits, jax.random.PRNGKey(0), 1, 8, 2, part, V)   # 3 steps = one per block is enough


def test_unmask_step_reveals_at_the_schedule_rate():
    x = jnp.full((1, 20_000), 9, jnp.int32)
    logits = jnp.zeros((1, 20_000, 9))
    out = mdm.unmask_step(jax.random.PRNGKey(0), x, logits, 0.8, 0.6, mask_id=9)
    np.testing.assert_allclose(float(jnp.mean(out != 9)), (0.8 - 0.6) / 0.8, atol=0.01)
    kept = out.at[0, :10].set(3)
    again = mdm.unmask_step(jax.random.PRNGKey(1), kept, logits, 0.6, 0.0, mask_id=9)
    assert int(jnp.sum(again == 9)) == 0 and np.all(np.asarray(again[0, :10]) == 3)   # revealed tokens stay


def test_sampler_draws_from_the_model_distribution():
    """With the iid oracle (logits = log p, context ignored) the samples' character frequencies follow p."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    part = mdm.t_partition(3, 0.0, 1e-3)
    res = mdm.sample(lambda b, x, t: jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), x.shape + (4,)),
                     jax.random.PRNGKey(2), 64, 128, 16, part, mask_id=4)
    np.testing.assert_allclose(np.bincount(res.tokens.ravel(), minlength=4) / res.tokens.size, p, atol=0.02)


# -- the task through the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The tiny config trained as B=3 blocks and as the end-to-end baseline (6 steps each), then assembled."""
    base = tmp_path_factory.mktemp("tiny_mdm")
    runs = {}
    for method in ("dblocks", "e2e"):
        c = tiny_mdm.get_config()
        c.method = method
        train_lib.train(c, str(base / method))
        runs[method] = assemble.load_run(str(base / method))
    return runs


def test_task_partition_and_units(tiny_runs):
    run = tiny_runs["dblocks"]
    task = run.task
    part = task.partition()
    assert task.full_range() == (1e-3, 1.0)
    assert [u.train_range for u in task.units("dblocks")] == list(part.ranges)
    assert task.units("e2e")[0].train_range == (1e-3, 1.0)
    assert [m["train_range"] for m in run.metas] == [list(r) for r in part.ranges]
    assert tiny_runs["e2e"].partition.num_blocks == 1


def test_initial_loss_is_ln_vocab(tiny_runs):
    """An untrained model predicts uniformly (zero-initialised head), so the weighted loss is ln V in expectation:
    the 1/t weight exactly undoes the masking rate."""
    task = tiny_runs["dblocks"].task
    unit = task.units("e2e")[0]
    model = task.make_model(unit)
    tokens = np.random.default_rng(0).integers(0, task.vocab.size, (256, 64)).astype(np.int32)
    params = task.init_params(model, jax.random.PRNGKey(0), {"tokens": tokens})
    loss, metrics = task.loss(model, params, {"tokens": jnp.asarray(tokens)}, jax.random.PRNGKey(1),
                              jnp.asarray(unit.train_range), train=False)
    np.testing.assert_allclose(float(loss), math.log(task.vocab.size), rtol=0.08)
    np.testing.assert_allclose(float(metrics["ce_masked"]), math.log(task.vocab.size), rtol=1e-5)


def test_evaluate_and_samples(tiny_runs, tmp_path):
    for method, run in tiny_runs.items():
        out = run.task.evaluate(run)
        assert out["headline"]["name"] == "bits per character" and out["headline"]["higher_is_better"] is False
        assert 0 < out["bpc"] < 10 and out["bpc_stderr"] > 0
        assert out["t_samples"] == 16 * 3 and out["num_sequences"] == 16
        assert len(out["samples"]) == 2 and all(len(s) == 16 and "?" not in s for s in out["samples"])
        assert out["block_calls_per_sample"] == 8
        assert out["layer_evals_per_sample"] == 8 * (1 if method == "dblocks" else 3)
        np.testing.assert_allclose(sum(out["bpc_per_block"]), out["bpc"], rtol=1e-9)
    summary = tiny_runs["dblocks"].task.write_samples(tiny_runs["dblocks"], str(tmp_path / "samples.png"))
    assert summary["path"].endswith("samples.txt") and summary["steps_per_block"] == [3, 3, 2]
    assert open(summary["path"]).read().count("=== sample") == 2


def test_bad_configs_are_refused():
    c = tiny_mdm.get_config()
    c.model.heads = 3
    c.mdm.t_min = 0.5
    c.sample.grid_points = 3
    c.data.name = "wikipedia"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    for field in ("model.hidden", "mdm.t_min", "sample.grid_points", "data.name"):
        assert field in str(e.value)


def test_sample_steps_is_now_grid_points():
    """MDM's sampler steps are `sample.grid_points`, every task's name: a run saved with the old field reads it under
    the new one (so it loads, resumes and exports as before), and a config file that still sets it is refused."""
    from dblocks import run_record
    saved = {"task": "mdm", "sample": {"steps": 5, "num": 2}}
    assert run_record.saved_config(saved)["sample"] == {"grid_points": 5, "num": 2}
    assert saved["sample"] == {"steps": 5, "num": 2}   # a copy: the record itself is left as it was
    c = tiny_mdm.get_config()
    c.sample.steps = 8
    with pytest.raises(config_lib.ConfigError, match="sample.steps is now called sample.grid_points"):
        config_lib.validate(c)
