"""The training system: real steps on every TFDS config (mocked), overfitting, sharded vs
unsharded steps, checkpoints (bitwise restore, exact resume, SIGTERM), non-finite stops, bad
input before compilation, and the end-to-end loop with its grids."""

import os
import pathlib
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from clu import metric_writers
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import data as data_lib  # noqa: E402
from asyncpatch_jax import diffusion  # noqa: E402
from asyncpatch_jax.train import checkpoint as ckpt_lib  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from asyncpatch_jax.train import optimizer as opt_lib  # noqa: E402
from asyncpatch_jax.train import state as state_lib  # noqa: E402
from asyncpatch_jax.train import step as step_lib  # noqa: E402
from asyncpatch_jax.train import trainer, validation  # noqa: E402
from configs import celeba_hq, cifar10, digits, imagenet, lsun  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical programs compiled twice (a resumed run) hit a persistent cache for this module."""
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs,
         jax.config.jax_persistent_cache_min_entry_size_bytes)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])


@pytest.fixture
def tfds_tmp(tmp_path, monkeypatch):
  """TFDS's DatasetInfo leaves a temporary directory per builder: keep them in tmp_path."""
  import tempfile

  (tmp_path / "tfds_tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tfds_tmp"))


def _digits(devices="all"):
  """digits:debug as every test here uses it, so equal programs are compiled once (cache)."""
  config = digits.get_config("debug")
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 3e-3
  if devices == "one":
    config.mesh.data, config.mesh.fsdp = 1, 1
  else:  # data × fsdp over the 8 test devices, with every kernel sharded
    config.mesh.data, config.mesh.fsdp, config.mesh.min_shard_size = 4, 2, 0
  return config


def _build(config, devices):
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  setup = state_lib.setup_state(config, mesh,
                                opt_lib.make_optimizer(config.optimizer, config.num_steps))
  step = step_lib.jit_train_step(step_lib.make_train_step(config, setup), setup, batch_sharding)
  return setup, batch_sharding, step


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(la, lb))


@pytest.mark.parametrize("config_module, arg", [  # imagenet / lsun: their pixel-space variants
    (cifar10, "debug"), (imagenet, "pixel128,debug"), (lsun, "pixel,debug"),
    (celeba_hq, "debug")], ids=["cifar10", "imagenet2012", "lsun", "celeba_hq"])
def test_tfds_debug_config_takes_a_real_step(config_module, arg, tfds_tmp):
  config = config_module.get_config(arg)
  config.optimizer.warmup_steps = 0
  config.mesh.data, config.mesh.fsdp = 1, 1
  if config_module is cifar10:  # also run the gradient-accumulation path (2 microbatches of 4)
    config.optimizer.grad_accum_steps = 2
  setup, batch_sharding, step = _build(config, jax.devices()[:1])
  with tfds.testing.mock_data(num_examples=16):
    pipe = data_lib.create_train_pipeline(config.data, batch_sharding)
    batch = next(pipe)
  state = setup.init(config)
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, batch)
  out = metrics.compute()
  assert np.isfinite(float(out["loss"])) and float(out["grad_norm"]) > 0
  assert int(out["first_nonfinite_step"]) == step_lib.NO_FAILURE
  assert int(state.step) == 1
  assert not _leaves_equal(before, state.params)


def test_loss_falls_when_overfitting_a_tiny_batch():
  config = _digits("one")
  setup, batch_sharding, step = _build(config, jax.devices()[:1])
  batch = next(data_lib.create_train_pipeline(config.data, batch_sharding))
  loss_fn = step_lib.make_loss_fn(config, setup.model_def, train=False)

  @jax.jit
  def held_loss(params, model_state):  # the same batch, levels and noise every time
    keys = [jax.random.fold_in(jax.random.key(7), i) for i in range(2)]
    return jnp.mean(jnp.stack([loss_fn(params, model_state, batch, k)[0] for k in keys]))

  state = setup.init(config)
  start = float(held_loss(state.params, state.model_state))
  for _ in range(50):
    state, _ = step(state, batch)
  end = float(held_loss(state.params, state.model_state))
  assert end < 0.6 * start, (start, end)


def test_fsdp_sharding_rules_shard_kernels():
  config = _digits()
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = state_lib.setup_state(config, mesh, opt_lib.make_optimizer(config.optimizer, 10))
  specs = state_lib.describe_shardings(setup.shardings)
  kernels = {k: v for k, v in specs.items() if k.endswith("kernel")}
  assert kernels and all("fsdp" in v for v in kernels.values()), kernels
  assert all(v == "P()" for k, v in specs.items() if k.endswith("bias"))
  # Adam moments follow their parameter; the step counter is replicated.
  mu = [s for p, s in jax.tree_util.tree_flatten_with_path(setup.shardings.opt_state)[0]
        if mesh_lib.path_string(p).endswith("input_conv/kernel")]
  assert mu and all("fsdp" in str(s.spec) for s in mu)


