"""LSUN scenes at 256×256, unconditional: SD-VAE latents of the official LMDB exports (default)
or pixels from TFDS.

Arguments (`--config=configs/lsun.py:ARG[,ARG…]`):
  church | bedroom   the category (default church, i.e. church_outdoor).
  unet | dit         the paper's U-Net (default) or DiT-L/2 on the 32×32×4 latents.
  pixel              ADM's 256×256 pixel U-Net on TFDS `lsun/<category>` instead of latents.
  debug              shrinks any of them to run on a CPU.
All have the uncertainty (variance) head, so the same model also samples adaptively.

Latents need, once (a run without them stops at once and prints these commands): the LMDB
exports (`git clone https://github.com/fyu/lsun; python download.py -c church_outdoor`, unzip
into LSUN_DIR), stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors, and the caches
  python -m asyncpatch_jax.latents.build --source=lsun \
      --lsun_lmdb=LSUN_DIR/church_outdoor_train_lmdb --image_size=256 --vae_config=sd \
      --vae_weights=VAE_FILE --out=LATENT_DIR/train
(and `--lsun_lmdb=LSUN_DIR/church_outdoor_val_lmdb --out=LATENT_DIR/validation`); then train
with `--config.data.latent_dir=LATENT_DIR --config.vae.weights=VAE_FILE`.
"""

from configs import base

CATEGORIES = {"church": "church_outdoor", "bedroom": "bedroom"}
MODELS = ("unet", "dit")
CHOICES = (*CATEGORIES, *MODELS, "pixel", "debug")


def get_config(arg=None):
  words = base.parse_arg(arg, CHOICES)
  category = CATEGORIES[base.pick_variant(words, tuple(CATEGORIES))]
  model_name = base.pick_variant(words, MODELS)
  if model_name == "dit" and "pixel" in words:
    raise ValueError("configs/lsun.py: 'dit' runs on latents; drop 'pixel' (or use 'unet')")
  config = base.get_config()
  config.num_steps = 500_000

  data = config.data
  data.label_key = ""
  data.train_split = "train"
  data.eval_split = "validation"
  data.image_size = 256
  data.channels = 3
  data.crop = "center"                        # ADM's centre crop + resize
  data.random_flip = True
  data.batch_size = 64
  data.worker_count = 4
  if "pixel" in words:
    data.source = "tfds"
    data.tfds_name = f"lsun/{category}"
    config.diffusion.patch_size = 8           # a 32×32 level map
  else:
    data.source = "latents"
    data.lsun_category = category
    config.vae.name = "sd"
    config.sampling.clip_x0 = False           # latents are not bounded to [-1, 1]
    config.diffusion.patch_size = 2           # a 16×16 level map on 32×32 latents

  model = config.model
  model.name = model_name
  model.parametrization = "eps"
  model.uncertainty = True  # the variance head: adaptive sampling (and DiT's learned sigma)
  model.num_classes = 0
  if model_name == "dit":
    model.dit.size = "L"
    model.dit.patch = 2
    model.dit.adaln = "single"                # per-token levels at +5% FLOPs (README)
  elif "pixel" in words:
    model.unet.channels = 128
    model.unet.channel_mult = (1, 1, 2, 2, 4, 4)
    model.unet.num_res_blocks = 2
    model.unet.attention_resolutions = (32, 16, 8)
    model.unet.dropout = 0.1
  else:
    model.unet.channels = 224                 # LDM's LSUN-churches latent U-Net width
    model.unet.channel_mult = (1, 2, 4)
    model.unet.num_res_blocks = 2
    model.unet.attention_resolutions = (16, 8)
    model.unet.num_heads = 8
    model.unet.norm_groups = 32
    model.unet.dropout = 0.1

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 5_000
  config.optimizer.ema_decays = (0.9999,)
  # FID-50k (README, "FID protocols"): bedrooms against ADM's reference batch, as ADM and LDM
  # report; churches (no ADM batch) against the training images' statistics.
  config.eval.fid_samples = 50_000
  if category == "bedroom":
    config.eval.fid_reference = "VIRTUAL_lsun_bedroom256.npz"
  return base.finalize(config, arg, CHOICES)
