"""Held-out evaluation (the `Evaluator` the trainer calls) and the `--mode=eval` job (`evaluate`):
the training objective, bits/dim along corruption paths, FID and KID. The metric networks
(Inception, FID statistics) are the `evaluation` package.

The objective is evaluated with the training level sampler but a fixed key per batch, so numbers
from different steps are comparable. Bits/dim is the negative ELBO (discretised 8-bit decoder,
`eval.elbo_steps` strata) along each path of `eval.paths` (docs/method.md): 'homogeneous' (VDM's
continuous-time bound), 'raster' (the autoregressive order) and 'random' (a random token order per
example), each with its standard error over the examples (`*_se`). `evaluate(config, workdir)` is
`--mode=eval`: the latest checkpoint's EMA over the whole eval split, plus FID / KID of
`eval.fid_samples` samples against the `eval.fid_split` statistics, into
`<workdir>/eval_step_<step>.json`. With `eval.compare_workdir`, a second checkpoint of the same
model is evaluated on the same examples with the same s and noise (common random numbers), and
the paired difference (this − compared) in bits/dim comes with its standard error (`*_diff`,
`*_diff_se`): far smaller than the unpaired one, so small gains are measurable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import data as data_lib
from asyncpatch_jax import diffusion, evaluation, file_io, models, pixels, rng_streams
from asyncpatch_jax import progress as progress_lib
from asyncpatch_jax.data import pipeline, preparation
from asyncpatch_jax.data import preprocess as preprocess_lib
from asyncpatch_jax.diffusion import elbo, paths
from asyncpatch_jax.evaluation import adm, fid
from asyncpatch_jax.latents import encode
from asyncpatch_jax.train import builders
from asyncpatch_jax.train import restore as restore_lib
from asyncpatch_jax.train import samples as samples_lib
from asyncpatch_jax.train import state as state_lib
from asyncpatch_jax.train import step as step_lib

PATHS = paths.NAMES


def path_names(eval_config: Any) -> tuple[str, ...]:
  """`eval.paths`, a tuple of names, each checked against `PATHS`."""
  names = eval_config.paths
  if isinstance(names, str) or not all(isinstance(n, str) for n in names):
    raise ValueError(f"eval.paths={names!r} must be a tuple of path names, e.g. "
                     f"--config.eval.paths=\"('homogeneous','raster')\"")
  unknown = [n for n in names if n not in PATHS]
  if unknown or not names:
    raise ValueError(f"eval.paths={names!r}: unknown path(s) {unknown}; choose one or more of "
                     f"{PATHS}")
  return tuple(names)


def make_path(name: str, grid: tuple[int, ...], key: jax.Array) -> paths.Path:
  """The corruption path `name` on the token grid `[B, *spatial]` (the key draws random orders)."""
  if name == "homogeneous":
    return paths.homogeneous()
  if name == "raster":
    return paths.raster(grid[1:])
  return paths.random_order(grid[1:], key, batch=grid[0])


def bpd_key(path_name: str) -> str:
  """The result key of bits/dim along a path: 'bpd' (homogeneous) or 'bpd_<path>'."""
  return "bpd" if path_name == "homogeneous" else f"bpd_{path_name}"


class Evaluator:
  """Mean held-out loss and bits/dim per path (each with its standard error) over `num_batches`
  global batches of the eval split (0: the whole split); with `compare=True` also the paired
  bits/dim difference against a second set of parameters passed to each call."""

  def __init__(self, config: Any, setup: state_lib.StateSetup, batch_sharding: NamedSharding,
               num_batches: int | None = None, compare: bool = False):
    self.config, self.setup, self.batch_sharding = config, setup, batch_sharding
    self.num_batches = int(config.eval.num_batches) if num_batches is None else num_batches
    # Open the split now, so a missing or too small eval split fails before any compilation.
    self._source = data_lib.get_source(config.data, config.data.eval_split)
    if len(self._source) < int(config.data.batch_size):
      raise ValueError(f"the eval split {config.data.eval_split!r} has {len(self._source)} "
                       f"records, fewer than one global batch ({config.data.batch_size})")
    loss_fn = step_lib.make_loss_fn(config, setup.model_def, train=False)
    schedule = builders.make_schedule(config.diffusion)
    patch = int(config.diffusion.patch_size)
    elbo_steps = int(config.eval.elbo_steps)
    names = path_names(config.eval) if elbo_steps > 0 else ()
    if compare and not names:
      raise ValueError("eval.compare_workdir compares bits/dim: set eval.elbo_steps > 0")
    grid = diffusion.token_grid((int(config.data.batch_size), *builders.data_shape(config)),
                                patch)
    num_classes = int(config.model.num_classes)
    root = rng_streams.root_key(config.seed, rng_streams.Stream.EVAL)
    latents = data_lib.latent_data(config.data)  # float32 batches, the model's data already

    def eval_step(params, model_state, batch, index, *other):
      key = jax.random.fold_in(root, index)
      _, (aux, _) = loss_fn(params, model_state, batch, key)
      out = {"loss": aux["loss"], "mse": aux["mse"], "nll": aux["nll"]}
      labels = batch["label"].astype(jnp.int32) if num_classes else None
      x0 = (jnp.asarray(batch["image"], jnp.float32) if latents
            else pixels.to_model_range(batch["image"]))
      networks = {"": (params, model_state)}
      if other:
        networks["_compare"] = other
      for suffix, (p, m) in networks.items():
        denoiser = models.make_denoiser(
            setup.model_def.merge(p, m), schedule=schedule,
            parametrization=config.model.parametrization, patch_size=patch, labels=labels,
            num_classes=num_classes)
        for name in names:
          # The same keys for every path and network: common random numbers.
          path = make_path(name, grid, jax.random.fold_in(key, 2))
          bound = elbo.nelbo(denoiser, x0, jax.random.fold_in(key, 1), schedule=schedule,
                             path=path, num_steps=elbo_steps, patch_size=patch,
                             data="discrete8bit")
          out[bpd_key(name) + suffix] = bound["bpd"]  # per example
      return out

    replicated = NamedSharding(setup.mesh, P())
    network_shardings = (setup.shardings.params, setup.shardings.model_state)
    self._step = jax.jit(
        eval_step, in_shardings=(*network_shardings, batch_sharding, replicated,
                                 *(network_shardings if compare else ())),
        out_shardings=replicated)
    self._names, self._compare = names, compare

  def __call__(self, state: state_lib.TrainState,
               compare_state: state_lib.TrainState | None = None) -> dict[str, float]:
    if (compare_state is not None) != self._compare:
      raise ValueError("pass compare_state exactly when the Evaluator was built with compare=True")
    ema = restore_lib.ema_params_name(self.config)
    params = state.ema[ema]
    other = (() if compare_state is None else
             (compare_state.ema[ema], compare_state.model_state))
    pipeline = data_lib.create_eval_pipeline(self.config.data, self.batch_sharding,
                                             max_batches=self.num_batches or None,
                                             source=self._source)
    totals: dict[str, float] = {}
    per_example: dict[str, list[np.ndarray]] = {}
    count = 0
    for index, batch in enumerate(pipeline):
      if pipeline.num_batches is not None and index >= pipeline.num_batches:
        break
      out = self._step(params, state.model_state, batch, jnp.int32(index), *other)
      for k, v in out.items():
        if k.startswith("bpd"):
          per_example.setdefault(k, []).append(np.asarray(v))
        else:
          totals[k] = totals.get(k, 0.0) + float(np.asarray(v))
      count += 1
    results = {f"eval/{k}": v / max(count, 1) for k, v in totals.items()}
    for name in self._names:
      key = bpd_key(name)
      values = np.concatenate(per_example[key])
      if self._compare:
        pair = elbo.paired_difference(values, np.concatenate(per_example[key + "_compare"]))
        results.update({f"eval/{key}_compare": pair["b"], f"eval/{key}_compare_se": pair["b_se"],
                        f"eval/{key}_diff": pair["diff"], f"eval/{key}_diff_se": pair["diff_se"]})
      results[f"eval/{key}"], results[f"eval/{key}_se"] = elbo.mean_and_stderr(values)
    return results


def _reference_batches(config: Any, split: str, batch: int) -> Callable[[], Iterator[np.ndarray]]:
  """Every image of `split` in uint8 batches: preprocessed as for training (no flips), or for a
  latent run the images its cache encoded (ADM centre crop at `data.image_size`)."""
  def batches() -> Iterator[np.ndarray]:
    if data_lib.latent_data(config.data):  # a latent cache (synthetic latents have no FID)
      lsun = bool(config.data.lsun_category)
      source, _ = encode.make_source(
          "lsun" if lsun else "tfds", image_size=int(config.data.image_size),
          tfds_name=config.data.tfds_name, split=split, tfds_data_dir=config.data.tfds_data_dir,
          label_key=config.data.label_key,
          lsun_lmdb=preparation.lsun_lmdb(config.data, split) if lsun else "")
      size = int(config.data.image_size)
      load = lambda i: data_lib.center_crop_resize(
          preprocess_lib.to_channels(np.asarray(source[i]["image"]), 3), size)
    else:
      source = data_lib.get_source(config.data, split)
      preprocess = pipeline.make_preprocess(config.data, train=False, source=source)
      load = lambda i: preprocess(source[i])["image"]
    progress = progress_lib.Progress(f"FID reference statistics ({split})", len(source),
                                     unit="images")
    for start in range(0, len(source), batch):
      images = np.stack([load(i) for i in range(start, min(start + batch, len(source)))])
      yield images
      progress.update(len(images))
  return batches


def _rgb(images: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """Grey images to three channels (Inception takes RGB)."""
  return images if images.shape[-1] == 3 else jnp.repeat(images, 3, axis=-1)


def reference_name(config: Any) -> str:
  """The cache name of the FID reference statistics, e.g. 'tfds-cifar10-train-32'."""
  name = (f"{config.data.source}-{config.data.tfds_name or 'data'}-{config.eval.fid_split}-"
          f"{config.data.image_size}")
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def fid_protocol(config: Any) -> dict[str, Any]:
  """The FID protocol `--mode=eval` follows (README, "FID protocols"), for its JSON."""
  reference, sampling = config.eval.fid_reference, config.sampling
  return {"samples": int(config.eval.fid_samples),
          "reference": (f"{os.path.basename(reference)} (ADM reference batch)" if reference
                        else f"statistics of split {config.eval.fid_split!r}"),
          "sampler": sampling.strategy, "steps": int(sampling.num_steps),
          "stochastic": bool(sampling.stochastic), "cfg_scale": float(sampling.cfg_scale),
          "ema": restore_lib.ema_params_name(config), "features": fid.PROTOCOL}


def sample_quality(config: Any, setup: state_lib.StateSetup, state: state_lib.TrainState,
                   workdir: epath.Path, *, export: epath.Path | None = None) -> dict[str, float]:
  """FID and KID of `eval.fid_samples` samples (config.sampling's strategy) against the
  `eval.fid_split` statistics, cached in `eval.fid_cache_dir` (default `<workdir>/fid_cache`),
  or FID against the `mu` / `sigma` of the ADM reference batch `eval.fid_reference`. With
  `export`, the samples are also written there as ADM's sample batch (`evaluation/adm.py`)."""
  num = int(config.eval.fid_samples)
  decode = samples_lib.make_decoder(config)  # latent runs: FID of the decoded images
  shape = builders.data_shape(config)
  if decode is None and (len(shape) != 3 or shape[-1] not in (1, 3)):
    raise ValueError(f"FID needs images with 1 or 3 channels, not data of shape {shape}; set "
                     f"--config.eval.fid_samples=0")
  extractor = evaluation.FeatureExtractor(mesh=setup.mesh)
  batch = int(config.eval.fid_batch_size)
  cache_dir = config.eval.fid_cache_dir or os.fspath(workdir / "fid_cache")
  if config.eval.fid_reference:
    reference = adm.read_reference(config.eval.fid_reference)
  else:
    reference = evaluation.reference_statistics(
        reference_name(config),
        lambda: map(_rgb, _reference_batches(config, config.eval.fid_split, batch)()),
        extractor, cache_dir)
  writer = None
  if export is not None and jax.process_index() == 0:
    size = int(config.data.image_size)
    writer = adm.SampleBatchWriter(export, num, (size, size))
  progress = progress_lib.Progress("FID samples", num, unit="images")
  sample_fn = samples_lib.make_sample_fn(config, setup, batch, inpaint=False)
  params = state.ema[restore_lib.ema_params_name(config)]
  root = rng_streams.root_key(config.seed, rng_streams.Stream.FID_SAMPLES)
  features = []
  try:
    for i in range(math.ceil(num / batch)):
      images = sample_fn(params, state.model_state, jax.random.fold_in(root, i))
      if decode is not None:
        images = decode(images)
      features.append(extractor(_rgb(images)))
      kept = min(batch, num - i * batch)
      if writer is not None:
        writer.add(np.asarray(images)[:kept])
      progress.update(kept)
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  if writer is not None:
    writer.close()
    logging.info("Wrote the samples as an ADM sample batch: %s", export)
  features = np.concatenate(features)[:num]
  scores = evaluation.fid_kid(features, reference,
                              kid_subset_size=min(1000, num, reference.stats.count))
  return {f"eval/{k}": float(v) for k, v in scores.items()}


def evaluate(config: Any, workdir: str | epath.Path) -> dict[str, float]:
  """`--mode=eval`: the latest checkpoint's EMA over the whole eval split (loss and bits/dim
  along `eval.paths`, with standard errors), the paired bits/dim difference against
  `eval.compare_workdir`'s checkpoint when set, and FID / KID when `eval.fid_samples` > 0;
  writes `<workdir>/eval_step_<step>.json`."""
  with_fid = int(config.eval.fid_samples) > 0
  if with_fid and config.eval.fid_reference:  # a missing reference batch fails before any work
    adm.read_reference(config.eval.fid_reference)
  compare_dir = str(config.eval.compare_workdir)
  workdir, batch_sharding, setup, state, step = restore_lib.restore_latest(config, workdir)
  compare_state = compare_step = None
  if compare_dir:
    # The same model (restore_latest checks the config's compatibility) from another run or step.
    *_, compare_state, compare_step = restore_lib.restore_latest(
        config, compare_dir, step=int(config.eval.compare_step) or None)
  evaluator = Evaluator(config, setup, batch_sharding, num_batches=0,
                        compare=compare_state is not None)
  results: dict[str, Any] = evaluator(state, compare_state)
  if with_fid:
    export = workdir / f"fid_samples_step_{step}.npz" if config.eval.fid_export else None
    results.update(sample_quality(config, setup, state, workdir, export=export))
    results["protocol"] = fid_protocol(config)
  results["step"] = step
  results["settings"] = {"ema": restore_lib.ema_params_name(config),
                         "elbo_steps": int(config.eval.elbo_steps),
                         "paths": list(path_names(config.eval)), "split": config.data.eval_split,
                         "fid_split": config.eval.fid_split,
                         "fid_samples": int(config.eval.fid_samples),
                         "sampling": config.sampling.to_dict()}
  if compare_dir:
    results["settings"]["compare"] = {"workdir": compare_dir, "step": compare_step,
                                      "difference": "this checkpoint − compared, bits/dim"}
  logging.info("Evaluation at step %d: %s", step, results)
  if jax.process_index() == 0:
    file_io.write_json(workdir / f"eval_step_{step}.json", results)
  # The scalars also go to TensorBoard, in the run's event files at the checkpoint's step.
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, {k: v for k, v in results.items()
                              if k.startswith("eval/") and isinstance(v, int | float)})
  writer.close()
  return results