def test_sharded_step_equals_the_single_device_step():
  config = _digits("one")
  batch_np = jax.tree.map(np.asarray, next(data_lib.create_train_pipeline(
      config.data, mesh_lib.batch_sharding(mesh_lib.make_mesh(config.mesh, jax.devices()[:1])))))
  results = []
  for cfg, devices in ((_digits("one"), jax.devices()[:1]), (_digits(), jax.devices())):
    setup, batch_sharding, step = _build(cfg, devices)
    state = setup.init(cfg)
    batch = jax.tree.map(lambda x, s=batch_sharding: jax.device_put(x, s), batch_np)
    metrics = []
    for _ in range(2):
      state, m = step(state, batch)
      metrics.append({k: float(v) for k, v in m.compute().items()})
    results.append((metrics, jax.tree.map(np.asarray, state.params),
                    jax.tree.map(np.asarray, state.ema)))
  (m1, p1, e1), (m8, p8, e8) = results
  for a, b in zip(m1, m8):
    for key in ("loss", "mse", "grad_norm", "param_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  # Adam divides by √v, so parameters whose gradient is ~0 can move by a few 1e-6 on round-off
  # alone; everything else agrees to float32 precision.
  for a, b in zip(jax.tree.leaves(p1) + jax.tree.leaves(e1),
                  jax.tree.leaves(p8) + jax.tree.leaves(e8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_microbatches_keep_each_devices_rows():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  x = jax.device_put(jnp.arange(32), mesh_lib.batch_sharding(mesh))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None,
                                                                         mesh_lib.BATCH_AXES))
  micro = jax.jit(lambda b: step_lib._microbatches({"x": b}, 2, sharding))(x)["x"]
  assert micro.shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(micro), np.arange(32).reshape(16, 2).T)
  assert sorted(np.concatenate(np.asarray(micro)).tolist()) == list(range(32))


class RecordingWriter(metric_writers.MetricWriter):
  """Keeps scalars in memory; `on_scalars(step)` lets a test act at a given step."""

  def __init__(self, on_scalars=None):
    self.scalars, self.images, self.on_scalars = {}, {}, on_scalars

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})
    if self.on_scalars is not None:
      self.on_scalars(int(step))

  def write_images(self, step, images):
    self.images.setdefault(int(step), {}).update(images)

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    self.hparams = dict(hparams)

  def flush(self):
    pass

  def close(self):
    pass


def _e2e_config(num_steps=4):
  config = _digits()
  config.num_steps = num_steps
  config.checkpoint.every_steps = 2
  config.checkpoint.max_to_keep = 2
  config.checkpoint.keep_period = 4
  return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """A 4-step run from scratch: the reference for resumes and restores."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  writer = RecordingWriter()
  state = trainer.train_and_evaluate(_e2e_config(), workdir, writer=writer)
  return workdir, jax.tree.map(np.asarray, state), writer


def test_end_to_end_run_writes_everything(uninterrupted):
  workdir, state, writer = uninterrupted
  assert int(state.step) == 4
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4]
  assert (workdir / "config.json").exists()
  for name in ("samples", "inpaint"):
    assert (workdir / f"{name}_00000004.png").exists() and (workdir / f"{name}_latest.png").exists()
    assert name in writer.images[4]
  _check_grids(workdir, writer.images[4])
  assert sorted(writer.scalars) == [1, 2, 3, 4]
  assert all(np.isfinite(writer.scalars[s]["train/loss"]) for s in writer.scalars)
  assert list(workdir.glob("events.out.tfevents*")) == []  # the injected writer replaced TB
  assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _check_grids(workdir, logged):
  """The step-4 grids decoded: 4 samples in a row (a column per class, 10 classes), and the
  inpainting grid's rows (context with grey holes, completion, original) for its 2 examples."""
  from test_visualize import assert_not_constant, read_grid

  from asyncpatch_jax import pixels, sampling

  config = _e2e_config()
  shape = (8, 8, 1)
  samples = read_grid(workdir / "samples_00000004.png", 4, shape, nrow=10)
  assert_not_constant(samples, "samples")
  inpaint = read_grid(workdir / "inpaint_00000004.png", 6, shape, nrow=2)
  context, completion, original = inpaint[:2], inpaint[2:4], inpaint[4:]
  reference, _ = data_lib.reference_images(config.data, 2)
  np.testing.assert_array_equal(original, reference)
  known = sampling.masks.make_mask(config.sampling.inpaint_mask, 2, (8, 8),
                                   seed=config.seed)[..., None]
  assert known.any() and not known.all()
  grey = pixels.to_uint8(np.zeros(()))
  np.testing.assert_array_equal(context, np.where(known, original, grey))
  np.testing.assert_array_equal(np.where(known, completion, 0), np.where(known, original, 0))
  assert_not_constant(completion, "inpainting completions")
  for name, path in (("samples", "samples_latest.png"), ("inpaint", "inpaint_latest.png")):
    with Image.open(workdir / path) as im:  # the file is what was logged
      np.testing.assert_array_equal(np.asarray(im).reshape(logged[name].shape[1:]),
                                    logged[name][0])


