"""CIFAR-10 at 32×32, class-conditional, with the ADM U-Net (prepare with
`tfds build cifar10 --file_format=array_record`)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 400_000

  config.data.source = "tfds"
  config.data.tfds_name = "cifar10"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 10
  config.data.random_flip = True
  config.data.batch_size = 128

  config.model.name = "unet"
  config.model.parametrization = "eps"
  config.model.num_classes = 10
  config.model.label_dropout = 0.1
  config.model.unet.channels = 128
  config.model.unet.channel_mult = (1, 2, 2, 2)
  config.model.unet.num_res_blocks = 2
  config.model.unet.attention_resolutions = (16,)
  config.model.unet.dropout = 0.1

  config.diffusion.patch_size = 2

  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 5_000
  config.optimizer.ema_decays = (0.9999,)
  config.eval.fid_samples = 50_000    # against the 50,000 training images, as DDPM / ADM
  return base.finalize(config, arg)
