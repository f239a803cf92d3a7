"""Builds the Colab notebooks in this folder from the cells below (Python strings → nbformat).

  python colabs/build_notebooks.py           # (re)writes colabs/*.ipynb, without outputs
  python colabs/build_notebooks.py --check   # exits 1 if a notebook differs from this script

Edit the cells here, not in the .ipynb files, so the notebooks stay reviewable as code and share
their set-up cells word for word. Every notebook trains the same tiny config (`TINY_CONFIG`) into a
workdir named by the config's hash: run on one machine after another, a notebook reuses the
finished checkpoint instead of training again (on Colab each notebook trains its own, about two
minutes on the CPU runtime).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap

import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def md(text: str) -> tuple[str, str]:
  return ("markdown", textwrap.dedent(text).strip("\n"))


def code(text: str) -> tuple[str, str]:
  return ("code", textwrap.dedent(text).strip("\n"))


# ----------------------------------------------------------------------------------------------
# Cells shared by every notebook.

SETUP = code('''
    # Set-up. Where asyncpatch_jax is installed from a checkout (`pip install -e .`) this cell only
    # finds the checkout. On Colab it installs it, with no editing needed, from: SOURCE if set (a
    # git URL, or the URL of a source archive), else a source archive in /content
    # (asyncpatch_jax*.tar.gz or .zip), else one picked in the upload dialog. Make the archive in
    # a checkout with `git archive --format=zip -o asyncpatch_jax.zip HEAD` (or GitHub's ZIP).
    import importlib.metadata
    import importlib.util
    import os
    import pathlib
    import shutil
    import subprocess
    import sys
    import urllib.request

    SOURCE = ""  # @param {type:"string"}
    CLONE_DIR = pathlib.Path("/content/asyncpatch_jax")
    ARCHIVES = ("asyncpatch_jax*.tar.gz", "asyncpatch_jax*.zip")
    STANDS_IN = {"tensorflow-cpu": "tensorflow"}  # Colab's TensorFlow serves for tensorflow-cpu


    def find_checkout():
      """The checkout that holds configs/ (not an installed package): the source tree of an editable
      install of asyncpatch_jax, the working directory or a folder above it, or CLONE_DIR."""
      cwd = pathlib.Path.cwd()
      candidates = [cwd, *cwd.parents, CLONE_DIR]
      spec = importlib.util.find_spec("asyncpatch_jax")
      if spec is not None and spec.origin:
        candidates.insert(0, pathlib.Path(spec.origin).resolve().parents[1])
      for path in candidates:
        if (path / "configs" / "base.py").is_file() and (path / "asyncpatch_jax").is_dir():
          return path
      return None


    def unpack(archive):
      """Extracts a source archive into CLONE_DIR (a single top folder is stripped)."""
      tmp = CLONE_DIR.with_name(CLONE_DIR.name + ".unpacked")
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.unpack_archive(str(archive), str(tmp))
      entries = list(tmp.iterdir())
      top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
      if not (top / "configs" / "base.py").is_file():
        shutil.rmtree(tmp)
        raise RuntimeError(f"{pathlib.Path(archive).name} holds no configs/base.py: the notebooks "
                           "need the source tree (a wheel lacks configs/); upload a source archive")
      shutil.rmtree(CLONE_DIR, ignore_errors=True)
      shutil.move(str(top), str(CLONE_DIR))
      shutil.rmtree(tmp, ignore_errors=True)


    def fetch_source():
      """Puts the source tree into CLONE_DIR; returns where it came from, in words."""
      if SOURCE.endswith((".tar.gz", ".tgz", ".zip")):
        archive = CLONE_DIR.parent / SOURCE.rsplit("/", 1)[-1]
        urllib.request.urlretrieve(SOURCE, archive)
        unpack(archive)
        return f"the archive at {SOURCE}"
      if SOURCE:
        shutil.rmtree(CLONE_DIR, ignore_errors=True)
        subprocess.run(["git", "clone", "--depth=1", SOURCE, str(CLONE_DIR)], check=True)
        return f"git clone {SOURCE}"
      archives = sorted(p for pattern in ARCHIVES for p in CLONE_DIR.parent.glob(pattern))
      how = "the archive"
      if not archives:
        from google.colab import files
        print("Upload a source archive of asyncpatch_jax (or set SOURCE and run again):")
        archives = [pathlib.Path(name).resolve() for name in files.upload()]
        how = "the uploaded archive"
        if not archives:
          raise RuntimeError("nothing was uploaded; upload a source archive or set SOURCE")
      unpack(archives[-1])
      return f"{how} {archives[-1].name}"


    def installed_version(name):
      try:
        return importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        return None


    def older(have, pinned):
      try:
        from packaging.version import Version
        return Version(have) < Version(pinned)
      except Exception:  # an unparsable version: keep what is installed
        return False


    def needed(requirements, version_of=installed_version):
      """The pins (`name==version` lines) this runtime lacks or has only in an older version. Newer
      installed packages are kept, so pip replaces little that the session may have imported."""
      out = []
      for line in requirements:
        pin = line.split("#")[0].strip()
        if not pin:
          continue
        name, _, version = pin.partition("==")
        have = version_of(name) or (version_of(STANDS_IN[name]) and version
                                    if name in STANDS_IN else None)
        if have is None or older(have, version):
          out.append(pin)
      return out


    def replaced_imports():
      """Modules this session imported whose installed version pip has since changed."""
      importlib.invalidate_caches()
      dists = importlib.metadata.packages_distributions()
      out = []
      for name in [n for n in list(sys.modules) if "." not in n and n in dists]:
        version, now = getattr(sys.modules[name], "__version__", None), installed_version(
            dists[name][0])
        if isinstance(version, str) and now and version != now:
          out.append(f"{name} {version} -> {now}")
      return out


    ROOT = find_checkout()
    if ROOT is None:
      if "google.colab" not in sys.modules:
        raise RuntimeError(
            "asyncpatch_jax is not installed. In a shell: git clone <the repository> && cd "
            "asyncpatch_jax && pip install -c constraints.txt -e . ; then open this notebook from "
            "the checkout's colabs/ folder.")
      where = fetch_source()
      pins = needed((CLONE_DIR / "requirements.txt").read_text().splitlines())
      pip = [sys.executable, "-m", "pip", "install", "-q"]
      subprocess.run([*pip, "--no-deps", "-e", str(CLONE_DIR)], check=True)
      if pins:
        subprocess.run([*pip, *pins], check=True)
      ROOT = CLONE_DIR
      print(f"asyncpatch_jax installed from {where}; pinned {len(pins)} missing or older "
            f"requirement(s): {' '.join(pins) or 'none'}")
      if replaced := replaced_imports():
        print(f"Restart the session (Runtime > Restart session) and run all cells: pip replaced "
              f"{', '.join(replaced)}, which this session had imported.")
    else:
      print(f"asyncpatch_jax from the checkout {ROOT}")
    if str(ROOT) not in sys.path:
      sys.path.insert(0, str(ROOT))  # for `configs`, which lives next to the package
''')

IMPORT_JAX = code('''
    import jax
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # the library logs progress; the cells print it
    print(f"JAX {jax.__version__} on {jax.devices()}")
''')

SHOW = code('''
    import matplotlib.pyplot as plt
    import numpy as np

    from asyncpatch_jax import pixels, visualize


    def grid_image(images, nrow=None):
      """Images `[N, H, W, 1]` in [-1, 1] tiled into one uint8 picture (grey borders)."""
      return visualize.make_grid(pixels.to_uint8(np.asarray(images)), nrow, border=1,
                                 fill=128)[..., 0]


    def show(images, nrow=None, title=None, ax=None, size=0.45):
      """Draws a grid of images; nearest-neighbour, so 8×8 digits stay sharp."""
      picture = grid_image(images, nrow)
      if ax is None:
        _, ax = plt.subplots(figsize=(size * picture.shape[1] / 9, size * picture.shape[0] / 9))
      ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
      ax.set_axis_off()
      if title:
        ax.set_title(title, fontsize=9)
      return ax
''')

CONFIG_MD = md('''
    ## The tiny config

    `configs/digits.py` (scikit-learn's 8×8 handwritten digits, installed with the package's
    dependencies: nothing to download) shrunk to train in two to three minutes on a two-core CPU:
    a 16-channel U-Net, 400 optimizer steps of batch 64. Configs are `ml_collections` dicts:
    every field you set here is what `--config.FIELD=VALUE` sets on the command line. Each pixel
    is a token with its own noise level (`diffusion.patch_size = 1`: an 8×8 level map).
''')

CONFIG = code('''
    import hashlib
    import tempfile

    from configs import digits


    def tiny_config():
      """configs/digits.py, shrunk: the same in every notebook of this folder."""
      config = digits.get_config()
      config.num_steps = 400                 # configs/digits.py trains 3,000 steps of batch 128
      config.data.batch_size = 64
      config.model.unet.channels = 16        # U-Net widths 16 and 32 (channel_mult (1, 2))
      config.model.parametrization = "v"     # v-prediction: steady for a briefly trained network
      config.model.uncertainty = True        # per-element uncertainty head (adaptive sampling)
      config.optimizer.warmup_steps = 50
      config.optimizer.ema_decays = (0.99,)  # a short run needs a short average
      config.checkpoint.every_steps = 200
      config.logging.log_every_steps = 50
      config.logging.parameter_overview = False
      config.eval.every_steps = 0
      config.sampling.every_steps = 0        # the trainer draws one sample grid, at the end
      config.sampling.num_samples = 20
      config.sampling.num_steps = 50
      config.sampling.num_inpaint = 0
      return config


    config = tiny_config()
    # The workdir is named by the config's hash, so every notebook of this folder run on the same
    # machine shares one checkpoint (set ASYNCPATCH_COLAB_WORKDIR to put them elsewhere).
    WORKDIR_ROOT = pathlib.Path(os.environ.get("ASYNCPATCH_COLAB_WORKDIR")
                                or pathlib.Path(tempfile.gettempdir()) / "asyncpatch_colabs")
    digest = hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:10]
    WORKDIR = WORKDIR_ROOT / f"digits_tiny_{digest}"
    print(f"{config.data.source} {config.data.image_size}×{config.data.image_size}, "
          f"{config.model.name} ({config.model.parametrization}-prediction), "
          f"{config.num_steps} steps of batch {config.data.batch_size}; workdir {WORKDIR}")
''')

TRAIN = code('''
    import time

    from clu import metric_writers

    from asyncpatch_jax.train import train_and_evaluate


    class NotebookWriter(metric_writers.MetricWriter):
      """Keeps the trainer's scalars in memory and prints the loss every `every` steps."""

      def __init__(self, every=100):
        self.every, self.history = every, {}

      def write_scalars(self, step, scalars):
        for name, value in scalars.items():
          self.history.setdefault(name, []).append((int(step), float(value)))
        if "train/loss" in scalars and step % self.every == 0:
          print(f"step {step:4d}  loss {float(scalars['train/loss']):.4f}")

      def write_summaries(self, step, values, metadata=None):
        pass

      def write_images(self, step, images):
        pass

      def write_videos(self, step, videos):
        pass

      def write_audios(self, step, audios, *, sample_rate):
        pass

      def write_texts(self, step, texts):
        pass

      def write_histograms(self, step, arrays, num_buckets=None):
        pass

      def write_hparams(self, hparams):
        pass

      def flush(self):
        pass

      def close(self):
        pass


    writer = NotebookWriter()
    start = time.time()
    # Resumes from the latest checkpoint in WORKDIR: a finished run returns at once.
    state = train_and_evaluate(config, WORKDIR, writer=writer)
    trained_here = bool(writer.history.get("train/loss"))
    print(f"step {int(state.step)} after {time.time() - start:.0f} s "
          f"({'trained now' if trained_here else 'reused the checkpoint in ' + str(WORKDIR)})")
