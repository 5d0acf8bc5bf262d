"""Autoregressive DiffusionBlocks: the [clean ; noisy] mask and positions, causality of the model, the cached decoder
against the uncached one, the loss, validation, and an end-to-end train/evaluate/sample of the tiny config."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dblocks import assemble, textgen
from dblocks.assemble import randomize, random_run
from dblocks import train as train_lib
from dblocks import config as config_lib
from dblocks.models import ar as ar_model
from dblocks.tasks import get_task
from experiments.configs import tiny_ar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ar_runs():
    runs = {m: random_run(tiny_ar.get_config(), m) for m in ("dblocks", "e2e")}
    c = tiny_ar.get_config()
    c.model.prev_token = True    # noisy row i also reads token i-1: the cache path must pass it (state "last")
    runs["dblocks_prev"] = random_run(c, "dblocks")
    runs["dblocks_t"] = random_run(t_layout_config(), "dblocks")
    return runs


def t_layout_config():
    """tiny_ar with the prior head (needs the likelihood term) in the T-row layout. The grid stops at 0.5: at
    sigma_min the likelihood term (/ sigma^2) scales float rounding in z into logit differences that flip draws
    between two compilations of the same chain."""
    c = tiny_ar.get_config()
    c.model.lm_head, c.model.likelihood, c.model.ar_layout = "prior", True, "t"
    c.sample.grid = "80,0.5"
    return c


# -- mask and positions ------------------------------------------------------------------------------------------

def test_ar_mask_matches_its_definition():
    T = 6
    m = ar_model.ar_mask(T)
    assert m.shape == (2 * T, 2 * T)
    for r in range(2 * T):
        for k in range(2 * T):
            if r < T:      # clean row r: clean keys k <= r, no noisy key
                want = k < T and k <= r
            else:          # noisy row i = r - T: clean keys j < i, and itself
                i = r - T
                want = (k < T and k < i) or k == r
            assert m[r, k] == want, (r, k)
    # no row sees a future token: every allowed key sits at a position <= the row's position, and a noisy row's
    # only key at its own position is itself (not the clean token it is denoising)
    pos = ar_model.ar_positions(T)
    key_pos, row_pos = np.broadcast_to(pos[None, :], m.shape), np.broadcast_to(pos[:, None], m.shape)
    assert np.all(key_pos[m] <= row_pos[m])
    assert not np.any(m[T:, :T] & (key_pos[T:, :T] == row_pos[T:, :T]))


def test_positions_are_reused():
    np.testing.assert_array_equal(ar_model.ar_positions(4), [0, 1, 2, 3, 0, 1, 2, 3])


@pytest.fixture(scope="module")
def tiny_model():
    T, V, D = 8, 11, 16
    model = ar_model.ARModel(vocab=V, num_layers=2, hidden=16, heads=2, mlp_ratio=2.0, diffusion=True)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, V)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, T, D))
    c = jax.random.normal(jax.random.PRNGKey(2), (2, T))
    params = jax.jit(lambda k: randomize(model.init(k, tokens, z, c)["params"], k))(jax.random.PRNGKey(3))
    return model, params, tokens, z, c


def test_perturbing_a_token_changes_nothing_before_it(tiny_model):
    model, params, tokens, z, c = tiny_model
    f = jax.jit(lambda t, zz: model.apply({"params": params}, t, zz, c))
    base = f(tokens, z)
    T = tokens.shape[1]
    for j in range(T):
        t2 = tokens.at[:, j].set((tokens[:, j] + 1) % model.vocab)
        out = f(t2, z)
        # noisy row i reads clean tokens < i: rows i <= j are unchanged, rows i > j do change
        np.testing.assert_allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-5)
        if j < T - 1:
            assert np.abs(out[:, j + 1:] - base[:, j + 1:]).max() > 1e-4
        # a noisy input z_j reaches only its own row
        out_z = f(tokens, z.at[:, j].add(1.0))
        others = np.delete(np.arange(T), j)
        np.testing.assert_allclose(out_z[:, others], base[:, others], atol=1e-5)
        assert np.abs(out_z[:, j] - base[:, j]).max() > 1e-4


def test_plain_lm_is_causal(ar_runs):
    run = ar_runs["e2e"]
    model, params = run.models[0], run.params[0]
    tokens = jnp.asarray(np.arange(32).reshape(2, 16) % 20)
    f = jax.jit(lambda t: model.apply({"params": params}, t))
    base = f(tokens)
    j = 5
    out = f(tokens.at[:, j].set((tokens[:, j] + 1) % 20))
    np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-5)
    assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-4


def test_cached_rows_equal_the_full_pass_only_with_reused_positions(tiny_model):
    """Noisy row i computed against the clean cache at position i equals the 2T pass; at position i + T it does not
    (so the 2T pass really puts noisy row i at position i)."""
    model, params, tokens, z, c = tiny_model
    T, i = tokens.shape[1], 5
    @jax.jit
    def rows(pos):
        full = model.apply({"params": params}, tokens, z, c)
        _, kvs = model.apply({"params": params}, tokens, jnp.arange(T)[None], ar_model.causal_mask(T),
                             method=model.clean_rows)
        cache = ar_model.write_cache(ar_model.empty_cache(2, 2, T, 2, 8), kvs, 0)
        row = model.apply({"params": params}, z[:, i:i + 1], c[:, i:i + 1], jnp.full((1, 1), pos),
                          ar_model.prefix_mask(i, T), cache, method=model.noisy_rows)
        return row[:, 0], full[:, i]
    for pos, same in ((i, True), (i + T, False)):
        row, full = rows(pos)
        assert np.allclose(row, full, atol=1e-5) == same


# -- the T-row layout (prior head) ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t_model():
    T, V, D = 8, 11, 16
    kw = dict(vocab=V, num_layers=2, hidden=16, heads=2, mlp_ratio=2.0)
    model, lm = ar_model.ARModel(**kw, diffusion=True, layout="t"), ar_model.ARModel(**kw, diffusion=False)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, V)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, T, D))
    c = jax.random.normal(jax.random.PRNGKey(2), (2, T))
    params = jax.jit(lambda k: randomize(model.init(k, tokens, z, c)["params"], k))(jax.random.PRNGKey(3))
    return model, lm, params, tokens, z, c


def test_t_layout_row_i_reads_only_tokens_before_i(t_model):
    """Row i of the T layout is the prediction of token i: it must not see token i or later ones (a read-out from
    row i instead of row i - 1 would leak token i), and it reads no z."""
    model, _, params, tokens, z, c = t_model
    f = jax.jit(lambda t, zz: model.apply({"params": params}, t, zz, c))
    base = f(tokens, z)
    T = tokens.shape[1]
    for j in range(T):
        out = f(tokens.at[:, j].set((tokens[:, j] + 1) % model.vocab), z)
        np.testing.assert_allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-5)
        if j < T - 1:
            assert np.abs(out[:, j + 1:] - base[:, j + 1:]).max() > 1e-4
    np.testing.assert_array_equal(f(tokens, z + 1.0), base)
    # sigma_i reaches row i only
    out = jax.jit(lambda cc: model.apply({"params": params}, tokens, z, cc))(c.at[:, 3].add(1.0))
    np.testing.assert_allclose(np.delete(np.asarray(out), 3, axis=1), np.delete(np.asarray(base), 3, axis=1),
                               atol=1e-5)
    assert np.abs(out[:, 3] - base[:, 3]).max() > 1e-4


def test_t_layout_is_the_causal_lm_with_a_sigma_head(t_model):
    """The T-layout block has the plain causal LM's parameter tree, and at the clean rows' sentinel noise level its
    row i is the LM's row i - 1: the same trunk (that of the 2T layout's clean rows), read one row later."""
    model, lm, params, tokens, z, _ = t_model
    lm_params = lm.init(jax.random.PRNGKey(0), tokens)["params"]
    assert jax.tree.structure(lm_params) == jax.tree.structure(params)
    sentinel = jnp.full(tokens.shape, 0.25 * np.log(model.sigma_min))
    out = model.apply({"params": params}, tokens, z, sentinel)
    ref = lm.apply({"params": params}, tokens)
    np.testing.assert_allclose(out[:, 1:], ref[:, :-1], rtol=1e-4, atol=1e-4)


def test_t_layout_validation_and_compute():
    c = t_layout_config()
    c.model.lm_head = "posterior"
    with pytest.raises(config_lib.ConfigError, match="ar_layout='t' needs model.lm_head='prior'"):
        config_lib.validate(c)
    c.model.ar_layout = "3t"
    with pytest.raises(config_lib.ConfigError, match="model.ar_layout='3t'"):
        config_lib.validate(c)
    c = t_layout_config()
    config_lib.validate(c)
    L, B = c.model.num_layers, c.blocks.num_blocks
    assert get_task(c).training_compute("dblocks")["forward_layer_rows_per_token"] == L // B
    assert get_task(tiny_ar.get_config()).training_compute("dblocks")["forward_layer_rows_per_token"] == 2 * L // B


# -- decoding ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dblocks", "dblocks_prev", "dblocks_t", "e2e"])
def test_cached_generation_equals_uncached(ar_runs, method):
    run = ar_runs[method]
    prompts = np.array([[1, 2, 3, 4, 9, 10, 11, 12], [5, 6, 7, 8, 13, 14, 15, 16]], np.int32)   # T/2: one prefill shape
    # logits of the next token after a few generated ones (same noise key for both decoders)
    dec_c, dec_u = (run.task.decoder(run, 2, use_cache=u) for u in (True, False))
    sc, su = dec_c.prefill(prompts), dec_u.prefill(prompts)
    for t in range(5):
        key = jax.random.PRNGKey(t)
        lc, lu = dec_c.next_logits(sc, key), dec_u.next_logits(su, key)
        np.testing.assert_allclose(lc, lu, rtol=1e-4, atol=1e-3)
        tok = np.asarray(jnp.argmax(lc, -1), np.int32)
        sc, su = dec_c.append(sc, tok), dec_u.append(su, tok)
    # whole sampled generations, past the window length (16): the re-prefilled window agrees too
    a, calls = run.task.generate(run, prompts, 12, seed=3, use_cache=True)
    b, _ = run.task.generate(run, prompts, 12, seed=3, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert calls == (1 if method == "e2e" else 2)


def test_sample_token_top_p_and_greedy():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.PRNGKey(0)
    assert set(np.asarray(textgen.sample_token(logits, keys, greedy=True))) == {0}
    drawn = np.asarray(textgen.sample_token(logits, keys, top_p=0.7))
    assert set(drawn) == {0, 1}                       # 0.5 < 0.7 needs the second; 0.8 >= 0.7 stops
    assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.03
    full = np.asarray(textgen.sample_token(logits, keys))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / len(full), [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_p_without_a_sort_keeps_the_sorted_set(monkeypatch):
    """Small vocabularies filter top-p by pairwise comparison; it keeps exactly the set the stable sort keeps, ties
    (ranked by index) included, so both draw the same tokens."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(np.round(rng.normal(size=(256, 65)), 1), jnp.float32)   # rounded: many exact ties
    key = jax.random.PRNGKey(3)
    draws = {}
    for limit in (textgen._PAIRWISE_TOP_P, 0):   # 0: every vocabulary takes the sort
        monkeypatch.setattr(textgen, "_PAIRWISE_TOP_P", limit)
        draws[limit] = [np.asarray(textgen.sample_token(logits, key, top_p=p)) for p in (0.3, 0.9)]
    for a, b in zip(*draws.values()):
        np.testing.assert_array_equal(a, b)
    assert len(set(draws[0][0].tolist())) < len(set(draws[0][1].tolist()))   # the two top_p differ


