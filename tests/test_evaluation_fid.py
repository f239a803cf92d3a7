"""FID/KID arithmetic and the reference-statistics cache: analytic answers, no network needed."""

import os

import numpy as np
import pytest
import scipy.linalg

from asyncpatch_jax.evaluation import fid, images


def _stats(mean, cov, count=100):
  return fid.FeatureStats(mean=np.asarray(mean, np.float64), cov=np.asarray(cov, np.float64),
                          count=count)


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_gaussians_analytic():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(_stats(mu1, np.diag(a)), _stats(mu2, np.diag(b)))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_distance_non_commuting_2d_analytic():
  # For 2×2 M with positive eigenvalues: tr √M = √(tr M + 2√det M).
  cov1 = np.array([[2.0, 0.7], [0.7, 1.0]])
  theta = 0.6
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  cov2 = rot @ np.diag([3.0, 0.2]) @ rot.T
  assert not np.allclose(cov1 @ cov2, cov2 @ cov1)
  m = cov1 @ cov2
  tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
  mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
  got = fid.frechet_distance(_stats(mu1, cov1), _stats(mu2, cov2))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_trace_sqrt_product_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  cov1, cov2 = _random_spd(rng, 40), _random_spd(rng, 40)
  expected = np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real
  np.testing.assert_allclose(fid.trace_sqrt_product(cov1, cov2), expected, rtol=1e-9)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
  # Fewer samples than dimensions, as with small CPU evaluations: rank-deficient covariances.
  rng = np.random.default_rng(2)
  scale = rng.uniform(0.1, 2.0, 256)
  f1 = rng.normal(size=(100, 256)) * scale
  f2 = rng.normal(size=(100, 256)) * scale + 0.05
  s1, s2 = fid.feature_statistics(f1), fid.feature_statistics(f2)
  between = fid.frechet_distance(s1, s2)
  assert between > 1.0
  assert fid.frechet_distance(s1, s1) < 1e-8 * np.trace(s1.cov)
  np.testing.assert_allclose(fid.frechet_distance(s2, s1), between, rtol=1e-9)


@pytest.mark.parametrize("n", [40, 300])  # fewer and more samples than dimensions
def test_frechet_distance_to_features_equals_the_full_computation(n):
  rng = np.random.default_rng(6)
  reference = fid.feature_statistics(rng.normal(size=(500, 128)) * rng.uniform(0.5, 2, 128))
  f = rng.normal(size=(n, 128)) + 0.2
  expected = fid.frechet_distance(fid.feature_statistics(f), reference)
  # The full path's rank-deficient Σ leaves round-off eigenvalues ~1e-14 whose roots add ~1e-8.
  np.testing.assert_allclose(fid.frechet_distance_to_features(f, reference), expected, rtol=1e-7)


def test_feature_statistics_float64_mean_and_unbiased_cov():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(50, 7)).astype(np.float32)
  stats = fid.feature_statistics(f)
  assert stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64 and stats.count == 50
  np.testing.assert_allclose(stats.cov, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError, match="N ≥ 2"):
    fid.feature_statistics(f[:1])
  with pytest.raises(ValueError, match="non-finite"):
    fid.feature_statistics(np.full((3, 7), np.nan))
  with pytest.raises(ValueError, match="do not match"):
    fid.frechet_distance(stats, fid.feature_statistics(f[:, :5]))


def _mmd_unbiased(x, y):
  d = x.shape[1]
  k = lambda a, b: (a @ b.T / d + 1.0) ** 3
  m = x.shape[0]
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  off = lambda km: km.sum() - np.trace(km)
  return (off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2


def test_kid_matches_the_unbiased_mmd_u_statistic():
  # With subsets as large as the sets, every subset is a permutation: the estimate is exact.
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(30, 16)), rng.normal(size=(30, 16)) + 0.3
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
  np.testing.assert_allclose(mean, _mmd_unbiased(x, y), rtol=1e-10)
  assert std < 1e-10 * abs(mean)


