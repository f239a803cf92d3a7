"""Preemption without warning: training killed with SIGKILL and restarted ends bitwise equal to an
uninterrupted run (benchmarks/sigkill_stress.py drives real `asyncpatch_jax.main` processes)."""

import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stress_module():
  spec = importlib.util.spec_from_file_location("sigkill_stress",
                                                ROOT / "benchmarks" / "sigkill_stress.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check(result, kills):
  assert result["kills"] == kills and result["restarts"] == kills
  # Every restart resumed from the newest committed checkpoint: orbax ignored (and cleaned
  # up) the temporary directory of any save the kill interrupted.
  assert result["every_start_resumed_from_the_latest_committed_step"], result["starts"]
  assert result["unfinished_saves_at_end"] == []
  assert result["damaged_checkpoints_skipped"] == 0
  assert result["same_structure"] and result["data_position_equal"]
  assert result["mismatched_leaves"] == [] and result["bitwise_equal"]


def test_sigkill_and_restart_matches_the_uninterrupted_run(tmp_path):
  """CI size: one kill after a random delay past a new checkpoint (three processes, ~40 s)."""
  result = _stress_module().stress(tmp_path, kills=1, num_steps=8, every=2, seed=1,
                                   max_delay_s=0.6)
  _check(result, 1)


@pytest.mark.slow
def test_five_sigkills_at_random_points_match_the_uninterrupted_run(tmp_path):
  """Five kills, some during start-up / restore, some during training and asynchronous saves."""
  result = _stress_module().stress(tmp_path, kills=5, num_steps=24, every=2, seed=7,
                                   early_fraction=0.3, max_delay_s=1.0)
  _check(result, 5)


# --- optimizer.skip_nonfinite_updates: a bad batch is skipped and counted, up to a limit ---

def _digits_config(skip):
  from configs import digits

  config = digits.get_config("debug")
  config.optimizer.warmup_steps = 0
  config.optimizer.skip_nonfinite_updates = skip
  return config


def _float_batch(config, nan=False):
  """A real digits batch as float32 pixels (so one pixel can be NaN)."""
  import numpy as np

  from asyncpatch_jax.data import sources

  src = sources.digits_source("train")
  n = int(config.data.batch_size)
  images = np.stack([src[i]["image"] for i in range(n)]).astype(np.float32)
  if nan:
    images[3, 4, 4, 0] = np.nan
  labels = np.asarray([src[i]["label"] for i in range(n)], np.int32)
  return {"image": images, "label": labels}


@pytest.mark.slow  # one more train-step compile; the trainer test below covers skipping in CI
def test_a_nan_batch_leaves_the_state_unchanged_and_is_counted():
  import jax
  import numpy as np

  from asyncpatch_jax.train import mesh as mesh_lib
  from asyncpatch_jax.train import optimizer as opt_lib
  from asyncpatch_jax.train import state as state_lib
  from asyncpatch_jax.train import step as step_lib

  config = _digits_config(skip=3)
  config.mesh.data, config.mesh.fsdp = 1, 1
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.setup_state(config, mesh, opt_lib.make_optimizer(config.optimizer, 4))
  train_step = step_lib.jit_train_step(step_lib.make_train_step(config, setup), setup,
                                       mesh_lib.batch_sharding(mesh))
  state, good = train_step(setup.init(config), _float_batch(config))
  assert int(good.nonfinite_steps.compute()) == 0
  before = jax.tree.map(np.asarray, state)
  after, bad = train_step(state, _float_batch(config, nan=True))
  after = jax.tree.map(np.asarray, after)
  assert int(after.step) == 2 and int(bad.nonfinite_steps.compute()) == 1
  assert int(bad.first_nonfinite_step.compute()) == 2
  merged = good.merge(bad).compute()
  assert np.isfinite(merged["loss"]) and merged["nonfinite_steps"] == 1  # mean of finite steps

  def leaves(s):
    return jax.tree.leaves((s.params, s.opt_state, s.ema, s.model_state))

  # Parameters, optimizer state and EMAs kept bit for bit.
  assert all(np.array_equal(a, b) for a, b in zip(leaves(before), leaves(after)))


def test_trainer_skips_counts_and_stops_past_the_limit(tmp_path, monkeypatch):
  import numpy as np

  from asyncpatch_jax import data as data_lib
  from asyncpatch_jax.train import trainer

  real = data_lib.create_train_pipeline

  class Poisoned:
    """The real pipeline with float pixels, one of them NaN in the batches of steps 2 and 4."""

    def __init__(self, pipeline):
      self.pipeline, self.iterator, self.n = pipeline, pipeline.iterator, 0

    def __next__(self):
      import jax

      self.n += 1
      batch = next(self.pipeline)
      image = batch["image"].astype(np.float32)
      if self.n in (2, 4):
        image = image.at[0, 0, 0, 0].set(np.nan)
      return {"image": jax.device_put(image, batch["image"].sharding), "label": batch["label"]}

    def close(self):
      self.pipeline.close()

  monkeypatch.setattr(data_lib, "create_train_pipeline", lambda *a, **k: Poisoned(real(*a, **k)))
  config = _digits_config(skip=1)
  config.num_steps = 6
  scalars = {}

  class Writer:
    def write_scalars(self, step, values):
      scalars.setdefault(int(step), {}).update({k: float(v) for k, v in values.items()})

    def __getattr__(self, name):  # images, hparams, flush, …: not needed here
      return lambda *args, **kwargs: None

  with pytest.raises(trainer.NonFiniteError,
                     match=r"2 steps skipped .*skip_nonfinite_updates=1"):
    trainer.train_and_evaluate(config, tmp_path, writer=Writer())
  assert [scalars[s]["train/nonfinite_steps"] for s in (1, 2, 3)] == [0, 1, 0]
  assert all(np.isfinite(scalars[s]["train/loss"]) for s in (1, 3))
  # Step 2's checkpoint (one skip, within the limit) was saved; step 4's was not.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2]


# --- config validation: every field's type and range, each message naming the field and fix ---

_BAD_FIELDS = [
    ({"seed": -1}, "config.seed must be in"),
    ({"num_steps": 0}, "config.num_steps must be positive"),
    ({"num_steps": 2.5}, "config.num_steps must be an integer"),
    ({"train_minutes": float("nan")}, "config.train_minutes must be a number"),
    ({"data.channels": 4}, "config.data.channels must be 1 or 3"),
    ({"data.random_flip": 1}, "config.data.random_flip must be True or False"),
    ({"data.texture_scale": 0.0}, "config.data.texture_scale must be positive"),
    ({"data.eval_split": ""}, "config.data.eval_split must be non-empty"),
    ({"model.name": "resnet"}, "config.model.name must be one of"),
    ({"model.dtype": "float16"}, "config.model.dtype must be one of"),
    ({"model.level_embedding": "sigma"}, "config.model.level_embedding must be one of"),
    ({"model.unet.dropout": -0.1}, r"config.model.unet.dropout must be in \[0, 1\)"),
    ({"model.label_dropout": 1.0}, r"config.model.label_dropout must be in \[0, 1\)"),
    ({"model.unet.channel_mult": ()}, "model.unet.channel_mult must be a non-empty tuple"),
    ({"model.attention_impl": "flash"}, "model.attention_impl must be None"),
    ({"model.unet.norm_groups": 12}, "multiples of model.unet.norm_groups=12"),
    ({"model.name": "dit", "model.dit.patch": 3}, "model.dit.patch=3 must divide"),
    ({"model.name": "dit", "model.dit.num_heads": 5}, "model.dit.num_heads"),
    ({"optimizer.name": "sgd"}, "config.optimizer.name must be 'adamw'"),
    ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate must be positive"),
    ({"optimizer.learning_rate": "1e-4"}, "config.optimizer.learning_rate must be a number"),
    ({"optimizer.b2": 1.0}, r"config.optimizer.b2 must be in \[0, 1\)"),
    ({"optimizer.eps": 0.0}, "config.optimizer.eps must be positive"),
    ({"optimizer.ema_decays": (1.0,)}, r"optimizer.ema_decays must be a non-empty tuple"),
    ({"optimizer.skip_nonfinite_updates": -1}, "config.optimizer.skip_nonfinite_updates must"),
    ({"mesh.fsdp": 0}, r"config.mesh.fsdp must be -1 \(fill\) or >= 1"),
    ({"checkpoint.async_save": "yes"}, "config.checkpoint.async_save must be True or False"),
    ({"eval.num_batches": 0}, "config.eval.num_batches must be >= 1"),
    ({"eval.paths": ("homogeneous", "zigzag")}, "config.eval.paths must be a non-empty tuple"),
    ({"eval.fid_batch_size": 0}, "config.eval.fid_batch_size must be >= 1"),
    ({"sampling.strategy": "zigzag"}, "config.sampling.strategy must be one of"),
    ({"sampling.cfg_scale": -1.0}, "config.sampling.cfg_scale must be >= 0"),
    ({"sampling.num_inpaint": -1}, "config.sampling.num_inpaint must be >= 0"),
    ({"diffusion.log_snr_min": 20.0}, "log_snr_min=20.0 must be below diffusion.log_snr_max"),
    ({"diffusion.patch_size": 3}, "diffusion.patch_size=3 must divide"),
    ({"diffusion.level_sampler.components.mask.weight": -0.3}, "component weights must be"),
    ({"diffusion.level_sampler.components.staircase.max_overlap": 1.5}, "max_overlap"),
]


def _with(overrides):
  """digits:debug as a fresh ConfigDict (any value type allowed) with `overrides` applied."""
  import ml_collections

  from configs import digits

  tree = digits.get_config("debug").to_dict()
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = tree
    for key in parents:
      node = node[key]
    node[leaf] = value
  return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("overrides,message", _BAD_FIELDS,
                         ids=[",".join(o) + "=" + repr(list(o.values())[-1])
                              for o, _ in _BAD_FIELDS])
def test_each_bad_field_is_a_config_error_naming_it(overrides, message):
  from asyncpatch_jax.train import validation

  validation.validate_config(_with({}))  # the base is valid
  with pytest.raises(validation.ConfigError, match=message):
    validation.validate_config(_with(overrides))


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.data": 3}, r"3×1 = 3 does not match the 8 available devices; set --config.mesh"),
    ({"data.batch_size": 12}, r"data.batch_size=12 .* use a multiple of 8"),
    ({"optimizer.grad_accum_steps": 2}, r"grad_accum_steps=2 .* use a multiple of 16"),
], ids=["mesh_vs_devices", "batch_vs_data_axis", "batch_vs_microbatches"])
def test_topology_errors_name_the_fields(overrides, message):
  import jax

  from asyncpatch_jax.train import validation

  assert len(jax.devices()) == 8
  validation.validate_topology(_with({}))
  with pytest.raises(validation.ConfigError, match=message):
    validation.validate_topology(_with(overrides))


