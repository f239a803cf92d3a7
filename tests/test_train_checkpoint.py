"""train/checkpoint.py on small pytrees: retention (keep N + every K), atomicity, the iterator
position, and restoring onto shardings."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from asyncpatch_jax.train import checkpoint as ckpt_lib
from asyncpatch_jax.train import mesh as mesh_lib


def _options(**overrides):
  config = ml_collections.ConfigDict({"max_to_keep": 2, "keep_period": 4, "async_save": True})
  config.update(overrides)
  return config


def _state(step):
  return {"w": jnp.arange(16.0).reshape(4, 4) * step, "step": jnp.int32(step)}


def _run_config():
  return ml_collections.ConfigDict({"seed": 3, "name": "tiny"})


def _iterator():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


def test_keeps_the_last_n_and_every_kth(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options())
  data = _iterator()
  for step in range(1, 10):
    next(data)
    assert checkpointer.save(step, _state(step), data, _run_config())
  checkpointer.close()
  assert ckpt_lib.Checkpointer(tmp_path, _options()).all_steps() == [4, 8, 9]


def test_round_trip_with_iterator_and_config(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options(async_save=False))
  data = _iterator()
  for _ in range(3):
    next(data)
  checkpointer.save(3, _state(3), data, _run_config())
  after = [next(data) for _ in range(2)]  # advancing after save() must not leak into it
  checkpointer.close()

  reader = ckpt_lib.Checkpointer(tmp_path, _options(), read_only=True)
  fresh = _iterator()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  restored = reader.restore(None, abstract, fresh)
  assert reader.latest_step() == 3
  for k, v in _state(3).items():
    assert restored[k].dtype == v.dtype and np.array_equal(restored[k], v)
  assert all(np.array_equal(next(fresh), a) for a in after)
  assert reader.restore_config() == _run_config().to_dict()


def test_restore_places_arrays_on_the_target_shardings(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options(async_save=False))
  checkpointer.save(1, _state(1), None, _run_config())
  checkpointer.close()
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4}))
  shardings = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp")),
               "step": mesh_lib.replicated(mesh)}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          _state(0), shardings)
  restored = ckpt_lib.Checkpointer(tmp_path, _options(), read_only=True).restore(1, abstract)
  assert restored["w"].sharding.is_equivalent_to(shardings["w"], 2)
  assert len(restored["w"].addressable_shards) == 8
  np.testing.assert_array_equal(restored["w"], _state(1)["w"])


def test_unfinished_saves_are_never_restored(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options(async_save=False))
  checkpointer.save(2, _state(2), None, _run_config())
  checkpointer.close()
  # What a save killed mid-write leaves behind: orbax's temporary directory for step 3.
  partial = tmp_path / "3.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("half written")
  reopened = ckpt_lib.Checkpointer(tmp_path, _options())
  assert reopened.latest_step() == 2 and reopened.all_steps() == [2]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  np.testing.assert_array_equal(reopened.restore(None, abstract)["w"], _state(2)["w"])
  reopened.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  reader = ckpt_lib.Checkpointer(tmp_path / "none", _options(), read_only=True)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    reader.restore(None, {})
