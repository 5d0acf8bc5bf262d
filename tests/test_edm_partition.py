"""The functional core: EDM formulas, the partition, grids and ODE steps (values from docs/method.md)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dblocks import edm as E
from dblocks import partition as P

EDM = E.EDM()


def test_b3_boundaries_match_paper():
    b = P.make_partition(3, EDM).boundaries
    np.testing.assert_allclose(b, [0.002, 0.1796, 0.5050, 80.0], rtol=5e-4)


@pytest.mark.parametrize("B,expected", [(2, [0.002, 0.3012, 80]), (4, [0.002, 0.1341, 0.3012, 0.6766, 80]),
                                        (6, [0.002, 0.0943, 0.1796, 0.3012, 0.5050, 0.9617, 80])])
def test_other_boundaries_match_method_table(B, expected):
    np.testing.assert_allclose(P.make_partition(B, EDM).boundaries, expected, rtol=5e-4)


def test_equiprobable_blocks_have_equal_mass():
    b = np.array(P.make_partition(5, EDM).boundaries)
    cdf = stats.norm.cdf((np.log(b) - EDM.p_mean) / EDM.p_std)
    np.testing.assert_allclose(np.diff(cdf), np.full(5, (cdf[-1] - cdf[0]) / 5), rtol=1e-6)
    assert np.all(np.diff(b) > 0)


def test_b3_gamma005_training_ranges():
    r = P.make_partition(3, EDM, gamma=0.05).ranges  # block order: 0 = highest noise
    np.testing.assert_allclose(r[0], [0.3920, 80.0], rtol=5e-4)
    np.testing.assert_allclose(r[1], [0.1706, 0.5318], rtol=5e-4)
    np.testing.assert_allclose(r[2], [0.002, 0.2249], rtol=5e-4)


def test_gamma01_ranges_and_clamp():
    r = P.make_partition(4, EDM, gamma=0.1).ranges
    np.testing.assert_allclose(r[::-1], [[0.002, 0.2042], [0.1237, 0.3266], [0.2778, 0.7337], [0.4198, 80]],
                               rtol=5e-4)
    assert r[0][1] == 80.0 and r[-1][0] == 0.002  # clamped to the global range


def test_negative_gamma_refused():
    with pytest.raises(ValueError, match="gamma"):
        P.make_partition(3, EDM, gamma=-0.1)


def test_loguniform_partition():
    b = P.make_partition(3, EDM, kind="loguniform").boundaries
    np.testing.assert_allclose(np.diff(np.log(b)), np.full(3, np.log(80 / 0.002) / 3), rtol=1e-9)


def test_block_of_direction_and_boundaries():
    p = P.make_partition(3, EDM)
    chex.assert_trees_all_equal(p.block_of(jnp.array([80.0, 1.0, 0.3, 0.1, 0.002])), jnp.array([0, 0, 1, 2, 2]))
    # every level inside a block's own interval maps to that block
    for b in range(3):
        lo, hi = p.interval(b)
        mid = np.sqrt(lo * hi)
        assert int(p.block_of(mid)) == b


def test_cdf_grid_50_points_gives_17_16_16():
    grid = E.cdf_grid(50, EDM)
    assert float(grid[0]) == 80.0 and abs(float(grid[-1]) - 0.002) < 1e-9
    counts = P.steps_per_block(grid, P.make_partition(3, EDM))
    np.testing.assert_array_equal(counts, [17, 16, 16])


def test_karras_grid_endpoints_and_monotone():
    g = np.asarray(E.karras_grid(18, 0.002, 80.0))
    np.testing.assert_allclose([g[0], g[-1]], [80.0, 0.002], rtol=1e-5)
    assert np.all(np.diff(g) < 0)


def test_grid_too_short_is_an_error():
    p = P.make_partition(3, EDM)
    with pytest.raises(ValueError, match="never runs block"):
        P.steps_per_block(E.cdf_grid(2, EDM), p)
    with pytest.raises(ValueError, match="at least 2 points"):
        E.cdf_grid(1, EDM)
    # B points, equal in CDF: one call per block (classification's default)
    np.testing.assert_array_equal(P.grid_blocks(E.cdf_grid(3, EDM), p), [0, 1, 2])
    np.testing.assert_array_equal(P.grid_blocks(E.cdf_grid(4, EDM), P.make_partition(4, EDM)), [0, 1, 2, 3])


def test_sampled_sigma_stays_in_range_and_fits_truncated_lognormal():
    p = P.make_partition(3, EDM, gamma=0.05)
    for b, (lo, hi) in enumerate(p.ranges):
        s = np.asarray(P.sample_block_sigma(jax.random.PRNGKey(b), (20000,), jnp.array([lo, hi]), EDM))
        assert s.min() >= lo and s.max() <= hi
        a, c = (np.log(lo) - EDM.p_mean) / EDM.p_std, (np.log(hi) - EDM.p_mean) / EDM.p_std
        ks = stats.kstest(np.log(s), stats.truncnorm(a, c, loc=EDM.p_mean, scale=EDM.p_std).cdf)
        assert ks.pvalue > 1e-3, (b, ks)


def test_b1_is_ordinary_edm_training():
    p = P.make_partition(1, EDM, gamma=0.05)
    assert p.ranges == ((0.002, 80.0),)
    s = np.asarray(P.sample_block_sigma(jax.random.PRNGKey(0), (20000,), jnp.array(p.ranges[0]), EDM))
    # the truncation at [0.002, 80] removes only 1.6e-5 of the mass: ln sigma ~ N(-1.2, 1.2)
    assert abs(np.log(s).mean() - EDM.p_mean) < 0.03 and abs(np.log(s).std() - EDM.p_std) < 0.03
    assert int(p.block_of(80.0)) == 0 and int(p.block_of(0.002)) == 0


def test_loss_is_weighted_per_sample():
    sigma = jnp.array([0.01, 0.1, 1.0, 10.0])
    loss = jnp.array([4.0, 3.0, 2.0, 1.0])
    w = E.loss_weight(sigma, 0.5, "edm")
    weighted = E.weighted_mean(loss, w)
    chex.assert_shape(loss * w, (4,))
    np.testing.assert_allclose(weighted, np.mean(np.asarray(loss) * np.asarray(w)), rtol=1e-6)
    assert not np.isclose(float(weighted), float(loss.mean() * w.mean()), rtol=1e-3)
    with pytest.raises(ValueError, match="broadcast"):
        E.weighted_mean(loss, w[:, None])


def test_loss_weight_modes():
    sigma = jnp.array([0.002, 0.5, 80.0])
    lam = E.loss_weight(sigma, 0.5, "edm")
    np.testing.assert_allclose(lam, (sigma**2 + 0.25) / (0.25 * sigma**2), rtol=1e-6)
    # lambda(0.1) = 0.26 / 0.0025 by hand (lambda is symmetric in sigma, sigma_data: the swap is caught below)
    np.testing.assert_allclose(E.loss_weight(jnp.array([0.1, 2.0]), 0.5, "edm"), [104.0, 4.25], rtol=1e-5)
    np.testing.assert_array_equal(E.loss_weight(sigma, 0.5, "none"), 1.0)
    c = E.loss_weight(sigma, 0.5, "clamped", max_weight=10.0)
    assert float(c.max()) == 10.0 and abs(float(c[1]) - 1.0) < 1e-6
    with pytest.raises(ValueError):
        E.loss_weight(sigma, 0.5, "bogus")


@pytest.mark.parametrize("sigma,expected", [
    # by hand, sigma_data = 0.5: s2 = sigma^2 + 0.25; c_skip = 0.25/s2, c_out = 0.5 sigma/sqrt(s2), c_in = 1/sqrt(s2)
    (0.1, [0.25 / 0.26, 0.05 / np.sqrt(0.26), 1 / np.sqrt(0.26), 0.25 * np.log(0.1)]),    # c_skip 0.9615
    (2.0, [0.25 / 4.25, 1.0 / np.sqrt(4.25), 1 / np.sqrt(4.25), 0.25 * np.log(2.0)]),     # c_skip 0.0588
    (0.5, [0.5, 0.25 / np.sqrt(0.5), 1 / np.sqrt(0.5), 0.25 * np.log(0.5)]),
])
def test_preconditioning_values(sigma, expected):
    """Away from sigma = sigma_data, where swapping sigma and sigma_data in c_skip (0.9615 <-> 0.0385 at 0.1)
    changes the value."""
    pc = E.precondition(jnp.array(sigma), 0.5)
    np.testing.assert_allclose([pc.c_skip, pc.c_out, pc.c_in, pc.c_noise], expected, rtol=1e-5)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 2.0, 30.0])
def test_preconditioning_gives_unit_variance_input_and_unit_initial_loss(sigma):
    """EDM's design goals, by Monte Carlo on data of std sigma_data: the network input c_in * z has unit variance,
    and an untrained network (F = 0, so D = c_skip z) has lambda-weighted loss 1 at every sigma. A swapped c_skip
    gives lambda * E[(c_skip z - y)^2] = 25 at sigma 0.1 and 0.07 at sigma 2."""
    rng = np.random.default_rng(0)
    y = 0.5 * rng.standard_normal(200_000)
    z = y + sigma * rng.standard_normal(y.shape)
    pc = E.precondition(jnp.array(sigma), 0.5)
    np.testing.assert_allclose(np.var(float(pc.c_in) * z), 1.0, rtol=0.02)
    initial_loss = float(E.loss_weight(jnp.array(sigma), 0.5, "edm")) * np.mean((float(pc.c_skip) * z - y) ** 2)
    np.testing.assert_allclose(initial_loss, 1.0, rtol=0.02)


def _oracle_walk(solver, n=30):
    y = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    oracle = lambda z, s: y  # noqa: E731
    grid = np.asarray(E.cdf_grid(n, EDM))
    z = E.initial_noise(jax.random.PRNGKey(2), y.shape, EDM.sigma_max)
    for s, s_next in zip(grid[:-1], grid[1:]):
        d = oracle(z, s)
        z = E.euler_step(z, d, s, s_next) if solver == "euler" else E.heun_step(oracle, z, d, s, s_next)
    return z, y, grid


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_oracle_denoiser_lands_on_target(solver):
    z, y, grid = _oracle_walk(solver)
    # with D = y the exact ODE solution is z(sigma) = y + (sigma / sigma_max) z0, and Euler is exact on it:
    # at sigma_min the residual is sigma_min * eps (about 0.002 per coordinate)
    np.testing.assert_allclose(z, y, atol=4 * grid[-1])


def test_euler_sign_blends_toward_denoised():
    z, d = jnp.array([[10.0]]), jnp.array([[0.0]])
    out = E.euler_step(z, d, 1.0, 0.25)
    np.testing.assert_allclose(out, [[2.5]])  # the paper's printed '+' would give 17.5
