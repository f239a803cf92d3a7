"""`eval/loss` and `eval/bpd` of `--mode=eval` recomputed by hand from the restored EMA network on
the same batches with the same random numbers, to 1e-5 (issue 25).

By hand here: the batches (the eval split in order, the last partial batch dropped), the pixel
scaling (uint8 → [−1, 1]), the corruption z = α x0 + σ ε, the ε-MSE over the noised elements, the
dimension count of bits/dim (8·8·1) and the mean over every example. Shared with the code under
test: the network, the level sampler and the ELBO's per-example nats (`elbo.nelbo`, tested
against closed forms in test_elbo.py), and the documented keys: batch k uses
fold_in(fold_in(key(seed), 0xE7A1), k), split four ways (level map, noise, labels, network) for
the loss, and folded with 1 for the ELBO.
"""

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from asyncpatch_jax import models  # noqa: E402
from asyncpatch_jax.data import pipeline, sources  # noqa: E402
from asyncpatch_jax.diffusion import elbo, level_samplers, paths  # noqa: E402
from asyncpatch_jax.train import builders, eval_job, restore  # noqa: E402
from asyncpatch_jax.train import checkpoint as ckpt_lib  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from asyncpatch_jax.train import optimizer as opt_lib  # noqa: E402
from asyncpatch_jax.train import state as state_lib  # noqa: E402
from asyncpatch_jax.train import workdir as workdir_lib  # noqa: E402
from configs import digits  # noqa: E402

BATCH = 8
ELBO_STEPS = 3


def _config():
  config = digits.get_config("debug")  # 8×8×1, ε-parametrised U-Net, no uncertainty head
  config.data.batch_size = BATCH
  config.data.eval_split = "test"
  config.checkpoint.async_save = False
  config.sampling.num_inpaint = 0
  config.eval.elbo_steps = ELBO_STEPS
  config.eval.paths = ("homogeneous",)
  return config


def _save_checkpoint(config, workdir):
  """Initial parameters saved at step 3, the EMA moved well away from the raw parameters (an
  evaluation of the raw parameters, or of the initial ones, would give other numbers)."""
  setup = state_lib.setup_state(config, mesh_lib.make_mesh(config.mesh),
                                opt_lib.make_optimizer(config.optimizer, config.num_steps))
  state = setup.init(config)
  name = restore.ema_params_name(config)
  leaves, treedef = jax.tree.flatten(state.ema[name])
  keys = jax.random.split(jax.random.key(7), len(leaves))
  moved = [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  state = state.replace(step=jnp.int32(3),
                        ema={name: jax.tree.unflatten(treedef, moved)})
  workdir_lib.write_config(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
  checkpointer.save(3, state, None, config)
  checkpointer.close()


def _restored_ema(config, workdir):
  """The checkpoint's EMA and model state, restored onto one device."""
  config = _config()
  config.mesh.data, config.mesh.fsdp = 1, 1
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  setup = state_lib.setup_state(config, mesh, opt_lib.make_optimizer(config.optimizer, 4))
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint,
                                       read_only=True)
  state = checkpointer.restore(None, setup.abstract)
  checkpointer.close()
  return setup, state.ema[restore.ema_params_name(config)], state.model_state


def _by_hand(config, setup, ema, model_state):
  schedule = builders.make_schedule(config.diffusion)
  sampler = level_samplers.from_config(config.diffusion.level_sampler)
  root = jax.random.fold_in(jax.random.key(int(config.seed)), 0xE7A1)

  @jax.jit
  def one_batch(images, labels, k):
    x0 = images.astype(jnp.float32) / 127.5 - 1.0
    key = jax.random.fold_in(root, k)
    k_level, k_noise, _, _ = jax.random.split(key, 4)
    t = sampler(k_level, x0.shape[:3])  # one level per pixel (patch size 1)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    alpha, sigma = schedule.alpha_sigma(t[..., None])
    network = setup.model_def.merge(ema, model_state)
    out = network(alpha * x0 + sigma * noise, t, labels, deterministic=True)
    assert out.log_variance is None
    noised = jnp.broadcast_to((t > 0)[..., None], x0.shape)
    sq = jnp.where(noised, jnp.square(out.output - noise), 0.0)
    loss = sq.sum((1, 2, 3)) / jnp.maximum(noised.sum((1, 2, 3)), 1)
    denoiser = models.make_denoiser(network, schedule=schedule, parametrization="eps",
                                    patch_size=1, labels=labels, num_classes=10)
    nats = elbo.nelbo(denoiser, x0, jax.random.fold_in(key, 1), schedule=schedule,
                      path=paths.homogeneous(), num_steps=ELBO_STEPS, patch_size=1,
                      data="discrete8bit")["total"]
    return loss, nats / (8 * 8 * 1 * math.log(2.0))

  source = sources.digits_source("test")
  preprocess = pipeline.make_preprocess(config.data, train=False, source=source)
  losses, bpds = [], []
  for k in range(len(source) // BATCH):
    records = [preprocess(source[i]) for i in range(k * BATCH, (k + 1) * BATCH)]
    loss, bpd = one_batch(np.stack([r["image"] for r in records]),
                          np.asarray([r["label"] for r in records], np.int32), k)
    losses.append(np.asarray(loss))
    bpds.append(np.asarray(bpd))
  return float(np.mean(np.concatenate(losses))), float(np.mean(np.concatenate(bpds)))


def test_eval_mode_loss_and_bpd_equal_the_restored_ema_recomputed_by_hand(tmp_path):
  config = _config()
  _save_checkpoint(config, tmp_path)
  results = eval_job.evaluate(_config(), tmp_path)
  assert results["step"] == 3
  setup, ema, model_state = _restored_ema(config, tmp_path)
  loss, bpd = _by_hand(config, setup, ema, model_state)
  np.testing.assert_allclose(results["eval/loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(results["eval/bpd"], bpd, rtol=1e-5)
  assert 0 < bpd < 100  # an untrained network: far above a trained one's ~1 bit, but finite
