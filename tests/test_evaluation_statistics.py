"""Feature statistics, the Fréchet distance and KID against pytorch-fid's functions and an independent KID,
and `.npz` statistics both ways between this project and pytorch-fid."""

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

from jax_uncond.errors import UsageError
from jax_uncond.evaluation.statistics import (FeatureStatistics, frechet_distance, kernel_inception_distance,
                                              kid_subsets, scores)


def features(n, dim, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (np.maximum(rng.normal(size=(n, dim)) @ mixing + shift, 0)).astype(np.float32)


@pytest.mark.parametrize("n", [8, 300])  # fewer images than dimensions: a singular covariance, as in small tests
def test_frechet_distance_equals_pytorch_fid(n):
    a = FeatureStatistics.from_features(features(n, 64, 0))
    b = FeatureStatistics.from_features(features(n + 5, 64, 1, shift=0.3))
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    theirs = calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert ours == pytest.approx(theirs, rel=1e-6) and ours > 0
    assert abs(frechet_distance(a.mu, a.sigma, a.mu, a.sigma)) < 1e-6 * np.trace(a.sigma)


def test_statistics_are_pytorch_fids():
    """float64 mean and `np.cov(rowvar=False)` of the float32 features, as calculate_activation_statistics."""
    f = features(20, 16, 2)
    stats = FeatureStatistics.from_features(f)
    act = np.empty((20, 16))  # pytorch-fid's float64 pred_arr
    act[:] = f
    np.testing.assert_array_equal(stats.mu, np.mean(act, axis=0))
    np.testing.assert_array_equal(stats.sigma, np.cov(act, rowvar=False))
    with pytest.raises(UsageError, match="at least 2 images"):
        FeatureStatistics.from_features(f[:1])


def clean_fid_kernel_distance(x_all, y_all, index_x, index_y):
    """clean-fid's `kernel_distance` loop (its algebra, not ours), on given subsets; and per-subset MMDs."""
    n = x_all.shape[1]
    m = index_x.shape[1]
    t, per_subset = 0.0, []
    for rows_x, rows_y in zip(index_x, index_y):
        x, y = x_all[rows_x].astype(np.float64), y_all[rows_y].astype(np.float64)
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        value = (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
        t += value
        per_subset.append(value / m)
    return t / len(index_x) / m, np.std(per_subset)


def test_kid_is_clean_fids_definition():
    x, y = features(30, 32, 3), features(25, 32, 4, shift=0.2)
    mean, std = kernel_inception_distance(x, y, num_subsets=7, max_subset_size=20)
    index_x, index_y = kid_subsets(30, 25, num_subsets=7, max_subset_size=20)
    assert index_x.shape == (7, 20) and all(len(set(row)) == 20 for row in index_x)
    expected_mean, expected_std = clean_fid_kernel_distance(x, y, index_x, index_y)
    assert mean == pytest.approx(expected_mean, rel=1e-9) and std == pytest.approx(expected_std, rel=1e-9)
    same_mean, _ = kernel_inception_distance(features(200, 32, 5), features(200, 32, 6), num_subsets=10)
    assert abs(same_mean) < 0.2 * mean  # unbiased: near 0 for one distribution, clearly above for two


def test_npz_both_ways(tmp_path):
    ours = FeatureStatistics.from_features(features(12, 2048, 7))
    ours.save(tmp_path / "ours.npz")
    mu, sigma = compute_statistics_of_path(str(tmp_path / "ours.npz"), None, 50, 2048, "cpu")  # pytorch-fid reads it
    np.testing.assert_array_equal(mu, ours.mu)
    np.testing.assert_array_equal(sigma, ours.sigma)
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu, sigma=sigma)  # pytorch-fid's save_fid_stats
    theirs = FeatureStatistics.load(tmp_path / "theirs.npz", 2048)
    assert theirs.features is None and theirs.num_images is None
    np.testing.assert_array_equal(theirs.sigma, ours.sigma)
    small = FeatureStatistics.from_features(features(12, 16, 8))
    without_features = FeatureStatistics(small.mu, small.sigma)
    assert scores(small, without_features)["kid_mean"] is None  # KID needs the features pytorch-fid does not keep
    np.testing.assert_array_equal(FeatureStatistics.load(tmp_path / "ours.npz", 2048).features, ours.features)


@pytest.mark.parametrize("case,message", [
    ("dimension", "dimension"), ("keys", "no `mu` and `sigma`"), ("text", "not a readable .npz")])
def test_bad_npz(tmp_path, case, message):
    path = tmp_path / "stats.npz"
    if case == "dimension":
        np.savez(path, mu=np.zeros(768), sigma=np.eye(768))  # pytorch-fid --dims 768
    elif case == "keys":
        np.savez(path, mean=np.zeros(2048))
    else:
        path.write_text("mu, sigma")
    with pytest.raises(UsageError, match=message):
        FeatureStatistics.load(path, 2048)
