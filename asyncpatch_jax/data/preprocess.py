"""Per-record preprocessing on the host: ADM centre crop + resize, channels, random flip."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's `center_crop_arr`: BOX-halve while the short side ≥ 2·size, BICUBIC to size, crop.

  Matches guided-diffusion's ImageNet / LSUN preprocessing, so FID numbers are comparable.
  """
  if image.shape[0] == size and image.shape[1] == size:
    return image
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  while min(*pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
  scale = size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
  arr = np.asarray(pil)
  top = (arr.shape[0] - size) // 2
  left = (arr.shape[1] - size) // 2
  arr = arr[top:top + size, left:left + size]
  return arr[..., None] if squeeze else arr


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Plain BICUBIC resize to size×size (no crop), for square sources such as CelebA-HQ."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  arr = np.asarray(pil.resize((size, size), resample=Image.Resampling.BICUBIC))
  return arr[..., None] if squeeze else arr


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Grey ↔ RGB so every record has the configured number of channels."""
  if image.ndim == 2:
    image = image[..., None]
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if have in (3, 4) and channels == 1:
    rgb = image[..., :3].astype(np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(grey).clip(0, 255).astype(np.uint8)[..., None]
  if have == 4 and channels == 3:
    return image[..., :3]
  raise ValueError(f"cannot convert an image with {have} channels to {channels}")


class Preprocess:
  """Record → `{'image': uint8 [size, size, C], 'label': int32}`; picklable for grain workers.

  `flip_key` seeds the horizontal flip from the record's position in the global stream, so the
  augmentation does not depend on the number of processes or workers.
  """

  def __init__(self, image_size: int, channels: int, *, crop: str = "center",
               random_flip: bool = False):
    if crop not in ("center", "resize"):
      raise ValueError(f"data.crop must be 'center' (ADM) or 'resize', not {crop!r}")
    self.image_size, self.channels = int(image_size), int(channels)
    self.crop, self.random_flip = crop, bool(random_flip)

  def __call__(self, record: dict[str, Any], flip_key: tuple[int, ...] | None = None
               ) -> dict[str, np.ndarray]:
    image = np.asarray(record["image"])
    if image.dtype != np.uint8:
      raise ValueError(f"expected uint8 images, got {image.dtype}")
    image = to_channels(image, self.channels)
    if self.crop == "center":
      image = center_crop_resize(image, self.image_size)
    else:
      image = resize(image, self.image_size)
    if self.random_flip and flip_key is not None:
      if np.random.default_rng(list(flip_key)).random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image, dtype=np.uint8),
            "label": np.int32(record.get("label", 0))}