''')

TRAIN_MD = md('''
    ## Train (or reuse) the tiny model

    `train_and_evaluate(config, workdir)` is what `python -m asyncpatch_jax.main --mode=train` runs.
    It resumes from the workdir's latest checkpoint, so if `quickstart.ipynb` (or any notebook of
    this folder) already trained this config on this machine, the cell returns in seconds.
''')

RESTORE = code('''
    from asyncpatch_jax import models
    from asyncpatch_jax.train import builders
    from asyncpatch_jax.train import checkpoint as ckpt_lib
    from asyncpatch_jax.train import mesh as mesh_lib
    from asyncpatch_jax.train import optimizer as opt_lib
    from asyncpatch_jax.train import state as state_lib
    from asyncpatch_jax.train.restore import ema_params_name
    from asyncpatch_jax.train.samples import clip_x0


    def restore_model(config, workdir):
      """The latest checkpoint's EMA network, restored the way `--mode=sample` restores it."""
      mesh = mesh_lib.make_mesh(config.mesh)
      tx = opt_lib.make_optimizer(config.optimizer, int(config.num_steps))
      setup = state_lib.setup_state(config, mesh, tx)  # abstract state: shapes, dtypes, shardings
      checkpointer = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints",
                                           config.checkpoint, read_only=True)
      step = checkpointer.latest_step()
      restored = checkpointer.restore(step, setup.abstract)
      checkpointer.close()
      params = restored.ema[ema_params_name(config)]
      return setup.model_def.merge(params, restored.model_state), restored, step


    model, restored, step = restore_model(config, WORKDIR)
    schedule = builders.make_schedule(config.diffusion)
    PATCH = int(config.diffusion.patch_size)
    X_SHAPE = builders.data_shape(config)  # (8, 8, 1): one example
    NUM_CLASSES = int(config.model.num_classes)


    def make_denoiser(labels=None, cfg_scale=0.0, clip=True):
      """The network as the samplers' `denoiser(z, levels) -> Prediction(x0, variance)`.

      labels: class labels `[B]`, or None for the null class (the class is not given).
      clip: clip x̂0 to the data range [-1, 1], as the trainer's sample grids do.
      """
      denoiser = models.make_denoiser(
          model, schedule=schedule, parametrization=config.model.parametrization,
          patch_size=PATCH, labels=labels, cfg_scale=cfg_scale, num_classes=NUM_CLASSES)
      return clip_x0(denoiser) if clip else denoiser


    print(f"restored step {step}: {models.num_params(restored.params):,} parameters")
