"""FID and KID with the standard Inception: features on (sharded) batches, statistics, distances.

* `FeatureExtractor`: images → pool3 features, one jitted function whose batch is split over
  every axis of a mesh (parameters replicated); batches are padded to a multiple of the device
  count and the padding dropped.
* `feature_statistics` / `frechet_distance`: mean and covariance in float64, and the Fréchet
  distance with tr √(Σ₁Σ₂) from symmetric eigendecompositions (√Σ₁ Σ₂ √Σ₁ is symmetric PSD, so
  its eigenvalues are real; round-off negatives are clipped) — no complex `sqrtm` residue, about
  3× faster than `scipy.linalg.sqrtm` at 2048-d, and √Σ of a reference is computed only once.
* `kernel_inception_distance`: the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (x·y/d + 1)³ averaged over random subsets, as Bińkowski et al. and StyleGAN2-ADA.
* `reference_statistics`: a dataset's statistics (and features, for KID), computed once and
  cached as `.npz` in a cache directory, keyed by the network's sha1 and the input protocol;
  written atomically by process 0 only.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import file_io
from asyncpatch_jax.evaluation import images as images_lib
from asyncpatch_jax.evaluation import inception, weights

# Changes to preprocessing that alter features must change this: it keys cached statistics.
PROTOCOL = "tf-inception-2015-12-05/pool3/tf1-bilinear-299/x128m1"


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Mean [D] and covariance [D, D] (float64) of `count` feature vectors."""

  mean: np.ndarray
  cov: np.ndarray
  count: int

  @functools.cached_property
  def cov_sqrt(self) -> np.ndarray:
    """√Σ (symmetric PSD), computed once: a reference's serves every FID against it."""
    return _psd_sqrt(np.asarray(self.cov, np.float64))


