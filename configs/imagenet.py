"""ImageNet 256×256, class-conditional (the paper's main setting), ADM preprocessing, FSDP.

Prepare with: ILSVRC2012 tars into DATA_DIR/downloads/manual, then
`tfds build imagenet2012 --data_dir=DATA_DIR --file_format=array_record`.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.num_steps = 1_000_000

  config.data.source = "tfds"
  config.data.tfds_name = "imagenet2012"
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = 256
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.crop = "center"
  config.data.random_flip = True
  config.data.batch_size = 256
  config.data.worker_count = 8
  config.data.read_threads = 8

  config.model.name = "unet"
  config.model.parametrization = "eps"
  config.model.num_classes = 1000
  config.model.label_dropout = 0.1
  config.model.channels = 256
  config.model.channel_mult = (1, 1, 2, 2, 4, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (32, 16, 8)
  config.model.num_heads = 4
  config.model.dropout = 0.0
  config.model.dtype = "bfloat16"

  config.diffusion.patch_size = 8             # a 32×32 level map

  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10_000
  config.optimizer.ema_decays = (0.9999,)
  config.mesh.fsdp = -1                       # shard parameters over every device
  config.mesh.data = 1
  config.sampling.cfg_scale = 1.5
  return base.finalize(config, arg)
