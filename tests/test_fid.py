"""Frechet distance against closed forms, and the feature-network artifact and FID protocol on synthetic data."""
import numpy as np
import pytest
import scipy.linalg

from dblocks import data as data_lib
from dblocks import fid


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_frechet_distance_of_diagonal_and_commuting_gaussians():
    mu1, mu2 = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, 0.5])
    a, b = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)   # = 10 + 1 + 4 = 15
    assert expected == pytest.approx(15.0)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    q = _rotation(3, 0)  # same eigenvectors: the formula holds in any rotated basis
    assert fid.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(
        expected, rel=1e-7)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert fid.frechet_distance(np.array([3.0]), np.array([[4.0]]), np.array([1.0]), np.array([[1.0]])) == \
        pytest.approx(4.0 + 1.0)


def test_frechet_distance_of_general_gaussians():
    rng = np.random.default_rng(1)
    d = 5
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # independent form: tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), with symmetric square roots
    r1 = scipy.linalg.sqrtm(c1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(r1 @ c2 @ r1).real)
    got = fid.frechet_distance(mu1, c1, mu2, c2)
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(fid.frechet_distance(mu2, c2, mu1, c1), rel=1e-6)   # symmetric
    assert fid.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)


def test_empirical_stats_converge():
    rng = np.random.default_rng(2)
    cov = np.array([[2.0, 0.5], [0.5, 1.0]])
    x = rng.multivariate_normal([1.0, -1.0], cov, size=200_000)
    mu, c = fid.gaussian_stats(x)
    assert fid.frechet_distance(mu, c, np.array([1.0, -1.0]), cov) < 1e-3
    assert fid.frechet_distance(mu, c, np.array([2.0, -1.0]), cov) == pytest.approx(1.0, abs=1e-2)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    sources = lambda split: data_lib.synthetic_images(split, num_classes=4, size=8, channels=1)  # noqa: E731
    to_batch = lambda ex: (data_lib.to_model_range(ex["image"]), ex["label"])  # noqa: E731
    key = {"name": "synthetic", "image_size": 8}
    ext = fid.load_or_train(cache, key, sources, to_batch, 4, steps=60, batch_size=32, features=16)
    return cache, key, sources, to_batch, ext


def test_feature_network_is_trained_once_and_cached(extractor, monkeypatch):
    cache, key, sources, to_batch, ext = extractor
    assert ext.meta["test_accuracy"] > 0.5           # 4 classes: chance is 0.25
    monkeypatch.setattr(fid, "_train", lambda *a, **k: pytest.fail("retrained instead of loading the artifact"))
    again = fid.load_or_train(cache, key, sources, to_batch, 4, steps=60, batch_size=32, features=16)
    images = to_batch(sources("test").get(np.arange(50)))[0]
    np.testing.assert_array_equal(again.features(images), ext.features(images))
    assert again.meta == ext.meta
    assert fid.artifact_dir(cache, {**key, "image_size": 16}, 60, 0, 16) != ext.meta["path"]


def test_protocol_min_of_repeats(extractor):
    _, _, sources, to_batch, ext = extractor
    ref = to_batch(sources("test").get(np.arange(400)))[0]
    rng = np.random.default_rng(0)

    def sample_fn(r, start, count):   # repeat 0 returns the reference itself; repeat 1 adds noise
        x = ref[start:start + count]
        return x if r == 0 else np.clip(x + 0.5 * rng.normal(size=x.shape), -1, 1)

    out = fid.evaluate_samples(ext, ref, sample_fn, num_samples=400, repeats=2, batch_size=100)
    assert abs(out["fids"][0]) < 1e-3, out["fids"]          # the reference against itself (round-off only)
    assert out["fids"][1] > 0.1, out["fids"]
    assert out["fid_min"] == min(out["fids"]) and out["seconds_per_image"] > 0
