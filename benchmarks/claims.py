"""The paper's six claims, measured at CPU scale on the bundled MNIST subset and the textures.

Per data set, up to three networks are trained from the data set's config with the same
architecture, batch and number of optimizer updates (equal training compute), differing only in
the training level sampler: `asyncpatch` (the recipe's level-sampler mixture, which covers the
samplers' maps), `conventional` (homogeneous maps: standard diffusion) and `iid` (independent
levels, Diffusion Forcing). All have the uncertainty head. The learning rate is constant after
warm-up, so the checkpoint after a fraction of the updates *is* a network trained for that
many: checkpoints every 1/`--curve_points` of training give the FID-against-updates curves and
the claim-1 control (`conventional` at `--control_fraction` × the updates, ≈ the share of maps
the mixture spends on homogeneous ones). Then, with the EMA parameters:

1. asyncpatch vs conventional (and vs the control) under uniform sampling: FID/KID with
   bootstrap intervals, FID against training updates, paired bits/dim along the homogeneous
   path.
2. asyncpatch vs iid levels: the same.
3. Inpainting per mask family: native inpainting (asyncpatch) vs RePaint on the conventional
   model at the cheap setting and at the paper's (T = 250, jump 10, resample 10); per-image
   LPIPS, paired differences.
4. Input guidance on asyncpatch: ω and re-noise level k; LPIPS and the hole's texture
   statistics against its context (Gram and local mean/std distances), paired against unguided.
5. FID against NFE for the uniform plan, the fixed-budget uncertainty plan and grouped
   autoregressive generation at budgets `--nfe_budgets`.
6. Grouped autoregressive generation against uniform at equal NFE (FID ratio, goal ≤ 1.3),
   with half the budget per group at every budget and a larger share at `--sample_steps`
   (more overlap between groups), and bits/dim along the raster path for every trained
   network, paired.

Every number carries its uncertainty and every verdict is read from it: FID/KID with percentile
bootstrap intervals over the samples (the reference held fixed), differences between two FID
rows from their bootstrap replicates (the same resample indices in every row, so rows that share
noise and labels get a paired interval); LPIPS, texture statistics and bits/dim with
paired differences over the same images (± 1.96 standard errors). A verdict is "holds" when the
interval excludes the claim's failure, "fails" when it excludes its success, and "not
significant" otherwise.

FID uses `--features`: `alexnet` (default) is LPIPS' AlexNet conv5, mean-pooled at 64 px, a
256-d Fréchet distance that ranks rows of one table and is comparable with nothing published;
`inception` is the TF Inception (pool3), which runs at about 5 images/s on this 2-core CPU
(1,000 samples: 3.5 minutes per row, ~2 hours for the table), so it is left for machines with
an accelerator. The FID reference is `--num_ref` images of the training split (README "FID
protocols"); bits/dim and inpainting use the test split.

Everything is resumable: trained networks stay in `--workdir` (training resumes from its last
checkpoint), and every measurement is stored in `<workdir>/measurements.json` as it finishes,
so a re-run (e.g. after the session ended) only does what is missing. A workdir made with other
settings is refused, naming the differences. Results go to `<out>/claims.json`, `<out>/claims.md`
and PNG plots, rewritten (atomically) after each claim; `--render` rewrites them and the README's
claims table from `claims.json` alone.

    python benchmarks/claims.py --out results/claims           # the recorded run (≈ 3 h, 2 cores)
    python benchmarks/claims.py --quick --out /tmp/claims      # every claim at toy size
    python benchmarks/claims.py --render --out results/claims  # tables, plots, README from json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
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
from clu import metric_writers  # noqa: E402
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
from asyncpatch_jax.data import sources  # noqa: E402
from asyncpatch_jax.diffusion import elbo, level_samplers, paths  # noqa: E402
from asyncpatch_jax.evaluation import fid as fid_lib  # noqa: E402
from asyncpatch_jax.evaluation import images as images_lib  # noqa: E402
from asyncpatch_jax.evaluation import lpips as lpips_lib  # noqa: E402
from asyncpatch_jax.evaluation import texture_stats  # noqa: E402
from asyncpatch_jax.train import builders, perf, trainer  # noqa: E402
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
         6: ("asyncpatch", "conventional")}  # claim 6 also ranks 'iid' where it is trained
TITLES = {
    1: "AsyncPatch vs conventional diffusion under homogeneous sampling",
    2: "Controlled level sampler vs naive iid levels",
    3: "Native inpainting vs RePaint",
    4: "Input guidance: ω and re-noise level k (inpainting)",
    5: "Uncertainty-guided acceleration: FID against NFE",
    6: "Autoregressive generation and the raster-path ELBO",
}
FEATURE_DIMS = {"alexnet": 256, "inception": 2048}
# Settings that do not change a measurement (the rest must match a workdir's).
NOT_COMPARED = ("out", "workdir", "claims", "plan", "render", "readme", "train_minutes")


class FlagError(ValueError):
  """A bad flag or a workdir made with other settings (reported without a traceback)."""


README_BEGIN = "<!-- claims table: generated by benchmarks/claims.py --render; do not edit -->"
README_END = "<!-- end of claims table -->"
QUICK = dict(image_size=8, batch_size=8, train_steps=4, curve_points=2, control_fraction=0.5,
             train_minutes=2.0, num_fid=16, num_ref=16, bootstrap=20, sample_steps=4,
             nfe_budgets="2,4", elbo_steps=2, elbo_examples=8, num_inpaint=8, masks="box,half",
             repaint_jump=2, repaint_resample=2, repaint_paper="8,2,2", guidance_scales="0,1",
             guidance_levels="0.5", batch=16, claims=["mnist=1,2,3,4,5,6"])


# ------------------------------------------------------------------------------------------------
# Settings.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default=os.path.join(ROOT, "results", "claims"),
                 help="folder for claims.json, claims.md and the plots")
  p.add_argument("--workdir", default="/tmp/asyncpatch_claims",
                 help="trained networks and stored measurements (a re-run resumes from them)")
  p.add_argument("--quick", action="store_true", help="every claim at toy size (a smoke test)")
  p.add_argument("--render", action="store_true",
                 help="only rewrite claims.md, the plots and --readme from <out>/claims.json")
  p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                 help="README whose claims table --render regenerates ('' : none)")
  p.add_argument("--claims", action="append", default=None, metavar="DATASET=1,2,…",
                 help="claims per data set (repeatable); default mnist=1,2,5,6 and "
                      "textures=1,3,4,5,6")
  p.add_argument("--image_size", type=int, default=16, help="0: the data set config's (32)")
  p.add_argument("--batch_size", type=int, default=32, help="training batch; 0: the config's")
  p.add_argument("--train_steps", type=int, default=4000,
                 help="optimizer updates per network (equal for every network)")
  p.add_argument("--train_minutes", type=float, default=45.0,
                 help="cap per network and call; a network that hits it stops with a message "
                      "(re-run to continue from its checkpoint)")
  p.add_argument("--curve_points", type=int, default=5,
                 help="checkpoints (evenly spaced) with FID for the training curves")
  p.add_argument("--control_fraction", type=float, default=0.6,
                 help="claim 1's control: conventional after this share of the updates "
                      "(a multiple of 1/--curve_points)")
  p.add_argument("--num_fid", type=int, default=1000, help="samples per FID")
  p.add_argument("--num_ref", type=int, default=1000,
                 help="training images for the FID reference")
  p.add_argument("--features", choices=tuple(FEATURE_DIMS), default="alexnet",
                 help="FID features (see the module docstring)")
  p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per FID/KID")
  p.add_argument("--sample_steps", type=int, default=25, help="uniform sampling steps")
  p.add_argument("--nfe_budgets", default="5,8,12,25,50",
                 help="claim 5's budgets N (network calls per sample)")
  p.add_argument("--elbo_steps", type=int, default=16, help="strata of the ELBO integral")
  p.add_argument("--elbo_examples", type=int, default=256, help="test images for bits/dim")
  p.add_argument("--num_inpaint", type=int, default=64, help="test images per mask")
  p.add_argument("--masks", default="box,half,narrow,wide", help="mask families (claim 3)")
  p.add_argument("--repaint_jump", type=int, default=5, help="the cheap RePaint setting")
  p.add_argument("--repaint_resample", type=int, default=5, help="the cheap RePaint setting")
  p.add_argument("--repaint_paper", default="250,10,10",
                 help="RePaint at its paper's setting: T,jump_length,resample ('' : skip)")
  p.add_argument("--guidance_scales", default="0,0.5,1,2", help="ω sweep (at k=0.5)")
  p.add_argument("--guidance_levels", default="0.3,0.5,0.8",
                 help="k sweep (at the ω of lowest LPIPS)")
  p.add_argument("--guidance_mask", default="box", help="mask family of claim 4")
  p.add_argument("--batch", type=int, default=125, help="sampling batch")
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
    args.claims = ["mnist=1,2,5,6", "textures=1,3,4,5,6"]
  args.plan = parse_plan(args.claims)
  if not args.render:
    check_args(args)
  return args


def parse_plan(specs: list[str]) -> dict[str, tuple[int, ...]]:
  """['mnist=1,2', 'textures=3'] → {'mnist': (1, 2), 'textures': (3,)} with clear errors."""
  plan: dict[str, tuple[int, ...]] = {}
  for spec in specs:
    name, sep, numbers = spec.partition("=")
    if not sep or name not in DATASETS:
      raise FlagError(f"--claims takes DATASET=1,2,… with DATASET one of {sorted(DATASETS)}, "
                       f"got {spec!r}")
    try:
      claims = tuple(sorted({int(n) for n in numbers.split(",") if n.strip()}))
    except ValueError:
      raise FlagError(f"--claims {spec!r}: claims are integers in {CLAIMS}") from None
    if not claims or any(c not in CLAIMS for c in claims):
      raise FlagError(f"--claims {spec!r}: claims are integers in {CLAIMS}")
    plan[name] = claims
  return plan


def floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def check_args(args: argparse.Namespace) -> None:
  """Every flag checked before anything is trained: a bad one is a ValueError naming it."""
  for name in ("sample_steps", "elbo_steps", "elbo_examples", "num_inpaint", "train_steps",
               "batch", "curve_points"):
    if getattr(args, name) < 1:
      raise FlagError(f"--{name} must be positive, got {getattr(args, name)}")
  if args.num_fid < 2 or args.num_ref < 2:
    raise FlagError(f"FID needs at least 2 samples and 2 reference images, got --num_fid "
                     f"{args.num_fid} --num_ref {args.num_ref}")
  dims = FEATURE_DIMS[args.features]
  if not args.quick and min(args.num_fid, args.num_ref) <= dims:
    raise FlagError(f"--num_fid {args.num_fid} / --num_ref {args.num_ref}: FID in {dims}-d "
                    f"{args.features} features needs more samples than dimensions (a full-rank "
                    f"covariance); use at least {dims + 1} (1000 recommended), or --quick")
  if args.bootstrap < 20:
    raise FlagError(f"--bootstrap {args.bootstrap}: a 95% percentile interval needs at least "
                     f"20 resamples (200 recommended)")
  if args.train_steps % args.curve_points:
    raise FlagError(f"--train_steps {args.train_steps} must be a multiple of --curve_points "
                     f"{args.curve_points} (checkpoints are evenly spaced)")
  fraction = args.control_fraction * args.curve_points
  claim_1 = any(1 in claims for claims in args.plan.values())
  if claim_1 and (not 0 < args.control_fraction < 1 or abs(fraction - round(fraction)) > 1e-9):
    raise FlagError(f"--control_fraction {args.control_fraction} must lie in (0, 1) and be a "
                     f"multiple of 1/--curve_points = {1 / args.curve_points:g}, so a "
                     f"checkpoint holds the control")
  for name in args.masks.split(",") + [args.guidance_mask]:
    if name not in sampling.masks.MASKS:
      raise FlagError(f"unknown mask {name!r}; choose from {sorted(sampling.masks.MASKS)}")
  if args.repaint_paper and len(ints(args.repaint_paper)) != 3:
    raise FlagError(f"--repaint_paper takes T,jump_length,resample, got {args.repaint_paper!r}")
  if any(s < 0 for s in floats(args.guidance_scales)) or not floats(args.guidance_scales):
    raise FlagError(f"--guidance_scales takes ω ≥ 0, got {args.guidance_scales!r}")
  if any(not 0 < k < 1 for k in floats(args.guidance_levels)):
    raise FlagError(f"--guidance_levels takes k in (0, 1), got {args.guidance_levels!r}")
  budgets = ints(args.nfe_budgets)
  if not budgets or min(budgets) < 1:
    raise FlagError(f"--nfe_budgets takes positive integers, got {args.nfe_budgets!r}")
  for dataset, claims in args.plan.items():
    config = make_config(dataset, "asyncpatch", args, args.train_steps)
    if 1 in claims or 2 in claims or 5 in claims or 6 in claims:
      reference = len(sources.get_source(config.data, config.data.train_split))
      if args.num_ref > reference:
        raise FlagError(f"--num_ref {args.num_ref}: the {dataset} training split has only "
                         f"{reference} images; lower it")
    held_out = len(sources.get_source(config.data, config.data.eval_split))
    for name in ("elbo_examples", "num_inpaint"):
      if getattr(args, name) > held_out:
        raise FlagError(f"--{name} {getattr(args, name)}: the {dataset} test split has only "
                         f"{held_out} images; lower it")
    grid = diffusion.token_grid((1, *builders.data_shape(config)),
                                int(config.diffusion.patch_size))[1:]
    schedule = builders.make_schedule(config.diffusion)
    if 5 in claims or 6 in claims:
      rows = [kw for budget in budgets + [args.sample_steps]
              for kw in nfe_rows(budget, grid).values()]
      rows += [ar_kwargs(args.sample_steps, grid, share) for share in AR_SHARES[1:]]
      for kwargs in rows:
        budget = kwargs["num_steps"]
        try:
          options = {k: v for k, v in kwargs.items() if k not in ("strategy", "num_steps",
                                                                  "x0_draw")}
          sampling.sampler.make_plan(kwargs["strategy"], grid, kwargs["num_steps"],
                                     schedule=schedule, **options)
        except ValueError as e:
          raise FlagError(f"--nfe_budgets: budget {budget} is too small for the "
                           f"{kwargs['strategy']} plan on the {tuple(grid)} token grid: "
                           f"{e}") from None


def ar_kwargs(budget: int, grid: tuple[int, ...], share: float = 0.5) -> dict[str, Any]:
  """Grouped autoregressive generation at a total budget: row groups, each getting
  ⌊share·N⌋ steps, the overlap fitted (a larger share: more overlap, every token more
  updates); below 8 steps (or grids of fewer than 4 rows), four blocks of a quarter of the
  grid."""
  layout = "row" if budget >= 8 and grid[0] >= 4 else tuple(max(1, g // 2) for g in grid)
  return dict(strategy="autoregressive", num_steps=budget,
              steps_per_group=max(1, int(budget * share)), group_shape=layout, order="raster")


# Claim 6: the share of the budget each AR group gets, swept at `--sample_steps` (0.5 is
# claim 5's AR row).
AR_SHARES = (0.5, 0.75, 0.9)


def nfe_rows(budget: int, grid: tuple[int, ...]) -> dict[str, dict[str, Any]]:
  """Claim 5's three samplers at a budget of N network calls per sample."""
  return {"uniform": dict(strategy="uniform", num_steps=budget),
          "uncertainty": dict(strategy="adaptive", rule="budget", num_steps=budget),
          "autoregressive": ar_kwargs(budget, grid)}


