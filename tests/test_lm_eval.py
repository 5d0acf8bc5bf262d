"""The language tasks' new pieces, each against a case with a known answer: the ELBO of an exact Bayes denoiser, the
information partition's scale invariance, the scale contract, the analytic likelihood term, grids that end above
sigma_min, the n-gram judge and the ensemble reference. Model-free or on the tiny config's random blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dblocks import edm as edm_lib
from dblocks import information, lm_elbo, ngram, targets, text_metrics
from dblocks import partition as partition_lib
from dblocks.tasks import get_task
from dblocks.tasks.lm.sampler import parse_grid
from dblocks.tasks.lm.task import likelihood_logits
from experiments.configs import tiny_ar
from dblocks.assemble import random_run


# -- ELBO --------------------------------------------------------------------------------------------------------

def test_elbo_of_the_exact_denoiser_is_minus_log_prior_per_token():
    """For the exact posterior mean of a categorical prior q the bound is tight token by token: E[ELBO(v)] = -log q(v)
    (I-MMSE). A denoiser of the wrong prior (uniform) pays log V for every token instead."""
    V, D, N = 8, 16, 20000
    E = jnp.asarray(targets.fixed_embedding(V, D, 0.5, 0, 1.0))
    q = np.array([.4, .2, .1, .1, .08, .06, .04, .02])
    edm = edm_lib.EDM()
    part = partition_lib.make_partition(2, edm, 0.1)
    toks = np.random.default_rng(0).choice(V, size=(N, 1), p=q)
    for log_prior, want in ((jnp.log(q), -np.log(q[toks[:, 0]])), (jnp.zeros(V), np.full(N, np.log(V)))):
        r = lm_elbo.elbo_nats(lm_elbo.exact_denoiser(log_prior, E), E[toks], E, part, edm.sigma_min, edm.sigma_max,
                              jax.random.PRNGKey(1), 32)
        diff = r["total"][:, 0] - want
        se = diff.std() / np.sqrt(N)
        assert abs(diff.mean()) < 4 * se + 1e-3, (diff.mean(), se)
        for v in (0, 1, 3):   # per token, not only on average
            d_v = diff[toks[:, 0] == v]
            assert abs(d_v.mean()) < 4 * d_v.std() / np.sqrt(len(d_v)) + 1e-3
        assert r["diffusion_per_block"].shape == (2, N, 1)
        np.testing.assert_allclose(r["diffusion_per_block"].sum(0), r["diffusion"])


def test_elbo_strata_cover_each_block_interval_once():
    part = partition_lib.make_partition(4, edm_lib.EDM(), 0.1)
    st = lm_elbo.strata(part, 32)
    for b in range(4):
        lo, hi = np.log(part.interval(b))
        mine = sorted((a, c) for bb, a, c in st if bb == b)
        assert np.isclose(mine[0][0], lo) and np.isclose(mine[-1][1], hi)
        assert all(np.isclose(x[1], y[0]) for x, y in zip(mine, mine[1:]))


# -- information partition -----------------------------------------------------------------------------------------

def test_information_boundaries_scale_with_the_row_norm():
    """Everything depends on r / sigma, so doubling the row norm doubles every inner boundary; each boundary is
    where the curve crosses its share."""
    V, D = 40, 64
    prior = np.random.default_rng(0).dirichlet(np.ones(V))
    E1 = targets.fixed_embedding(V, D, 0.5, 0, 0.25)
    b1 = information.information_boundaries(E1, prior, 4, 0.002, 80.0)
    b2 = information.information_boundaries(2 * E1, prior, 4, 0.002, 80.0)
    assert b1[0] == 0.002 and b1[-1] == 80.0 and all(x < y for x, y in zip(b1, b1[1:]))
    np.testing.assert_allclose(np.array(b2[1:-1]) / np.array(b1[1:-1]), 2.0, rtol=0.03)
    f = information.information_curve(E1, prior, np.array(b1[1:-1]))
    np.testing.assert_allclose(f, [0.75, 0.5, 0.25], atol=0.03)


def test_sigma_floor_raises_training_ranges_only():
    part = partition_lib.make_partition(4, edm_lib.EDM(), 0.1)
    floored = information.with_sigma_floor(part, 0.05)
    assert floored.boundaries == part.boundaries
    assert floored.ranges[3][0] == 0.05 and floored.ranges[:3] == part.ranges[:3]


def test_task_builds_the_information_partition():
    c = tiny_ar.get_config()
    c.blocks.partition, c.blocks.sigma_floor, c.model.target_norm = "information", 0.03, 0.5
    task = get_task(c)
    part = task.partition()
    assert part.num_blocks == 2 and 0.002 < part.boundaries[1] < 80 and part.ranges[1][0] == 0.03
    f = information.information_curve(np.asarray(task.E), task.unigram(), np.array([part.boundaries[1]]))
    assert abs(f[0] - 0.5) < 0.05


# -- scale contract and the likelihood term -------------------------------------------------------------------------

def test_scale_contract_targets_bridge_and_input_scaling_agree():
    c = tiny_ar.get_config()
    c.model.target_norm, c.model.match_sigma_data = 0.25, True
    task = get_task(c)
    E, D = np.asarray(task.E), task.target_dim
    assert np.isclose(task.sigma_data, 0.25 / np.sqrt(D))
    tokens = np.arange(40) % task.vocab.size
    y = E[tokens]                                     # the training targets
    np.testing.assert_allclose(np.sqrt((y ** 2).mean()), task.sigma_data, rtol=1e-5)   # per-coordinate RMS
    onehot = 1e4 * jax.nn.one_hot(tokens, task.vocab.size)
    np.testing.assert_allclose(targets.bridge(onehot, task.E), y, atol=1e-6)            # the bridge's rows
    eps = np.random.default_rng(0).standard_normal((4000, D))
    for s in (0.002, 0.02, 0.2, 2.0, 80.0):           # c_in z has unit RMS per coordinate at every sigma
        z = E[np.arange(4000) % task.vocab.size] + s * eps
        rms = np.sqrt(((edm_lib.precondition(s, task.sigma_data).c_in * z) ** 2).mean())
        assert abs(rms - 1.0) < 0.03, (s, rms)


def test_likelihood_term_makes_an_untrained_block_the_exact_uniform_prior_posterior():
    """With model.likelihood the zero-initialised head leaves exactly (<z, E_v> - |E_v|^2/2) / sigma^2 (raw z), the
    Bayes posterior under a uniform prior, in the teacher-forced pass and in the cached noisy row alike."""
    c = tiny_ar.get_config()
    c.model.likelihood, c.model.target_norm, c.model.match_sigma_data = True, 1.0, True
    c.method = "dblocks"
    task = get_task(c)
    unit = task.units("dblocks")[1]
    model = task.make_model(unit)
    params = task.init_params(model, jax.random.PRNGKey(0), task.dummy_batch())   # zero head: network logits 0
    tokens = jnp.asarray(np.arange(32).reshape(2, 16) % task.vocab.size)
    sigma = jnp.full((2, 16), 0.3)
    z = task.E[tokens] + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (2, 16, task.target_dim))
    logits = task.noisy_logits(model, params, tokens, z, sigma)
    E = np.asarray(task.E)
    want = (np.asarray(z) @ E.T - 0.5 * (E ** 2).sum(-1)) / 0.09
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(likelihood_logits(z, sigma, task.E), want, rtol=1e-4, atol=1e-3)
    fns = task.block_fns(model, "softmax")
    _, cache = fns["prefill"](params, tokens[:, :5])
    _, row = fns["noisy_row"](params, cache, z[:, 5:6], jnp.full((2,), 0.3), 5, jax.random.PRNGKey(0), tokens[:, 4])
    np.testing.assert_allclose(row, want[:, 5], rtol=1e-4, atol=1e-3)


def test_prior_head_reads_no_z_and_trains_the_prior_cross_entropy():
    """model.lm_head='prior': the network's logits do not depend on z (random, non-zero params), the posterior is
    those logits plus the exact likelihood term, and the loss is the CE of the network's logits alone. For an
    untrained block (zero head) that CE is log V at any sigma, where the posterior's CE at low sigma is near 0."""
    c = tiny_ar.get_config()
    c.model.likelihood, c.model.target_norm, c.model.match_sigma_data, c.model.lm_head = True, 1.0, True, "prior"
    c.edm.loss_weighting = "none"
    run = random_run(c, "dblocks")
    task, model, params = run.task, run.models[1], run.params[1]
    tokens = jnp.asarray(np.arange(32).reshape(2, 16) % task.vocab.size)
    sigma = jnp.full((2, 16), 0.05)
    z1 = task.E[tokens] + 0.05 * jax.random.normal(jax.random.PRNGKey(1), (2, 16, task.target_dim))
    z2 = jax.random.normal(jax.random.PRNGKey(2), z1.shape)
    prior1 = task.noisy_logits(model, params, tokens, z1, sigma, prior_only=True)
    prior2 = task.noisy_logits(model, params, tokens, z2, sigma, prior_only=True)
    assert float(jnp.abs(prior1).max()) > 1e-3
    np.testing.assert_allclose(prior1, prior2, atol=1e-5)
    np.testing.assert_allclose(task.noisy_logits(model, params, tokens, z1, sigma),
                               prior1 + likelihood_logits(z1, sigma, task.E), rtol=1e-5, atol=1e-3)
    zero = task.init_params(model, jax.random.PRNGKey(0), task.dummy_batch())   # zero head: prior logits 0
    loss, _ = task.loss(model, zero, {"tokens": tokens}, jax.random.PRNGKey(3), (0.002, 0.01))
    np.testing.assert_allclose(float(loss), np.log(task.vocab.size), rtol=1e-5)
    c.model.lm_head = "posterior"
    post = get_task(c)
    loss, _ = post.loss(model, zero, {"tokens": tokens}, jax.random.PRNGKey(3), (0.002, 0.01))
    assert float(loss) < 0.1


