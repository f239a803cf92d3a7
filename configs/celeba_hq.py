"""CelebA-HQ at 256×256, unconditional (TFDS `celeb_a_hq/256` needs the manually generated
images; see the TFDS catalogue, then `tfds build celeb_a_hq/256 --file_format=array_record`)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 500_000

  config.data.source = "tfds"
  config.data.tfds_name = "celeb_a_hq/256"
  config.data.label_key = ""
  config.data.train_split = "train[:-1000]"   # TFDS has one split: hold out the last 1,000
  config.data.eval_split = "train[-1000:]"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.crop = "resize"                 # already square and aligned
  config.data.random_flip = True
  config.data.batch_size = 64
  config.data.worker_count = 4

  config.model.name = "unet"
  config.model.parametrization = "eps"
  config.model.num_classes = 0
  config.model.unet.channels = 128
  config.model.unet.channel_mult = (1, 1, 2, 2, 4, 4)
  config.model.unet.num_res_blocks = 2
  config.model.unet.attention_resolutions = (16,)
  config.model.unet.dropout = 0.0

  config.diffusion.patch_size = 8             # a 32×32 level map

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 5_000
  config.optimizer.ema_decays = (0.9999,)
  config.mesh.fsdp = 1
  config.eval.fid_samples = 50_000    # against the training images (README, "FID protocols")
  config.eval.fid_split = config.data.train_split
  return base.finalize(config, arg)
