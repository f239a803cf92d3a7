"""The model config and the config-selected registry (`config.model.name`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections
from flax import nnx

from asyncpatch_jax.diffusion.parametrization import PARAMETRIZATIONS
from asyncpatch_jax.diffusion.schedules import Schedule
from asyncpatch_jax.models import precision
from asyncpatch_jax.models.dit import DIT_SIZES, DiT
from asyncpatch_jax.models.embeddings import LEVEL_EMBEDDINGS
from asyncpatch_jax.models.unet import UNet


def default_config() -> ml_collections.ConfigDict:
  """Every model field with its default; training configs override what they need. The fields
  at the top are read by both networks; `unet` and `dit` hold what only that network reads."""
  config = ml_collections.ConfigDict()
  config.name = "unet"  # 'unet' (the paper's) or 'dit'
  config.parametrization = "eps"  # what the network outputs: 'eps', 'x0' or 'v'
  config.uncertainty = False  # add the per-element log-variance head
  config.num_classes = 0  # 0: unconditional; else labels in [0, num_classes), null = num_classes
  config.label_dropout = 0.1  # p of the null label in training (used by the train step)
  # The sinusoid's input: 't', 'log_snr' (schedule-independent) or 'dit' (the official DiT's
  # timestep of equal log-SNR: what pretrained DiT weights read; models/embeddings.py).
  config.level_embedding = "t"
  config.level_slots = 8  # K distinct levels per example on the fast path at inference; 0: off
  # 'bfloat16': bf16 matmuls with float32 accumulation (models/precision.py), on accelerators
  # and on CPUs with AMX / AVX512-BF16 alike; parameters and optimizer stay float32.
  config.dtype = "float32"
  # Attention: None picks (bf16 'cpu' kernels: models/precision.py's mixed_attention; 'standard':
  # cuDNN's on GPUs where it applies, else XLA's); 'xla'; 'cudnn' (cuDNN flash attention: GPUs,
  # bf16).
  config.attention_impl = ml_collections.config_dict.placeholder(str)
  # 'cpu': models/precision.py's custom-VJP bf16 forms, written for XLA:CPU; 'standard': flax
  # modules with bf16 dtype, jax.nn.dot_product_attention (cuDNN on GPUs) and plain autodiff,
  # for GPUs and TPUs; 'auto' picks by jax.default_backend(). The same function; logged.
  config.kernels = "auto"
  # Recompute each block in the backward pass: '' (off), 'full', 'dots_saveable' or
  # 'dots_with_no_batch_dims_saveable' (what is kept; see models/common.py). Saves memory.
  config.remat = ""

  # U-Net (ADM-style): UNet's constructor keywords.
  config.unet = ml_collections.ConfigDict({
      "channels": 128,
      "channel_mult": (1, 2, 2, 2),
      "num_res_blocks": 2,
      "attention_resolutions": (16,),  # spatial sizes (first spatial axis) with attention
      "dropout": 0.1,
      "num_heads": 4,
      "norm_groups": 32,
  })

  # DiT: size and patch name the published model (e.g. 'XL' and 2 for DiT-XL/2).
  config.dit = ml_collections.ConfigDict({
      "size": "B",  # 'S', 'B', 'L' or 'XL'
      "patch": 2,
      "hidden_size": ml_collections.config_dict.placeholder(int),  # None: the size's
      "depth": ml_collections.config_dict.placeholder(int),
      "num_heads": ml_collections.config_dict.placeholder(int),
      "mlp_ratio": 4.0,
      # 'block': DiT's adaLN-Zero, every block projects the (per-token) conditioning; 'single':
      # PixArt-α's adaLN-single, one projection shared by all blocks plus per-block tables:
      # per-token levels then cost ≈ +5% FLOPs instead of ≈ +47% (models/dit.py). Changes the
      # parameters.
      "adaln": "block",
      "scan_layers": False,  # one nnx.scan over stacked blocks (fast compile when deep)
  })
  return config


def _check_common(config: ml_collections.ConfigDict) -> None:
  if config.parametrization not in PARAMETRIZATIONS:
    raise ValueError(f"unknown model.parametrization {config.parametrization!r}; choose one of "
                     f"{PARAMETRIZATIONS}")
  if config.level_embedding not in LEVEL_EMBEDDINGS:
    raise ValueError(f"unknown model.level_embedding {config.level_embedding!r}; choose one of "
                     f"{LEVEL_EMBEDDINGS}")
  if int(config.num_classes) < 0:
    raise ValueError(f"model.num_classes must be >= 0, got {config.num_classes}")


def _common_kwargs(config: ml_collections.ConfigDict, data_shape, level_patch_size, schedule,
                   rngs) -> dict:
  return dict(data_shape=tuple(data_shape), level_patch_size=int(level_patch_size),
              num_classes=int(config.num_classes), uncertainty=bool(config.uncertainty),
              parametrization=config.parametrization, level_embedding=config.level_embedding,
              schedule=schedule, level_slots=int(config.level_slots), dtype=config.dtype,
              attention_impl=config.attention_impl, remat=str(config.remat), rngs=rngs)


def build_unet(config, *, data_shape, level_patch_size, schedule, rngs) -> UNet:
  """The U-Net of `config.unet` (its fields are UNet's keywords)."""
  unet = config.unet
  return UNet(channels=int(unet.channels), channel_mult=tuple(unet.channel_mult),
              num_res_blocks=int(unet.num_res_blocks),
              attention_resolutions=tuple(unet.attention_resolutions),
              dropout=float(unet.dropout), num_heads=int(unet.num_heads),
              norm_groups=int(unet.norm_groups),
              **_common_kwargs(config, data_shape, level_patch_size, schedule, rngs))


def dit_dimensions(dit: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(hidden size, depth, heads) of `model.dit.size`, with any of `model.dit.hidden_size`,
  `depth`, `num_heads` that is set overriding the size's."""
  if dit.size not in DIT_SIZES:
    raise ValueError(f"unknown model.dit.size {dit.size!r}; choose one of {list(DIT_SIZES)}")
  hidden, depth, heads = DIT_SIZES[dit.size]
  return dit.hidden_size or hidden, dit.depth or depth, dit.num_heads or heads


def build_dit(config, *, data_shape, level_patch_size, schedule, rngs) -> DiT:
  """The DiT of `config.dit`."""
  dit = config.dit
  hidden, depth, heads = dit_dimensions(dit)
  return DiT(patch_size=int(dit.patch), hidden_size=hidden, depth=depth, num_heads=heads,
             mlp_ratio=float(dit.mlp_ratio), scan_layers=bool(dit.scan_layers),
             adaln=str(dit.adaln),
             **_common_kwargs(config, data_shape, level_patch_size, schedule, rngs))


MODELS: dict[str, Callable[..., nnx.Module]] = {"unet": build_unet, "dit": build_dit}


def get_model(model_config: ml_collections.ConfigDict, *, data_shape: Sequence[int],
              level_patch_size: int, schedule: Schedule | None, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `MODELS[model_config.name]` for inputs `[B, *data_shape]` and level maps of patch
  `level_patch_size`, and selects the process's precision kernels (`model.kernels`, logged).
  Wrap in `nnx.eval_shape(lambda: get_model(...))` for an abstract model."""
  if model_config.name not in MODELS:
    raise ValueError(f"unknown model.name {model_config.name!r}; choose one of {sorted(MODELS)}")
  _check_common(model_config)
  precision.select_kernels(str(model_config.get("kernels", "auto")))
  return MODELS[model_config.name](model_config, data_shape=tuple(data_shape),
                                   level_patch_size=level_patch_size, schedule=schedule,
                                   rngs=rngs)
