"""ImageNet, class-conditional: 256×256 as SD-VAE latents (the paper's headline setting), or in
pixel space at 64 and 128.

Arguments (`--config=configs/imagenet.py:ARG[,debug]`):
  dit       (default) DiT-XL/2 on 32×32×4 latents of 256×256 images, as DiT trains it but with
            adaLN-single (`model.dit.adaln='single'`; 'block' is DiT's own, which init_from needs).
  unet      the paper's U-Net (level map through spatial FiLM) on the same latents.
  pixel64   ADM's 64×64 U-Net on TFDS `imagenet_resized/64x64` (labelled, box-downsampled).
  pixel128  ADM's 128×128 U-Net on TFDS `imagenet2012` (ADM centre crop).
  debug     shrinks any of them to run on a CPU (latent variants: a 'tiny' random VAE, 32² images).

All: global batch 256, AdamW at 1e-4, EMA 0.9999, 400K steps, label dropout 0.1 for
classifier-free guidance (`sampling.cfg_scale`, 1.5 as in DiT's FID runs), and the uncertainty
(variance) head, so the same model also samples with the adaptive strategies.

Latent variants need, once (a run without them stops at once and prints these commands):
  1. the ILSVRC2012 tars in DATA_DIR/downloads/manual, then
     `tfds build imagenet2012 --data_dir=DATA_DIR --file_format=array_record`;
  2. stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors (huggingface.co);
  3. the latent caches of both splits:
     `python -m asyncpatch_jax.latents.build --source=tfds --tfds_name=imagenet2012
      --tfds_data_dir=DATA_DIR --split=train --image_size=256 --vae_config=sd
      --vae_weights=VAE_FILE --out=LATENT_DIR/train` (and `--split=validation
      --out=LATENT_DIR/validation`);
then train with `--config.data.latent_dir=LATENT_DIR --config.vae.weights=VAE_FILE`.
"""

from configs import base

VARIANTS = ("dit", "unet", "pixel64", "pixel128")
CHOICES = (*VARIANTS, "debug")


def _latents(config) -> None:
  config.data.source = "latents"
  config.data.image_size = 256                # the pixel resolution encoded: 32×32×4 latents
  config.vae.name = "sd"
  config.sampling.clip_x0 = False             # latents are not bounded to [-1, 1]
  config.diffusion.patch_size = 2             # a 16×16 level map (one level per DiT-XL/2 token)


def get_config(arg=None):
  words = base.parse_arg(arg, CHOICES)
  variant = base.pick_variant(words, VARIANTS)
  config = base.get_config()
  config.num_steps = 400_000

  config.data.tfds_name = "imagenet2012"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.num_classes = 1000
  config.data.channels = 3
  config.data.crop = "center"
  config.data.random_flip = True
  config.data.batch_size = 256
  config.data.worker_count = 8
  config.data.read_threads = 8

  model = config.model
  model.parametrization = "eps"
  model.uncertainty = True  # the variance head: adaptive sampling (and DiT's learned sigma)
  model.num_classes = 1000
  model.label_dropout = 0.1
  model.unet.dropout = 0.0
  model.dtype = "bfloat16"
  if variant == "dit":
    _latents(config)
    model.name = "dit"
    model.dit.size = "XL"
    model.dit.patch = 2
    # adaLN-single: per-token levels at +5% FLOPs instead of DiT's +47%, trained no worse here
    # (README, "Performance"); starting from DiT's weights (init_from) needs 'block'.
    model.dit.adaln = "single"
  elif variant == "unet":
    _latents(config)
    model.name = "unet"
    model.unet.channels = 256
    model.unet.channel_mult = (1, 2, 2)
    model.unet.num_res_blocks = 2
    model.unet.attention_resolutions = (16, 8)
    model.unet.num_heads = 8
  else:
    config.data.source = "tfds"
    model.name = "unet"
    model.unet.num_heads = 4
    if variant == "pixel64":
      config.data.tfds_name = "imagenet_resized/64x64"
      config.data.image_size = 64
      model.unet.channels = 192
      model.unet.channel_mult = (1, 2, 3, 4)
      model.unet.num_res_blocks = 3
      model.unet.attention_resolutions = (32, 16, 8)
      model.unet.dropout = 0.1
      config.diffusion.patch_size = 4         # a 16×16 level map
    else:
      config.data.image_size = 128
      model.unet.channels = 256
      model.unet.channel_mult = (1, 1, 2, 3, 4)
      model.unet.num_res_blocks = 2
      model.unet.attention_resolutions = (32, 16, 8)
      config.diffusion.patch_size = 8         # a 16×16 level map

  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 0           # DiT: constant 1e-4 from the start
  config.optimizer.ema_decays = (0.9999,)
  config.mesh.fsdp = -1                       # shard parameters over every device
  config.mesh.data = 1
  config.sampling.cfg_scale = 1.5
  # FID-50k against ADM's reference batch of the resolution, as DiT and ADM report (README,
  # "FID protocols"; download it and pass its path if it is not in the working directory).
  config.eval.fid_samples = 50_000
  size = 256 if variant in ("dit", "unet") else config.data.image_size
  config.eval.fid_reference = f"VIRTUAL_imagenet{size}_labeled.npz"
  return base.finalize(config, arg, CHOICES)