def test_prior_head_needs_the_likelihood_term():
    c = tiny_ar.get_config()
    c.model.lm_head = "prior"
    assert any("lm_head" in p for p in get_task(c).validate())
    c.model.lm_head = "prior-ish"
    assert any("lm_head" in p for p in get_task(c).validate())


# -- sampler options ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def db_run():
    return random_run(tiny_ar.get_config(), "dblocks")


def test_grids_explicit_and_ending_above_sigma_min(db_run):
    task = db_run.task
    s = task.sampler_options(db_run, sigma_end=0.1, grid_points=4)
    assert len(s.grid) == 4 and s.grid[0] == task.edm.sigma_max and np.isclose(s.grid[-1], 0.1)
    assert task.sampler_options(db_run, grid="80,0.45,0.2,0.1").grid == (80.0, 0.45, 0.2, 0.1)
    assert task.sampler_options(db_run, grid="80,0.5,0.1", solver="heun").calls_per_token == 5
    assert task.sampler_options(db_run, grid_points=6).calls_per_token == 6   # the CLI's --grid_points
    with pytest.raises(ValueError):
        parse_grid("0.1,0.5")
    # the token is drawn from the last call: generation runs and reports the calls
    out, calls = task.generate(db_run, np.ones((2, 4), np.int32), 3, 0,
                                   task.sampler_options(db_run, grid="80,0.45,0.1"))
    assert out.shape == (2, 3) and calls == 3