class FeatureExtractor:
  """Pool3 features of image batches, jitted, with the batch sharded over `mesh`.

  Images follow `images.check_images`: [B, H, W, 3|1], uint8 or float in [-1, 1]. A numpy
  batch is the whole batch (on several processes every process passes the same one); a
  `jax.Array` may already be sharded globally (samples straight from the sampler). Batches
  larger than `batch_size` are split. With `mesh=None` the computation uses one device.
  """

  def __init__(self, model: inception.InceptionV3 | None = None, mesh: Mesh | None = None,
               batch_size: int = 64, quantize: bool = True,
               weights_path: str | os.PathLike[str] | None = None):
    path = weights.inception_weights_path() if weights_path is None else weights_path
    self.network_sha1 = inception.file_sha1(path)
    self.quantize = quantize
    self.mesh = mesh
    if model is None:
      model = inception.load_inception(path)
    graphdef, state = nnx.split(model)
    num_devices = 1 if mesh is None else mesh.devices.size
    self.batch_multiple = num_devices
    self.batch_size = max(num_devices, -(-int(batch_size) // num_devices) * num_devices)

    def features(state, images):
      model = nnx.merge(graphdef, state)
      return model(inception.preprocess(images, quantize=quantize))

    if mesh is None:
      self._state = jax.device_put(state, jax.devices()[0])
      self._batch_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      self._features = jax.jit(features)
    else:
      replicated = NamedSharding(mesh, P())
      self._batch_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
      self._state = jax.device_put(state, replicated)
      self._features = jax.jit(features, in_shardings=(replicated, self._batch_sharding),
                               out_shardings=self._batch_sharding)

  @property
  def fingerprint(self) -> str:
    """Identity of the features: network weights and input protocol (keys cached statistics)."""
    return f"{self.network_sha1}:{PROTOCOL}:{'q8' if self.quantize else 'float'}"

  def _run(self, chunk: Any) -> np.ndarray:
    n = chunk.shape[0]
    padded = -(-n // self.batch_multiple) * self.batch_multiple
    if padded != n:
      pad = ((0, padded - n), (0, 0), (0, 0), (0, 0))
      chunk = jnp.pad(chunk, pad) if isinstance(chunk, jax.Array) else np.pad(chunk, pad)
    # A no-op for a batch already laid out over the mesh; otherwise one transfer or reshard.
    chunk = jax.device_put(chunk, self._batch_sharding)
    out = self._features(self._state, chunk)
    if not out.is_fully_addressable:
      out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out, np.float32)[:n]

  def __call__(self, images: Any) -> np.ndarray:
    """float32 [B, 2048] pool3 features of one batch of images."""
    if not isinstance(images, jax.Array):
      images = np.asarray(images)
    images_lib.check_images(images)
    n = images.shape[0]
    return np.concatenate([self._run(images[i:i + self.batch_size])
                           for i in range(0, n, self.batch_size)])

  def features(self, batches: Iterable[Any]) -> np.ndarray:
    """float32 [N, 2048] features of every batch of an iterable, concatenated."""
    out = [self(batch) for batch in batches]
    if not out:
      raise ValueError("no image batches to compute features of")
    return np.concatenate(out)


def feature_statistics(features: Any) -> FeatureStats:
  """Mean and (unbiased, N-1) covariance of [N, D] features, in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"statistics need [N ≥ 2, D] features, got shape {f.shape}")
  if not np.all(np.isfinite(f)):
    raise ValueError("features have non-finite values")
  return FeatureStats(mean=f.mean(axis=0), cov=np.cov(f, rowvar=False), count=f.shape[0])


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh((cov + cov.T) / 2)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray,
                       cov1_sqrt: np.ndarray | None = None) -> float:
  """tr √(Σ₁Σ₂) for PSD Σ₁, Σ₂: Σ √eig(√Σ₁ Σ₂ √Σ₁), all float64 (√Σ₁ may be given)."""
  s1 = _psd_sqrt(np.asarray(cov1, np.float64)) if cov1_sqrt is None else cov1_sqrt
  m = s1 @ np.asarray(cov2, np.float64) @ s1
  eigvals = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
  """‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2√(Σ₁Σ₂)): the Fréchet distance of two Gaussians (FID)."""
  mu1, mu2 = np.asarray(stats1.mean, np.float64), np.asarray(stats2.mean, np.float64)
  cov1, cov2 = np.asarray(stats1.cov, np.float64), np.asarray(stats2.cov, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"statistics do not match: means {mu1.shape}, {mu2.shape}; covariances "
                     f"{cov1.shape}, {cov2.shape}")
  # tr √(Σ₁Σ₂) = tr √(Σ₂Σ₁): take the square root of whichever side already has one cached.
  if "cov_sqrt" in vars(stats2) and "cov_sqrt" not in vars(stats1):
    stats1, stats2, cov1, cov2 = stats2, stats1, cov2, cov1
  diff = mu1 - mu2
  tr_sqrt = trace_sqrt_product(cov1, cov2, cov1_sqrt=stats1.cov_sqrt)
  value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt
  return float(max(value, 0.0))


def frechet_distance_to_features(features: Any, reference: FeatureStats) -> float:
  """FID of [N, D] features to reference statistics; exact, and fast when N ≤ D.

  With B the centred features, Σ = BᵀB/(N-1), and the nonzero eigenvalues of Σ_ref Σ are those
  of the N×N matrix B Σ_ref Bᵀ/(N-1): no D×D eigendecomposition for small sample sets.
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] != np.shape(reference.mean)[0]:
    raise ValueError(f"need [N ≥ 2, {np.shape(reference.mean)[0]}] features, got {f.shape}")
  n, d = f.shape
  if n - 1 >= d:
    return frechet_distance(feature_statistics(f), reference)
  if not np.all(np.isfinite(f)):
    raise ValueError("features have non-finite values")
  mean = f.mean(axis=0)
  b = f - mean
  m = b @ np.asarray(reference.cov, np.float64) @ b.T / (n - 1)
  tr_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))
  diff = mean - np.asarray(reference.mean, np.float64)
  value = diff @ diff + np.sum(b * b) / (n - 1) + np.trace(reference.cov) - 2.0 * tr_sqrt
  return float(max(value, 0.0))


