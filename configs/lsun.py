"""LSUN church (outdoor) at 256×256, unconditional, ADM preprocessing (prepare with
`tfds build lsun/church_outdoor --file_format=array_record`)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 500_000

  config.data.source = "tfds"
  config.data.tfds_name = "lsun/church_outdoor"
  config.data.label_key = ""
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.crop = "center"                 # ADM's centre crop + resize
  config.data.random_flip = True
  config.data.batch_size = 64
  config.data.worker_count = 4

  config.model.name = "unet"
  config.model.parametrization = "eps"
  config.model.num_classes = 0
  config.model.channels = 128
  config.model.channel_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (32, 16, 8)
  config.model.dropout = 0.1

  config.diffusion.patch_size = 8

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 5_000
  config.optimizer.ema_decays = (0.9999,)
  return base.finalize(config, arg)
