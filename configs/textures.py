"""Random 32×32 crops of scikit-image's CC0 texture photographs (brick, grass, gravel).

A stationary-texture set where input guidance and inpainting are easy to judge by eye; the label
is the texture.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 20_000

  config.data.source = "textures"
  config.data.image_size = 32
  config.data.channels = 1
  config.data.num_classes = 3
  config.data.texture_scale = 0.5     # 512² photographs halved: crops show more structure
  config.data.texture_crops_per_epoch = 10_000
  config.data.random_flip = True
  config.data.batch_size = 64
  config.data.read_threads = 1
  config.data.prefetch_buffer_size = 4

  config.model.name = "unet"
  config.model.parametrization = "eps"
  config.model.num_classes = 3
  config.model.unet.channels = 32
  config.model.unet.channel_mult = (1, 2, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attention_resolutions = (8,)
  config.model.unet.norm_groups = 8
  config.model.unet.dropout = 0.0

  config.diffusion.patch_size = 2

  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.ema_decays = (0.999,)

  config.checkpoint.every_steps = 1_000
  config.checkpoint.keep_period = 0
  config.logging.log_every_steps = 50
  config.eval.every_steps = 0
  config.sampling.every_steps = 2_000
  config.sampling.num_steps = 100
  config.eval.fid_samples = 1_000     # against the training crops (README, "FID protocols")
  return base.finalize(config, arg)
