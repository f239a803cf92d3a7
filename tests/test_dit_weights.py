"""Official DiT checkpoints in our DiT (models/dit_weights.py), read without torch.

Checkpoints are written the way DiT's train.py writes them (`{"model", "ema", "opt", "args"}`
via `torch.save`) from the faithful PyTorch copy in `benchmarks/torch_dit.py`; with scalar
levels at matched log-SNR our outputs must equal PyTorch's, and `--config.init_from` makes
`configs/imagenet.py:dit,debug` (synthetic latents) train from them. The DiT-timestep embedding,
the refusal of foreign pickles and the mismatch errors need no torch.
"""

import argparse
import copy
import pathlib
import pickle
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "benchmarks"):
  if str(folder) not in sys.path:
    sys.path.insert(0, str(folder))

from asyncpatch_jax import torch_pickle  # noqa: E402
from asyncpatch_jax.diffusion.schedules import get_schedule  # noqa: E402
from asyncpatch_jax.models import dit_weights, embeddings  # noqa: E402
from asyncpatch_jax.models.dit import DiT  # noqa: E402
from asyncpatch_jax.train import mesh as mesh_lib  # noqa: E402
from asyncpatch_jax.train import optimizer as opt_lib  # noqa: E402
from asyncpatch_jax.train import state as state_lib  # noqa: E402
from asyncpatch_jax.train import trainer, validation  # noqa: E402
from configs import imagenet  # noqa: E402

SCHEDULE = get_schedule("cosine")
# DiT timesteps at which outputs are compared: both ends of DiT's range and a few between.
STEPS = np.array([0, 1, 17, 250, 500, 998, 999])


def _torch_dit(torch, *, hidden, depth, heads, patch, size, num_classes, learn_sigma=True,
               seed=0):
  """The PyTorch DiT with every parameter random (DiT zero-initialises its adaLN and output
  layers, which would hide any mapping error)."""
  torch_dit = pytest.importorskip("torch_dit")
  torch.manual_seed(seed)
  model = torch_dit.DiT(input_size=size, patch_size=patch, in_channels=4, hidden_size=hidden,
                        depth=depth, num_heads=heads, num_classes=num_classes,
                        learn_sigma=learn_sigma)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":
        p.normal_(0.0, 0.1 if p.ndim == 1 else p[0].numel() ** -0.5)
  return model.eval()


def _save_like_train_py(torch, ema, path):
  """DiT's train.py checkpoint: the trained model (here: the EMA perturbed), the EMA, AdamW's
  state after one step and the command line."""
  model = copy.deepcopy(ema).train()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "pos_embed":  # fixed, not trained
        p.add_(0.05)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
  size = int(ema.x_embedder.num_patches**0.5) * ema.patch_size
  model(torch.randn(2, 4, size, size), torch.tensor([3, 700]), torch.tensor([0, 1])).square(
      ).mean().backward()
  opt.step()  # the optimizer state then holds tensors too
  args = argparse.Namespace(model="DiT-S/2", image_size=256, num_classes=1000, global_seed=0,
                            vae="ema", epochs=1400)
  torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
              "args": args}, path)
  return model.eval()


def _ours(*, hidden, depth, heads, patch, size, num_classes, uncertainty, scan_layers=False):
  return DiT(data_shape=(size, size, 4), level_patch_size=patch, patch_size=patch,
             hidden_size=hidden, depth=depth, num_heads=heads, num_classes=num_classes,
             uncertainty=uncertainty, level_embedding="dit", schedule=SCHEDULE,
             scan_layers=scan_layers, rngs=nnx.Rngs(0))


def _torch_output(torch, model, x, steps, labels):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(steps),
                torch.from_numpy(labels))
  return out.numpy().transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# The DiT-timestep level embedding (no torch).