# -- loss and config ------------------------------------------------------------------------------------------------

def test_loss_is_per_token_weighted_cross_entropy():
    """The loss is mean_i(lambda(sigma_i) * CE_i) over tokens, sigma drawn per token inside the block's range (a
    stand-in read-out, logits = z . E^T, keeps it model-free)."""
    c = tiny_ar.get_config()
    c.edm.loss_weighting = "edm"
    task = get_task(c)
    tokens = jnp.asarray(np.arange(48).reshape(3, 16) % 20)
    seen = {}

    def logits_fn(z, sigma):
        seen["sigma"] = sigma
        return z @ task.E.T

    loss, metrics = task.denoising_loss(logits_fn, task.noisy_targets(tokens, jax.random.PRNGKey(0),
                                                                       jnp.asarray([0.1, 2.0])))
    sigma = np.asarray(seen["sigma"])
    assert sigma.shape == tokens.shape and len(np.unique(sigma)) == sigma.size     # one sigma per token
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    _, k_eps = jax.random.split(jax.random.PRNGKey(0))   # the loss's own noise, to recompute its CE here
    z = task.E[tokens] + seen["sigma"][..., None] * jax.random.normal(k_eps, task.E[tokens].shape)
    ce = optax.softmax_cross_entropy_with_integer_labels(z @ task.E.T, tokens)
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    np.testing.assert_allclose(loss, np.mean(np.asarray(ce) * lam), rtol=1e-4)
    np.testing.assert_allclose(metrics["ce"], np.mean(ce), rtol=1e-5)
    assert abs(float(loss) - float(np.mean(ce)) * float(np.mean(lam))) > 1e-3   # not the broadcast-bug value