def test_temperature_acts_on_the_last_calls_softmax(db_run):
    task = db_run.task
    prompts = np.tile(np.arange(4, dtype=np.int32), (64, 1))
    smp = lambda t: task.sampler_options(db_run, grid="80,0.45,0.1", temperature=t, top_p=1.0)  # noqa
    cold, _ = task.generate(db_run, prompts, 1, 0, smp(0.05))
    hot, _ = task.generate(db_run, prompts, 1, 0, smp(5.0))
    assert len(np.unique(hot)) > len(np.unique(cold))


# -- judges and references ----------------------------------------------------------------------------------------

def test_ngram_is_normalised_and_matches_counts():
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 5, 3000)
    m = ngram.NGram(stream, 5, order=3)
    ctx = np.array([[1, 2, 3]])
    probs = [np.exp(m.logprobs(np.concatenate([ctx, [[v]]], 1), 3)[0, 0]) for v in range(5)]
    np.testing.assert_allclose(sum(probs), 1.0, rtol=1e-9)
    # order 1 alone is the add-beta-to-uniform unigram
    m1 = ngram.NGram(stream, 5, order=1)
    counts = np.bincount(stream, minlength=5)
    np.testing.assert_allclose(np.exp(m1.logprobs(np.array([[0, 2]]), 1))[0, 0],
                               (counts[2] + 5 * 0.2) / (len(stream) + 5))


def test_ensemble_of_one_run_twice_is_that_run():
    run = random_run(tiny_ar.get_config(), "e2e")
    w = (np.arange(64).reshape(4, 16) % 20).astype(np.int32)
    ens = run.task.ensemble_bits([run, run], w, 4)
    single = text_metrics.bits_per_token(run.task.window_logprobs(run, w, jax.random.PRNGKey(0), 1)["logp"])
    assert np.isclose(ens["mixture_bits"], single, atol=1e-5) and np.isclose(ens["product_bits"], single, atol=1e-5)


def test_char_entropy():
    assert text_metrics.char_entropy_bits(["abab"]) == pytest.approx(1.0)
    assert text_metrics.char_entropy_bits(["aaaa"]) == pytest.approx(0.0)


def test_mauve_separates_shifted_features():
    pytest.importorskip("mauve")
    rng = np.random.default_rng(0)
    p, q = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    assert text_metrics.mauve_score(p, q) > 0.9
    assert text_metrics.mauve_score(p, q + 3.0) < 0.2