def log(message: str) -> None:
  stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
  print(f"[claims {stamp}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# The workdir: settings, stored measurements.


class Store:
  """Measurements stored in `<workdir>/measurements.json` as they finish (written atomically),
  so a re-run skips them. The workdir's settings are in `claims_settings.json`; a run with
  other settings is refused, naming each difference."""

  def __init__(self, args: argparse.Namespace):
    os.makedirs(args.workdir, exist_ok=True)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_COMPARED}
    settings_path = os.path.join(args.workdir, "claims_settings.json")
    if os.path.exists(settings_path):
      with open(settings_path) as f:
        saved = json.load(f)
      # Flags added since the workdir was made are not differences (their defaults held).
      differences = [f"--{k}: workdir {saved[k]!r}, now {settings.get(k)!r}"
                     for k in sorted(saved) if saved[k] != settings.get(k)]
      if differences:
        raise FlagError(f"--workdir {args.workdir} holds networks and measurements made with "
                         f"other settings ({'; '.join(differences)}); pass those settings to "
                         f"resume it, or a new --workdir")
    else:
      file_io.write_json(settings_path, settings)
    self.path = os.path.join(args.workdir, "measurements.json")
    self.values: dict[str, Any] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.values = json.load(f)

  def get(self, key: str) -> Any:
    return self.values.get(key)

  def put(self, key: str, value: Any) -> Any:
    self.values[key] = value
    file_io.write_json(self.path, self.values)
    return value