# --- bad data: unusable images are a clear error, or (TFDS sets) skipped and counted ---

@pytest.mark.parametrize("image,message", [
    (np.zeros((8, 8, 1), np.float32), "float32 pixels where uint8"),
    (np.zeros((8, 8, 5), np.uint8), "5 channels"),
    (np.zeros((0, 8, 3), np.uint8), "empty image"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"shape \(2, 8, 8, 3\) is not"),
    (np.array(b"\x89PNG garbage"), "undecoded bytes"),
], ids=["float", "5_channels", "empty", "4d", "bytes"])
def test_preprocess_names_what_is_wrong_with_an_image(image, message):
  from asyncpatch_jax.data import preprocess

  with pytest.raises(preprocess.BadRecordError, match=message):
    preprocess.Preprocess(8, 1)({"image": image, "label": 0})


def test_any_size_and_grey_alpha_are_converted():
  from asyncpatch_jax.data import preprocess

  grey_alpha = np.stack([np.full((5, 13), 200, np.uint8), np.zeros((5, 13), np.uint8)], -1)
  out = preprocess.Preprocess(8, 3)({"image": grey_alpha, "label": 2})["image"]
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and (out == 200).all()


class _DamagedSource:
  """16 digits; record 3 fails to read (a corrupt file), record 5 has 5 channels."""

  def __init__(self):
    from asyncpatch_jax.data import sources

    self.base = sources.digits_source("train")

  def __len__(self):
    return 16

  def __getitem__(self, i):
    if i == 3:
      raise OSError("image file is truncated")
    record = dict(self.base[i])
    if i == 5:
      record["image"] = np.repeat(record["image"], 5, axis=-1)
    return record