def kernel_inception_distance(features1: Any, features2: Any, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID: (mean, std over subsets) of the unbiased MMD² with k(x, y) = (x·y/d + 1)³.

  Each subset draws min(subset_size, N₁, N₂) rows of each set without replacement, with a
  numpy generator seeded by `seed`, so the number is reproducible.
  """
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f"KID needs [N, D] features of equal D, got {f1.shape} and {f2.shape}")
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise ValueError(f"KID needs subsets of at least 2 features, got {m}")
  d = f1.shape[1]
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for i in range(num_subsets):
    x = f1[rng.choice(f1.shape[0], m, replace=False)]
    y = f2[rng.choice(f2.shape[0], m, replace=False)]
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    values[i] = within - 2.0 * kxy.sum() / (m * m)
  return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------------------------
# Reference statistics, cached.


@dataclasses.dataclass(frozen=True)
class ReferenceStatistics:
  """A dataset's feature statistics, with its features when kept (KID needs them)."""

  name: str
  stats: FeatureStats
  features: np.ndarray | None
  fingerprint: str


def _cache_path(cache_dir: str | os.PathLike[str], name: str, fingerprint: str) -> epath.Path:
  """The statistics file in `cache_dir` (a local folder or a bucket URL)."""
  key = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
  return epath.Path(cache_dir) / f"fid-ref-{name}-{key}.npz"


def _load_cached(path: epath.Path, name: str, fingerprint: str,
                 keep_features: bool) -> ReferenceStatistics | None:
  try:
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
      if str(data["fingerprint"]) != fingerprint or str(data["name"]) != name:
        return None
      if keep_features and "features" not in data:
        return None
      stats = FeatureStats(mean=data["mean"], cov=data["cov"], count=int(data["count"]))
      features = data["features"] if keep_features else None
  except (OSError, KeyError, ValueError):
    return None
  return ReferenceStatistics(name=name, stats=stats, features=features, fingerprint=fingerprint)


def reference_statistics(name: str, batches: Iterable[Any] | Callable[[], Iterable[Any]],
                         extractor: FeatureExtractor, cache_dir: str | os.PathLike[str],
                         keep_features: bool = True) -> ReferenceStatistics:
  """Statistics of a reference set (e.g. 'mnist-test'), from the cache or computed and cached.

  `batches` (an iterable of image batches, or a function returning one) is only consumed when
  no valid cache exists, so loading the dataset is skipped too. The cache file is named after
  `name` and a hash of the extractor's fingerprint; a file made with another network or input
  protocol is never used. Only process 0 writes it.
  """
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
    raise ValueError(f"reference name must be a plain file-name stem, got {name!r}")
  fingerprint = extractor.fingerprint
  path = _cache_path(cache_dir, name, fingerprint)
  if path.exists():
    cached = _load_cached(path, name, fingerprint, keep_features)
    if cached is not None:
      return cached
  features = extractor.features(batches() if callable(batches) else batches)
  stats = feature_statistics(features)
  if jax.process_index() == 0:
    arrays = dict(mean=stats.mean, cov=stats.cov, count=np.int64(stats.count),
                  fingerprint=np.str_(fingerprint), name=np.str_(name))
    if keep_features:
      arrays["features"] = features
    with file_io.atomic_open(path, "wb") as f:
      np.savez(f, **arrays)
  return ReferenceStatistics(name=name, stats=stats, features=features if keep_features else None,
                             fingerprint=fingerprint)


def fid_kid(features: Any, reference: ReferenceStatistics, kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
  """FID (and KID, when the reference kept its features) of sample features to a reference."""
  out = {"fid": frechet_distance_to_features(features, reference.stats),
         "num_samples": float(np.shape(features)[0])}
  if reference.features is not None:
    out["kid"], out["kid_std"] = kernel_inception_distance(
        features, reference.features, kid_subsets, kid_subset_size, seed)
  return out