def test_target_rows_follow_the_scale_contract_or_target_norm():
    c = tiny_ar.get_config()
    D = c.model.hidden
    norms = np.linalg.norm(np.asarray(get_task(c).E), axis=1)
    np.testing.assert_allclose(norms, c.edm.sigma_data * np.sqrt(D), rtol=1e-5)
    c.model.target_norm = 1.0
    np.testing.assert_allclose(np.linalg.norm(np.asarray(get_task(c).E), axis=1), 1.0, rtol=1e-5)


def test_validate_reports_bad_values():
    c = tiny_ar.get_config()
    c.model.heads = 3
    c.sample.bridge = "nope"
    c.sample.grid_points = 1
    c.sample.grid = "1.0,2.0"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    msg = str(e.value)
    assert "model.hidden" in msg and "sample.bridge" in msg and "sample.grid_points" in msg and "sample.grid:" in msg


# -- the whole path: train, assemble, evaluate, sample ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("tiny_ar"))
    c = tiny_ar.get_config()
    train_lib.train(c, wd)
    return wd


def test_train_evaluate_and_write_samples(trained, tmp_path):
    run = assemble.load_run(trained)
    res = run.task.evaluate(run, max_windows=4, num_samples=2, max_tokens=6)
    json.dumps(res)
    assert res["headline"]["name"] == "bits_per_char" and np.isfinite(res["headline"]["value"])
    assert res["num_draws"] == 2 and res["block_calls_per_token"] == 2 and "block_calls_per_sample" not in res
    assert len(res["per_step"]["values"]) == 2
    assert 0 <= res["next_token_accuracy"] <= 1
    g = res["generation"]
    assert g["new_tokens"] == 6 and "distinct_2" in g and "gen_ppl" not in g   # no e2e run given: no gen-PPL
    out = run.task.write_samples(run, str(tmp_path / "s.txt"), prompt="the king", max_tokens=5, num_samples=2)
    text = open(out["path"]).read()
    assert text.count("=== sample") == 2 and "the king[[" in text