# ------------------------------------------------------------------------------------------------
# Networks.


def make_config(dataset: str, variant: str, args: argparse.Namespace,
                steps: int) -> ml_collections.ConfigDict:
  """The data set's config with the variant's level sampler, the uncertainty head, `steps`
  updates at a constant learning rate after warm-up, checkpoints every 1/`curve_points` of
  training (all kept) and no intermediate grids."""
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
    config.optimizer.schedule = "constant"  # so a checkpoint is a shorter run's network
    config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps),
                                        max(1, int(args.train_steps) // 10))
    config.checkpoint.every_steps = max(1, int(steps) // int(args.curve_points))
    # Every curve checkpoint kept, plus those a stopped-and-resumed run saves on the way.
    config.checkpoint.max_to_keep = int(args.curve_points) + 20
    config.checkpoint.keep_period = 0
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
  """A trained network's EMA parameters (at `steps` updates) and what goes with them."""

  dataset: str
  variant: str
  config: Any
  setup: Any
  params: Any
  model_state: Any
  steps: int
  train_seconds: float
  workdir: str = ""

  def at(self, step: int) -> Network:
    """The same run's network after `step` updates (a kept checkpoint)."""
    if step == self.steps:
      return self
    _, _, setup, state, restored = restore_lib.restore_latest(self.config, self.workdir, step)
    return dataclasses.replace(self, setup=setup, params=state.ema[
        restore_lib.ema_params_name(self.config)], model_state=state.model_state,
        steps=int(restored))


TRAINING_FIELDS = ("data", "diffusion", "init_from", "model", "num_steps", "optimizer", "seed",
                   "vae")


def settings_hash(config: Any) -> str:
  """A hash of the config fields that determine the trained network (not sampling, evaluation,
  checkpointing, logging or the time cap, which later code may change)."""
  fields = {k: v for k, v in config.to_dict().items() if k in TRAINING_FIELDS}
  return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:10]


class LossCurve(metric_writers.LoggingWriter):
  """The trainer's scalar logs, also appended to a JSON-lines file (the training-loss curve,
  across resumed calls; a torn last line after a kill is skipped when read)."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def write_scalars(self, step: int, scalars: Any) -> None:
    super().write_scalars(step, scalars)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")


def read_curve(path: str, key: str = "train/loss") -> list[tuple[int, float]]:
  """(step, value) of `key` from a LossCurve file, the last write per step."""
  points: dict[int, float] = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if key in record:
          points[int(record["step"])] = float(record[key])
  return sorted(points.items())


def train_network(dataset: str, variant: str, args: argparse.Namespace) -> Network:
  """Trains (resuming, or reusing a finished run of) one network; returns its final EMA params."""
  steps = int(args.train_steps)
  config = make_config(dataset, variant, args, steps)
  workdir = os.path.join(args.workdir, f"{dataset}-{variant}-{settings_hash(config)}")
  done = os.path.join(workdir, "claims_trained.json")
  if os.path.exists(done):
    with open(done) as f:
      record = json.load(f)
    log(f"{dataset}/{variant}: reusing {workdir} ({record['steps']} steps)")
  else:
    log(f"{dataset}/{variant}: training to {steps} steps (cap {args.train_minutes} min)")
    os.makedirs(workdir, exist_ok=True)
    start = time.monotonic()
    trainer.train_and_evaluate(config, workdir,
                               writer=LossCurve(os.path.join(workdir, "claims_curve.jsonl")))
    seconds_path = os.path.join(workdir, "claims_seconds.json")  # summed over resumed calls
    seconds = time.monotonic() - start
    if os.path.exists(seconds_path):
      with open(seconds_path) as f:
        seconds += json.load(f)["train_seconds"]
    file_io.write_json(seconds_path, {"train_seconds": seconds})
    record = {"train_seconds": seconds}
  _, _, setup, state, step = restore_lib.restore_latest(config, workdir)
  if int(step) < steps:
    user_errors.fail(
        f"{dataset}/{variant} stopped at {int(step)} of {steps} updates (the --train_minutes "
        f"{args.train_minutes} cap, or a stop signal). Re-run the same command to continue "
        f"from its checkpoint (or raise --train_minutes); every network gets the same updates.")
  record["steps"] = int(step)
  if not os.path.exists(done):
    file_io.write_json(done, record)  # a torn marker would break the next reuse
  params = state.ema[restore_lib.ema_params_name(config)]
  log(f"{dataset}/{variant}: {record['steps']} steps, {record['train_seconds']:.0f} s")
  return Network(dataset, variant, config, setup, params, state.model_state, int(step),
                 float(record["train_seconds"]), workdir)


# ------------------------------------------------------------------------------------------------
# Statistics.


def fid_kid_bootstrap(features: np.ndarray, reference: fid_lib.ReferenceStatistics, reps: int,
                      seed: int) -> dict[str, Any]:
  """FID and KID of the samples with percentile bootstrap intervals over the samples (the
  reference held fixed), and the replicates (so two rows' difference gets an interval too).
  Every call with one `seed` resamples the same indices, so rows whose samples share noise
  and labels (networks compared under one sampler) get a paired bootstrap of their difference.

  KID is the unbiased MMD² with k(x, y) = (x·y/d + 1)³ on all samples against all reference
  images; a resample's pairs of copies of one sample are left out, as the unbiased estimator
  leaves out i = j.
  """
  f = np.asarray(features, np.float64)
  ref = np.asarray(reference.features, np.float64)
  n, m, d = len(f), len(ref), f.shape[1]
  kxx = (f @ f.T / d + 1.0) ** 3
  cross = ((f @ ref.T / d + 1.0) ** 3).mean(axis=1)
  kyy = (ref @ ref.T / d + 1.0) ** 3
  within_ref = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  diag = np.diag(kxx)

  def kid(counts: np.ndarray) -> float:
    pairs = counts.sum() ** 2 - (counts ** 2).sum()
    within = (counts @ kxx @ counts - (counts ** 2) @ diag) / pairs
    return float(within + within_ref - 2.0 * (counts @ cross) / counts.sum())

  rng = np.random.default_rng(seed)
  fid_boot, kid_boot = [], []
  for _ in range(reps):
    idx = rng.integers(0, n, n)
    fid_boot.append(fid_lib.frechet_distance_to_features(f[idx], reference.stats))
    kid_boot.append(kid(np.bincount(idx, minlength=n).astype(np.float64)))
  out = {"fid": fid_lib.frechet_distance_to_features(f, reference.stats),
         "kid": kid(np.ones(n)), "num_samples": n, "bootstrap_reps": reps}
  for metric, boot in (("fid", np.asarray(fid_boot)), ("kid", np.asarray(kid_boot))):
    # A resample repeats about a third of the samples, which biases FID upwards (fewer distinct
    # samples): the replicates are re-centred on the estimate.
    out[f"{metric}_bias"] = float(boot.mean() - out[metric])
    out[f"{metric}_boot"] = (boot - out[f"{metric}_bias"]).tolist()
  out["fid_lo"], out["fid_hi"] = percentiles(out["fid_boot"])
  out["kid_lo"], out["kid_hi"] = percentiles(out["kid_boot"])
  return out


def percentiles(values: Any) -> tuple[float, float]:
  lo, hi = np.percentile(np.asarray(values, np.float64), [2.5, 97.5])
  return float(lo), float(hi)


def boot_difference(a: dict[str, Any], b: dict[str, Any], metric: str = "fid",
                    ratio: bool = False) -> dict[str, float]:
  """`a − b` (or, with `ratio`, `a / b`) of two rows' `metric`, with the percentile interval
  of their replicates' differences (ratios). Rows bootstrapped with one seed resample the same
  indices, so for rows that share noise and labels the interval is a paired one."""
  boot_a, boot_b = np.asarray(a[f"{metric}_boot"]), np.asarray(b[f"{metric}_boot"])
  if ratio:
    lo, hi = percentiles(boot_a / np.maximum(boot_b, 1e-12))
    return {"ratio": float(a[metric] / max(b[metric], 1e-12)), "lo": lo, "hi": hi}
  lo, hi = percentiles(boot_a - boot_b)
  return {"diff": float(a[metric] - b[metric]), "lo": lo, "hi": hi}


def paired(a: Any, b: Any) -> dict[str, float]:
  """Mean of the per-item differences `a − b` (same items), ± 1.96 standard errors."""
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  diff = diff[np.isfinite(diff)]
  if diff.size < 2:
    return {"diff": float("nan"), "se": float("nan"), "lo": float("nan"), "hi": float("nan")}
  se = float(diff.std(ddof=1) / math.sqrt(diff.size))
  mean = float(diff.mean())
  return {"diff": mean, "se": se, "lo": mean - 1.96 * se, "hi": mean + 1.96 * se}


def welch(a: Any, b: Any) -> dict[str, float]:
  """mean(a) − mean(b) with a 95% Welch t interval (for a handful of checkpoints each)."""
  from scipy import stats

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  diff, se = float(a.mean() - b.mean()), float(math.sqrt(va + vb))
  df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = float(stats.t.ppf(0.975, df)) * se
  return {"diff": diff, "se": se, "lo": diff - half, "hi": diff + half, "df": float(df)}


def mean_se(values: Any) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if v.size < 2:
    return (float(v.mean()) if v.size else float("nan")), float("nan")
  return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def verdict(lo: float, hi: float, *, holds_below: float = 0.0) -> str:
  """'holds' when the interval lies below `holds_below`, 'fails' above it, else 'not
  significant' (lower is better: a difference ours − theirs, or a ratio against its goal)."""
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return "not measurable"
  if hi < holds_below:
    return "holds"
  if lo > holds_below:
    return "fails"
  return "not significant"


def interval_text(value: float, lo: float, hi: float, digits: int = 2) -> str:
  return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def diff_text(d: dict[str, float], digits: int = 2) -> str:
  return f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


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


def _kwargs_key(kwargs: dict[str, Any]) -> str:
  return ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))


