"""scikit-learn's 1,797 handwritten 8×8 digits: trains in seconds on a CPU."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 3_000

  config.data.source = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.random_flip = False
  config.data.batch_size = 128
  config.data.read_threads = 1
  config.data.prefetch_buffer_size = 4

  config.model.name = "unet"
  config.model.parametrization = "eps"
  config.model.num_classes = 10
  config.model.unet.channels = 32
  config.model.unet.channel_mult = (1, 2)
  config.model.unet.num_res_blocks = 1
  config.model.unet.attention_resolutions = ()
  config.model.unet.norm_groups = 8
  config.model.unet.dropout = 0.0

  config.diffusion.patch_size = 1     # per-pixel levels on the 8×8 grid

  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.ema_decays = (0.999,)

  config.checkpoint.every_steps = 500
  config.checkpoint.keep_period = 0
  config.logging.log_every_steps = 50
  config.eval.every_steps = 1_000
  config.eval.num_batches = 1
  config.sampling.every_steps = 1_000
  config.sampling.num_steps = 50
  config.eval.fid_samples = 1_000     # against the training digits (README, "FID protocols")
  return base.finalize(config, arg)