def test_restore_is_bitwise_identical(uninterrupted, tmp_path):
  workdir, state, _ = uninterrupted
  config = _e2e_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  setup = state_lib.setup_state(config, mesh, opt_lib.make_optimizer(config.optimizer, 4))
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(setup.shardings.params))
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint,
                                       read_only=True)
  restored = checkpointer.restore(None, setup.abstract)
  checkpointer.close()
  assert _leaves_equal(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim)


def test_sigterm_saves_and_the_resumed_run_matches(uninterrupted, tmp_path):
  _, reference, _ = uninterrupted

  def preempt(step):
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  first = trainer.train_and_evaluate(_e2e_config(), tmp_path, writer=RecordingWriter(preempt))
  assert int(first.step) == 2  # the flag is seen after the next step, which is then saved
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2]
  assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler) or \
      callable(signal.getsignal(signal.SIGTERM))
  writer = RecordingWriter()
  resumed = trainer.train_and_evaluate(_e2e_config(), tmp_path, writer=writer)
  assert sorted(writer.scalars) == [3, 4]
  assert _leaves_equal(jax.tree.map(np.asarray, resumed), reference)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path,
                                                                  monkeypatch):
  workdir, _, _ = uninterrupted
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  real_loss = diffusion.diffusion_loss

  def poisoned(*args, **kwargs):
    out = real_loss(*args, **kwargs)
    return {k: v * jnp.nan for k, v in out.items()}

  monkeypatch.setattr(diffusion, "diffusion_loss", poisoned)
  with pytest.raises(trainer.NonFiniteError, match="at step 5"):
    trainer.train_and_evaluate(_e2e_config(num_steps=8), tmp_path, writer=RecordingWriter())
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]


def test_sample_and_eval_modes_read_the_checkpoint(uninterrupted):
  from asyncpatch_jax.train import eval_job, sample_job

  workdir, _, _ = uninterrupted
  config = _e2e_config()
  arrays = sample_job.sample_from_checkpoint(config, workdir)  # more: test_sampling_cli.py
  n = config.sampling.num_samples
  assert arrays["samples"].shape == (n, 8, 8, 1) and np.isfinite(arrays["samples"]).all()
  assert arrays["step"] == 4 and arrays["folder"].parent == workdir / "samples"
  with np.load(arrays["folder"] / "samples.npz") as saved:
    np.testing.assert_array_equal(saved["samples"], arrays["samples"])

  config.eval.elbo_steps = 2
  results = eval_job.evaluate(config, workdir)
  assert results["step"] == 4
  assert np.isfinite(results["eval/loss"]) and np.isfinite(results["eval/bpd"])
  assert results["eval/bpd"] > 0  # a negative bits/dim would mean a broken bound
  assert (workdir / "eval_step_4.json").exists()


def test_clip_x0_wraps_any_denoiser():
  from asyncpatch_jax.train import samples

  def denoiser(z, t):
    return diffusion.Prediction(x0=z * 10.0, variance=jnp.ones_like(z))

  pred = samples.clip_x0(denoiser)(jnp.array([[-1.0, 0.05, 3.0]]), None)
  np.testing.assert_array_equal(pred.x0, [[-1.0, 0.5, 1.0]])
  np.testing.assert_array_equal(pred.variance, 1.0)
  plain = samples.clip_x0(lambda z, t: z)(jnp.array([2.0]), None)
  np.testing.assert_array_equal(plain.x0, [1.0])


def test_bad_input_fails_before_compiling(tmp_path, monkeypatch, tfds_tmp):
  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before the input was checked")

  monkeypatch.setattr(jax, "jit", no_compiling)
  config = _digits()
  config.data.batch_size = 12
  with pytest.raises(validation.ConfigError, match="batch_size"):
    trainer.train_and_evaluate(config, tmp_path / "a")
  config = cifar10.get_config("debug")
  config.data.tfds_data_dir = str(tmp_path / "no_data")
  with pytest.raises(data_lib.DatasetNotFoundError, match="tfds build cifar10"):
    trainer.train_and_evaluate(config, tmp_path / "b")
  assert not list((tmp_path / "b").iterdir())  # nothing written
  config = _digits()
  config.eval.every_steps = 1
  config.data.eval_split = "nonexistent"
  with pytest.raises(ValueError, match="nonexistent"):
    trainer.train_and_evaluate(config, tmp_path / "c")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(validation.ConfigError, match="not writable"):
    trainer.train_and_evaluate(digits.get_config("debug"), blocker / "run")