class DatasetBench:
  """Samplers, FID, LPIPS, bits/dim and inpainting for the networks of one data set.

  Networks are named `variant` (after all updates) or `variant@step` (a kept checkpoint).
  Compiled functions take the parameters as arguments, so the networks of a data set (same
  architecture) share one program per sampler. Every measurement goes through the `Store`.
  """

  def __init__(self, dataset: str, networks: dict[str, Network], args: argparse.Namespace,
               extractor: Any, lpips: lpips_lib.LPIPSDistance | None, store: Store):
    self.dataset, self.args, self.store = dataset, args, store
    self.extractor, self.lpips = extractor, lpips
    self.networks: dict[str, Network] = dict(networks)
    first = next(iter(networks.values()))
    self.config = first.config
    self.model_def = first.setup.model_def
    self.schedule = builders.make_schedule(self.config.diffusion)
    self.patch = int(self.config.diffusion.patch_size)
    self.shape = builders.data_shape(self.config)
    self.grid = tuple(diffusion.token_grid((1, *self.shape), self.patch)[1:])
    self.num_classes = int(self.config.model.num_classes)
    self.cfg_scale = float(self.config.sampling.cfg_scale)
    self.root = jax.random.key(int(args.seed))
    self._programs: dict[Any, Any] = {}
    self._reference = None
    # The held-out images (`--elbo_examples` of the test split): bits/dim and the data variance.
    self.held_out = data_lib.reference_images(self.config.data, args.elbo_examples)
    self.data_variance = float(np.var(pixels.to_model_range(self.held_out[0])))

  def network(self, name: str) -> Network:
    if name not in self.networks:
      variant, _, step = name.partition("@")
      self.networks[name] = self.networks[variant].at(int(step))
    return self.networks[name]

  @property
  def reference(self) -> fid_lib.ReferenceStatistics:
    """Features of `--num_ref` training images (computed once, cached in the workdir)."""
    if self._reference is None:
      args = self.args
      cache = os.path.join(args.workdir, "fid_cache")
      name = f"{self.dataset}-train-{self.shape[0]}px-{args.num_ref}"

      def batches():
        images, _ = data_lib.reference_images(self.config.data, args.num_ref,
                                              self.config.data.train_split)
        return [images[i:i + args.batch] for i in range(0, len(images), args.batch)]

      self._reference = fid_lib.reference_statistics(name, batches, self.extractor, cache)
    return self._reference

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

  def generate(self, network: str, num: int, **sample_kwargs) -> tuple[np.ndarray, float]:
    """`num` samples (classes in turn) and the mean NFE per batch. The keys depend on the
    sampler, not the network (common random numbers across networks)."""
    net = self.network(network)
    batch = min(self.args.batch, num)
    fn = self.program(batch, False, **sample_kwargs)
    outs, nfes = [], []
    for i in range(math.ceil(num / batch)):
      labels = (jnp.arange(i * batch, (i + 1) * batch, dtype=jnp.int32) % self.num_classes
                if self.num_classes else jnp.zeros((batch,), jnp.int32))
      key = jax.random.fold_in(self.root, _key_of(self.dataset, _kwargs_key(sample_kwargs), i))
      out, nfe = fn(net.params, net.model_state, key, labels, None, None)
      outs.append(np.asarray(out))
      nfes.append(int(nfe))
    return np.concatenate(outs)[:num], float(np.mean(nfes))

  def fid(self, network: str, name: str, **sample_kwargs) -> dict[str, Any]:
    """FID/KID of `--num_fid` samples with bootstrap intervals (stored); saves a grid."""
    key = f"{self.dataset}/{network}/fid/{_kwargs_key(sample_kwargs)}"
    row = self.store.get(key)
    if row is None:
      start = time.monotonic()
      images, nfe = self.generate(network, self.args.num_fid, **sample_kwargs)
      features = self.extractor.features(
          [images[i:i + self.args.batch] for i in range(0, len(images), self.args.batch)])
      row = fid_kid_bootstrap(features, self.reference, self.args.bootstrap, self.args.seed)
      grid_name = f"samples_{self.dataset}_{network.replace('@', '_')}_{name}.png"
      nrow = self.num_classes if 0 < self.num_classes <= 16 else None
      save_grid(images[:min(len(images), 4 * (nrow or 8))],
                os.path.join(self.args.out, grid_name), nrow)
      row.update(nfe=nfe, grid=grid_name, seconds=time.monotonic() - start)
      self.store.put(key, row)
      log(f"{self.dataset}/{network} {name}: FID "
          f"{interval_text(row['fid'], row['fid_lo'], row['fid_hi'])} at NFE {nfe:.1f}")
    return dict(row)

  # -- bits/dim ----------------------------------------------------------------------------

  def bpd_values(self, network: str, path_name: str) -> np.ndarray:
    """Per-example bits/dim along 'homogeneous' or 'raster' (stored). The keys depend on the
    path and the batch, not the network: every network sees the same x0, s and noise (common
    random numbers), so differences between networks are paired."""
    key = f"{self.dataset}/{network}/bpd/{path_name}"
    if self.store.get(key) is not None:
      return np.asarray(self.store.get(key))
    net = self.network(network)
    images, labels = self.held_out
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
    return np.asarray(self.store.put(key, np.concatenate(values).tolist()))

  def bpd(self, network: str, path_name: str) -> dict[str, float]:
    """Mean bits/dim along 'homogeneous' or 'raster' and its standard error."""
    return dict(zip(("bpd", "bpd_se"), elbo.mean_and_stderr(self.bpd_values(network,
                                                                             path_name))))

  def bpd_difference(self, network: str, other: str, path_name: str) -> dict[str, float]:
    """Paired bits/dim difference `network − other` (same x0, s, noise), ± 1.96 SE."""
    return paired(self.bpd_values(network, path_name), self.bpd_values(other, path_name))

  # -- inpainting --------------------------------------------------------------------------

  def inpaint_set(self, mask_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The originals (float [-1, 1]), a token mask and its pixel mask, fixed by the seed."""
    images, _ = data_lib.reference_images(self.config.data, self.args.num_inpaint)
    mask = sampling.masks.make_mask(mask_name, len(images), self.grid, seed=int(self.args.seed))
    pixel_mask = np.asarray(diffusion.expand_levels(jnp.asarray(mask, jnp.float32),
                                                    (len(images), *self.shape),
                                                    self.patch))[..., 0] > 0
    return pixels.to_model_range(images), mask, pixel_mask

  def inpaint(self, network: str, mask_name: str, name: str, grid: bool = False,
              **sample_kwargs) -> dict[str, Any]:
    """Per-image LPIPS to the originals and texture statistics of the completions (stored)."""
    key = f"{self.dataset}/{network}/inpaint/{mask_name}/{_kwargs_key(sample_kwargs)}"
    row = self.store.get(key)
    if row is not None:
      return dict(row)
    start = time.monotonic()
    net = self.network(network)
    originals, mask, pixel_mask = self.inpaint_set(mask_name)
    num = len(originals)
    batch = min(self.args.batch, num)
    pad = math.ceil(num / batch) * batch - num
    known = np.concatenate([originals, np.repeat(originals[-1:], pad, 0)])
    mask_p = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
    fn = self.program(batch, True, **sample_kwargs)
    outs, nfes = [], []
    for i in range(0, len(known), batch):
      rng = jax.random.fold_in(self.root, _key_of(self.dataset, _kwargs_key(sample_kwargs),
                                                  mask_name, i))
      out, nfe = fn(net.params, net.model_state, rng, None, known[i:i + batch],
                    mask_p[i:i + batch])
      outs.append(np.asarray(out))
      nfes.append(int(nfe))
    done = np.concatenate(outs)[:num]
    lp = np.asarray(self.lpips(done, originals), np.float64)
    row = {"lpips_values": lp.tolist(), "nfe": float(np.mean(nfes)),
           **texture_values(done, pixel_mask, self.patch)}
    row["lpips"], row["lpips_se"] = mean_se(lp)
    for metric in ("gram", "local_stats"):
      row[metric], row[f"{metric}_se"] = mean_se(row[f"{metric}_values"])
    row["seconds"] = time.monotonic() - start
    if grid:  # rows: the known context (hole grey), the completion, the original
      images = np.concatenate([visualize.masked_images(originals[:8], pixel_mask[:8]),
                               done[:8], originals[:8]])
      file_name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"inpaint_{self.dataset}_{name}")
      save_grid(images, os.path.join(self.args.out, f"{file_name}.png"), min(8, num))
    self.store.put(key, row)
    log(f"{self.dataset}/{network} {mask_name} {name}: LPIPS {row['lpips']:.4f} ± "
        f"{row['lpips_se']:.4f}, NFE {row['nfe']:.0f}")
    return dict(row)


def texture_values(images: np.ndarray, pixel_mask: np.ndarray, patch: int) -> dict[str, list]:
  """Per-image Gram and local mean/std distances of the holes to their context (NaN where an
  image lacks one of the regions); the windows are the tokens (p×p), 4×4 pixels when p = 1."""
  window = patch if patch >= 2 else 4
  return {"gram_values": np.asarray(texture_stats.gram_distance(images, pixel_mask),
                                    np.float64).tolist(),
          "local_stats_values": np.asarray(texture_stats.local_stats_distance(
              images, pixel_mask, window=window), np.float64).tolist()}


# ------------------------------------------------------------------------------------------------
# The claims. Each returns {"rows": …, "summary": [(comparison, result, verdict), …],
# "verdict": one line}; rows keep bootstrap replicates until `public` strips them.


def curve_steps(args: argparse.Namespace) -> list[int]:
  every = args.train_steps // args.curve_points
  return [every * (i + 1) for i in range(args.curve_points)]


def claim_1_2(bench: DatasetBench, other: str) -> dict[str, Any]:
  """asyncpatch vs `other` (conventional: claim 1, iid: claim 2), uniform sampling."""
  args = bench.args
  uniform = dict(strategy="uniform", num_steps=args.sample_steps)
  rows: dict[str, dict[str, Any]] = {}
  for variant in ("asyncpatch", other):
    rows[variant] = {**bench.fid(variant, "uniform", **uniform), **bench.bpd(variant,
                                                                             "homogeneous"),
                     "updates": args.train_steps}
  summary = []
  fid_diff = boot_difference(rows["asyncpatch"], rows[other])
  summary.append((f"FID, asyncpatch − {other} (equal updates)", diff_text(fid_diff),
                  verdict(fid_diff["lo"], fid_diff["hi"])))
  kid_diff = boot_difference(rows["asyncpatch"], rows[other], "kid")
  summary.append((f"KID, asyncpatch − {other}", diff_text(kid_diff, 4),
                  verdict(kid_diff["lo"], kid_diff["hi"])))
  if other == "conventional":
    step = round(args.control_fraction * args.train_steps)
    name = f"conventional@{step}"
    rows[f"conventional, {args.control_fraction:g}× updates"] = {
        **bench.fid(name, "uniform", **uniform), **bench.bpd(name, "homogeneous"),
        "updates": step}
    control = boot_difference(rows["asyncpatch"], rows[f"conventional, "
                                                       f"{args.control_fraction:g}× updates"])
    summary.append((f"FID, asyncpatch − conventional at {args.control_fraction:g}× updates",
                    diff_text(control), verdict(control["lo"], control["hi"])))
  bpd_pair = bench.bpd_difference("asyncpatch", other, "homogeneous")
  summary.append((f"bits/dim (homogeneous), asyncpatch − {other}, paired",
                  diff_text(bpd_pair, 3), verdict(bpd_pair["lo"], bpd_pair["hi"])))
  curves = {}  # claim 1 only: the iid network's curve would cost four more FIDs
  for variant in (("asyncpatch", other) if other == "conventional" else ()):
    points = []
    for step in curve_steps(args):
      name = variant if step == args.train_steps else f"{variant}@{step}"
      r = bench.fid(name, "uniform", **uniform)
      points.append({"updates": step, "fid": r["fid"], "fid_lo": r["fid_lo"],
                     "fid_hi": r["fid_hi"]})
    curves[variant] = {"fid": points, "loss": read_curve(os.path.join(
        bench.network(variant).workdir, "claims_curve.jsonl"))}
  # Training noise: the spread of FID between the last checkpoints (at least two each).
  late = {v: [p["fid"] for p in c["fid"] if p["updates"] >= args.control_fraction
              * args.train_steps] for v, c in curves.items()}
  if late and min(map(len, late.values())) >= 2:
    between = welch(late["asyncpatch"], late[other])
    summary.append((f"FID, asyncpatch − {other}, mean over the checkpoints from "
                    f"{round(args.control_fraction * args.train_steps)} updates (their spread as "
                    f"the error: training noise)", diff_text(between),
                    verdict(between["lo"], between["hi"])))
  head = summary[0]
  line = (f"FID {interval_text(rows['asyncpatch']['fid'], rows['asyncpatch']['fid_lo'], rows['asyncpatch']['fid_hi'])} (asyncpatch) vs "  # noqa: E501
          f"{interval_text(rows[other]['fid'], rows[other]['fid_lo'], rows[other]['fid_hi'])} "
          f"({other}); difference {head[1]}: {describe(head[2], 'asyncpatch better', 'asyncpatch worse')}")  # noqa: E501
  return {"rows": rows, "curves": curves, "summary": summary, "verdict": line}


def describe(word: str, holds: str, fails: str) -> str:
  """A verdict word with what it means for this comparison."""
  return {"holds": f"holds ({holds})", "fails": f"fails ({fails})",
          "not significant": "not significant (no difference detected)"}.get(word, word)


def claim_3(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  steps = args.sample_steps
  methods = [
      ("native (asyncpatch)", "asyncpatch", dict(strategy="uniform", num_steps=steps)),
      (f"RePaint j={args.repaint_jump} r={args.repaint_resample} (conventional)", "conventional",
       dict(strategy="repaint", num_steps=steps, jump_length=args.repaint_jump,
            resample=args.repaint_resample)),
      ("replacement, RePaint r=1 (conventional)", "conventional",
       dict(strategy="repaint", num_steps=steps, jump_length=args.repaint_jump, resample=1)),
      (f"RePaint j={args.repaint_jump} r={args.repaint_resample} (asyncpatch)", "asyncpatch",
       dict(strategy="repaint", num_steps=steps, jump_length=args.repaint_jump,
            resample=args.repaint_resample)),
  ]
  if args.repaint_paper:
    t, jump, resample = ints(args.repaint_paper)
    methods.insert(1, (f"RePaint paper T={t} j={jump} r={resample} (conventional)",
                       "conventional", dict(strategy="repaint", num_steps=t, jump_length=jump,
                                            resample=resample)))
  rows: dict[str, dict[str, Any]] = {}
  summary = []
  for mask_name in args.masks.split(","):
    rows[mask_name] = {}
    for label, variant, kwargs in methods:
      rows[mask_name][label] = bench.inpaint(variant, mask_name, mask_name,
                                             grid=label.startswith("native"), **kwargs)
    native = rows[mask_name]["native (asyncpatch)"]
    for label in list(rows[mask_name])[1:]:
      if "(conventional)" in label and "replacement" not in label:
        other = rows[mask_name][label]
        pair = paired(native["lpips_values"], other["lpips_values"])
        summary.append((f"{mask_name}: LPIPS native (NFE {native['nfe']:.0f}) − {label} "
                        f"(NFE {other['nfe']:.0f}), paired", diff_text(pair, 4),
                        verdict(pair["lo"], pair["hi"])))
  words = [s[2] for s in summary]
  line = (f"native inpainting vs RePaint on the conventional network, paired LPIPS over "
          f"{args.num_inpaint} images per mask: holds (native lower) in {words.count('holds')}, "
          f"fails (native higher) in {words.count('fails')}, not significant in "
          f"{words.count('not significant')} of {len(words)} comparisons")
  return {"rows": rows, "summary": summary, "verdict": line}


def claim_4(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  scales, levels = floats(args.guidance_scales), floats(args.guidance_levels)
  base_kwargs = dict(strategy="uniform", num_steps=args.sample_steps)
  rows: dict[str, dict[str, Any]] = {}

  def run(scale: float, level: float) -> None:
    kwargs = dict(base_kwargs)
    if scale > 0:
      kwargs.update(input_guidance=float(scale), guidance_level=float(level))
    label = f"ω={scale:g}" + (f", k={level:g}" if scale > 0 else "")
    if label not in rows:
      row = bench.inpaint("asyncpatch", args.guidance_mask, f"guidance_{label}",
                          grid=(scale > 0 and level == 0.5) or scale == 0, **kwargs)
      rows[label] = {**row, "omega": scale, "level": level if scale > 0 else None}

  run(0.0, 0.5)
  for s in scales:  # first ω at k = 0.5, then k at the ω of lowest LPIPS
    run(s, 0.5)
  guided = [r for r in rows.values() if r["omega"] > 0]
  best_omega = min(guided, key=lambda r: r["lpips"])["omega"] if guided else 1.0
  for k in levels:
    run(best_omega, k)
  originals, _, pixel_mask = bench.inpaint_set(args.guidance_mask)
  truth_values = texture_values(originals, pixel_mask, bench.patch)
  truth = {m: mean_se(truth_values[f"{m}_values"])[0] for m in ("gram", "local_stats")}
  base = rows["ω=0"]
  summary = []
  good = []
  for label, r in rows.items():
    if r["omega"] == 0:
      continue
    lp = paired(r["lpips_values"], base["lpips_values"])
    gram = paired(r["gram_values"], base["gram_values"])
    local = paired(r["local_stats_values"], base["local_stats_values"])
    r.update(lpips_diff=lp, gram_diff=gram, local_stats_diff=local)
    words = (verdict(lp["lo"], lp["hi"]), verdict(gram["lo"], gram["hi"]),
             verdict(local["lo"], local["hi"]))
    ok = words[0] == "holds" and "fails" not in words[1:]
    good += [label] if ok else []
    summary.append((f"{label} − unguided: LPIPS / Gram / local mean-std, paired",
                    f"{diff_text(lp, 4)} / {diff_text(gram, 3)} / {diff_text(local, 3)}",
                    "holds" if ok else ("fails" if "fails" in words[1:] or words[0] == "fails"
                                        else "not significant")))
  line = (f"input guidance lowers LPIPS without worsening the texture statistics (both "
          f"significant at 95%, paired over {args.num_inpaint} images) in {len(good)} of "
          f"{len(summary)} settings; originals: Gram {truth['gram']:.3f}, local "
          f"{truth['local_stats']:.3f}")
  return {"rows": rows, "ground_truth": truth, "mask": args.guidance_mask, "summary": summary,
          "verdict": line}


def claim_5(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  budgets = ints(args.nfe_budgets)
  rows: dict[str, dict[str, Any]] = {}
  for budget in budgets:
    for sampler, kwargs in nfe_rows(budget, bench.grid).items():
      rows[f"{sampler}, N={budget}"] = {**bench.fid("asyncpatch", f"{sampler}_{budget}",
                                                    **kwargs), "sampler": sampler,
                                        "budget": budget}
  summary = []
  for budget in budgets:
    d = boot_difference(rows[f"uncertainty, N={budget}"], rows[f"uniform, N={budget}"])
    summary.append((f"FID at N={budget}: uncertainty plan − uniform", diff_text(d),
                    verdict(d["lo"], d["hi"])))
  target = args.sample_steps if args.sample_steps in budgets else max(budgets)
  reference = rows[f"uniform, N={target}"]
  needed = {}
  for sampler in ("uniform", "uncertainty", "autoregressive"):
    for budget in budgets:  # the smallest budget not significantly worse than the reference
      d = boot_difference(rows[f"{sampler}, N={budget}"], reference)
      if d["lo"] <= 0:
        needed[sampler] = budget
        break
  ratio = needed.get("uncertainty")
  goal = ("holds" if ratio is not None and ratio <= 0.5 * target else "fails")
  summary.append((f"NFE the uncertainty plan needs to match uniform at N={target} "
                  f"(not significantly worse), goal ≤ {0.5 * target:g}",
                  f"{ratio if ratio is not None else f'> {max(budgets)}'}", goal))
  line = (f"uncertainty plan vs uniform at equal NFE: better in "
          f"{sum(s[2] == 'holds' for s in summary[:-1])}, worse in "
          f"{sum(s[2] == 'fails' for s in summary[:-1])} of {len(budgets)} budgets; matching "
          f"uniform at N={target} takes {needed.get('uncertainty', 'more than the largest')} "
          f"calls (uniform {needed.get('uniform', '–')}, autoregressive "
          f"{needed.get('autoregressive', '–')}): the ≤ 0.5× goal {goal}")
  return {"rows": rows, "needed": needed, "target": target, "summary": summary, "verdict": line}


def claim_6(bench: DatasetBench) -> dict[str, Any]:
  args = bench.args
  budgets = sorted(set(ints(args.nfe_budgets)) | {args.sample_steps})
  sampling_rows: dict[str, dict[str, Any]] = {}
  summary, sweep = [], []
  for budget in budgets:
    rows_n = nfe_rows(budget, bench.grid)
    ar = bench.fid("asyncpatch", f"autoregressive_{budget}", **rows_n["autoregressive"])
    uni = bench.fid("asyncpatch", f"uniform_{budget}", **rows_n["uniform"])
    sampling_rows[f"autoregressive, N={budget}"] = {**ar, "budget": budget}
    sampling_rows[f"uniform, N={budget}"] = {**uni, "budget": budget}
    r = boot_difference(ar, uni, ratio=True)
    summary.append((f"FID ratio autoregressive / uniform at N={budget}, goal ≤ 1.3",
                    interval_text(r["ratio"], r["lo"], r["hi"]),
                    verdict(r["lo"], r["hi"], holds_below=1.3)))
  # How the ratio depends on the share of the budget each group gets (more overlap).
  budget = args.sample_steps
  uni = sampling_rows[f"uniform, N={budget}"]
  seen = {ar_kwargs(budget, bench.grid)["steps_per_group"]}
  for share in AR_SHARES[1:]:
    kwargs = ar_kwargs(budget, bench.grid, share)
    if kwargs["steps_per_group"] in seen:  # small budgets: shares that round alike
      continue
    seen.add(kwargs["steps_per_group"])
    label = f"autoregressive, N={budget}, {kwargs['steps_per_group']} steps per group"
    ar = bench.fid("asyncpatch", f"autoregressive_{budget}_share_{share}", **kwargs)
    sampling_rows[label] = {**ar, "budget": budget}
    r = boot_difference(ar, uni, ratio=True)
    sweep.append((kwargs["steps_per_group"], interval_text(r["ratio"], r["lo"], r["hi"]),
                  verdict(r["lo"], r["hi"], holds_below=1.3)))
  elbos: dict[str, dict[str, Any]] = {}
  for variant in bench.networks:
    if "@" in variant:
      continue
    elbos[variant] = {name: bench.bpd(variant, name) for name in ("raster", "homogeneous")}
    if variant != "asyncpatch":
      for name in ("raster", "homogeneous"):
        pair = bench.bpd_difference("asyncpatch", variant, name)
        elbos[variant][name].update(bpd_diff=pair["diff"], bpd_diff_se=pair["se"])
        if name == "raster":
          summary.append((f"raster-path bits/dim, asyncpatch − {variant}, paired",
                          diff_text(pair, 3), verdict(pair["lo"], pair["hi"])))
  words = [s[2] for s in summary[:len(budgets)]]
  line = (f"grouped AR within 1.3× of uniform FID: holds at {words.count('holds')}, fails at "
          f"{words.count('fails')}, not significant at {words.count('not significant')} of "
          f"{len(budgets)} budgets (half the budget per group); at N={budget} with more steps "
          f"per group: " + ", ".join(f"{steps}: {ratio} ({word})" for steps, ratio, word in sweep)
          + "; raster-path bits/dim: "
          + "; ".join(f"{s[0].split(', ')[1]} {s[1]} ({s[2]})" for s in summary[len(budgets):]))
  summary[len(budgets):len(budgets)] = [
      (f"FID ratio autoregressive ({steps} of {budget} steps per group) / uniform at "
       f"N={budget}, goal ≤ 1.3", ratio, word) for steps, ratio, word in sweep]
  return {"rows": {"sampling": sampling_rows, "bits_per_dim": elbos}, "summary": summary,
          "verdict": line}


# ------------------------------------------------------------------------------------------------
# Output.


def fmt(value: Any, digits: int = 3) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return "nan" if not np.isfinite(value) else f"{value:.{digits}f}"
  return str(value)


def fid_cells(r: dict[str, Any]) -> str:
  """'FID [lo, hi] | KID [lo, hi]' cells of a row."""
  return (f"{interval_text(r['fid'], r['fid_lo'], r['fid_hi'])} | "
          f"{interval_text(r['kid'], r['kid_lo'], r['kid_hi'], 4)}")


def strip(res: Any) -> Any:
  """A claim's result without bootstrap replicates and per-image values."""
  if isinstance(res, dict):
    return {k: strip(v) for k, v in res.items() if not k.endswith(("_boot", "_values"))}
  if isinstance(res, (list, tuple)):
    return [strip(v) for v in res]
  return res


def calls_text(calls: list[dict[str, Any]]) -> list[str]:
  """claims.md's record of the calls on the workdir (start, minutes, CPU)."""
  if not calls:
    return []
  parts = [f"{c['started']}, {float(c['minutes']):.0f} min, {c.get('cpu') or 'CPU not recorded'}"
           + (f" ({c['note']})" if c.get("note") else "") for c in calls]
  return ["Calls on this workdir: " + "; ".join(parts) + ". Results do not depend on the "
          "machine; times do.", ""]


def markdown(results: dict[str, Any]) -> str:
  s = results["settings"]
  env = results["environment"]
  lines = [
      "# Claims at CPU scale", "",
      f"Command: `{s['command']}`  ",
      f"Machine: {env['cpu_count']} CPU cores ({env.get('cpu', 'CPU model not recorded')}; "
      f"{env['devices']}), jax {env.get('jax')}. Started {results['started']} UTC; "
      f"{results.get('status', '')}"
      f"{'; wall time ' + results['wall'] if results.get('wall') else ''}.", "",
      *calls_text(results.get("calls", [])),
      f"Networks: {s['image_size']}×{s['image_size']} pixels, batch {s['batch_size']}, "
      f"{s['train_steps']} updates each, constant learning rate after warm-up, EMA weights; "
      f"checkpoints every {s['train_steps'] // s['curve_points']} updates for the curves.", "",
      f"FID/KID: {FEATURE_NAMES[s['features']]} features of {s['num_fid']} samples against "
      f"{s['num_ref']} training images ({s['sample_steps']}-step ancestral sampling unless "
      f"stated), [95% percentile bootstrap interval over the samples, {s['bootstrap']} "
      f"resamples, re-centred on the estimate]; differences between rows from the replicates, "
      f"which resample the same sample indices in every row (rows of different networks under "
      f"one sampler share noise and labels, so theirs is a paired bootstrap). LPIPS: AlexNet "
      f"at 64×64, {s['num_inpaint']} test images per mask, ± standard error, differences "
      f"paired over the images [± 1.96 SE]. Bits/dim: {s['elbo_examples']} test images, "
      f"{s['elbo_steps']} strata, 8-bit decoder, paired across networks (same images, s and "
      f"noise). Verdict: holds / fails when the 95% interval excludes the other side, else not "
      f"significant.", "",
      "## Verdicts", "",
      "| claim | data set | comparison | result [95% interval] | verdict |",
      "|---|---|---|---|---|"]
  for claim_id in map(str, CLAIMS):
    for dataset, res in results["claims"].get(claim_id, {}).items():
      for comparison, result, word in res.get("summary", []):
        lines.append(f"| {claim_id} | {dataset} | {comparison} | {result} | {word} |")
  lines += ["", "## Networks", "", "| network | updates | training time (s) |", "|---|---|---|"]
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


FEATURE_NAMES = {"alexnet": "AlexNet (LPIPS conv5, mean-pooled, 64 px; ranks rows, not "
                            "comparable with published FID)",
                 "inception": "Inception-v3 pool3"}


def claim_table(claim: int, res: dict[str, Any]) -> list[str]:
  rows = res["rows"]
  if claim in (1, 2):
    out = ["| network | updates | FID ↓ | KID ↓ | NFE | bits/dim (homogeneous) ↓ |",
           "|---|---|---|---|---|---|"]
    for name, r in rows.items():
      out.append(f"| {name} | {r.get('updates', '–')} | {fid_cells(r)} | {fmt(r['nfe'], 0)} | "
                 f"{fmt(r['bpd'])} ± {fmt(r['bpd_se'])} |")
    if res.get("curves"):
      out += ["", "FID against training updates:", "",
              "| updates | " + " | ".join(res["curves"]) + " |",
              "|---|" + "---|" * len(res["curves"])]
      steps = [p["updates"] for p in next(iter(res["curves"].values()))["fid"]]
      for i, step in enumerate(steps):
        cells = [interval_text(c["fid"][i]["fid"], c["fid"][i]["fid_lo"], c["fid"][i]["fid_hi"])
                 for c in res["curves"].values()]
        out.append(f"| {step} | " + " | ".join(cells) + " |")
    return out
  if claim == 3:
    out = ["| mask | method | LPIPS ↓ | NFE |", "|---|---|---|---|"]
    for mask_name, methods in rows.items():
      for label, r in methods.items():
        out.append(f"| {mask_name} | {label} | {fmt(r['lpips'], 4)} ± {fmt(r['lpips_se'], 4)} "
                   f"| {fmt(r['nfe'], 0)} |")
    return out
  if claim == 4:
    truth = res["ground_truth"]
    out = [f"Mask `{res['mask']}`. Texture statistics of the hole against its context (lower is "
           f"closer); the originals themselves give Gram {fmt(truth['gram'])}, local mean/std "
           f"{fmt(truth['local_stats'])} (natural variation). Δ: setting − unguided, paired.",
           "", "| setting | LPIPS ↓ | Gram distance | local mean/std distance | Δ LPIPS | Δ Gram "
           "| NFE |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
      deltas = ([diff_text(r["lpips_diff"], 4), diff_text(r["gram_diff"], 3)]
                if "lpips_diff" in r else ["–", "–"])
      out.append(f"| {label} | {fmt(r['lpips'], 4)} ± {fmt(r['lpips_se'], 4)} | "
                 f"{fmt(r['gram'])} ± {fmt(r['gram_se'])} | {fmt(r['local_stats'])} ± "
                 f"{fmt(r['local_stats_se'])} | {deltas[0]} | {deltas[1]} | "
                 f"{fmt(r['nfe'], 0)} |")
    return out
  if claim == 5:
    out = ["| sampler | budget N | NFE | FID ↓ | KID ↓ |", "|---|---|---|---|---|"]
    for r in sorted(rows.values(), key=lambda r: (r["sampler"], r["budget"])):
      out.append(f"| {r['sampler']} | {r['budget']} | {fmt(r['nfe'], 1)} | {fid_cells(r)} |")
    return out
  out = ["| sampler (asyncpatch) | NFE | FID ↓ | KID ↓ |", "|---|---|---|---|"]
  for label, r in rows["sampling"].items():
    out.append(f"| {label} | {fmt(r['nfe'], 0)} | {fid_cells(r)} |")
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


def readme_table(results: dict[str, Any]) -> str:
  """The README's claims table: one row per claim and data set, its verdicts and key result."""
  s = results["settings"]
  lines = [README_BEGIN, "",
           f"Measured by `{s['command']}` ({results.get('status', '')}; "
           f"{results['environment']['cpu_count']} CPU cores): {s['image_size']}×"
           f"{s['image_size']} networks of {s['train_steps']} updates, FID of {s['num_fid']} "
           f"samples in {s['features']} features with 95% bootstrap intervals. Full tables: "
           f"[results/claims/claims.md](results/claims/claims.md).", "",
           "| claim | data set | comparison | result [95% interval] | verdict |",
           "|---|---|---|---|---|"]
  for claim_id in map(str, CLAIMS):
    for dataset, res in results["claims"].get(claim_id, {}).items():
      for comparison, result, word in res.get("summary", []):
        lines.append(f"| {claim_id}. {TITLES[int(claim_id)]} | {dataset} | {comparison} | "
                     f"{result} | **{word}** |")
  missing = [f"{dataset} claim {c}" for dataset, claims in parse_plan(s["claims"]).items()
             for c in claims if dataset not in results["claims"].get(str(c), {})]
  if missing:
    lines += ["", f"Not measured yet: {', '.join(missing)}. The run stopped before them; the "
                  f"same command resumes it."]
  return "\n".join(lines + ["", README_END])


def update_readme(results: dict[str, Any], path: str) -> None:
  """Replaces the README's block between the claims-table markers."""
  with open(path) as f:
    text = f.read()
  pattern = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
  if not pattern.search(text):
    raise ValueError(f"{path} has no claims-table markers ({README_BEGIN!r} … {README_END!r})")
  file_io.write_text(path, pattern.sub(lambda _: readme_table(results), text))


def plot(results: dict[str, Any], out: str) -> list[str]:
  """PNG plots: training curves (claims 1, 2), inpainting (3), guidance (4), FID against NFE
  (5); returns the names."""
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

  def errorbar(ax, xs, rows, label, marker="o-"):
    ys = [r["fid"] for r in rows]
    err = [[r["fid"] - min(r["fid"], r["fid_lo"]) for r in rows],
           [max(0.0, r["fid_hi"] - r["fid"]) for r in rows]]
    ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=3, label=label)

  for claim_id in ("1", "2"):
    for dataset, res in results["claims"].get(claim_id, {}).items():
      if not res.get("curves"):
        continue
      fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
      for variant, curve in res["curves"].items():
        errorbar(ax0, [p["updates"] for p in curve["fid"]], curve["fid"], variant)
        if curve["loss"]:
          steps, loss = zip(*curve["loss"])
          ax1.plot(steps, loss, label=variant)
      ax0.set(xlabel="updates", ylabel="FID (95% bootstrap)", title="FID against training")
      ax1.set(xlabel="updates", ylabel="training loss", yscale="log", title="training loss")
      ax0.legend()
      ax1.legend()
      fig.suptitle(f"Claim {claim_id} ({dataset})", y=1.02)
      fig.tight_layout()
      save(fig, f"claim{claim_id}_training_{dataset}.png")
  for dataset, res in results["claims"].get("5", {}).items():
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for sampler in ("uniform", "uncertainty", "autoregressive"):
      pts = sorted((r["nfe"], r) for r in res["rows"].values() if r["sampler"] == sampler)
      if pts:
        errorbar(ax, [p[0] for p in pts], [p[1] for p in pts], sampler)
    budgets = sorted({r["budget"] for r in res["rows"].values()})
    ax.set(xscale="log", xlabel="NFE", ylabel="FID (95% bootstrap)",
           title=f"Claim 5 ({dataset}): FID against NFE")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.legend()
    save(fig, f"claim5_fid_vs_nfe_{dataset}.png")
  for dataset, res in results["claims"].get("3", {}).items():
    masks_ = list(res["rows"])
    labels = list(res["rows"][masks_[0]])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
      ax.bar(np.arange(len(masks_)) + j * width,
             [res["rows"][m][label]["lpips"] for m in masks_], width,
             yerr=[1.96 * res["rows"][m][label]["lpips_se"] for m in masks_], capsize=2,
             label=f"{label} (NFE {res['rows'][masks_[0]][label]['nfe']:.0f})")
    ax.set_xticks(np.arange(len(masks_)) + 0.4 - width / 2, masks_)
    ax.set(ylabel="LPIPS (± 1.96 SE)", title=f"Claim 3 ({dataset}): inpainting")
    ax.legend(fontsize=6)
    save(fig, f"claim3_lpips_{dataset}.png")
  for dataset, res in results["claims"].get("4", {}).items():
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    sweep = sorted((r["omega"], r) for r in res["rows"].values()
                   if r["omega"] == 0 or r["level"] == 0.5)
    for ax, metric in zip(axes, ("lpips", "gram", "local_stats")):
      ax.errorbar([o for o, _ in sweep], [r[metric] for _, r in sweep],
                  yerr=[1.96 * r[f"{metric}_se"] for _, r in sweep], fmt="o-", capsize=3,
                  label="k = 0.5")
      if metric != "lpips":
        ax.axhline(res["ground_truth"][metric], ls="--", c="gray", label="originals")
      ax.set(xlabel="ω", title=metric)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Claim 4 ({dataset}): input guidance (± 1.96 SE)", y=1.04)
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
  store = Store(args)
  command = "python benchmarks/claims.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
  settings = {k: v for k, v in vars(args).items() if k != "plan"}
  settings["command"] = command or "python benchmarks/claims.py"
  begin = time.monotonic()
  # Every call on this workdir (start, minutes, CPU): the run's wall time is their sum.
  calls = list(store.get("calls") or [])
  cpu = perf.host_cpu()
  this_call = {"started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "cpu": cpu, "minutes": 0.0}

  def record_call() -> None:
    this_call["minutes"] = round((time.monotonic() - begin) / 60, 1)
    results["calls"] = store.put("calls", calls + [this_call])

  results: dict[str, Any] = {
      "settings": settings,
      "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
      "environment": {"cpu_count": os.cpu_count(), "cpu": cpu,
                      "devices": str(jax.devices()), "jax": jax.__version__,
                      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
      "models": {}, "claims": {}, "status": "running"}
  extractor = (fid_lib.FeatureExtractor(batch_size=args.batch) if args.features == "inception"
               else AlexNetFeatures())
  lpips = lpips_lib.LPIPSDistance("alexnet", resize_to=64)
  for dataset, claims in args.plan.items():
    variants = [v for v in VARIANTS if any(v in NEEDS[c] for c in claims)]
    networks = {}
    for variant in variants:
      net = train_network(dataset, variant, args)
      networks[variant] = net
      results["models"][f"{dataset}/{variant}"] = {"steps": net.steps,
                                                   "train_seconds": net.train_seconds}
    write_results(results, args.out)
    bench = DatasetBench(dataset, networks, args, extractor, lpips, store)
    for claim in claims:
      start = time.monotonic()
      if claim in (1, 2):
        res = claim_1_2(bench, "conventional" if claim == 1 else "iid")
      else:
        res = {3: claim_3, 4: claim_4, 5: claim_5, 6: claim_6}[claim](bench)
      res["seconds"] = time.monotonic() - start
      results["claims"].setdefault(str(claim), {})[dataset] = strip(res)
      log(f"claim {claim} ({dataset}): {res['verdict']}")
      record_call()
      write_results(results, args.out)
  record_call()
  total = sum(float(c["minutes"]) for c in results["calls"])
  results["status"] = "finished " + datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
  results["wall"] = (f"{this_call['minutes']:.0f} min in this call, {total:.0f} min over the "
                     f"{len(results['calls'])} calls on this workdir (each call reuses the "
                     f"networks and measurements of the earlier ones)")
  write_results(results, args.out)
  return results


def render(args: argparse.Namespace) -> dict[str, Any]:
  """Rewrites claims.md, the plots and the README's table from `<out>/claims.json`."""
  path = os.path.join(args.out, "claims.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--render needs {path}: run the claims first")
  with open(path) as f:
    results = json.load(f)
  write_results(results, args.out)
  if args.readme:
    update_readme(results, args.readme)
  return results


def main(argv: list[str] | None = None) -> None:
  try:
    args = parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    results = render(args) if args.render else run(args)
  except FlagError as e:
    user_errors.fail(str(e))
  print(markdown(results))


if __name__ == "__main__":
  with user_errors.clean_exit():
    main()