def test_generated_text_is_judged_by_another_run_never_by_itself(ar_runs):
    kw = dict(max_windows=2, num_samples=2, max_tokens=4, mauve=False, temperatures=(), elbo_sigmas=2)
    e2e, blocks = ar_runs["e2e"], ar_runs["dblocks"]
    assert "gen_ppl" in blocks.task.evaluate(blocks, judge=e2e, **kw)["generation"]   # a plain LM judges the blocks
    for judge in (None, e2e):   # an e2e run evaluated alone, or handed itself: no perplexity of its own samples
        g = e2e.task.evaluate(e2e, judge=judge, **kw)["generation"]
        assert "gen_ppl" not in g and "gen_ppl_e2e" not in g and g["judge"] is None and "gen_ppl_ngram" in g


@pytest.mark.slow
def test_t_layout_trains_evaluates_and_samples(tmp_path):
    wd = str(tmp_path / "t")
    train_lib.train(t_layout_config(), wd)
    run = assemble.load_run(wd)
    assert "z_in" not in run.params[0] and run.models[0].layout == "t"
    res = run.task.evaluate(run, max_windows=4, num_samples=2, max_tokens=6, mauve=False)
    assert np.isfinite(res["headline"]["value"]) and np.isfinite(res["elbo_bits"])
    assert res["generation"]["new_tokens"] == 6


@pytest.mark.slow
def test_sample_cli_writes_text(trained, tmp_path):
    out = tmp_path / "samples.txt"
    subprocess.run([sys.executable, "-m", "experiments.sample", "--workdir", trained, "--out", str(out),
                    "--prompt", "the queen", "--max_tokens", "7"], cwd=ROOT, check=True)
    assert "the queen[[" in out.read_text()
