"""The paper's six claims, measured at CPU scale on the bundled MNIST subset and the textures.

Per data set, up to three networks are trained from the data set's config with the same
architecture, batch and number of optimizer updates (equal training compute), differing only in
the training level sampler: `asyncpatch` (the recipe's controlled mixture), `conventional`
(homogeneous maps: standard diffusion) and `iid` (independent levels, Diffusion Forcing). All
have the uncertainty head (claim 5 needs it). Then, with the EMA parameters:

1. asyncpatch vs conventional under homogeneous (uniform) sampling: FID/KID and bits/dim along
   the homogeneous path.
2. asyncpatch (controlled sampler) vs iid levels: the same metrics.
3. Inpainting per mask family: native inpainting (asyncpatch) vs RePaint on the conventional
   model (and on asyncpatch), LPIPS to the original and NFE; RePaint with resample=1 is plain
   replacement at the native NFE.
4. Input guidance on asyncpatch: a sweep of ω and of the re-noise level k; LPIPS and texture
   statistics of the hole against its context (`evaluation.texture_stats`).
5. Uncertainty-guided acceleration (adaptive plans) on asyncpatch: FID against measured NFE,
   next to uniform plans with the same NFE.
6. Autoregressive (raster) sampling on asyncpatch: FID; and bits/dim along the raster path for
   every model.

FID uses the TF Inception (pool3) on `--num_fid` samples against `--num_ref` test images; FID
of a few hundred samples is biased upwards, so compare numbers within a table, not with
published ones. `--quick` runs every claim at toy size with a cheap stand-in feature network
(LPIPS AlexNet conv5, mean-pooled): a smoke test of the pipeline, not a measurement.

The defaults (32×32, six networks of 1000 updates at batch 16 capped at 10 minutes each, 250
FID samples, 25 sampling steps) are sized for about two hours on an idle 2-core CPU, an
estimate scaled from the reduced run recorded in results/claims (16×16, 551 updates: 55 minutes
on the shared, loaded machine).

Results go to `<out>/claims.json`, `<out>/claims.md` and PNG plots, rewritten (atomically)
after each claim, so an interrupted run keeps what it measured. Trained networks stay in
`--workdir` and are reused by a re-run with the same settings.

    python benchmarks/claims.py --out results/claims          # the defaults (see above)
    python benchmarks/claims.py --quick --out /tmp/claims     # every claim at toy size
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import sys
import time
import zlib
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402

from asyncpatch_jax import data as data_lib  # noqa: E402
from asyncpatch_jax import (  # noqa: E402
    diffusion,
    file_io,
    models,
    pixels,
    sampling,
    user_errors,
    visualize,
)
from asyncpatch_jax.diffusion import elbo, level_samplers, paths  # noqa: E402
from asyncpatch_jax.evaluation import fid as fid_lib  # noqa: E402
from asyncpatch_jax.evaluation import images as images_lib  # noqa: E402
from asyncpatch_jax.evaluation import lpips as lpips_lib  # noqa: E402
from asyncpatch_jax.evaluation import texture_stats  # noqa: E402
from asyncpatch_jax.train import builders, trainer  # noqa: E402
from asyncpatch_jax.train import restore as restore_lib  # noqa: E402
from asyncpatch_jax.train import samples as samples_lib  # noqa: E402
from configs import mnist as mnist_config  # noqa: E402
from configs import textures as textures_config  # noqa: E402

DATASETS = {"mnist": mnist_config, "textures": textures_config}
VARIANTS = ("asyncpatch", "conventional", "iid")
CLAIMS = (1, 2, 3, 4, 5, 6)
# Which networks each claim reads.
NEEDS = {1: ("asyncpatch", "conventional"), 2: ("asyncpatch", "iid"),
         3: ("asyncpatch", "conventional"), 4: ("asyncpatch",), 5: ("asyncpatch",),
         6: ("asyncpatch", "conventional", "iid")}
TITLES = {
    1: "AsyncPatch vs conventional diffusion under homogeneous sampling",
    2: "Controlled level sampler vs naive iid levels",
    3: "Native inpainting vs RePaint",
    4: "Input guidance: ω and re-noise level k (inpainting)",
    5: "Uncertainty-guided acceleration: FID against NFE",
    6: "Autoregressive sampling and the raster-path ELBO",
}
QUICK = dict(image_size=8, batch_size=8, train_steps=3, train_minutes=2.0, num_fid=16, num_ref=16,
             sample_steps=4, elbo_steps=2, elbo_examples=8, num_inpaint=8, masks="box,half",
             repaint_jump=2, repaint_resample=2, guidance_scales="0,1", guidance_levels="0.5",
             accel_steps="4", ar_steps_per_group=2, ar_overlap=0.5, features="alexnet",
             batch=16, claims=["mnist=1,2,3,4,5,6"])


# ------------------------------------------------------------------------------------------------
# Settings.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default=os.path.join(ROOT, "results", "claims"),
                 help="folder for claims.json, claims.md and the plots")
  p.add_argument("--workdir", default="/tmp/asyncpatch_claims",
                 help="training runs (reused when the settings match)")
  p.add_argument("--quick", action="store_true", help="every claim at toy size (a smoke test)")
  p.add_argument("--claims", action="append", default=None, metavar="DATASET=1,2,…",
                 help="claims per data set (repeatable); default mnist=1,2,3,5,6 and "
                      "textures=1,2,3,4")
  p.add_argument("--image_size", type=int, default=0, help="0: the data set config's (32)")
  p.add_argument("--batch_size", type=int, default=16,
                 help="training batch (more updates per minute on a CPU); 0: the data set "
                      "config's (MNIST 32, textures 64)")
  p.add_argument("--train_steps", type=int, default=1000,
                 help="optimizer updates per network (equal for every network)")
  p.add_argument("--train_minutes", type=float, default=10.0,
                 help="cap per network; once a network hits it, every later one (of any data set) "
                      "trains for the updates it reached")
  p.add_argument("--num_fid", type=int, default=250, help="samples per FID")
  p.add_argument("--num_ref", type=int, default=250, help="test images for the FID reference")
  p.add_argument("--sample_steps", type=int, default=25, help="uniform sampling steps")
  p.add_argument("--elbo_steps", type=int, default=16, help="strata of the ELBO integral")
  p.add_argument("--elbo_examples", type=int, default=64, help="test images for bits/dim")
  p.add_argument("--num_inpaint", type=int, default=32, help="test images per mask")
  p.add_argument("--masks", default="box,half,narrow,wide", help="mask families (claim 3)")
  p.add_argument("--repaint_jump", type=int, default=5)
  p.add_argument("--repaint_resample", type=int, default=5)
  p.add_argument("--guidance_scales", default="0,0.5,1,2", help="ω sweep (at k=0.5)")
  p.add_argument("--guidance_levels", default="0.3,0.5,0.8",
                 help="k sweep (at the ω of lowest LPIPS)")
  p.add_argument("--guidance_mask", default="box", help="mask family of claim 4")
  p.add_argument("--accel_steps", default="25,50",
                 help="reference budgets M of the step-size rule (claim 5)")
  p.add_argument("--ar_steps_per_group", type=int, default=4)
  p.add_argument("--ar_overlap", type=float, default=0.75)
  p.add_argument("--features", choices=("inception", "alexnet"), default="inception")
  p.add_argument("--batch", type=int, default=64, help="sampling batch")
  p.add_argument("--seed", type=int, default=0)
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  given = {a.dest for a in p._actions for o in a.option_strings
           if any(w == o or w.startswith(o + "=") for w in argv)}
  if args.quick:  # toy sizes for every setting not given on the command line
    for key, value in QUICK.items():
      if key not in given:
        setattr(args, key, value)
    if "workdir" not in given:
      args.workdir = os.path.join(args.out, "work")
  if args.claims is None:
    args.claims = ["mnist=1,2,3,5,6", "textures=1,2,3,4"]
  args.plan = parse_plan(args.claims)
  for name in ("num_fid", "num_ref", "sample_steps", "elbo_steps", "elbo_examples",
               "num_inpaint", "train_steps", "batch"):
    if getattr(args, name) < (2 if name in ("num_fid", "num_ref") else 1):
      raise ValueError(f"--{name} must be positive (FID needs at least 2), got "
                       f"{getattr(args, name)}")
  for name in args.masks.split(",") + [args.guidance_mask]:
    if name not in sampling.masks.MASKS:
      raise ValueError(f"unknown mask {name!r}; choose from {sorted(sampling.masks.MASKS)}")
  return args


def parse_plan(specs: list[str]) -> dict[str, tuple[int, ...]]:
  """['mnist=1,2', 'textures=3'] → {'mnist': (1, 2), 'textures': (3,)} with clear errors."""
  plan: dict[str, tuple[int, ...]] = {}
  for spec in specs:
    name, sep, numbers = spec.partition("=")
    if not sep or name not in DATASETS:
      raise ValueError(f"--claims takes DATASET=1,2,… with DATASET one of {sorted(DATASETS)}, "
                       f"got {spec!r}")
    try:
      claims = tuple(sorted({int(n) for n in numbers.split(",") if n.strip()}))
    except ValueError:
      raise ValueError(f"--claims {spec!r}: claims are integers in {CLAIMS}") from None
    if not claims or any(c not in CLAIMS for c in claims):
      raise ValueError(f"--claims {spec!r}: claims are integers in {CLAIMS}")
    plan[name] = claims
  return plan


def floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def log(message: str) -> None:
  stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
  print(f"[claims {stamp}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Networks.


def make_config(dataset: str, variant: str, args: argparse.Namespace,
                steps: int) -> ml_collections.ConfigDict:
  """The data set's config with the variant's level sampler, the uncertainty head, `steps`
  updates (warm-up set by `--train_steps`, so a capped run's peers keep the same schedule) and
  no intermediate grids (the trainer's final grids are one image)."""
  config = DATASETS[dataset].get_config("debug" if args.quick else None)
  with config.unlocked():
    if variant == "conventional":
      config.diffusion.level_sampler = ml_collections.ConfigDict({"name": "homogeneous"})
    elif variant == "iid":
      config.diffusion.level_sampler = ml_collections.ConfigDict({"name": "iid"})
    elif variant == "asyncpatch":
      config.diffusion.level_sampler = level_samplers.default_config()
    else:
      raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    config.seed = int(args.seed)
    config.model.uncertainty = True
    if args.image_size:
      config.data.image_size = int(args.image_size)
      if config.data.image_size < 16:
        config.model.unet.attention_resolutions = ()
    if args.batch_size:
      config.data.batch_size = int(args.batch_size)
    config.num_steps = int(steps)
    config.train_minutes = float(args.train_minutes)
    config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps),
                                          max(1, int(args.train_steps) // 5))
    config.checkpoint.every_steps = int(steps)
    config.checkpoint.max_to_keep = 1
    config.checkpoint.async_save = False
    config.logging.log_every_steps = max(1, min(50, steps))
    config.logging.parameter_overview = False
    config.eval.every_steps = 0
    config.sampling.every_steps = 0
    config.sampling.num_samples = 1
    config.sampling.num_steps = 1
    config.sampling.num_inpaint = 1
  return config


@dataclasses.dataclass
class Network:
  """A trained network's EMA parameters and what goes with them."""

  dataset: str
  variant: str
  config: Any
  setup: Any
  params: Any
  model_state: Any
  steps: int
  train_seconds: float


def settings_hash(config: Any) -> str:
  return hashlib.sha1(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:10]


def train_network(dataset: str, variant: str, args: argparse.Namespace, steps: int) -> Network:
  """Trains (or reuses a finished run of) one network and returns its EMA parameters."""
  config = make_config(dataset, variant, args, steps)
  workdir = os.path.join(args.workdir, f"{dataset}-{variant}-{settings_hash(config)}")
  done = os.path.join(workdir, "claims_trained.json")
  if os.path.exists(done):
    with open(done) as f:
      record = json.load(f)
    log(f"{dataset}/{variant}: reusing {workdir} ({record['steps']} steps)")
  else:
    log(f"{dataset}/{variant}: training for {steps} steps (cap {args.train_minutes} min)")
    start = time.monotonic()
    trainer.train_and_evaluate(config, workdir)
    record = {"train_seconds": time.monotonic() - start}
  _, _, setup, state, step = restore_lib.restore_latest(config, workdir)
  record["steps"] = int(step)
  if not os.path.exists(done):
    with file_io.atomic_open(done) as f:  # a torn marker would break the next reuse
      json.dump(record, f)
  params = state.ema[restore_lib.ema_params_name(config)]
  log(f"{dataset}/{variant}: {record['steps']} steps, {record['train_seconds']:.0f} s")
  return Network(dataset, variant, config, setup, params, state.model_state, int(step),
                 float(record["train_seconds"]))


# ------------------------------------------------------------------------------------------------
# Feature networks.


class AlexNetFeatures:
  """Mean-pooled conv5 activations of LPIPS' AlexNet at 64×64 (256-d): a cheap stand-in for the
  Inception in `--quick` runs. Its "FID" is not comparable with anything published."""

  def __init__(self, size: int = 64):
    backbone = lpips_lib.load_lpips("alexnet").backbone
    graphdef, self._state = nnx.split(backbone)
    self.fingerprint = f"lpips-alexnet-conv5-mean-{size}px"

    def features(state, images):
      x = images_lib.to_model_range(images)
      x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")
      return nnx.merge(graphdef, state)(x)[-1].mean(axis=(1, 2))

    self._features = jax.jit(features)

  def __call__(self, images: Any) -> np.ndarray:
    images_lib.check_images(images)
    return np.asarray(self._features(self._state, images), np.float32)

  def features(self, batches: Any) -> np.ndarray:
    return np.concatenate([self(b) for b in batches])


# ------------------------------------------------------------------------------------------------
# Measurements on one data set.


def save_grid(images: np.ndarray, path: str, nrow: int | None) -> None:
  """An image grid, each image enlarged (nearest) to at least 64 pixels so small ones show."""
  scale = max(1, -(-64 // images.shape[1]))
  visualize.save_image_grid(images.repeat(scale, axis=1).repeat(scale, axis=2), path, nrow)


def _key_of(*parts: Any) -> int:
  return zlib.crc32("/".join(str(p) for p in parts).encode())


class DatasetBench:
  """Samplers, FID, LPIPS, bits/dim and inpainting for the networks of one data set.

  Compiled functions take the parameters as arguments, so the networks of a data set (same
  architecture) share one program per sampler.
  """

  def __init__(self, dataset: str, networks: dict[str, Network], args: argparse.Namespace,
               extractor: Any, lpips: lpips_lib.LPIPSDistance):
    self.dataset, self.networks, self.args = dataset, networks, args
    self.extractor, self.lpips = extractor, lpips
    first = next(iter(networks.values()))
    self.config = first.config
    self.model_def = first.setup.model_def
    self.schedule = builders.make_schedule(self.config.diffusion)
    self.patch = int(self.config.diffusion.patch_size)
    self.shape = builders.data_shape(self.config)
    self.grid = diffusion.token_grid((1, *self.shape), self.patch)[1:]
    self.num_classes = int(self.config.model.num_classes)
    self.cfg_scale = float(self.config.sampling.cfg_scale)
    self.root = jax.random.key(int(args.seed))
    self._programs: dict[Any, Any] = {}
    self._fid_cache: dict[Any, dict] = {}
    self._bpd_cache: dict[tuple[str, str], np.ndarray] = {}
    ref_images, _ = data_lib.reference_images(self.config.data, args.num_ref)
    cache = os.path.join(args.workdir, "fid_cache")
    name = f"{dataset}-test-{self.shape[0]}px-{args.num_ref}"
    self.reference = fid_lib.reference_statistics(
        name, lambda: [ref_images[i:i + args.batch] for i in range(0, len(ref_images),
                                                                   args.batch)],
        extractor, cache)
    self.data_variance = float(np.var(pixels.to_model_range(ref_images)))

  # -- sampling ----------------------------------------------------------------------------

  def _denoiser(self, params, model_state, labels, cfg_scale):
    model = self.model_def.merge(params, model_state)
    denoiser = models.make_denoiser(model, schedule=self.schedule,
                                    parametrization=self.config.model.parametrization,
                                    patch_size=self.patch, labels=labels,
                                    cfg_scale=cfg_scale, num_classes=self.num_classes)
    return samples_lib.clip_x0(denoiser)

  def program(self, batch: int, inpaint: bool, **sample_kwargs) -> Any:
    """jit'd `(params, model_state, key, labels, known, mask) -> (samples, nfe)`."""
    key = (batch, inpaint, tuple(sorted(sample_kwargs.items())))
    if key not in self._programs:
      x_shape = (batch, *self.shape)
      cfg = 0.0 if inpaint else self.cfg_scale  # inpainting: the null label, as RePaint

      def run(params, model_state, rng, labels, known, mask):
        denoiser = self._denoiser(params, model_state,
                                  labels if (self.num_classes and not inpaint) else None, cfg)
        extra = dict(known=known, known_mask=mask) if inpaint else {}
        out, info = sampling.sample(denoiser, rng, x_shape, schedule=self.schedule,
                                    patch_size=self.patch, **extra, **sample_kwargs)
        return jnp.clip(out, -1.0, 1.0), info["nfe"]

      self._programs[key] = jax.jit(run)
    return self._programs[key]

  def generate(self, variant: str, num: int, name: str, **sample_kwargs
               ) -> tuple[np.ndarray, float]:
    """`num` samples (classes in turn) and the mean NFE per batch."""
    net = self.networks[variant]
    batch = min(self.args.batch, num)
    fn = self.program(batch, False, **sample_kwargs)
    outs, nfes = [], []
    for i in range(math.ceil(num / batch)):
      labels = (jnp.arange(i * batch, (i + 1) * batch, dtype=jnp.int32) % self.num_classes
                if self.num_classes else jnp.zeros((batch,), jnp.int32))
      key = jax.random.fold_in(self.root, _key_of(self.dataset, name, i))
      out, nfe = fn(net.params, net.model_state, key, labels, None, None)
      outs.append(np.asarray(out))
      nfes.append(int(nfe))
    return np.concatenate(outs)[:num], float(np.mean(nfes))

  def fid(self, variant: str, name: str, **sample_kwargs) -> dict[str, Any]:
    """FID/KID of `num_fid` samples (cached per variant and sampler); also saves a grid."""
    key = (variant, tuple(sorted(sample_kwargs.items())))
    if key not in self._fid_cache:
      start = time.monotonic()
      images, nfe = self.generate(variant, self.args.num_fid, f"fid/{key}", **sample_kwargs)
      scores = fid_lib.fid_kid(self.extractor.features(
          [images[i:i + self.args.batch] for i in range(0, len(images), self.args.batch)]),
          self.reference)
      grid_name = f"samples_{self.dataset}_{variant}_{name}.png"
      nrow = self.num_classes if 0 < self.num_classes <= 16 else None
      save_grid(images[:min(len(images), 4 * (nrow or 8))],
                os.path.join(self.args.out, grid_name), nrow)
      self._fid_cache[key] = {"fid": scores["fid"], "kid": scores.get("kid"), "nfe": nfe,
                              "num_samples": len(images), "grid": grid_name,
                              "seconds": time.monotonic() - start}
      log(f"{self.dataset}/{variant} {name}: FID {scores['fid']:.2f} at NFE {nfe:.1f}")
    return dict(self._fid_cache[key])

  # -- bits/dim ----------------------------------------------------------------------------

  def bpd_values(self, variant: str, path_name: str) -> np.ndarray:
    """Per-example bits/dim along 'homogeneous' or 'raster' (cached). The keys depend on the
    path and the batch, not the network: every network sees the same x0, s and noise (common
    random numbers), so differences between networks are paired."""
    key = (variant, path_name)
    if key in self._bpd_cache:
      return self._bpd_cache[key]
    net = self.networks[variant]
    images, labels = data_lib.reference_images(self.config.data, self.args.elbo_examples)
    path = paths.homogeneous() if path_name == "homogeneous" else paths.raster(self.grid)
    program = ("elbo", path_name)
    if program not in self._programs:
      def run(params, model_state, x0, labels, rng):
        model = self.model_def.merge(params, model_state)
        denoiser = models.make_denoiser(model, schedule=self.schedule,
                                        parametrization=self.config.model.parametrization,
                                        patch_size=self.patch,
                                        labels=labels if self.num_classes else None,
                                        num_classes=self.num_classes)
        return elbo.nelbo(denoiser, x0, rng, schedule=self.schedule, path=path,
                          num_steps=self.args.elbo_steps, patch_size=self.patch,
                          data="discrete8bit", data_variance=self.data_variance)["bpd"]

      self._programs[program] = jax.jit(run)
    values = []
    for i in range(0, len(images), self.args.batch):
      x0 = pixels.to_model_range(images[i:i + self.args.batch])
      rng = jax.random.fold_in(self.root, _key_of(self.dataset, "elbo", path_name, i))
      values.append(np.asarray(self._programs[program](net.params, net.model_state, x0,
                                                       labels[i:i + self.args.batch], rng)))
    self._bpd_cache[key] = np.concatenate(values)
    return self._bpd_cache[key]

  def bpd(self, variant: str, path_name: str) -> dict[str, float]:
    """Mean bits/dim along 'homogeneous' or 'raster' and its standard error."""
    return dict(zip(("bpd", "bpd_se"), elbo.mean_and_stderr(self.bpd_values(variant, path_name))))

  def bpd_difference(self, variant: str, other: str, path_name: str) -> dict[str, float]:
    """Paired bits/dim difference `variant − other` (same x0, s, noise) with its standard error,
    and the unpaired standard error for comparison."""
    pair = elbo.paired_difference(self.bpd_values(variant, path_name),
                                  self.bpd_values(other, path_name))
    return {"bpd_diff": pair["diff"], "bpd_diff_se": pair["diff_se"],
            "bpd_diff_se_unpaired": pair["diff_se_unpaired"]}

  # -- inpainting --------------------------------------------------------------------------

  def inpaint_set(self, mask_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The originals (float [-1, 1]) and a token mask for claim 3/4, fixed by the seed."""
    images, _ = data_lib.reference_images(self.config.data, self.args.num_inpaint)
    mask = sampling.masks.make_mask(mask_name, len(images), self.grid, seed=int(self.args.seed))
    return pixels.to_model_range(images), mask

  def inpaint(self, variant: str, mask_name: str, name: str, **sample_kwargs
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(originals, pixel mask, completions, mean NFE)."""
    net = self.networks[variant]
    originals, mask = self.inpaint_set(mask_name)
    num = len(originals)
    batch = min(self.args.batch, num)
    pad = math.ceil(num / batch) * batch - num
    known = np.concatenate([originals, np.repeat(originals[-1:], pad, 0)])
    mask_p = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
    fn = self.program(batch, True, **sample_kwargs)
    outs, nfes = [], []
    for i in range(0, len(known), batch):
      key = jax.random.fold_in(self.root, _key_of(self.dataset, name, mask_name, i))
      out, nfe = fn(net.params, net.model_state, key, None, known[i:i + batch],
                    mask_p[i:i + batch])
      outs.append(np.asarray(out))
      nfes.append(int(nfe))
    pixel_mask = np.asarray(diffusion.expand_levels(jnp.asarray(mask, jnp.float32),
                                                    (num, *self.shape), self.patch))[..., 0] > 0
    return originals, pixel_mask, np.concatenate(outs)[:num], float(np.mean(nfes))

  def inpaint_scores(self, originals, pixel_mask, completions) -> dict[str, float]:
    lp = self.lpips(completions, originals)
    return {"lpips": float(lp.mean()), "lpips_se": float(lp.std(ddof=1) / math.sqrt(len(lp)))
            if len(lp) > 1 else float("nan")}


# ------------------------------------------------------------------------------------------------
# The claims.


def claim_1_2(bench: DatasetBench, other: str) -> dict[str, Any]:
  """asyncpatch vs `other` (conventional: claim 1, iid: claim 2), uniform sampling."""
  rows = {}
  for variant in ("asyncpatch", other):
    row = bench.fid(variant, "uniform", strategy="uniform", num_steps=bench.args.sample_steps)
    row.update(bench.bpd(variant, "homogeneous"))
    rows[variant] = row
  a, o = rows["asyncpatch"], rows[other]
  pair = bench.bpd_difference("asyncpatch", other, "homogeneous")
  verdict = (f"FID {a['fid']:.2f} (asyncpatch) vs {o['fid']:.2f} ({other}): "
             f"{compare(a['fid'], o['fid'], 0.10)}; homogeneous bits/dim {a['bpd']:.3f} vs "
             f"{o['bpd']:.3f}: {paired_verdict(pair)}")
  return {"rows": rows, "bpd_difference": pair, "verdict": verdict}


def paired_verdict(pair: dict[str, float]) -> str:
  """A paired bits/dim difference (asyncpatch − other) read at two standard errors."""
  diff, se = pair["bpd_diff"], pair["bpd_diff_se"]
  text = (f"difference {diff:+.3f} ± {se:.3f} (paired; unpaired "
          f"± {pair['bpd_diff_se_unpaired']:.3f})")
  if not (np.isfinite(diff) and np.isfinite(se)):
    return "not measurable"
  if abs(diff) <= 2 * se:
    return f"no significant difference, {text}"
  return f"asyncpatch {'better' if diff < 0 else 'worse'}, {text}"


def compare(ours: float, theirs: float, tolerance: float) -> str:
  """'better' / 'comparable (within x%)' / 'worse' for lower-is-better numbers."""
  if not (np.isfinite(ours) and np.isfinite(theirs)):
    return "not measurable"
  if abs(ours - theirs) <= tolerance * abs(theirs):
    return f"comparable (within {tolerance:.0%})"
  return "asyncpatch better" if ours < theirs else "asyncpatch worse"


def claim_3(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  steps = args.sample_steps
  methods = [
      ("native (asyncpatch)", "asyncpatch", dict(strategy="uniform", num_steps=steps)),
      ("RePaint (conventional)", "conventional",
       dict(strategy="repaint", num_steps=steps, jump_length=args.repaint_jump,
            resample=args.repaint_resample)),
      ("replacement, RePaint r=1 (conventional)", "conventional",
       dict(strategy="repaint", num_steps=steps, jump_length=args.repaint_jump, resample=1)),
      ("RePaint (asyncpatch)", "asyncpatch",
       dict(strategy="repaint", num_steps=steps, jump_length=args.repaint_jump,
            resample=args.repaint_resample)),
  ]
  rows: dict[str, dict[str, Any]] = {}
  wins = []
  for mask_name in args.masks.split(","):
    rows[mask_name] = {}
    for label, variant, kwargs in methods:
      originals, pixel_mask, done, nfe = bench.inpaint(variant, mask_name, label, **kwargs)
      row = bench.inpaint_scores(originals, pixel_mask, done)
      row["nfe"] = nfe
      rows[mask_name][label] = row
      if label.startswith("native"):
        # Rows: the known context (hole grey), the completion, the original.
        grid = np.concatenate([visualize.masked_images(originals[:8], pixel_mask[:8]),
                               done[:8], originals[:8]])
        save_grid(grid, os.path.join(args.out, f"inpaint_{bench.dataset}_{mask_name}.png"),
                  min(8, len(originals)))
    r = rows[mask_name]
    native, repaint = r["native (asyncpatch)"], r["RePaint (conventional)"]
    wins.append(native["lpips"] <= repaint["lpips"])
    log(f"{bench.dataset} {mask_name}: LPIPS native {native['lpips']:.4f} (NFE "
        f"{native['nfe']:.0f}) vs RePaint {repaint['lpips']:.4f} (NFE {repaint['nfe']:.0f})")
  verdict = (f"native inpainting has lower LPIPS than RePaint on the conventional model for "
             f"{sum(wins)} of {len(wins)} mask families, at "
             f"{rows[mask_name]['native (asyncpatch)']['nfe']:.0f} vs "
             f"{rows[mask_name]['RePaint (conventional)']['nfe']:.0f} NFE")
  return {"rows": rows, "verdict": verdict}


def texture_scores(images: np.ndarray, pixel_mask: np.ndarray, patch: int) -> dict[str, float]:
  """Mean Gram and local mean/std distances of the holes to their context; the windows are the
  tokens (p×p, so every hole has whole windows), 4×4 pixels when p = 1."""
  window = patch if patch >= 2 else 4

  def mean(v):  # over the images where both regions exist (NaN if none)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")

  return {"gram": mean(texture_stats.gram_distance(images, pixel_mask)),
          "local_stats": mean(texture_stats.local_stats_distance(images, pixel_mask,
                                                                 window=window))}


def claim_4(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  scales, levels = floats(args.guidance_scales), floats(args.guidance_levels)
  # First ω at k = 0.5; then the re-noise level k at the ω with the lowest LPIPS.
  points = [(s, 0.5) for s in scales]
  rows: dict[str, dict[str, Any]] = {}
  originals = pixel_mask = None
  for index in itertools.count():
    if index == len(scales):
      guided = [r for r in rows.values() if r["omega"] > 0]
      best = min(guided, key=lambda r: r["lpips"])["omega"] if guided else 1.0
      points += [(best, k) for k in levels if k != 0.5]
    if index == len(points):
      break
    scale, level = points[index]
    kwargs = dict(strategy="uniform", num_steps=args.sample_steps)
    if scale > 0:
      kwargs.update(input_guidance=float(scale), guidance_level=float(level))
    label = f"ω={scale:g}" + (f", k={level:g}" if scale > 0 else "")
    originals, pixel_mask, done, nfe = bench.inpaint("asyncpatch", args.guidance_mask, label,
                                                     **kwargs)
    row = bench.inpaint_scores(originals, pixel_mask, done)
    row.update(omega=scale, level=level if scale > 0 else None, nfe=nfe,
               **texture_scores(done, pixel_mask, bench.patch))
    rows[label] = row
    log(f"{bench.dataset} {label}: LPIPS {row['lpips']:.4f}, Gram {row['gram']:.3f}, local "
        f"{row['local_stats']:.3f}")
  truth = texture_scores(originals, pixel_mask, bench.patch)
  base = rows["ω=0"] if "ω=0" in rows else None
  guided = {k: v for k, v in rows.items() if v["omega"] > 0}
  if base and guided:
    best = min(guided, key=lambda k: guided[k]["lpips"])
    verdict = (f"best guided setting by LPIPS: {best} ({guided[best]['lpips']:.4f} vs "
               f"{base['lpips']:.4f} unguided; Gram {guided[best]['gram']:.3f} vs "
               f"{base['gram']:.3f}, local mean/std {guided[best]['local_stats']:.3f} vs "
               f"{base['local_stats']:.3f}; ground truth Gram {truth['gram']:.3f}, local "
               f"{truth['local_stats']:.3f})")
  else:
    verdict = "needs ω = 0 and at least one ω > 0 in --guidance_scales"
  return {"rows": rows, "ground_truth": truth, "mask": args.guidance_mask, "verdict": verdict}


def claim_5(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  rows: dict[str, dict[str, Any]] = {}
  pairs = []
  d = bench.data_variance
  for m in ints(args.accel_steps):
    for rule, kwargs in (("step_size", {}), ("quantile", {"quantile": 0.5, "speedup": 2})):
      if rule == "quantile" and m != ints(args.accel_steps)[0]:
        continue
      row = bench.fid("asyncpatch", f"adaptive_{rule}_{m}", strategy="adaptive", rule=rule,
                      num_steps=m, data_variance=d, **kwargs)
      row.update(kind=f"adaptive ({rule})", budget=m)
      rows[f"adaptive {rule}, M={m}"] = row
      steps = max(1, round(row["nfe"]))
      uni = bench.fid("asyncpatch", f"uniform_{steps}", strategy="uniform", num_steps=steps)
      uni.update(kind="uniform", budget=steps)
      rows[f"uniform, {steps} steps"] = uni
      pairs.append((row, uni))
    full = bench.fid("asyncpatch", f"uniform_{m}", strategy="uniform", num_steps=m)
    full.update(kind="uniform", budget=m)
    rows[f"uniform, {m} steps"] = full
  wins = sum(a["fid"] <= u["fid"] for a, u in pairs)
  verdict = (f"adaptive plans beat the uniform plan of the same NFE in {wins} of {len(pairs)} "
             f"pairs (FID); data variance d = {d:.3f}")
  return {"rows": rows, "verdict": verdict}


def claim_6(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  rows: dict[str, dict[str, Any]] = {}
  ar = bench.fid("asyncpatch", "autoregressive", strategy="autoregressive", order="raster",
                 steps_per_group=args.ar_steps_per_group, overlap=args.ar_overlap)
  uni = bench.fid("asyncpatch", "uniform", strategy="uniform", num_steps=args.sample_steps)
  rows["sampling"] = {"autoregressive (raster)": ar, "uniform": uni}
  elbos = {}
  for variant in bench.networks:
    elbos[variant] = {name: bench.bpd(variant, name) for name in ("raster", "homogeneous")}
    if variant != "asyncpatch":  # paired against asyncpatch: asyncpatch − variant
      for name in ("raster", "homogeneous"):
        elbos[variant][name].update(bench.bpd_difference("asyncpatch", variant, name))
  rows["bits_per_dim"] = elbos
  best = min(elbos, key=lambda v: elbos[v]["raster"]["bpd"])
  versus = "; ".join(f"asyncpatch vs {v} (raster): {paired_verdict(r['raster'])}"
                     for v, r in elbos.items() if v != "asyncpatch")
  verdict = (f"AR FID {ar['fid']:.2f} at NFE {ar['nfe']:.0f} vs uniform {uni['fid']:.2f} at "
             f"NFE {uni['nfe']:.0f}; lowest raster-path bits/dim: {best} "
             f"({elbos[best]['raster']['bpd']:.3f} ± {elbos[best]['raster']['bpd_se']:.3f})"
             f"{'; ' + versus if versus else ''}")
  return {"rows": rows, "verdict": verdict}


# ------------------------------------------------------------------------------------------------
# Output.


def fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"
  return str(value)


def markdown(results: dict[str, Any]) -> str:
  s = results["settings"]
  lines = [
      "# Claims at CPU scale", "",
      f"Command: `{s['command']}`  ",
      f"Started {results['started']} UTC on {results['environment']['cpu_count']} CPU cores "
      f"({results['environment']['devices']}); {results.get('status', '')}.", "",
      f"FID: {s['features']} features of {s['num_fid']} samples against {s['num_ref']} test "
      f"images ({s['sample_steps']}-step ancestral sampling unless stated). Small-sample FID is "
      f"biased upwards: compare within a table only. LPIPS: AlexNet on images resized to 64×64. "
      f"Bits/dim: {s['elbo_examples']} test images, {s['elbo_steps']} strata, 8-bit decoder, "
      f"± its standard error over the images.",
      "", "## Networks (equal training compute: same architecture, batch and updates)", "",
      "| network | updates | training time (s) |", "|---|---|---|"]
  for name, m in results["models"].items():
    lines.append(f"| {name} | {m['steps']} | {m['train_seconds']:.0f} |")
  for claim_id in map(str, CLAIMS):
    per_ds = results["claims"].get(claim_id)
    if not per_ds:
      continue
    lines += ["", f"## Claim {claim_id}: {TITLES[int(claim_id)]}"]
    for dataset, res in per_ds.items():
      lines += ["", f"**{dataset}** — {res['verdict']}", ""]
      lines += claim_table(int(claim_id), res)
  return "\n".join(lines) + "\n"


def claim_table(claim: int, res: dict[str, Any]) -> list[str]:
  rows = res["rows"]
  if claim in (1, 2):
    out = ["| network | FID ↓ | KID ↓ | NFE | bits/dim (homogeneous) ↓ |", "|---|---|---|---|---|"]
    for name, r in rows.items():
      out.append(f"| {name} | {fmt(r['fid'], 2)} | {fmt(r['kid'], 4)} | {fmt(r['nfe'], 0)} | "
                 f"{fmt(r['bpd'])} ± {fmt(r['bpd_se'])} |")
    if "bpd_difference" in res:
      pair = res["bpd_difference"]
      out += ["", f"Homogeneous bits/dim, asyncpatch − other, paired (same images, s and noise): "
              f"{pair['bpd_diff']:+.3f} ± {fmt(pair['bpd_diff_se'])} (unpaired ± "
              f"{fmt(pair['bpd_diff_se_unpaired'])})."]
    return out
  if claim == 3:
    out = ["| mask | method | LPIPS ↓ | NFE |", "|---|---|---|---|"]
    for mask_name, methods in rows.items():
      for label, r in methods.items():
        out.append(f"| {mask_name} | {label} | {fmt(r['lpips'], 4)} ± {fmt(r['lpips_se'], 4)} "
                   f"| {fmt(r['nfe'], 0)} |")
    return out
  if claim == 4:
    out = [f"Mask `{res['mask']}`. Texture statistics of the hole against its context (lower is "
           f"closer); the originals themselves give Gram {fmt(res['ground_truth']['gram'])}, "
           f"local mean/std {fmt(res['ground_truth']['local_stats'])} (natural variation: a "
           f"completion near these matches the context as well as the truth does).", "",
           "| setting | LPIPS ↓ | Gram distance | local mean/std distance | NFE |",
           "|---|---|---|---|---|"]
    for label, r in rows.items():
      out.append(f"| {label} | {fmt(r['lpips'], 4)} ± {fmt(r['lpips_se'], 4)} | "
                 f"{fmt(r['gram'])} | {fmt(r['local_stats'])} | {fmt(r['nfe'], 0)} |")
    return out
  if claim == 5:
    out = ["| plan | NFE | FID ↓ | KID ↓ |", "|---|---|---|---|"]
    for label, r in sorted(rows.items(), key=lambda kv: kv[1]["nfe"]):
      out.append(f"| {label} | {fmt(r['nfe'], 1)} | {fmt(r['fid'], 2)} | {fmt(r['kid'], 4)} |")
    return out
  out = ["| sampler (asyncpatch) | NFE | FID ↓ |", "|---|---|---|"]
  for label, r in rows["sampling"].items():
    out.append(f"| {label} | {fmt(r['nfe'], 0)} | {fmt(r['fid'], 2)} |")
  out += ["", "Bits/dim ± standard error; Δ: asyncpatch − network, paired (same images, s and "
          "noise), ± its standard error.", "",
          "| network | bits/dim raster ↓ | Δ raster | bits/dim homogeneous ↓ | Δ homogeneous |",
          "|---|---|---|---|---|"]
  for name, r in rows["bits_per_dim"].items():
    cells = [name]
    for path_name in ("raster", "homogeneous"):
      b = r[path_name]
      cells.append(f"{fmt(b['bpd'])} ± {fmt(b['bpd_se'])}")
      cells.append(f"{b['bpd_diff']:+.3f} ± {fmt(b['bpd_diff_se'])}" if "bpd_diff" in b else "–")
    out.append("| " + " | ".join(cells) + " |")
  return out


def plot(results: dict[str, Any], out: str) -> list[str]:
  """PNG plots of claims 3, 4 and 5 (those with more than two numbers); returns the names."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []

  def save(fig, name):
    path = os.path.join(out, name)
    with file_io.atomic_open(path, "wb") as f:
      fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(name)

  for dataset, res in results["claims"].get("5", {}).items():
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, marker in (("uniform", "o-"), ("adaptive (step_size)", "s"),
                         ("adaptive (quantile)", "^")):
      pts = sorted((r["nfe"], r["fid"]) for r in res["rows"].values() if r["kind"] == kind)
      if pts:
        ax.plot(*zip(*pts), marker, label=kind)
    ax.set(xlabel="NFE", ylabel="FID", title=f"Claim 5 ({dataset}): FID against NFE")
    ax.legend()
    save(fig, f"claim5_fid_vs_nfe_{dataset}.png")
  for dataset, res in results["claims"].get("3", {}).items():
    masks_ = list(res["rows"])
    labels = list(res["rows"][masks_[0]])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
      ax.bar(np.arange(len(masks_)) + j * width,
             [res["rows"][m][label]["lpips"] for m in masks_], width,
             label=f"{label} (NFE {res['rows'][masks_[0]][label]['nfe']:.0f})")
    ax.set_xticks(np.arange(len(masks_)) + 0.4 - width / 2, masks_)
    ax.set(ylabel="LPIPS", title=f"Claim 3 ({dataset}): inpainting")
    ax.legend(fontsize=7)
    save(fig, f"claim3_lpips_{dataset}.png")
  for dataset, res in results["claims"].get("4", {}).items():
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    sweep = sorted((r["omega"], r) for r in res["rows"].values()
                   if r["omega"] == 0 or r["level"] == 0.5)
    for ax, metric in zip(axes, ("lpips", "gram", "local_stats")):
      ax.plot([o for o, _ in sweep], [r[metric] for _, r in sweep], "o-", label="k = 0.5")
      if metric != "lpips":
        ax.axhline(res["ground_truth"][metric], ls="--", c="gray", label="ground truth")
      ax.set(xlabel="ω", title=metric)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Claim 4 ({dataset}): input guidance", y=1.04)
    save(fig, f"claim4_guidance_{dataset}.png")
  return written


def write_results(results: dict[str, Any], out: str) -> None:
  os.makedirs(out, exist_ok=True)
  results["plots"] = plot(results, out)
  file_io.write_text(os.path.join(out, "claims.json"),
                    json.dumps(results, indent=1, default=float) + "\n")
  file_io.write_text(os.path.join(out, "claims.md"), markdown(results))


# ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
  os.makedirs(args.out, exist_ok=True)
  command = "python benchmarks/claims.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
  settings = {k: v for k, v in vars(args).items() if k != "plan"}
  settings["command"] = command or "python benchmarks/claims.py"
  results: dict[str, Any] = {
      "settings": settings,
      "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
      "environment": {"cpu_count": os.cpu_count(), "devices": str(jax.devices()),
                      "jax": jax.__version__,
                      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
      "models": {}, "claims": {}, "status": "running"}
  extractor = (fid_lib.FeatureExtractor(batch_size=args.batch) if args.features == "inception"
               else AlexNetFeatures())
  lpips = lpips_lib.LPIPSDistance("alexnet", resize_to=64)
  steps = int(args.train_steps)
  for dataset, claims in args.plan.items():
    variants = [v for v in VARIANTS if any(v in NEEDS[c] for c in claims)]
    networks = {}
    for variant in variants:
      net = train_network(dataset, variant, args, steps)
      if net.steps < steps:  # the time cap hit: the others get the same number of updates
        log(f"{dataset}/{variant} stopped at {net.steps} of {steps} updates (time cap); the "
            f"remaining networks train for {net.steps}")
        steps = net.steps
      networks[variant] = net
      results["models"][f"{dataset}/{variant}"] = {"steps": net.steps,
                                                   "train_seconds": net.train_seconds}
    counts = {n.steps for n in networks.values()}
    if len(counts) > 1:
      log(f"warning: {dataset} networks have unequal updates {sorted(counts)} (a reused run?)")
    write_results(results, args.out)
    bench = DatasetBench(dataset, networks, args, extractor, lpips)
    for claim in claims:
      start = time.monotonic()
      if claim in (1, 2):
        res = claim_1_2(bench, "conventional" if claim == 1 else "iid")
      else:
        res = {3: claim_3, 4: claim_4, 5: claim_5, 6: claim_6}[claim](bench)
      res["seconds"] = time.monotonic() - start
      results["claims"].setdefault(str(claim), {})[dataset] = res
      log(f"claim {claim} ({dataset}): {res['verdict']}")
      write_results(results, args.out)
  results["status"] = "finished " + datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
  write_results(results, args.out)
  return results


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  results = run(args)
  print(markdown(results))


if __name__ == "__main__":
  with user_errors.clean_exit():
    main()