def test_dit_timestep_is_exact_at_dit_steps_monotone_and_clamped():
  log_snr = embeddings.dit_log_snr()
  assert log_snr.shape == (1000,) and np.all(np.diff(log_snr) < 0)
  assert log_snr[0] == pytest.approx(9.2102, abs=1e-4)
  assert log_snr[-1] == pytest.approx(-10.1177, abs=1e-4)
  steps = np.asarray(embeddings.dit_timestep(jnp.asarray(log_snr, jnp.float32)))
  np.testing.assert_allclose(steps, np.arange(1000), atol=2e-3)
  mid = np.asarray(embeddings.dit_timestep(jnp.asarray((log_snr[:-1] + log_snr[1:]) / 2)))
  assert np.all((mid > np.arange(999)) & (mid < np.arange(1, 1000)))
  clamped = embeddings.dit_timestep(jnp.asarray([30.0, 9.3, -10.2, -30.0]))
  np.testing.assert_array_equal(np.asarray(clamped), [0.0, 0.0, 999.0, 999.0])
  # Through a schedule: our level of DiT's log-SNR at step n reads as timestep n.
  t = SCHEDULE.t_from_log_snr(jnp.asarray(log_snr[STEPS], jnp.float32))
  np.testing.assert_allclose(np.asarray(embeddings.level_feature(t, "dit", SCHEDULE)), STEPS,
                             atol=2e-3)
  with pytest.raises(ValueError, match="needs the noise schedule"):
    embeddings.LevelEmbedding(8, kind="dit", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------
# Equality with PyTorch's DiT.

SIZES = {  # DiT-S/2 and DiT-B/4 at their widths and heads, shallow to stay fast
    "S/2": dict(hidden=384, depth=2, heads=6, patch=2, size=16),
    "B/4": dict(hidden=768, depth=1, heads=12, patch=4, size=16),
}


@pytest.mark.parametrize("name,uncertainty,scan_layers",
                         [("S/2", True, False), ("B/4", False, True)])
def test_outputs_equal_torch_dit_at_matched_log_snr(tmp_path, name, uncertainty, scan_layers):
  torch = pytest.importorskip("torch")
  dims = SIZES[name]
  ema = _torch_dit(torch, num_classes=10, **dims)
  trained = _save_like_train_py(torch, ema, tmp_path / "0400000.pt")
  ours = _ours(num_classes=10, uncertainty=uncertainty, scan_layers=scan_layers, **dims)
  notes = dit_weights.load_dit_checkpoint(ours, tmp_path / "0400000.pt")

  size = dims["size"]
  x = np.random.default_rng(1).normal(size=(len(STEPS), size, size, 4)).astype(np.float32)
  labels = np.array([0, 3, 9, 10, 1, 2, 10])  # 10: the null class of both
  t = SCHEDULE.t_from_log_snr(jnp.asarray(embeddings.dit_log_snr()[STEPS], jnp.float32))
  reference = _torch_output(torch, ema, x, STEPS, labels)
  assert reference.shape[-1] == 8 and np.abs(reference).mean() > 0.3  # not a near-zero output
  out = ours(jnp.asarray(x), t, jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(out.output), reference[..., :4], rtol=0, atol=1e-4)
  # The per-token path with homogeneous level maps computes the same function.
  grid = size // dims["patch"]
  t_map = jnp.broadcast_to(t[:, None, None], (len(STEPS), grid, grid))
  dense = ours(jnp.asarray(x), t_map, jnp.asarray(labels), deterministic=False)
  np.testing.assert_allclose(np.asarray(dense.output), reference[..., :4], rtol=0, atol=1e-4)
  if uncertainty:  # the head starts at zero: the calibrated ε-error scale σ²/α²
    assert out.log_variance is not None and np.isfinite(np.asarray(out.log_variance)).all()
  # The EMA was read, not the trained model (which differs by 0.05 in every parameter).
  other = _torch_output(torch, trained, x, STEPS, labels)
  assert np.abs(other[..., :4] - reference[..., :4]).max() > 0.05
  assert "ema weights" in notes[0] and "'model': 'DiT-S/2'" in notes[0]
  assert "dropped DiT's learned-σ outputs" in notes[1]


def test_export_round_trips_and_loads_into_torch_strictly(tmp_path):
  torch = pytest.importorskip("torch")
  dims = SIZES["S/2"] | {"depth": 1}
  plain = _torch_dit(torch, num_classes=10, learn_sigma=False, **dims)
  torch.save(plain.state_dict(), tmp_path / "released.pt")  # a released file: a state dict
  checkpoint = dit_weights.read_checkpoint(tmp_path / "released.pt")
  assert checkpoint.source == "state dict" and checkpoint.args == {}
  ours = _ours(num_classes=10, uncertainty=True, scan_layers=True, **dims)
  params, notes = dit_weights.dit_params(checkpoint, ours)
  assert "no learned σ; the uncertainty head starts from zero" in notes[1]
  nnx.update(ours, jax.tree.map(jnp.asarray, params))
  exported = dit_weights.dit_state_dict(ours, learn_sigma=False)
  expected = plain.state_dict()
  assert sorted(exported) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(exported[key], value.numpy(), rtol=0, atol=1e-6, err_msg=key)
  # With learned σ: DiT's own model loads it strictly; its σ outputs are zero.
  sigma = _torch_dit(torch, num_classes=10, learn_sigma=True, seed=1, **dims)
  sigma.load_state_dict({k: torch.from_numpy(v) for k, v in
                         dit_weights.dit_state_dict(ours).items()}, strict=True)
  x = np.random.default_rng(2).normal(size=(2, 16, 16, 4)).astype(np.float32)
  out = _torch_output(torch, sigma, x, np.array([10, 600]), np.array([1, 10]))
  np.testing.assert_allclose(out[..., :4], _torch_output(
      torch, plain, x, np.array([10, 600]), np.array([1, 10])), atol=1e-5)
  np.testing.assert_array_equal(out[..., 4:], 0.0)


# ---------------------------------------------------------------------------------------------
# Refusals (no torch).


def test_a_pickle_with_code_is_refused_by_name_and_never_runs(tmp_path):
  marker = tmp_path / "ran"
  command = f"touch {marker}".encode()
  payload = (b"\x80\x02cos\nsystem\nX" + len(command).to_bytes(4, "little") + command
             + b"q\x00\x85R.")
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match=r"global os\.system"):
    dit_weights.read_checkpoint(path)
  assert not marker.exists()


