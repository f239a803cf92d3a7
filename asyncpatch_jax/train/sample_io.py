"""What a sampling job reads and leaves behind (`train/sample_job.py`: `--mode=sample`, `inpaint`).

`write_outputs` writes `samples.png` (a grid, for 2-D images with 1 or 3 channels),
`inputs.png` (the masked input, when inpainting), `samples.npz` (with `known` and `known_mask`
when inpainting), `settings.json` (every setting plus the NFE) and `levels.gif` (when the run
recorded its level maps). Every file is written to a temporary name in the same folder and
renamed into place, so a crash leaves either the previous file or the new one, never half of
one (`file_io`). `load_images` reads the inpainting inputs (PIL). Host-side input and output,
kept out of the pure-JAX `sampling` package.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from asyncpatch_jax import file_io, pixels, visualize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_paths(spec: str) -> list[str]:
  """The image files named by `spec`: one file, a folder (its PNG / JPEG files) or a glob
  (wildcards in the file name on a bucket, anywhere locally); sorted. Local or a bucket URL."""
  if not spec:
    raise ValueError("no input image: set sampling.image to a PNG / JPEG file, a folder or a glob")
  where = epath.Path(spec)
  if where.is_dir():
    found = list(where.iterdir())
  elif where.is_file():
    found = [where]
  elif file_io.is_url(spec):
    found = ([p for p in where.parent.iterdir() if fnmatch.fnmatch(p.name, where.name)]
             if where.parent.is_dir() else [])
  else:
    found = [epath.Path(p) for p in glob.glob(spec)]
  paths = sorted(os.fspath(p) for p in found
                 if p.name.lower().endswith(IMAGE_SUFFIXES) and p.is_file())
  if not paths:
    raise FileNotFoundError(f"sampling.image={spec!r} names no PNG / JPEG file (a file, a folder "
                            f"or a glob such as 'photos/*.png')")
  return paths


def load_images(paths: Sequence[str], shape: Sequence[int]) -> np.ndarray:
  """Images `[N, H, W, C]` in [−1, 1] (x / 127.5 − 1, as training saw them), each checked
  against the model's data shape `(H, W, C)`: a different size or channel count is an error
  (grayscale for C = 1; RGB, alpha dropped, for C = 3)."""
  height, width, channels = (int(d) for d in shape)
  out = []
  for path in paths:
    with epath.Path(path).open("rb") as f, Image.open(f) as image:
      mode = image.mode
      if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
      colour = image.mode not in ("1", "L", "LA", "I", "I;16", "F")
      if colour != (channels == 3):
        raise ValueError(
            f"{path} is a {'colour' if colour else 'grayscale'} image (mode {mode}) but the "
            f"model takes {channels} channel(s); convert it to "
            f"{'RGB' if channels == 3 else 'grayscale'} first")
      if image.size != (width, height):
        raise ValueError(f"{path} is {image.size[0]}×{image.size[1]} but the model takes "
                         f"{width}×{height} images; crop or resize it to that size first")
      array = np.asarray(image.convert("RGB" if colour else "L"), np.uint8)
    out.append(array.reshape(height, width, channels))
  return pixels.to_model_range(np.stack(out))


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / jax arrays and scalars
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  if isinstance(value, str | int | float | bool) or value is None:
    return value
  return repr(value)


def _is_image_batch(array: np.ndarray) -> bool:
  return array.ndim == 4 and array.shape[-1] in (1, 3)


def write_outputs(samples: Any, info: Mapping[str, Any], settings: Mapping[str, Any],
                  outdir: str | os.PathLike, *, known: Any = None,
                  known_mask: Any = None, nrow: int | None = None,
                  extra_arrays: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes a sampling run's outputs into `outdir` (created); returns {kind: path}.

  Args:
    samples: `[B, *spatial, C]` in [−1, 1].
    info: the sampler's info ('nfe', 'nfe_per_example', 'num_steps', optional 'levels').
    settings: every setting of the run (strategy, steps, checkpoint, seed, ...), JSON-able.
    known, known_mask: the inpainting input, drawn as `inputs.png` when both are given.
    extra_arrays: more arrays for `samples.npz` (e.g. the latents that `samples` decode).
  """
  outdir = epath.Path(outdir)
  outdir.mkdir(parents=True, exist_ok=True)
  samples = np.asarray(samples, np.float32)
  written: dict[str, str] = {}

  def path(name: str) -> str:
    return os.fspath(outdir / name)

  if _is_image_batch(samples):
    visualize.save_image_grid(samples, path("samples.png"), nrow)
    written["grid"] = path("samples.png")
    if known is not None and known_mask is not None:
      inputs = visualize.masked_images(np.broadcast_to(np.asarray(known, np.float32),
                                                       samples.shape), known_mask)
      visualize.save_image_grid(inputs, path("inputs.png"), nrow)
      written["inputs"] = path("inputs.png")

  arrays = {"samples": samples, **{k: np.asarray(v) for k, v in (extra_arrays or {}).items()}}
  for key in ("nfe_per_example",):
    if key in info:
      arrays[key] = np.asarray(info[key])
  if known_mask is not None:
    arrays["known_mask"] = np.asarray(known_mask, bool)
    if known is not None:
      arrays["known"] = np.asarray(known, np.float32)
  levels = None
  if "levels" in info:
    steps = int(np.asarray(info.get("num_steps", np.asarray(info["levels"]).shape[0] - 1)))
    levels = visualize.trim_levels(info["levels"], steps)
    arrays["levels"] = levels

  with file_io.atomic_open(path("samples.npz"), "wb") as f:
    np.savez_compressed(f, **arrays)
  written["npz"] = path("samples.npz")

  record = dict(_jsonable(dict(settings)))
  record["nfe"] = _jsonable(info.get("nfe"))
  if "num_steps" in info:
    record["loop_steps"] = _jsonable(info["num_steps"])
  if "nfe_per_example" in info:
    record["nfe_per_example_mean"] = float(np.mean(np.asarray(info["nfe_per_example"])))

  file_io.write_json(path("settings.json"), record)
  written["settings"] = path("settings.json")

  if levels is not None and levels.ndim in (3, 4):
    visualize.save_level_map_gif(levels, path("levels.gif"))
    written["levels_gif"] = path("levels.gif")
  return written
