"""train/checkpoint.py on small pytrees: retention (keep N + every K), atomicity, the iterator
position, and restoring onto shardings."""

import shutil

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


def _biggest_array_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
              and p.parent.parent.name.startswith("ocdbt")), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _biggest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip_one_byte(step_dir):  # decodes without error: only the checksum sees it
  path = _biggest_array_file(step_dir)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _delete_state(step_dir):
  shutil.rmtree(step_dir / "state")


def _delete_data(step_dir):
  shutil.rmtree(step_dir / "data")


def _garbage_iterator_json(step_dir):
  next((step_dir / "data").glob("process_*.json")).write_text("{garbage")


def _garbage_array_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{not json")


def _big_state(step):  # large enough that orbax writes the array to its own data file
  return {"w": jnp.arange(4096.0).reshape(64, 64) * step, "step": jnp.int32(step)}


def _saved_three(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options(max_to_keep=5, async_save=False))
  data = _iterator()
  for step in (1, 2, 3):
    next(data)
    checkpointer.save(step, _big_state(step), data, _run_config())
  checkpointer.close()


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _big_state(0))


@pytest.mark.parametrize("damage", [_truncate, _flip_one_byte, _delete_state, _delete_data,
                                    _garbage_iterator_json, _garbage_array_metadata],
                         ids=lambda f: f.__name__.strip("_"))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, damage, caplog):
  _saved_three(tmp_path)
  damage(tmp_path / "3")
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options(max_to_keep=5, async_save=False))
  data = _iterator()
  with caplog.at_level("WARNING"):
    state, step = checkpointer.restore_latest_good(_abstract(), data)
  assert step == 2
  for k, v in _big_state(2).items():
    np.testing.assert_array_equal(state[k], v)
  np.testing.assert_array_equal(next(data), [8, 9, 10, 11])  # the iterator of step 2, too
  assert "step 3" in caplog.text and "does not restore" in caplog.text
  # Moved aside, so the next start does not try it again and step 3 can be saved anew.
  assert (tmp_path / "3.corrupt").is_dir() and checkpointer.all_steps() == [1, 2]
  checkpointer.save(3, _big_state(3), data, _run_config())
  checkpointer.close()
  reopened = ckpt_lib.Checkpointer(tmp_path, _options(max_to_keep=5), read_only=True)
  assert reopened.restore_latest_good(_abstract())[1] == 3


def test_read_only_fallback_moves_nothing(tmp_path):
  _saved_three(tmp_path)
  _truncate(tmp_path / "3")
  reader = ckpt_lib.Checkpointer(tmp_path, _options(), read_only=True)
  assert reader.restore_latest_good(_abstract())[1] == 2
  assert reader.all_steps() == [1, 2, 3] and not (tmp_path / "3.corrupt").exists()


def test_no_restorable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path):
  _saved_three(tmp_path)
  checkpointer = ckpt_lib.Checkpointer(tmp_path, _options(max_to_keep=5))
  wrong = {"w": jax.ShapeDtypeStruct((3, 3), jnp.float32),  # e.g. the config changed
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  with pytest.raises(ckpt_lib.CheckpointError, match=r"none of the 3 checkpoints.*step 3:"):
    checkpointer.restore(None, wrong)
  assert checkpointer.all_steps() == [1, 2, 3] and not list(tmp_path.glob("*.corrupt"))
  checkpointer.close()


def test_state_fingerprint_sees_any_single_change():
  tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.array([True, False]),
          "k": jax.random.key(0), "i": jnp.arange(5, dtype=jnp.int8)}
  base = ckpt_lib.state_fingerprint(tree)
  assert set(base) == {"['a']", "['b']", "['k']", "['i']"}
  swapped = dict(tree, a=tree["a"][::-1])  # same values, other positions
  assert ckpt_lib.state_fingerprint(swapped)["['a']"] != base["['a']"]
  nudged = dict(tree, a=tree["a"].at[2, 3].set(jnp.nextafter(11.0, 12.0)))
  assert ckpt_lib.state_fingerprint(nudged)["['a']"] != base["['a']"]
  assert ckpt_lib.state_fingerprint(dict(tree, k=jax.random.key(1)))["['k']"] != base["['k']"]
  assert ckpt_lib.state_fingerprint(dict(tree, b=~tree["b"]))["['b']"] != base["['b']"]