def test_kid_near_zero_for_the_same_distribution_and_reproducible():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(400, 64))
  same = rng.normal(size=(400, 64))
  shifted = rng.normal(size=(400, 64)) + 0.5
  kid_self, _ = fid.kernel_inception_distance(f, f, num_subsets=20, subset_size=200)
  kid_same, _ = fid.kernel_inception_distance(f, same, num_subsets=20, subset_size=200)
  kid_diff, _ = fid.kernel_inception_distance(f, shifted, num_subsets=20, subset_size=200)
  assert kid_diff > 0.1
  assert abs(kid_self) < 0.1 * kid_diff
  assert abs(kid_same) < 0.1 * kid_diff
  again = fid.kernel_inception_distance(f, shifted, num_subsets=20, subset_size=200)
  assert again == (kid_diff, again[1])
  with pytest.raises(ValueError, match="equal D"):
    fid.kernel_inception_distance(f, f[:, :3])


class _CountingExtractor:
  """Duck-typed extractor: features are the images' pixels, and calls are counted."""

  def __init__(self, fingerprint="net-a"):
    self.fingerprint, self.calls = fingerprint, 0

  def features(self, batches):
    self.calls += 1
    return np.concatenate([np.asarray(b, np.float32).reshape(len(b), -1) for b in batches])


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, size=(4, 2, 2, 3), dtype=np.uint8) for _ in range(3)]


def _unused_batches():
  raise AssertionError("the data set was read although the statistics were cached")


def test_reference_statistics_cached_once_and_keyed_by_network(tmp_path):
  extractor = _CountingExtractor()
  first = fid.reference_statistics("digits-test", _batches, extractor, tmp_path)
  assert extractor.calls == 1 and first.features.shape == (12, 12)
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith("fid-ref-digits-test-") and files[0].endswith(
      ".npz")
  again = fid.reference_statistics("digits-test", _unused_batches, extractor, tmp_path)
  assert extractor.calls == 1
  np.testing.assert_array_equal(again.stats.cov, first.stats.cov)
  np.testing.assert_array_equal(again.features, first.features)
  # Another network (or input protocol) never reuses the file.
  other = _CountingExtractor("net-b")
  fid.reference_statistics("digits-test", _batches, other, tmp_path)
  assert other.calls == 1 and len(os.listdir(tmp_path)) == 2
  # A cache without features does not serve a request for features.
  fid.reference_statistics("mnist", _batches, extractor, tmp_path, keep_features=False)
  with_features = fid.reference_statistics("mnist", _batches, extractor, tmp_path)
  assert extractor.calls == 3 and with_features.features is not None
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_reference_statistics_recomputes_a_corrupt_cache_and_rejects_bad_names(tmp_path):
  extractor = _CountingExtractor()
  ref = fid.reference_statistics("textures", _batches, extractor, tmp_path)
  (path,) = tmp_path.iterdir()
  path.write_bytes(b"truncated")
  again = fid.reference_statistics("textures", _batches, extractor, tmp_path)
  assert extractor.calls == 2
  np.testing.assert_array_equal(again.stats.mean, ref.stats.mean)
  with pytest.raises(ValueError, match="file-name stem"):
    fid.reference_statistics("../escape", _batches, extractor, tmp_path)
  scores = fid.fid_kid(ref.features, ref, kid_subsets=5)
  assert scores["fid"] < 1e-6 and scores["num_samples"] == 12 and "kid" in scores


@pytest.mark.parametrize(
    "array, message",
    [(np.zeros((2, 8, 8), np.uint8), r"\[B, H, W, 3\]"),
     (np.zeros((2, 3, 8, 8), np.float32), r"\[B, H, W, 3\]"),
     (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
     (np.zeros((2, 8, 8, 3), np.int32), "dtype int32"),
     (np.full((2, 8, 8, 3), 255.0, np.float32), "pass uint8"),
     (np.full((2, 8, 8, 3), 0.5, np.float32) + np.eye(8)[None, :, :, None] * 0.6, "2x - 1"),
     (np.full((2, 8, 8, 3), np.nan, np.float32), "non-finite")])
def test_image_checks_say_what_is_wrong(array, message):
  with pytest.raises(ValueError, match=message):
    images.check_images(array)


def test_image_conventions_round_trip():
  u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  x = u.astype(np.float32) * (2 / 255) - 1  # the data pipeline's model range
  np.testing.assert_array_equal(np.asarray(images.to_pixels(x)), np.asarray(images.to_pixels(u)))
  assert images.to_pixels(u).shape == (1, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(images.to_model_range(u)), np.repeat(x, 3, -1), atol=1e-6)