def test_a_checkpoint_carrying_other_objects_is_refused_naming_them(tmp_path):
  torch = pytest.importorskip("torch")
  import collections

  state = {"pos_embed": torch.zeros(1, 4, 8)}
  torch.save({"ema": state, "extra": collections.Counter("ab")}, tmp_path / "counter.pt")
  with pytest.raises(pickle.UnpicklingError, match=r"global collections\.Counter"):
    dit_weights.read_checkpoint(tmp_path / "counter.pt")
  torch.save({"ema": state, "hook": print}, tmp_path / "builtin.pt")
  with pytest.raises(pickle.UnpicklingError, match=r"global __builtin__\.print"):
    dit_weights.read_checkpoint(tmp_path / "builtin.pt")


def test_not_a_checkpoint_is_refused(tmp_path):
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="legacy format"):
    dit_weights.read_checkpoint(legacy)
  path = tmp_path / "numbers.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("numbers/data.pkl", pickle.dumps({"steps": 3, "lr": 0.1}, protocol=2))
  with pytest.raises(ValueError, match=r"holds a dict with entries \['lr', 'steps'\]"):
    dit_weights.read_checkpoint(path)
  assert torch_pickle.load(path) == {"steps": 3, "lr": 0.1}


def _random_state_dict(ours: DiT, learn_sigma: bool = True) -> dict[str, np.ndarray]:
  """A state dict of DiT's names and shapes for `ours` (random values), via the export."""
  params = nnx.state(ours, nnx.Param)
  leaves = jax.tree.leaves(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(ours, jax.tree.unflatten(jax.tree.structure(params), [
      jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  return dit_weights.dit_state_dict(ours, learn_sigma=learn_sigma)


def test_mismatched_checkpoints_name_the_file_architecture_and_each_tensor():
  dims = dict(hidden=32, depth=2, heads=2, patch=2, size=8)
  ours = _ours(num_classes=10, uncertainty=False, **dims)
  tensors = _random_state_dict(ours)
  checkpoint = dit_weights.DiTCheckpoint(tensors, "ema", {}, "x.pt")
  deeper = _ours(num_classes=10, uncertainty=False, **(dims | {"depth": 3}))
  with pytest.raises(ValueError) as error:
    dit_weights.dit_params(checkpoint, deeper)
  message = str(error.value)
  assert "the file: DiT with hidden size 32, depth 2, patch 2, 4 input channels (8 out, " \
         "learned σ), 10 classes, 16 tokens (8×8×4 inputs)" in message
  assert "the config: DiT with hidden size 32, depth 3" in message
  assert "10 missing: blocks.2.adaLN_modulation.1.bias; blocks.2.adaLN_modulation.1.weight" \
         in message
  wider = _ours(num_classes=10, uncertainty=False, **(dims | {"hidden": 64}))
  with pytest.raises(ValueError, match=r"31 mis-shaped: blocks\.0\.adaLN_modulation\.1\.bias: "
                     r"file \[192\], our blocks/0/adaln/bias needs \[384\] in our layout; .*"
                     r"; … \(19 more\)"):
    dit_weights.dit_params(checkpoint, wider)
  extra = dit_weights.DiTCheckpoint(tensors | {"blocks.0.attn.rel_pos": np.zeros(3)}, "ema", {})
  with pytest.raises(ValueError, match=r"1 unexpected: blocks\.0\.attn\.rel_pos"):
    dit_weights.dit_params(extra, ours)
  moved = dict(tensors, pos_embed=tensors["pos_embed"] + 0.1)
  with pytest.raises(ValueError, match="not DiT's fixed sin-cos embedding"):
    dit_weights.dit_params(dit_weights.DiTCheckpoint(moved, "ema", {}), ours)
  single = DiT(data_shape=(8, 8, 4), level_patch_size=2, hidden_size=32, depth=2, num_heads=2,
               num_classes=10, adaln="single", level_embedding="dit", schedule=SCHEDULE,
               rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="adaln='block'"):
    dit_weights.dit_params(checkpoint, single)


# ---------------------------------------------------------------------------------------------
# --config.init_from: configs/imagenet.py:dit,debug trains from imported weights.


def _init_from_config(path):
  """`configs/imagenet.py:dit,debug` on synthetic latents, started from the DiT file `path`."""
  config = imagenet.get_config("dit,debug")
  config.data.source = "synthetic"
  config.init_from = str(path)
  config.model.level_embedding = "dit"
  config.model.dit.adaln = "block"  # DiT's weights need DiT's adaLN (the config's is adaLN-single)
  return config


@pytest.mark.slow  # a few minutes on two shared cores: 4 train steps, checkpoints, samples
def test_init_from_trains_imagenet_debug_from_dit_weights(tmp_path):
  torch = pytest.importorskip("torch")
  config = _init_from_config(tmp_path / "dit.pt")
  # The debug DiT: hidden 32, depth 2, 2 heads, patch 2 on 4×4×4 latents, 1000 classes.
  ema = _torch_dit(torch, hidden=32, depth=2, heads=2, patch=2, size=4, num_classes=1000)
  _save_like_train_py(torch, ema, config.init_from)
  setup = state_lib.setup_state(
      config, mesh_lib.make_mesh(config.mesh),
      opt_lib.make_optimizer(config.optimizer, config.num_steps))
  start = trainer.start_from_dit(config, setup)
  abstract = setup.model_def.merge(setup.abstract.params, setup.abstract.model_state)
  imported, _ = dit_weights.dit_params(dit_weights.read_checkpoint(config.init_from), abstract)
  assert int(start.step) == 0
  for tree in (start.params, *start.ema.values()):
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(imported)):
      np.testing.assert_array_equal(np.asarray(got), want)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(start.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))  # Adam's moments start at zero

  state = trainer.train_and_evaluate(config, tmp_path / "run")
  assert int(state.step) == config.num_steps == 4
  # Four AdamW steps of at most ~lr each move every weight by little: trained from the import.
  moved = [np.abs(np.asarray(got) - want).max()
           for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(imported))]
  assert 0 < max(moved) < 10 * config.optimizer.learning_rate


def test_init_from_is_checked_before_compiling(tmp_path, monkeypatch):
  config = _init_from_config(tmp_path / "missing.pt")
  def refuse(*args, **kwargs):
    raise AssertionError("compiled before the input was checked")
  monkeypatch.setattr(jax, "jit", refuse)
  with pytest.raises(validation.ConfigError, match=r"missing\.pt' is not a file; download"):
    trainer.train_and_evaluate(config, tmp_path / "run")
  (tmp_path / "missing.pt").write_bytes(b"")
  validation.validate_config(config)
  for field, value, message in (
      ("level_embedding", "t", "set model.level_embedding='dit'"),
      ("dit.adaln", "single", "model.dit.adaln='block'"),
      ("parametrization", "v", "DiT predicts ε"),
      ("name", "unet", "set model.name='dit'")):
    bad = config.copy_and_resolve_references()
    bad.update_from_flattened_dict({f"model.{field}": value})
    with pytest.raises(validation.ConfigError, match=message):
      validation.validate_config(bad)
