"""What a latent-diffusion run (`config.data.source = 'latents'`) needs, and how to prepare it.

A run reads one latent cache per split, `<data.latent_dir>/<split>` (`cache_dir`), written by
`python -m asyncpatch_jax.latents.build` with the VAE that `config.vae` names
(`autoencoder.named`), and decodes its samples with that VAE. `missing_preparation(config)`
lists what is not there yet together with the exact commands that prepare it, so a run fails at
once (before any compilation) with a recipe instead of a traceback. Every path may be a bucket
URL: existence is checked through `etils.epath`.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from etils import epath

from asyncpatch_jax.autoencoder.named import RANDOM_WEIGHTS
from asyncpatch_jax.autoencoder.weights import HF_FILENAME, HF_REPOS
from asyncpatch_jax.data.latent_cache import METADATA, read_metadata


def cache_dir(data_config: Any, split: str) -> str:
  """Where the latent cache of `split` lives: `<data.latent_dir>/<split>`."""
  return os.fspath(epath.Path(data_config.latent_dir) / split)


def lsun_lmdb(data_config: Any, split: str) -> str:
  """The LSUN export of a split: `<data.lsun_dir>/<category>_{train,val}_lmdb`."""
  part = "train" if split == "train" else "val"
  return os.fspath(epath.Path(data_config.lsun_dir or "LSUN_DIR")
                   / f"{data_config.lsun_category}_{part}_lmdb")


def build_command(config: Any, split: str, tfds_data_dir: str = "") -> str:
  """The exact `latents.build` command that writes this run's cache of `split`
  (`tfds_data_dir`: where the TFDS images are, if not `data.tfds_data_dir`)."""
  data, vae = config.data, config.vae
  args = ["python", "-m", "asyncpatch_jax.latents.build"]
  if data.lsun_category:
    args += ["--source=lsun", f"--lsun_lmdb={lsun_lmdb(data, split)}"]
  else:
    args += ["--source=tfds", f"--tfds_name={data.tfds_name}", f"--split={split}",
             f"--label_key={data.label_key}"]
    if data.tfds_data_dir or tfds_data_dir:
      args.append(f"--tfds_data_dir={data.tfds_data_dir or tfds_data_dir}")
  weights = vae.weights or f"VAE_DIR/{HF_FILENAME}"
  args += [f"--image_size={int(data.image_size)}", f"--vae_config={vae.name}",
           f"--vae_weights={weights}",
           f"--out={cache_dir(data, split) if data.latent_dir else 'LATENT_DIR/' + split}"]
  return shlex.join(args)


def needed_splits(config: Any) -> tuple[str, ...]:
  """The training split, and the eval split when evaluation or inpainting grids read it."""
  splits = [config.data.train_split]
  if (int(config.eval.every_steps) > 0 or int(config.sampling.num_inpaint) > 0) and (
      config.data.eval_split not in splits):
    splits.append(config.data.eval_split)
  return tuple(splits)


def _cache_problem(path: str) -> str | None:
  if not (epath.Path(path) / METADATA).exists():
    return f"no latent cache in {path!r} (no {METADATA})"
  metadata = read_metadata(path)
  if not metadata.get("complete"):
    return f"the latent cache in {path!r} is incomplete (an interrupted build)"
  return None


def _tfds_prepared(data: Any) -> bool:
  try:
    import tensorflow_datasets as tfds  # heavy and optional: only when a cache is missing
    return bool(tfds.builder(data.tfds_name, data_dir=data.tfds_data_dir or None).is_prepared())
  except Exception:  # any failure to find the prepared files means "not there"
    return False


def missing_preparation(config: Any) -> str | None:
  """None when the VAE weights and every needed latent cache exist; else what is missing and
  the numbered steps that prepare it (the same commands for every missing piece)."""
  data, vae = config.data, config.vae
  missing, steps = [], []
  weights_missing = not vae.weights or (vae.weights != RANDOM_WEIGHTS
                                        and not epath.Path(vae.weights).exists())
  if weights_missing:
    missing.append("the VAE weights (config.vae.weights is not set)" if not vae.weights else
                   f"the VAE weights file {vae.weights!r}")
    urls = " or ".join(f"https://huggingface.co/{r}/resolve/main/{HF_FILENAME}"
                       for r in HF_REPOS)
    steps.append(f"Download Stable Diffusion's VAE ({HF_REPOS[0]}, DiT's choice; ft-mse also "
                 f"works): {urls} (`huggingface-cli download {HF_REPOS[0]} {HF_FILENAME} "
                 f"--local-dir VAE_DIR`) and pass --config.vae.weights=VAE_DIR/{HF_FILENAME}")
  splits = needed_splits(config)
  problems = {s: ("config.data.latent_dir is not set" if not data.latent_dir
                  else _cache_problem(cache_dir(data, s))) for s in splits}
  todo = [s for s in splits if problems[s]]
  missing += [f"the latent cache of split {s!r} ({problems[s]})" for s in todo]
  if todo:
    data_dir = ""  # the TFDS directory to name in the commands when it is to be prepared
    if data.lsun_category:
      lmdbs = [lsun_lmdb(data, s) for s in todo]
      absent = [p for p in lmdbs if not epath.Path(p).is_dir()]
      if absent:
        steps.append(f"Download the LSUN {data.lsun_category} LMDB exports (git clone "
                     f"https://github.com/fyu/lsun; python download.py -c {data.lsun_category}; "
                     f"unzip) so that {', '.join(absent)} exist (set --config.data.lsun_dir)")
    elif not _tfds_prepared(data):
      where = data.tfds_data_dir or "DATA_DIR"
      manual = (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) into "
                f"{where}/downloads/manual, then " if data.tfds_name == "imagenet2012" else "")
      data_dir = where
      steps.append(f"Prepare the images as TFDS ArrayRecord: {manual}`tfds build "
                   f"{data.tfds_name} --data_dir={data_dir} --file_format=array_record`")
    commands = "\n       ".join(build_command(config, s, data_dir) for s in todo)
    steps.append(f"Encode the latent caches once (resumable; rerun after an interruption):\n"
                 f"       {commands}")
    if not data.latent_dir:
      steps.append("Pass --config.data.latent_dir=LATENT_DIR to the run")
  if not missing:
    return None
  lines = [f"This latent-diffusion run ({data.image_size}px images as {vae.name!r} VAE latents) "
           f"is not prepared. Missing: " + "; ".join(missing) + ". To prepare it:"]
  lines += [f"  {i}. {step}" for i, step in enumerate(steps, 1)]
  return "\n".join(lines)
