"""`--mode=sample` and `--mode=inpaint`: a checkpoint's EMA → a fresh folder of outputs.

Both read checkpoint `sampling.checkpoint_step` (0: the latest) of the workdir, after checking
that it was trained with this config's model (`restore.check_compatible`), and sample with the
EMA `sampling.ema` using `config.sampling` (strategy and its options `sampling.<strategy>.*`,
steps, stochastic, cfg_scale, input guidance), so any of them can change on the command line
without retraining, e.g. `--config.sampling.num_steps=50 --config.sampling.stochastic=False`.
`num_samples` are drawn `batch_size` at a time (one compiled program; a progress line per
batch).

Each run writes a new folder `<output_dir or workdir/samples>/<mode>_step<N>_<strategy>_<UTC
time>` through `sample_io.write_outputs`: samples.png, samples.npz, settings.json (the whole
config, the checkpoint and the NFE measured by the sampler) and, for the adaptive and
autoregressive strategies, levels.gif (the first batch's level maps). The folder is assembled
under a hidden temporary name and renamed when complete (`file_io.atomic_directory`), so it is
never half-written.

Latent runs (data.source='latents') decode their samples with the run's VAE for samples.png
and keep the latents in samples.npz; `--mode=inpaint` is for pixel-space models.

`--mode=inpaint` completes the images `sampling.image` (a PNG / JPEG, a folder or a glob; the
model's size and channels) where `sampling.mask` says they are known: a PNG (white = known,
RePaint's convention; `mask_invert` for white = hole; token- or pixel-sized, a token being known
iff all its pixels are) or a mask name of `sampling.masks.MASKS` ('' = `inpaint_mask`). It adds
inputs.png (the known context) and keeps the known pixels bit-exact in samples.npz. A mask with
nothing known is an error (that is `--mode=sample`); one with everything known returns the
images unchanged with NFE 0 (a warning says so). Class-conditional models inpaint with the null
label (unconditionally).
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from asyncpatch_jax import data as data_lib
from asyncpatch_jax import diffusion, file_io, rng_streams
from asyncpatch_jax.sampling import masks as masks_lib
from asyncpatch_jax.train import builders, sample_io
from asyncpatch_jax.train import restore as restore_lib
from asyncpatch_jax.train import samples as samples_lib

MODES = ("sample", "inpaint")


def _check(config: Any) -> None:
  """The sampling fields these modes add (before anything is restored or compiled)."""
  scfg = config.sampling
  if int(scfg.checkpoint_step) < 0 or int(scfg.batch_size) < 0:
    raise ValueError(f"sampling.checkpoint_step ({scfg.checkpoint_step}; 0 = latest) and "
                     f"sampling.batch_size ({scfg.batch_size}; 0 = all at once) must be >= 0")


def _mask(config: Any, num: int) -> np.ndarray:
  """The token-level known mask `[num, *grid]` of `sampling.mask` (see the module docstring)."""
  scfg = config.sampling
  patch = int(config.diffusion.patch_size)
  grid = diffusion.token_grid((1, *builders.data_shape(config)), patch)[1:]
  spec = scfg.mask or scfg.inpaint_mask
  if spec in masks_lib.MASKS:
    mask = masks_lib.make_mask(spec, num, grid, seed=int(config.seed))
    mask = ~mask if scfg.mask_invert else mask
  elif epath.Path(spec).is_file():
    mask = masks_lib.from_png(spec, grid, patch_size=patch, batch=num,
                              invert=bool(scfg.mask_invert))
  else:
    raise ValueError(f"sampling.mask={spec!r} is neither a mask image file nor a mask name "
                     f"{sorted(masks_lib.MASKS)}")
  if not mask.any():
    raise ValueError(f"the mask {spec!r} marks nothing as known (white = known"
                     f"{', inverted' if scfg.mask_invert else ''}): that is unconditional "
                     f"sampling (--mode=sample); or flip it with sampling.mask_invert")
  if mask.all():
    logging.warning("The mask %r marks every token as known: the outputs are the inputs "
                    "(NFE 0)", spec)
  return mask


def _merge_infos(infos: list[dict[str, np.ndarray]], total: int) -> dict[str, Any]:
  """One info for the batches: 'nfe' the largest batch's (the calls one sample costs), the
  per-example counts concatenated, the level maps of the first batch."""
  nfes = [int(i["nfe"]) for i in infos]
  info: dict[str, Any] = {"nfe": max(nfes), "nfe_per_batch": nfes,
                          "nfe_per_example": np.concatenate(
                              [i["nfe_per_example"] for i in infos])[:total]}
  info["num_steps"] = max(int(i["num_steps"]) for i in infos)
  if "levels" in infos[0]:  # the first batch's (at most 16 examples drawn)
    info["levels"], info["num_steps"] = infos[0]["levels"][:, :16], infos[0]["num_steps"]
  return info


def _run_batches(fn: Callable[[int, int], tuple[Any, dict]], total: int, batch: int
                 ) -> tuple[np.ndarray, dict[str, Any]]:
  """Calls `fn(index, first)` for each batch, logging progress; `(samples[:total], info)`."""
  count = math.ceil(total / batch)
  outs, infos = [], []
  start = time.monotonic()
  first = 0.0
  for index in range(count):
    out, info = fn(index, index * batch)
    outs.append(np.asarray(out))
    infos.append(jax.tree.map(np.asarray, info))
    elapsed = time.monotonic() - start
    if index == 0:
      first, note = elapsed, " (with compilation)"
    else:  # the rate of the batches after the first, which compiled
      left = (elapsed - first) / index * (count - index - 1)
      note = f", about {left:.0f} s left" if index + 1 < count else ""
    logging.info("Sampled batch %d/%d (%d of %d samples) in %.1f s%s", index + 1, count,
                 min((index + 1) * batch, total), total, elapsed, note)
  return np.concatenate(outs)[:total], _merge_infos(infos, total)


def _output_folder(config: Any, workdir: epath.Path, mode: str, step: int) -> epath.Path:
  base = epath.Path(config.sampling.output_dir) if config.sampling.output_dir else (
      workdir / "samples")
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
  name = f"{mode}_step{step:08d}_{config.sampling.strategy}_{stamp}"
  folder, n = base / name, 1
  while folder.exists():
    folder, n = base / f"{name}_{n}", n + 1
  return folder


def _settings(config: Any, mode: str, directory: str, step: int, ema: str, total: int,
              batch: int, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
  return {"mode": mode, "checkpoint": f"{directory}/{step}", "checkpoint_step": step,
          "ema": ema, "num_samples": total, "batch_size": batch,
          "num_batches": math.ceil(total / batch), "nfe_per_batch": info["nfe_per_batch"],
          "strategy": config.sampling.strategy,
          "strategy_options": samples_lib.sampler_options(config.sampling),
          "sampling": config.sampling.to_dict(), "config": config.to_dict(), **extra}


def _restore(config: Any, workdir: Any) -> restore_lib.Restored:
  _check(config)
  return restore_lib.restore_params(config, workdir, int(config.sampling.checkpoint_step) or None)


def sample_from_checkpoint(config: Any, workdir: str | epath.Path) -> dict[str, Any]:
  """`--mode=sample`; returns {'samples' [N, H, W, C] in [−1, 1], 'info', 'step', 'folder'}."""
  decode = samples_lib.make_decoder(config)  # latent runs: the VAE, checked before restoring
  workdir, setup, params, model_state, step, ema = _restore(config, workdir)
  total = int(config.sampling.num_samples)
  batch = min(int(config.sampling.batch_size) or total, total)
  num_classes = int(config.model.num_classes)
  fn = samples_lib.make_sample_fn(config, setup, batch, inpaint=False, return_info=True)
  root = rng_streams.root_key(config.seed, rng_streams.Stream.SAMPLE)

  def one(index: int, first: int):
    labels = ((first + jnp.arange(batch, dtype=jnp.int32)) % num_classes
              if num_classes else None)
    return fn(params, model_state, jax.random.fold_in(root, index), labels=labels)

  images, info = _run_batches(one, total, batch)
  extra = {}
  if decode is not None:  # samples.npz keeps the latents next to the decoded images
    extra["latents"], images = images, decode(images)
  folder = _output_folder(config, workdir, "sample", step)
  if jax.process_index() == 0:
    settings = _settings(config, "sample", str(workdir / "checkpoints"), step, ema, total, batch,
                         info, seed=int(config.seed))
    nrow = num_classes if 0 < num_classes <= 16 else None  # a column per class
    with file_io.atomic_directory(folder) as tmp:
      sample_io.write_outputs(images, info, settings, tmp, nrow=nrow, extra_arrays=extra)
    logging.info("Sampled %d images from step %d (strategy %s, NFE %d) into %s", total, step,
                 config.sampling.strategy, info["nfe"], folder)
  return {"samples": images, "info": info, "step": step, "folder": folder}


def inpaint_from_checkpoint(config: Any, workdir: str | epath.Path) -> dict[str, Any]:
  """`--mode=inpaint`; returns {'samples', 'known', 'known_mask', 'info', 'step', 'folder'}."""
  if data_lib.latent_data(config.data):
    raise ValueError("--mode=inpaint takes images for a pixel-space model; this run diffuses VAE "
                     "latents (data.source='latents'): inpaint in latent space from Python "
                     "(train.restore.restore_model, the VAE's encoder, sampling.sample)")
  paths = sample_io.image_paths(config.sampling.image)  # bad input fails before restoring
  known = sample_io.load_images(paths, builders.data_shape(config))
  total = known.shape[0]
  mask = _mask(config, total)
  workdir, setup, params, model_state, step, ema = _restore(config, workdir)
  batch = min(int(config.sampling.batch_size) or total, total)
  num_classes = int(config.model.num_classes)
  fn = samples_lib.make_sample_fn(config, setup, batch, inpaint=True, return_info=True)
  root = rng_streams.root_key(config.seed, rng_streams.Stream.INPAINT)
  null = jnp.full((batch,), num_classes, jnp.int32) if num_classes else None
  pad = math.ceil(total / batch) * batch - total  # the last batch repeats the last image
  known_p = np.concatenate([known, np.repeat(known[-1:], pad, 0)])
  mask_p = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])

  def one(index: int, first: int):
    rows = slice(first, first + batch)
    return fn(params, model_state, jax.random.fold_in(root, index),
              jnp.asarray(known_p[rows]), jnp.asarray(mask_p[rows]), labels=null)

  images, info = _run_batches(one, total, batch)
  folder = _output_folder(config, workdir, "inpaint", step)
  if jax.process_index() == 0:
    settings = _settings(config, "inpaint", str(workdir / "checkpoints"), step, ema, total,
                         batch, info, seed=int(config.seed), images=paths,
                         mask=config.sampling.mask or config.sampling.inpaint_mask,
                         known_fraction=float(mask.mean()))
    with file_io.atomic_directory(folder) as tmp:
      sample_io.write_outputs(images, info, settings, tmp, known=known, known_mask=mask)
    logging.info("Inpainted %d images from step %d (strategy %s, NFE %d) into %s", total, step,
                 config.sampling.strategy, info["nfe"], folder)
  return {"samples": images, "known": known, "known_mask": mask, "info": info, "step": step,
          "folder": folder}
