"""Per-record preprocessing on the host: ADM centre crop + resize, channels, random flip.

Any image size is cropped / resized to `image_size`, and 1 (grey), 2 (grey + alpha), 3 (RGB) or
4 (RGBA) channels are converted to the configured count. What cannot be used — undecodable bytes,
an empty image, a dtype other than uint8, another channel count — is a `BadRecordError` naming the
problem; `sources.SkipBadRecords` (TFDS sets, `data.max_bad_records`) skips and counts such
records instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

CONVERTIBLE_CHANNELS = (1, 2, 3, 4)


class BadRecordError(ValueError):
  """A record's image cannot be preprocessed; the message says why."""


def image_problem(image: Any) -> str | None:
  """Why `image` cannot be preprocessed, or None if it can (any size; see the module doc)."""
  try:
    arr = np.asarray(image)
  except Exception as e:  # e.g. a lazily decoded image whose bytes are corrupt
    return f"unreadable ({type(e).__name__}: {e})"
  if arr.dtype != np.uint8:
    what = "undecoded bytes / objects" if arr.dtype.kind in "OSUV" else f"{arr.dtype} pixels"
    return f"{what} where uint8 pixels were expected"
  if arr.ndim not in (2, 3):
    return f"shape {arr.shape} is not [H, W] or [H, W, C]"
  if arr.size == 0:
    return f"empty image of shape {arr.shape}"
  if arr.ndim == 3 and arr.shape[-1] not in CONVERTIBLE_CHANNELS:
    return (f"{arr.shape[-1]} channels (shape {arr.shape}); 1, 2 (grey + alpha), 3 or 4 (RGBA) "
            f"can be converted")
  return None


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
  if have == 2:  # grey + alpha: drop the alpha
    return to_channels(image[..., :1], channels)
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
    problem = image_problem(record["image"])
    if problem is not None:
      raise BadRecordError(f"bad image record: {problem}")
    image = to_channels(np.asarray(record["image"]), self.channels)
    if self.crop == "center":
      image = center_crop_resize(image, self.image_size)
    else:
      image = resize(image, self.image_size)
    if self.random_flip and flip_key is not None:
      if np.random.default_rng(list(flip_key)).random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image, dtype=np.uint8),
            "label": np.int32(record.get("label", 0))}