def _pipeline(source):
  import jax

  from asyncpatch_jax.data import pipeline

  config = _with({"data.random_flip": False})
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return pipeline.create_train_pipeline(config.data, sharding, source=source)


def test_bad_records_are_skipped_counted_and_limited(caplog):
  import pickle

  from asyncpatch_jax.data import sources

  wrapped = sources.SkipBadRecords(_DamagedSource(), max_bad=2)
  assert pickle.loads(pickle.dumps(wrapped)).max_bad == 2  # grain workers get a copy
  with caplog.at_level("WARNING"):
    assert [wrapped[i]["label"] for i in (2, 3, 4, 5, 6)] == [
        wrapped[i]["label"] for i in (2, 4, 4, 6, 6)]  # each bad one → the next good one
  assert wrapped.bad == {3, 5}
  assert "Skipping record 3" in caplog.text and "truncated" in caplog.text
  assert "Skipping record 5" in caplog.text and "5 channels" in caplog.text

  source = sources.SkipBadRecords(_DamagedSource(), max_bad=2)
  data = _pipeline(source)
  try:
    batches = [next(data)["image"] for _ in range(4)]  # two epochs of 16
  finally:
    data.close()
  assert all(b.shape == (8, 8, 8, 1) and b.dtype == np.uint8 for b in batches)
  assert source.bad == {3, 5}

  strict = sources.SkipBadRecords(_DamagedSource(), max_bad=0)
  with pytest.raises(sources.BadDataError,
                     match=r"record 3 .* truncated.*max_bad_records=0.*--config.data"):
    strict[3]