''')

HELD_OUT = code('''
    from asyncpatch_jax import data as data_lib

    held_out = data_lib.get_source(config.data, "test")  # the 10% of the digits training never saw
    print(f"{len(held_out)} held-out digits, {held_out.images.shape[1:]} uint8")
''')


# ----------------------------------------------------------------------------------------------
# quickstart.ipynb

QUICKSTART = [
    md('''
        # AsyncPatch Diffusion: quickstart

        AsyncPatch Diffusion gives **every token its own noise level**: the network reads a noisy
        image `z` together with a *level map* `t` (one level in [0, 1] per token; 0 is clean, 1 is
        pure noise) and predicts the clean image. One such network generates images, inpaints
        them, and generates in any order: that's the subject of the other notebooks in `colabs/`.

        This notebook installs the package, trains a tiny model on 8×8 digits through the
        library API, restores its checkpoint and draws samples. It runs on a CPU runtime in a few
        minutes.
    '''),
    SETUP,
    IMPORT_JAX,
    SHOW,
    CONFIG_MD,
    CONFIG,
    md('''
        ## What the network sees in training

        Independent levels per token almost never give the homogeneous maps that sampling starts
        from, so training draws level maps from a mixture (`config.diffusion.level_sampler`):
        maps spread around a mean level (a share of them exactly homogeneous), inpainting maps
        (known tokens at 0, the rest at one level) and autoregressive staircases. Dark is clean,
        bright is noise.
    '''),
    code('''
        from asyncpatch_jax.diffusion import level_samplers

        level_sampler = level_samplers.from_config(config.diffusion.level_sampler)
        maps = np.asarray(level_sampler(jax.random.key(0), (12, 8, 8)))  # 12 maps of 8×8 tokens
        frame = visualize.level_map_frames(maps[None], scale=8, nrow=12)[0]
        fig, ax = plt.subplots(figsize=(12, 1.4))
        ax.imshow(frame)
        ax.set_axis_off()
        ax.set_title("training level maps; mean levels " + ", ".join(f"{m:.2f}" for m in
                                                                     maps.mean(axis=(1, 2))),
                     fontsize=9)
        plt.show()
    '''),
    md('''
        ## Train

        `train_and_evaluate(config, workdir)` is the training loop behind
        `python -m asyncpatch_jax.main --config=configs/digits.py --workdir=DIR`: it writes
        `config.json`, Orbax checkpoints (parameters, optimizer, EMA, data position) and, at the
        end, a sample grid into the workdir. It resumes from the latest checkpoint, so running the
        cell again (or another notebook of this folder) reuses the finished run.
    '''),
    TRAIN,
    code('''
        if trained_here:
          steps, losses = zip(*writer.history["train/loss"])
          fig, ax = plt.subplots(figsize=(5, 2.5))
          ax.plot(steps, losses)
          ax.set(xlabel="step", ylabel="training loss", yscale="log")
          plt.show()
        grid_png = WORKDIR / "samples_latest.png"  # written by the trainer at the end of the run
        if grid_png.exists():
          from PIL import Image

          picture = np.asarray(Image.open(grid_png))
          fig, ax = plt.subplots(figsize=(picture.shape[1] / 16, picture.shape[0] / 16))
          ax.imshow(picture, cmap="gray", interpolation="nearest")
          ax.set_axis_off()
          ax.set_title(f"the trainer's grid: {grid_png.name}", fontsize=9)
          plt.show()
    '''),
    md('''
        ## Restore the checkpoint

        A new session would start here: build the abstract train state (shapes, dtypes and
        shardings, nothing allocated), restore the latest checkpoint onto it, and take the EMA
        parameters. `make_denoiser` turns the network into the core's *denoiser*,
        `denoiser(z, levels) -> Prediction(x0, variance)`, which every sampler and the ELBO take.
    '''),
    RESTORE,
    code('''
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.ema),
                                                        jax.tree.leaves(restored.ema)))
        print("restored EMA parameters equal the ones training returned:", same)
        assert same
    '''),
    md('''
        ## Sample

        `sampling.sample(denoiser, rng, x_shape, ...)` is one compiled loop. With the default
        strategy every token shares the level (standard diffusion); `num_steps` network
        evaluations take the level map from 1 to 0. The model is class-conditional: two samples
        of each digit.
    '''),
    code('''
        import jax.numpy as jnp

        from asyncpatch_jax import sampling

        labels = jnp.arange(20) % 10
        batch_shape = (20, *X_SHAPE)
        samples, info = sampling.sample(make_denoiser(labels), jax.random.key(1), batch_shape,
                                        schedule=schedule, num_steps=50, patch_size=PATCH)
        fig, axes = plt.subplots(1, 2, figsize=(10, 2.4))
        show(samples, nrow=10, ax=axes[0],
             title=f"ancestral (DDPM) updates, {int(info['nfe'])} network evaluations")
        fast, info = sampling.sample(make_denoiser(labels), jax.random.key(1), batch_shape,
                                     schedule=schedule, num_steps=20, patch_size=PATCH,
                                     stochastic=False)
        show(fast, nrow=10, ax=axes[1],
             title=f"deterministic (DDIM) updates, {int(info['nfe'])} network evaluations")
        plt.show()
    '''),
    md('''
        ### Classifier-free guidance

        The network was trained with the class dropped 10% of the time (the null label), so
        `make_denoiser(labels, cfg_scale=w)` applies classifier-free guidance in x̂0 space,
        `x̂ = x̂_c + w (x̂_c − x̂_∅)`. Passed as a traced argument, one compilation serves every
        scale.
    '''),
    code('''
        @jax.jit
        def sample_with_cfg(cfg_scale, key):
          out, _ = sampling.sample(make_denoiser(labels, cfg_scale=cfg_scale), key, batch_shape,
                                   schedule=schedule, num_steps=50, patch_size=PATCH)
          return out


        scales = (0.0, 1.0, 3.0)
        fig, axes = plt.subplots(1, len(scales), figsize=(15, 2.4))
        for ax, scale in zip(axes, scales):
          show(sample_with_cfg(scale, jax.random.key(2)), nrow=10, ax=ax,
               title=f"cfg_scale = {scale}")
        plt.show()
    '''),
    md('''
        ## Next

        - `inpainting.ipynb`: masks on real digits, native inpainting against RePaint, input
          guidance.
        - `adaptive_autoregressive.ipynb`: uncertainty-guided acceleration and autoregressive
          generation, with the level map over time.
        - `elbo_paths.ipynb`: the ELBO along homogeneous, raster and random-order paths.
        - From a shell, the full digits config (3,000 steps):
          `python -m asyncpatch_jax.main --config=configs/digits.py --workdir=/tmp/digits`, then
          the same with `--mode=sample` or `--mode=eval`. Any field `tiny_config()` sets can be
          set there as `--config.FIELD=VALUE`. `configs/mnist.py` is the 32×32 default of
          `make demo`.
    '''),
]


# ----------------------------------------------------------------------------------------------
# inpainting.ipynb

INPAINTING = [
    md('''
        # Inpainting and input guidance

        An AsyncPatch model inpaints **natively**: the known tokens sit at level 0 (clean, passed
        exactly) and the unknown ones go from 1 to 0; the network was trained on such maps, so
        nothing is re-noised and nothing is fine-tuned. The baseline every claim is measured
        against is **RePaint**, which only ever shows the network homogeneous maps: it replaces the
        known region by a noised copy at every step and resamples (jumps back up) to harmonise.

        This notebook draws masks on held-out digits, compares the two side by side, and sweeps
        **input guidance** ω, which pushes the unknown tokens toward what the clean context
        implies. It trains (or reuses) the tiny model of `quickstart.ipynb`; a CPU runtime runs
        it in a few minutes.
    '''),
    SETUP,
    IMPORT_JAX,
    SHOW,
    CONFIG_MD,
    CONFIG,
    TRAIN_MD,
    TRAIN,
    RESTORE,
    md('''
        ## Masks on real digits

        Masks are token-level booleans `[B, *grid]`, **True = known** (`sampling.masks`: box, half,
        expand, alternating lines, super-resolution, random tokens, LaMa-style strokes, PNG
        files). One is drawn by hand below (`#` = missing). Every mask goes on four held-out
        digits: one batch of 24.
    '''),
    HELD_OUT,
    code('''
        from asyncpatch_jax import diffusion, sampling

        GRID = diffusion.token_grid((1, *X_SHAPE), PATCH)[1:]  # the token grid, (8, 8)
        DRAWN = """
        ........
        ...##...
        ..####..
        ..####..
        ...###..
        ....#...
        ........
        ........
        """
        drawn = np.array([[c == "." for c in row] for row in DRAWN.split()])[None]
        MASKS = {
            "drawn by hand": drawn,
            "centre box": sampling.masks.box(1, GRID, size=0.5),
            "bottom half": sampling.masks.half(1, GRID, side="bottom"),
            "wide strokes": sampling.masks.make_mask("wide", 1, GRID, seed=1),
            "every other row": sampling.masks.alternating_lines(1, GRID, axis=0),
            "1 pixel in 4": sampling.masks.super_resolution(1, GRID, factor=2),
        }
        # The first held-out 2, 4, 5 and 8.
        pick = [int(np.flatnonzero(held_out.labels == digit)[0]) for digit in (2, 4, 5, 8)]
        digits_x = pixels.to_model_range(held_out.images[pick])  # [4, 8, 8, 1]
        num_images, num_masks = len(pick), len(MASKS)
        # Row-major (mask, image): example i has mask i // 4 and image i % 4.
        known = np.tile(digits_x, (num_masks, 1, 1, 1))
        known_mask = np.repeat(np.concatenate(list(MASKS.values())), num_images, axis=0)
        unknown_pixels = np.broadcast_to(~known_mask[..., None], known.shape)
        context = visualize.masked_images(known, known_mask)  # missing pixels grey


        def label_rows(ax):
          """Names the mask of each row of a grid drawn by `show` (rows of 8 + 1 pixels)."""
          ax.set_axis_on()
          ax.set_xticks([])
          ax.set_yticks([5 + 9 * row for row in range(num_masks)], list(MASKS), fontsize=8)
          ax.tick_params(length=0)
          for spine in ax.spines.values():
            spine.set_visible(False)


        fig, axes = plt.subplots(1, 2, figsize=(6.5, 5))
        show(known, nrow=num_images, ax=axes[0], title="held-out digits")
        show(context, nrow=num_images, ax=axes[1], title="what the sampler is given")
        label_rows(axes[0])
        plt.show()
        print("known fraction:", {k: round(float(m.mean()), 2) for k, m in MASKS.items()})
    '''),
    md('''
        ## Native inpainting against RePaint

        The class is not given (`labels=None`: the null class); the model has only the visible
        pixels. Native inpainting takes 50 network evaluations. RePaint gets the same 50 steps,
        once without resampling (plain replacement, the same cost) and once with its resampling
        jumps (`jump_length=5, resample=5`: 230 evaluations). The error column is the mean
        squared error on the missing pixels against the held-out original: a rough guide only,
        since many completions are plausible.
    '''),
    code('''
        denoiser = make_denoiser()


        def inpaint(key=7, **kwargs):
          out, info = sampling.sample(denoiser, jax.random.key(key), known.shape, schedule=schedule,
                                      patch_size=PATCH, known=known, known_mask=known_mask,
                                      **kwargs)
          return np.asarray(out), int(info["nfe"])


        def missing_mse(images):
          return float(np.square(images - known)[unknown_pixels].mean())


        results = {
            "AsyncPatch (native)": inpaint(num_steps=50),
            "RePaint, replacement only": inpaint(strategy="repaint", num_steps=50, jump_length=5,
                                                 resample=1),
            "RePaint, resampling": inpaint(strategy="repaint", num_steps=50, jump_length=5,
                                           resample=5),
        }
        native, _ = results["AsyncPatch (native)"]
        known_pixels = ~unknown_pixels
        assert np.array_equal(native[known_pixels], known[known_pixels])
        print("native inpainting returns the known pixels bit for bit")
        for name, (images, nfe) in results.items():
          print(f"{name:28s} {nfe:4d} network evaluations, MSE on missing pixels "
                f"{missing_mse(images):.3f}")
    '''),
    code('''
        panels = {"original": known, "context": context}
        panels.update({name: images for name, (images, _) in results.items()})
        fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 5))
        for ax, (name, images) in zip(axes, panels.items()):
          show(images, nrow=num_images, ax=ax, title=name)
        label_rows(axes[0])
        plt.show()
    '''),
    md('''
        ## Input guidance

        `x̂_g = x̂(z; context clean) + ω (x̂(z; context clean) − x̂(z̃; context re-noised to level
        k))`, applied to the unknown tokens: the difference is what the clean context contributes
        beyond a blurred version of itself, and ω > 0 amplifies it, as classifier-free guidance
        amplifies the class. Each evaluation costs two network calls; k = 0.5 by default
        (`guidance_level`).
    '''),
    code('''
        guided = {0.0: results["AsyncPatch (native)"]}  # ω = 0 is plain native inpainting
        guided.update({omega: inpaint(num_steps=50, input_guidance=omega) for omega in (1.0, 3.0)})
        fig, axes = plt.subplots(1, len(guided) + 1, figsize=(2.6 * (len(guided) + 1), 5))
        show(context, nrow=num_images, ax=axes[0], title="context")
        label_rows(axes[0])
        for ax, (omega, (images, nfe)) in zip(axes[1:], guided.items()):
          show(images, nrow=num_images, ax=ax,
               title=f"ω = {omega}: MSE {missing_mse(images):.3f}, {nfe} calls")
        plt.show()
    '''),
    md('''
        The errors above come from one seed of a model trained for 400 steps on 8×8 digits: an
        illustration, not a measurement. The paper's claims (native inpainting as good as
        RePaint at a fraction of the evaluations; input guidance improving local consistency and
        texture matching) are about ImageNet and LSUN models: see the README for the commands.
        Try other masks (`sampling.masks.MASKS`), `guidance_level`, or `stochastic=False`.
    '''),
]


# ----------------------------------------------------------------------------------------------
# adaptive_autoregressive.ipynb

ADAPTIVE = [
    md('''
        # Uncertainty-guided acceleration and autoregressive sampling

        Because every token has its own level, the *plan* (which level each token has at each
        step) is free. This notebook runs two families of plans on the tiny digits model of
        `quickstart.ipynb` and shows the level map over time as an animation:

        - **uncertainty-guided acceleration**: the network's uncertainty head predicts its own
          per-token error; tokens that the rest of the image has made certain take larger steps;
        - **autoregressive**: token groups go from noise to clean one after another (with an
          overlap ρ), in raster or most-certain-first order.

        It trains (or reuses) the tiny model of `quickstart.ipynb`; a CPU runtime runs it in a
        few minutes.
    '''),
    SETUP,
    IMPORT_JAX,
    SHOW,
    CONFIG_MD,
    CONFIG,
    TRAIN_MD,
    TRAIN,
    RESTORE,
    HELD_OUT,
    md('''
        ## The uncertainty head

        Besides x̂0 the network predicts the log of its own squared error per element (trained
        with a Gaussian NLL against the stop-gradient mean). Below, the left half of each digit is
        known (level 0) and the right half sits at level 0.6: the predicted error should be large
        where the true error is, and zero on the known half.
    '''),
    code('''
        import jax.numpy as jnp

        from asyncpatch_jax import diffusion, sampling

        GRID = diffusion.token_grid((1, *X_SHAPE), PATCH)[1:]
        x = pixels.to_model_range(held_out.images[:8])
        labels = jnp.asarray(held_out.labels[:8])
        half_known = sampling.masks.half(8, GRID, side="right")  # True = known: the left half
        levels = jnp.where(half_known, 0.0, 0.6)
        z = diffusion.corrupt(jnp.asarray(x), levels, jax.random.normal(jax.random.key(0), x.shape),
                              schedule, PATCH)
        pred = make_denoiser(labels, clip=False)(z, levels)
        rows = {"digit": x, "noisy input z": np.clip(np.asarray(z), -1, 1),
                "x̂0": np.clip(np.asarray(pred.x0), -1, 1),
                "true |x̂0 − x|": np.abs(np.asarray(pred.x0) - x),
                "predicted √variance": np.sqrt(np.asarray(pred.variance))}
        fig, axes = plt.subplots(len(rows), 1, figsize=(6, 1.2 * len(rows)))
        for ax, (name, images) in zip(axes, rows.items()):
          if name.startswith(("true", "predicted")):
            ax.imshow(visualize.make_grid(images, 8, border=1, fill=0)[..., 0], cmap="viridis",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
          else:
            show(images, nrow=8, ax=ax)
          ax.set_title(name, fontsize=8, loc="left")
        plt.show()
    '''),
    md('''
        ## Uncertainty-guided acceleration

        The adaptive plan (`strategy="adaptive"`, `rule="budget"`) compares a token's predicted
        error v_i with v_ref(t) = d_i / (1 + d_i·SNR(t)), the error of an element of variance d_i
        estimated from its own noisy value alone; the certainty ratio r_i = v_ref / v_i says how
        much the rest of the image has told about the token. It spends exactly M steps: with R
        steps left a token at level t moves to t·(1 − s_i/R), s_i = min(max(r_i / r̄, 1)^γ,
        max_speedup) with r̄ the typical noisy token's ratio, so tokens more certain than the
        rest run ahead and the least certain keep the uniform pace. With `x0_draw="every"` each
        step also uses the head's variance (x is integrated over N(x̂0, v) instead of plugging
        in x̂0), which is where the measured gain lies (README, "Acceleration").

        The reference d_i: `reference="first"` (the default) takes the head's own prediction at
        the first step, so r_i measures what the other noisy tokens have told; `"data"` takes
        the per-position variance of the digits (averaged over each token, floored where a
        pixel never varies), so the tokens next to a known half run ahead as well. Every plan
        costs M network evaluations; `info["nfe_per_example"]` counts the calls while each
        example still had noisy tokens.

        One batch of 16: the first 8 are generated from noise, the last 8 have their left half
        known (inpainting). M = 40 for every plan.
    '''),
    code('''
        M = 40
        pixel_variance = np.var(pixels.to_model_range(held_out.images), axis=0)
        token_variance = np.maximum(diffusion.tokens_mean(pixel_variance[None], PATCH)[0], 1e-3)
        print(f"per-token variance of the digits: mean {token_variance.mean():.2f}, "
              f"max {token_variance.max():.2f}")
        STRATEGIES = {
            "uniform": dict(strategy="uniform"),
            "budget, γ=2": dict(strategy="adaptive", rule="budget", exponent=2.0),
            "budget, γ=2, x0 draws": dict(strategy="adaptive", rule="budget", exponent=2.0,
                                          x0_draw="every"),
            "budget, γ=2, data ref.": dict(strategy="adaptive", rule="budget", exponent=2.0,
                                           reference="data", data_variance=token_variance),
        }
        batch_known = np.concatenate([x, x])
        batch_mask = np.concatenate([np.zeros_like(half_known), half_known])  # nothing / left half
        batch_labels = jnp.concatenate([labels, labels])
        runs = {}
        for name, kwargs in STRATEGIES.items():
          out, info = sampling.sample(make_denoiser(batch_labels), jax.random.key(3),
                                      (16, *X_SHAPE), schedule=schedule, num_steps=M,
                                      patch_size=PATCH, known=batch_known, known_mask=batch_mask,
                                      return_levels=True, **kwargs)
          runs[name] = {"samples": np.asarray(out), "nfe": np.asarray(info["nfe_per_example"]),
                        "levels": visualize.trim_levels(info["levels"], int(info["num_steps"]))}
        print(f"{'network evaluations':22s} {'from noise':>12s} {'left half known':>16s}")
        for name, result in runs.items():
          print(f"{name:22s} {result['nfe'][:8].mean():12.1f} {result['nfe'][8:].mean():16.1f}")
        fig, axes = plt.subplots(1, len(runs), figsize=(3.4 * len(runs), 2.1))
        for ax, (name, result) in zip(axes, runs.items()):
          show(result["samples"], nrow=8, ax=ax, title=f"{name} (row 2: inpainting)")
        plt.show()
    '''),
    md('''
        ### The level map over time

        `info["levels"]` (with `return_levels=True`) is the level map after every step,
        `[steps + 1, B, *grid]`. `visualize.save_level_map_gif` writes it as an animated GIF
        (dark = clean, bright = noise); here the budget plan with the data reference on four
        examples, two from noise (top) and two with the left half known (bottom).
    '''),
    code('''
        from IPython.display import Image, display

        gif = WORKDIR / "levels_budget.gif"
        budget_levels = runs["budget, γ=2, data ref."]["levels"]
        visualize.save_level_map_gif(budget_levels[:, [0, 1, 8, 9]], gif, duration_ms=120,
                                     scale=12)
        display(Image(data=gif.read_bytes(), format="gif"))
    '''),
    md('''
        ## Autoregressive sampling

        Token groups (here 2×2 tokens: 16 groups) follow the staircase
        t_k(m) = clip(1 − (m − o_π(k))/S, 0, 1) with offsets o_j = ⌊j·S·(1 − ρ)⌋: `S` steps per
        group, overlap ρ (0: one group after another; > 0: a pyramid), order π raster,
        centre-out spiral, or most-certain-first (the next group is the one with the lowest
        predicted error at that step). The same network, no retraining.
    '''),
    code('''
        AR = {
            "raster, ρ=0, S=3": dict(order="raster", overlap=0.0, steps_per_group=3),
            "raster, ρ=½, S=6": dict(order="raster", overlap=0.5, steps_per_group=6),
            "most certain first, ρ=½, S=6": dict(order="certainty", overlap=0.5,
                                                 steps_per_group=6),
        }
        ar_runs = {}
        for name, kwargs in AR.items():
          out, info = sampling.sample(make_denoiser(labels), jax.random.key(5), (8, *X_SHAPE),
                                      schedule=schedule, strategy="autoregressive",
                                      group_shape=2, patch_size=PATCH, return_levels=True,
                                      **kwargs)
          ar_runs[name] = {"samples": np.asarray(out), "nfe": int(info["nfe"]),
                           "levels": visualize.trim_levels(info["levels"], int(info["num_steps"]))}
        fig, axes = plt.subplots(1, len(AR) + 2, figsize=(3.1 * (len(AR) + 2), 2))
        for ax, (name, result) in zip(axes, ar_runs.items()):
          show(result["samples"], nrow=4, ax=ax, title=f"{name}: {result['nfe']} NFE")
        for ax, (groups, steps, rho) in zip(axes[len(AR):], ((16, 3, 0.0), (16, 6, 0.5))):
          ax.imshow(sampling.autoregressive_levels(groups, steps, rho).T, cmap="magma",
                    vmin=0, vmax=1, aspect="auto", interpolation="nearest")
          ax.set(xlabel="step", title=f"level of each group slot: S={steps}, ρ={rho}")
          ax.title.set_fontsize(8)
        fig.tight_layout()
        plt.show()
    '''),
    md('''
        ### All plans side by side, as an animation

        The same level maps through matplotlib's animation (`to_jshtml` gives a player with
        controls): the first example of each plan, step by step.
    '''),
    code('''
        from IPython.display import HTML
        from matplotlib import animation

        movies = {"uniform": runs["uniform"]["levels"][:, 0],
                  "budget, data ref.": runs["budget, γ=2, data ref."]["levels"][:, 0],
                  "budget, left half known": runs["budget, γ=2, data ref."]["levels"][:, 8]}
        movies.update({name.split(",")[0] + f" ({name.split(', ')[1]})": result["levels"][:, 0]
                       for name, result in ar_runs.items()})
        length = max(len(m) for m in movies.values())
        fig, axes = plt.subplots(1, len(movies), figsize=(2.2 * len(movies), 2.6))
        artists = []
        for ax, (name, levels) in zip(axes, movies.items()):
          artists.append(ax.imshow(levels[0], cmap="magma", vmin=0, vmax=1))
          ax.set_title(name, fontsize=8)
          ax.set_axis_off()
        label = fig.suptitle("")


        def draw(frame):
          for artist, levels in zip(artists, movies.values()):
            artist.set_data(levels[min(frame, len(levels) - 1)])
          label.set_text(f"step {frame}")
          return artists


        movie = animation.FuncAnimation(fig, draw, frames=range(0, length, 2), interval=150)
        html = movie.to_jshtml()
        plt.close(fig)
        HTML(html)
    '''),
    md('''
        A 400-step model's uncertainty is crude, and its samples show it; the savings above are
        what this model gives, not the paper's. The plans are tested against the exact Gaussian
        denoiser (`sampling.analytic.GaussianDenoiser`, a perfect uncertainty head) in
        `tests/test_sampling.py`. Try `max_speedup`, other orders and overlaps, or
        `sampling.outpaint` for canvases larger than the training size.
    '''),
]


# ----------------------------------------------------------------------------------------------
# elbo_paths.ipynb

ELBO = [
    md('''
        # The ELBO along different paths

        Take a monotone path τ: [0, 1] → [0, 1]^N of level maps (every token's level
        non-decreasing, all 0 at s = 0, all 1 at s = 1). Each token is then a time-changed 1-D
        diffusion, so

        −ELBO_τ = E[−log p(x | z(0))] + KL(q(z(1) | x) ‖ N(0, I))
                  + ½ ∫₀¹ Σ_i (−d/ds SNR(τ_i(s))) E‖x_i − x̂_i(z(s), τ(s))‖² ds

        is a valid bound for **every** path: the homogeneous path τ_i(s) = s is VDM's
        continuous-time ELBO, a raster path is the autoregressive factorisation, and tokens
        frozen at a level contribute nothing. For the *exact* denoiser the integral is the same
        on every path; for a trained network each path gives its own bound.

        This notebook checks the first statement with the exact Gaussian denoiser against the
        closed form, then evaluates the bound of the tiny digits model of `quickstart.ipynb`
        along several paths. Library: `diffusion.nelbo`, `diffusion.paths`.
    '''),
    SETUP,
    IMPORT_JAX,
    md('''
        ## Exact denoiser, closed form

        Data: a Gaussian N(μ, Σ) fitted to 4×4 thumbnails of the digits (16 dimensions, one token
        per pixel), plus a small nugget on the diagonal. For x ~ N(μ, Σ) the posterior mean and
        variance given any level map are exact (`sampling.analytic.GaussianDenoiser`), and the
        expected terms of the bound are closed-form:

        - diffusion: ½ [log det(I + SNR_max Σ) − log det(I + SNR_min Σ)], the same for every path;
        - prior: ½ Σ_i [α₁² (μ_i² + Σ_ii) + σ₁² − 1 − log σ₁²];
        - reconstruction (Gaussian decoder): D [½ (1 + log 2π) − ½ λ_max].
    '''),
    code('''
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np

        from asyncpatch_jax import data as data_lib
        from asyncpatch_jax import diffusion, pixels, sampling
        from asyncpatch_jax.diffusion import paths
        from configs import digits

        images = np.asarray(pixels.to_model_range(
            data_lib.get_source(digits.get_config().data, "all").images), np.float64)
        thumbs = images.reshape(-1, 4, 2, 4, 2, 1).mean(axis=(2, 4))  # [N, 4, 4, 1]
        D, GRID = 16, (4, 4)
        mu = thumbs.reshape(len(thumbs), D).mean(axis=0)
        cov = np.cov(thumbs.reshape(len(thumbs), D), rowvar=False) + 0.02 * np.eye(D)
        gauss_schedule = diffusion.get_schedule("cosine", log_snr_min=-10.0, log_snr_max=10.0)
        exact = sampling.analytic.GaussianDenoiser(mu, cov, gauss_schedule, patch_size=1)

        lam_min, lam_max = gauss_schedule.log_snr_min, gauss_schedule.log_snr_max
        logdet = lambda snr: np.linalg.slogdet(np.eye(D) + snr * cov)[1]
        alpha1_sq, sigma1_sq = 1 / (1 + np.exp(-lam_min)), 1 / (1 + np.exp(lam_min))
        CLOSED = {
            "diffusion": 0.5 * (logdet(np.exp(lam_max)) - logdet(np.exp(lam_min))),
            "prior": 0.5 * np.sum(alpha1_sq * (mu**2 + np.diag(cov)) + sigma1_sq - 1
                                  - np.log(sigma1_sq)),
            "recon": D * (0.5 * (1 + np.log(2 * np.pi)) - 0.5 * lam_max),
        }
        CLOSED["total"] = sum(CLOSED.values())
        entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1]
        print({k: round(float(v), 4) for k, v in CLOSED.items()},
              f"(the entropy of N(μ, Σ) is {entropy:.4f} nats: the bound is tight)")
    '''),
    md('''
        ### The paths

        `paths.homogeneous()`, `paths.raster(grid, overlap)` (the last token in raster order is
        noised first, so generation runs in raster order) and `paths.random_order(grid, key)`
        are callables `s -> level map`. Below, the level of every token along s.
    '''),
    code('''
        PATHS = {
            "homogeneous": paths.homogeneous(),
            "raster": paths.raster(GRID),
            "raster, overlap ½": paths.raster(GRID, overlap=0.5),
            "random order": paths.random_order(GRID, jax.random.key(0)),
        }
        s_plot = jnp.linspace(0, 1, 401)
        fig, axes = plt.subplots(1, len(PATHS), figsize=(3.3 * len(PATHS), 2.4), sharey=True)
        for ax, (name, path) in zip(axes, PATHS.items()):
          levels = np.asarray(jax.vmap(lambda s, p=path: jnp.broadcast_to(p(s), GRID))(s_plot))
          ax.set_prop_cycle(color=plt.cm.viridis(np.linspace(0, 1, D)))  # by raster index
          ax.plot(s_plot, levels.reshape(len(s_plot), -1), lw=0.8)
          ax.set(title=name, xlabel="s")
        axes[0].set_ylabel("level τ_i(s), colour: raster index i")
        plt.show()
    '''),
    md('''
        ### Path independence, by quadrature

        For the Gaussian the expectation inside the integral is exact: E‖x_i − x̂_i‖² is the
        posterior variance, which the exact denoiser returns and which does not depend on z. So
        the diffusion term is a plain 1-D integral over s, computed here with the midpoint rule
        (the derivative of the path comes from `jax.jvp`, as inside `nelbo`). Every path
        converges to the closed form; paths that move one token at a time need a finer grid.
    '''),
    code('''
        def expected_integrand(path, s):
          """½ Σ_i (−d/ds SNR(τ_i(s))) E‖x_i − x̂_i‖² at each s `[S]`, exactly."""
          s = s.reshape(-1, 1, 1)
          tau, dtau = jax.jvp(lambda u: jnp.broadcast_to(path(u), (s.shape[0], *GRID)), (s,),
                              (jnp.ones_like(s),))
          variance = exact(jnp.zeros((s.shape[0], *GRID, 1)), tau).variance[..., 0]
          neg_dsnr = (-jnp.exp(gauss_schedule.log_snr(tau)) * gauss_schedule.dlog_snr_dt(tau)
                      * dtau)
          return 0.5 * jnp.where(dtau > 0, neg_dsnr * variance, 0.0).sum(axis=(1, 2))


        GRIDS = (256, 1024, 4096, 16384)
        s_all = jnp.concatenate([(jnp.arange(n) + 0.5) / n for n in GRIDS])  # every grid at once
        splits = np.cumsum(GRIDS)[:-1]
        quadrature = {}
        for name, path in PATHS.items():
          values = np.split(np.asarray(jax.jit(expected_integrand, static_argnums=0)(path, s_all)),
                            splits)
          quadrature[name] = [v.mean() for v in values]  # the midpoint rule on each grid
        print(f"{'points':>7s}" + "".join(f"{name:>19s}" for name in PATHS))
        for i, points in enumerate(GRIDS):
          print(f"{points:7d}" + "".join(f"{q[i]:19.4f}" for q in quadrature.values()))
        print(f"{'closed':>7s}" + f"{CLOSED['diffusion']:19.4f}" * len(PATHS))
    '''),
    code('''
        s = (jnp.arange(4096) + 0.5) / 4096
        fig, ax = plt.subplots(figsize=(7, 2.8))
        for name, path in PATHS.items():
          ax.plot(s, jax.jit(expected_integrand, static_argnums=0)(path, s), lw=0.8, label=name)
        ax.set(xlabel="s", ylabel="integrand (nats per unit s)", yscale="log", ylim=(1e-2, None),
               title="different integrands, the same area")
        ax.legend(fontsize=8)
        plt.show()
    '''),
    md('''
        ### The library's Monte-Carlo estimator

        `diffusion.nelbo(denoiser, x0, rng, schedule=..., path=..., num_steps=...)` estimates
        the bound per example, unbiased on any monotone path, with one network evaluation per
        stratum. It samples s by importance: each token's integrand, written in its own log-SNR
        λ, has nearly the same shape, e^λ E‖x_i − x̂_i‖² ≈ n_i sigmoid(λ + log d) for data
        variance d (`data_variance`), so the proposal is that shape pushed through every token's
        path, p(s) ∝ Σ_i |dλ_i/ds| q(λ_i(s)). Its CDF is closed-form for any path; s is
        stratified in it with an independent offset per stratum and example, and each draw is
        weighted by F(s) / p(s), in which the path's speed cancels (the docstring of
        `diffusion.elbo` derives it). Averaged over 1,024 draws x ~ N(μ, Σ) it matches the closed
        form within its standard error on every path, raster paths included.
    '''),
    code('''
        from asyncpatch_jax.diffusion import elbo

        B = 1024
        x_gauss = jnp.asarray(np.random.default_rng(0).multivariate_normal(mu, cov, size=B)
                              .reshape(B, *GRID, 1), jnp.float32)
        mc_paths = {
            "homogeneous": PATHS["homogeneous"],
            "raster": PATHS["raster"],
            "raster, overlap ½": PATHS["raster, overlap ½"],
            "random order per example": paths.random_order(GRID, jax.random.key(1), batch=B),
        }
        data_variance = float(np.diag(cov).mean())
        print(f"{'path':26s} {'diffusion (nats)':>18s} {'rel. SE':>8s} {'total':>9s}   closed "
              f"form: {CLOSED['diffusion']:.3f}, {CLOSED['total']:.3f}")
        for name, path in mc_paths.items():
          bound = jax.jit(lambda x, key, p=path: diffusion.nelbo(
              exact, x, key, schedule=gauss_schedule, path=p, num_steps=64,
              data_variance=data_variance))(x_gauss, jax.random.key(2))
          mean, stderr = elbo.mean_and_stderr(bound["diffusion"])
          print(f"{name:26s} {mean:9.3f} ± {stderr:6.3f} {stderr / mean:8.2%} "
                f"{float(bound['total'].mean()):9.3f}")
    '''),
    md('''
        ## A trained network

        For a trained network the error in the integrand is the network's own, not the posterior
        variance, and the bound depends on the path. Below: bits per dimension of the tiny digits
        model on the 180 held-out digits (given their class), with the discretised 8-bit
        decoder, along the homogeneous path (VDM's bound; `--mode=eval` reports it with
        `--config.eval.elbo_steps=N`), raster paths with overlap ρ and a random order per
        example with overlap 0.9. Each is a valid upper bound on −log₂ p(x | class) per pixel;
        the smallest is the best. Every number comes with its standard error over the digits.
    '''),
    SHOW,
    CONFIG_MD,
    CONFIG,
    TRAIN_MD,
    TRAIN,
    RESTORE,
    HELD_OUT,
    code('''
        x_digits = jnp.asarray(pixels.to_model_range(held_out.images))  # the 8-bit grid 2k/255 − 1
        denoiser = make_denoiser(jnp.asarray(held_out.labels), clip=False)
        grid = diffusion.token_grid(x_digits.shape, PATCH)[1:]
        TRAINED_PATHS = {
            "homogeneous": paths.homogeneous(),
            "raster": paths.raster(grid),
            "raster, overlap ½": paths.raster(grid, overlap=0.5),
            "random order, overlap 0.9": paths.random_order(grid, jax.random.key(3), overlap=0.9,
                                                            batch=len(held_out)),
        }
        STRATA = 64
        DIGIT_VARIANCE = float(np.var(np.asarray(x_digits)))  # d of the proposal


        def bits_per_dim(denoiser, path, key):
          """Per-digit bits/dim; the same `key` gives the same s and noise to any denoiser."""
          return np.asarray(jax.jit(lambda x, k: diffusion.nelbo(
              denoiser, x, k, schedule=schedule, path=path, num_steps=STRATA, patch_size=PATCH,
              data="discrete8bit", data_variance=DIGIT_VARIANCE)["bpd"])(x_digits, key))


        print(f"{'path':26s} {'bits/dim':>15s}   ({len(held_out)} digits, {STRATA} strata)")
        for name, path in TRAINED_PATHS.items():
          mean, stderr = elbo.mean_and_stderr(bits_per_dim(denoiser, path, jax.random.key(4)))
          print(f"{name:26s} {mean:7.3f} ± {stderr:5.3f}")
    '''),
    md('''
        ### Paired comparisons

        Does the class label help? The same network gives a bound with the class and one with
        the null class (`labels=None`). Most of the spread of per-digit bits/dim comes from the
        digits themselves, not from the estimator, so two bounds each ± their standard error
        rarely separate. Evaluated with the same key, both denoisers see the same digits, s and
        noise (common random numbers), and the per-digit difference has a far smaller spread:
        `elbo.paired_difference` gives its mean and standard error next to the unpaired one.
        A bound is ≥ −log₂ p(x), and knowing the class can lower the exact −log₂ p(x) by at most
        log₂ 10 bits per digit, 0.05 bits/dim here; the bounds may differ by more.
    '''),
    code('''
        unconditional = make_denoiser(None, clip=False)
        for name in ("homogeneous", "raster"):
          key = jax.random.key(5)
          pair = elbo.paired_difference(bits_per_dim(denoiser, TRAINED_PATHS[name], key),
                                        bits_per_dim(unconditional, TRAINED_PATHS[name], key))
          print(f"{name:12s} with class {pair['a']:.3f} ± {pair['a_se']:.3f}, null class "
                f"{pair['b']:.3f} ± {pair['b_se']:.3f}; difference {pair['diff']:+.4f} ± "
                f"{pair['diff_se']:.4f} paired (± {pair['diff_se_unpaired']:.4f} unpaired)")
    '''),
    md('''
        The absolute numbers are poor, near the 8 bits/dim of a uniform code. Where does the
        homogeneous bound come from? `diffusion.elbo.diffusion_integrand` evaluates the integrand
        at one s; on a grid uniform in log-SNR λ (ds = dλ / |λ'(s)|) it shows the bound per unit
        of λ:
    '''),
    code('''
        integrand = jax.jit(lambda s, key: elbo.diffusion_integrand(
            denoiser, x_digits, s, jax.random.normal(key, x_digits.shape), schedule=schedule,
            path=paths.homogeneous(), patch_size=PATCH).mean())
        edges = np.linspace(schedule.log_snr_min, schedule.log_snr_max, 61)
        lam = (edges[1:] + edges[:-1]) / 2
        s_of_lam = schedule.t_from_log_snr(jnp.asarray(lam, jnp.float32))
        per_lam = np.array([float(integrand(s, jax.random.key(i)) / abs(schedule.dlog_snr_dt(s)))
                            for i, s in enumerate(s_of_lam)])  # nats per unit of λ
        total = per_lam.sum() * (edges[1] - edges[0])
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.bar(lam, per_lam, width=edges[1] - edges[0])
        ax.set(xlabel="log-SNR λ (clean data on the right)", ylabel="nats per unit λ",
               title=f"homogeneous path: {total / (np.prod(X_SHAPE) * np.log(2)):.2f} bits/dim "
                     "from the diffusion term")
        ax.title.set_fontsize(9)
        plt.show()
        for threshold in (10, 5, 0):
          share = per_lam[lam > threshold].sum() / per_lam.sum()
          print(f"share of the diffusion term from λ > {threshold:2d}: {share:.0%}")
    '''),
    md('''
        Most of the bound comes from high signal-to-noise ratios, where the network must predict
        the last few bits of every pixel; a network trained for 400 steps with the v-prediction
        loss is far from exact there (VDM trains with the bound's own weighting for this reason:
        `config.diffusion.weighting = "elbo"` here). Compare the paths with each other:
        training saw mostly near-homogeneous maps and only 10% raster staircases
        (`config.diffusion.level_sampler`), and the homogeneous bound comes out the tightest.
    '''),
]


NOTEBOOKS = {
    "quickstart": QUICKSTART,
    "inpainting": INPAINTING,
    "adaptive_autoregressive": ADAPTIVE,
    "elbo_paths": ELBO,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  """The notebook, without outputs, with stable cell ids (so rebuilding changes nothing)."""
  nb = nbformat.v4.new_notebook()
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": [], "toc_visible": True},
  }
  for index, (kind, source) in enumerate(cells):
    make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
    cell = make(source)
    cell.id = f"{name}-{index:02d}"
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


def render(nb: nbformat.NotebookNode) -> str:
  return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="compare the notebooks on disk with this script instead of writing")
  args = parser.parse_args(argv)
  stale = []
  for name, cells in NOTEBOOKS.items():
    path = HERE / f"{name}.ipynb"
    text = render(build(name, cells))
    if args.check:
      if not path.exists() or path.read_text() != text:
        stale.append(path.name)
    else:
      path.write_text(text)
      print(f"wrote {path}")
  if stale:
    print(f"out of date with build_notebooks.py: {', '.join(stale)}; run "
          f"python colabs/build_notebooks.py", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
