"""Sample and inpainting grids during and after training (TensorBoard + PNG in the workdir).

Samples come from an EMA of the parameters with the configured sampler. The inpainting grid uses
fixed held-out images and the `sampling.inpaint_mask` family (`sampling.masks.MASKS`, True =
known): rows of (known context, completion, original), so grids of different steps compare.

Latent runs (`data.source='latents'`, or synthetic latents) sample latents and decode them with
the run's VAE (`make_decoder`). Their inpainting works in latent space: the known context is the
eval cache's encoded images and the mask lives on the latent token grid (one token = patch·8
pixels for the SD VAE); the grid shows decoded latents, so its "original" row is the VAE's
reconstruction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import data as data_lib
from asyncpatch_jax import diffusion, models, pixels, rng_streams, sampling, visualize
from asyncpatch_jax.autoencoder import named as named_vae
from asyncpatch_jax.data import latent_cache, preparation
from asyncpatch_jax.sampling import sampler as sampler_lib
from asyncpatch_jax.train import builders
from asyncpatch_jax.train import restore as restore_lib
from asyncpatch_jax.train import state as state_lib


def clip_x0(denoiser: Any) -> Any:
  """Clips x̂0 to the data range [-1, 1] (DDPM's `clip_denoised`).

  At the first steps from the bounded schedule's λ_min (α ≈ 5e-4 at λ = −15) an ε- or
  v-network's x̂0 = (z − σ ε̂)/α amplifies small errors a thousandfold; images live in [-1, 1].
  """
  def clipped(z, t):
    pred = diffusion.as_prediction(denoiser(z, t))
    return pred._replace(x0=jnp.clip(pred.x0, -1.0, 1.0))
  return clipped


def make_decoder(config: Any) -> Callable[[Any], np.ndarray] | None:
  """For a latent run, `scaled latents [N, h, w, c] -> images [N, H, W, 3]` in [-1, 1]; else None.

  The VAE is `config.vae`'s (its weights file, or seeded random weights for the tiny debug VAE)
  and must be the one that encoded the training cache: a different one is a
  `LatentCacheMismatchError` here, before anything is compiled. Decodes
  `config.vae.decode_batch_size` latents at a time (the decoder's activations at 256² are large).
  Synthetic latents (`data.source='synthetic'`) have no cache to match; without `vae.weights`
  their grids show the first three latent channels.
  """
  if not data_lib.latent_data(config.data):
    return None
  if config.data.source == "synthetic" and not config.vae.weights:
    logging.info("No vae.weights: sample grids show the first three latent channels")
    return lambda latents: np.clip(np.asarray(latents, np.float32)[..., :3] / 3.0, -1.0, 1.0)
  vae = named_vae.load_run_vae(config)
  if config.data.source == "latents":
    train_cache = preparation.cache_dir(config.data, config.data.train_split)
    latent_cache.check_metadata(latent_cache.read_metadata(train_cache), vae=vae,
                         image_size=int(config.data.image_size), where=repr(train_cache))
  graphdef, params = nnx.split(vae)
  decode = jax.jit(lambda params, z: jnp.clip(
      nnx.merge(graphdef, params).decode_scaled(z), -1.0, 1.0))
  chunk = int(config.vae.decode_batch_size)

  def decoder(latents: Any) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    out = []
    for start in range(0, len(latents), chunk):
      part = latents[start:start + chunk]
      padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])  # one shape
      out.append(np.asarray(decode(params, padded))[:len(part)])
    return np.concatenate(out)

  return decoder


def _class_labels(n: int, num_classes: int) -> jax.Array | None:
  return jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None


def sampler_options(scfg: Any) -> dict[str, Any]:
  """The keywords of `sampling.sample` that `config.sampling` sets besides the strategy, steps
  and guidance: the strategy's own (`sampling.<strategy>`), `x0_draw`, `update` and
  `guidance_level`."""
  return {**sampler_lib.strategy_kwargs(scfg.strategy, scfg), "x0_draw": scfg.x0_draw,
          "update": scfg.update_rule, "guidance_level": float(scfg.guidance_level)}


def make_sample_fn(config: Any, setup: state_lib.StateSetup, num: int, *, inpaint: bool,
                   return_info: bool = False) -> Any:
  """jit'd `(params, model_state, key[, known, known_mask, labels, guidance, cfg_scale])
  -> samples [num, H, W, C]` (with `return_info`: `(samples, info)`, the sampler's info, with
  the level maps for the adaptive and autoregressive strategies).

  Class-conditional models draw classes 0, 1, 2, … in turn unless `labels` are given.
  `guidance` (ω) and `cfg_scale` default to `config.sampling`'s; passed as arrays they are
  traced, so one compiled program serves every value.
  """
  schedule = builders.make_schedule(config.diffusion)
  patch = int(config.diffusion.patch_size)
  num_classes = int(config.model.num_classes)
  scfg = config.sampling
  x_shape = (num, *builders.data_shape(config))
  options = sampler_options(scfg)
  levels = return_info and scfg.strategy in ("adaptive", "autoregressive")
  latents = data_lib.latent_data(config.data)

  def run(params, model_state, key, known=None, mask=None, labels=None, guidance=None,
          cfg_scale=None):
    model = setup.model_def.merge(params, model_state)
    if labels is None:
      labels = _class_labels(num, num_classes)
    denoiser = models.make_denoiser(
        model, schedule=schedule, parametrization=config.model.parametrization,
        patch_size=patch, labels=labels if num_classes else None,
        cfg_scale=float(scfg.cfg_scale) if cfg_scale is None else cfg_scale,
        num_classes=num_classes)
    if scfg.clip_x0:
      denoiser = clip_x0(denoiser)
    kwargs = {}
    if inpaint:
      kwargs = dict(known=known, known_mask=mask,
                    input_guidance=float(scfg.input_guidance) if guidance is None else guidance)
    out, info = sampling.sample(denoiser, key, x_shape, schedule=schedule,
                                strategy=scfg.strategy, num_steps=int(scfg.num_steps),
                                patch_size=patch, stochastic=bool(scfg.stochastic),
                                return_levels=levels, **kwargs, **options)
    if not latents:  # images live in [-1, 1]; latents are decoded by `make_decoder`
      out = jnp.clip(out, -1.0, 1.0)
    return (out, info) if return_info else out

  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(run, out_shardings=replicated)


class SampleWriter:
  """Writes `samples_<step>.png` and `inpaint_<step>.png` (and the `_latest` copies)."""

  def __init__(self, config: Any, setup: state_lib.StateSetup, workdir: epath.Path,
               writer: Any | None = None):
    self.config, self.workdir, self.writer = config, epath.Path(workdir), writer
    self.ema = restore_lib.ema_params_name(config)
    n = int(config.sampling.num_samples)
    self.num_inpaint = int(config.sampling.num_inpaint)
    self._known = None
    self._decode = make_decoder(config)  # latent runs: load the VAE first (a missing file)
    if self.num_inpaint > 0:  # host-side set-up first: a bad split fails before any jit
      grid = diffusion.token_grid((1, *builders.data_shape(config)),
                                  int(config.diffusion.patch_size))[1:]
      self._mask = sampling.masks.make_mask(config.sampling.inpaint_mask, self.num_inpaint,
                                            grid, seed=int(config.seed))
      images, self._labels = data_lib.reference_images(config.data, self.num_inpaint)
      self._known = (pixels.to_model_range(images) if images.dtype == np.uint8
                     else images.astype(np.float32))  # latents are the model's data already
    self._sample = make_sample_fn(config, setup, n, inpaint=False)
    self._inpaint = (make_sample_fn(config, setup, self.num_inpaint, inpaint=True)
                     if self.num_inpaint > 0 else None)
    self._root = rng_streams.root_key(config.seed, rng_streams.Stream.SAMPLE_GRIDS)

  def __call__(self, state: state_lib.TrainState, step: int) -> dict[str, np.ndarray]:
    """Samples at `step`; returns the images in [-1, 1] (for tests and notebooks)."""
    params = state.ema[self.ema]
    key = jax.random.fold_in(self._root, step)
    to_images = self._decode or np.asarray  # latent runs decode, pixel runs are images
    out = {"samples": to_images(self._sample(params, state.model_state, key))}
    classes = int(self.config.model.num_classes)
    nrow = {"samples": classes if 0 < classes <= 16 else None}  # a column per class
    if self._inpaint is not None:
      done = np.asarray(self._inpaint(params, state.model_state, jax.random.fold_in(key, 1),
                                      jnp.asarray(self._known), jnp.asarray(self._mask),
                                      jnp.asarray(self._labels)))
      original = to_images(self._known)
      context = visualize.masked_images(original, self._mask)
      # Rows: the known context (unknown tokens grey), the completion, the original.
      out["inpaint"] = np.concatenate([context, to_images(done), original], axis=0)
      nrow["inpaint"] = self.num_inpaint
    if jax.process_index() == 0:
      for name, images in out.items():
        for suffix in (f"{step:08d}", "latest"):
          visualize.save_image_grid(images, self.workdir / f"{name}_{suffix}.png", nrow[name])
        if self.writer is not None:
          grid = visualize.make_grid(pixels.to_uint8(images), nrow[name])
          self.writer.write_images(step, {name: grid[None]})
      logging.info("Wrote sample grids for step %d to %s", step, self.workdir)
    return out
