"""The official DiT checkpoints (facebookresearch/DiT) in our DiT, and our DiT back as one.

Files: the released `DiT-XL-2-256x256.pt` / `DiT-XL-2-512x512.pt` hold a state dict; those
written by DiT's `train.py` hold `{"model", "ema", "opt", "args"}` (`args` an
`argparse.Namespace`). Both are `torch.save` zips, read here by `torch_pickle` without torch and
without running pickled code: only tensor storage, ordered dicts and `argparse.Namespace` (read
as a dict) are admitted, and any other global is refused by name. The `ema` weights are used
when present (DiT samples from them), else `model`.

Our DiT with `adaln='block'` computes DiT's function, so every tensor has a place:

  x_embedder.proj            patch_embed           conv [d, C, p, p] → kernel [p·p·C, d]
  t_embedder.mlp.0 / .2      level_embed.fc1 / fc2
  y_embedder.embedding_table class_embed           [num_classes + 1, d]: the last row is the
                                                   null class in both
  blocks.i.attn.qkv / proj, blocks.i.mlp.fc1 / fc2, blocks.i.adaLN_modulation.1 (→ .adaln)
  final_layer.adaLN_modulation.1 → final.adaln, final_layer.linear → final.linear
  pos_embed                  (not a parameter: our sin-cos embedding is computed; checked equal)

Linear weights `[out, in]` become kernels `[in, out]`. Names and shapes are checked: a missing,
unexpected or mis-shaped tensor is an error that lists them next to the file's architecture.

Learned σ: DiT's last layer has 2C output channels per pixel, ε then the interpolation `v` of
its reverse-process log-variance between log β_t and log β̃_t. Our uncertainty head's channels
mean something else (the log squared error of the prediction), so `v`'s weights are dropped
(and said so); with `uncertainty=True` the head starts from zero, its calibrated start.

Levels: DiT's timestep embedder was trained on the integer timesteps of its 1000-step linear-β
schedule; `level_embedding='dit'` (models/embeddings.py) feeds it the timestep of equal log-SNR,
so with scalar levels our outputs are DiT's at matched log-SNR.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from asyncpatch_jax import torch_pickle
from asyncpatch_jax.models.dit import DiT, sincos_position_embedding

CHECKPOINT_GLOBALS = {**torch_pickle.TENSOR_GLOBALS, **torch_pickle.NAMESPACE_GLOBALS}
# Our module path (blocks' index left out) → DiT's; parameter leaf → DiT's.
_MODULES = {
    "patch_embed": "x_embedder.proj", "level_embed.fc1": "t_embedder.mlp.0",
    "level_embed.fc2": "t_embedder.mlp.2", "class_embed": "y_embedder.embedding_table",
    "final.adaln": "final_layer.adaLN_modulation.1", "final.linear": "final_layer.linear",
    "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "adaln": "adaLN_modulation.1",
}
_LEAVES = {"kernel": "weight", "embedding": "weight", "bias": "bias"}
_POS_EMBED_ATOL = 1e-5


@dataclasses.dataclass(frozen=True)
class DiTCheckpoint:
  """A DiT checkpoint's weights (DiT state-dict names, PyTorch layouts) and where they came from.

  `source`: 'ema' or 'model' (a `train.py` checkpoint's entry), or 'state dict' (a released
  file); `args`: `train.py`'s command line ({} for released files).
  """

  tensors: dict[str, np.ndarray]
  source: str
  args: dict[str, Any]
  path: str = ""


def _is_state_dict(value: Any) -> bool:
  return isinstance(value, Mapping) and bool(value) and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())


def read_checkpoint(path: str | os.PathLike[str]) -> DiTCheckpoint:
  """The DiT weights in a `torch.save` file: its `ema` entry, else `model`, else the file's
  state dict itself. Refuses (`pickle.UnpicklingError`) a file naming any global but tensor
  storage, ordered dicts and `argparse.Namespace`; runs nothing from it."""
  path = os.fspath(path)
  obj = torch_pickle.load(path, CHECKPOINT_GLOBALS)
  if _is_state_dict(obj):
    return DiTCheckpoint(dict(obj), "state dict", {}, path)
  if isinstance(obj, Mapping):
    args = obj.get("args")
    for source in ("ema", "model"):
      if _is_state_dict(obj.get(source)):
        return DiTCheckpoint(dict(obj[source]), source,
                             dict(args) if isinstance(args, Mapping) else {}, path)
  what = f"a dict with entries {sorted(map(str, obj))}" if isinstance(obj, Mapping) else (
      f"an object of type {type(obj).__name__}")
  raise ValueError(f"{path} holds {what}; a DiT checkpoint is a state dict of tensors or "
                   f"DiT train.py's dict with an 'ema' or 'model' state dict")


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a DiT state dict's shapes say about the network that wrote it."""

  hidden_size: int
  depth: int
  patch_size: int
  in_channels: int
  out_channels: int
  num_classes: int
  num_tokens: int

  @property
  def learn_sigma(self) -> bool:
    return self.out_channels == 2 * self.in_channels

  def describe(self) -> str:
    side = round(self.num_tokens**0.5) * self.patch_size
    return (f"DiT with hidden size {self.hidden_size}, depth {self.depth}, patch "
            f"{self.patch_size}, {self.in_channels} input channels ({self.out_channels} out"
            f"{', learned σ' if self.learn_sigma else ''}), {self.num_classes} classes, "
            f"{self.num_tokens} tokens ({side}×{side}×{self.in_channels} inputs)")


def architecture(tensors: Mapping[str, np.ndarray]) -> Architecture:
  """The architecture of a DiT state dict, from the shapes of a few of its tensors."""
  needed = ("x_embedder.proj.weight", "final_layer.linear.weight",
            "y_embedder.embedding_table.weight", "pos_embed")
  missing = [k for k in needed if k not in tensors]
  if missing:
    raise ValueError(f"not a DiT state dict: no {missing} (found {len(tensors)} tensors, e.g. "
                     f"{sorted(tensors)[:5]})")
  hidden, in_channels, patch, _ = tensors["x_embedder.proj.weight"].shape
  depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
  return Architecture(
      hidden_size=int(hidden), depth=depth, patch_size=int(patch), in_channels=int(in_channels),
      out_channels=int(tensors["final_layer.linear.weight"].shape[0]) // patch**2,
      num_classes=int(tensors["y_embedder.embedding_table.weight"].shape[0]) - 1,
      num_tokens=int(tensors["pos_embed"].shape[1]))


def dit_name(path: tuple[Any, ...]) -> str:
  """Our parameter path (unrolled blocks: `('blocks', 3, 'attn', 'qkv', 'kernel')`) → DiT's
  state-dict key (`blocks.3.attn.qkv.weight`)."""
  *modules, leaf = (str(p) for p in path)
  prefix = ""
  if modules[0] == "blocks":
    prefix, modules = f"blocks.{modules[1]}.", modules[2:]
  return f"{prefix}{_MODULES['.'.join(modules)]}.{_LEAVES[leaf]}"


def _check_model(model: DiT) -> None:
  if not isinstance(model, DiT) or model.adaln != "block":
    raise ValueError("DiT checkpoints map onto our DiT with adaln='block' (DiT's adaLN-Zero); "
                     "set model.name='dit' and model.dit.adaln='block'")
  if len(model.grid) != 2:
    raise ValueError(f"DiT checkpoints are for 2-D inputs; this DiT's inputs are "
                     f"{model.data_shape}")


def _final_channels(model: DiT) -> int:
  return model.out_features // model.patch_size**2


def _to_ours(name: str, value: np.ndarray, model: DiT) -> np.ndarray:
  """A DiT tensor in our parameter's layout (shapes are checked by the caller)."""
  p, c = model.patch_size, model.channels
  if name == "x_embedder.proj.weight":  # conv [d, C, p, p] → the patchified [p·p·C, d]
    return value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0]) if value.ndim == 4 else value
  if name.startswith("final_layer.linear.") and value.shape[0] % (p * p) == 0:
    # [p²·C_file, (d)] → ε's C channels of each pixel, then zeros for our uncertainty head.
    per_pixel = value.reshape(p * p, value.shape[0] // (p * p), *value.shape[1:])[:, :c]
    if _final_channels(model) == 2 * c:
      per_pixel = np.concatenate([per_pixel, np.zeros_like(per_pixel)], axis=1)
    value = per_pixel.reshape(-1, *value.shape[1:])
  return value.T if value.ndim == 2 and name != "y_embedder.embedding_table.weight" else value


def dit_params(checkpoint: DiTCheckpoint, model: DiT) -> tuple[nnx.State, list[str]]:
  """Our DiT's `nnx.Param` state (numpy float32 leaves, the model's tree) from a DiT checkpoint,
  and notes on what was read, dropped or started fresh. `model` may be abstract
  (`nnx.eval_shape`): only its structure and shapes are read.

  Every tensor of the file is either mapped, or checked (`pos_embed`), or dropped with a note
  (learned σ); anything else is an error listing every mismatch.
  """
  _check_model(model)
  tensors = dict(checkpoint.tensors)
  found = architecture(tensors)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  missing, misshaped, leaves = [], [], []
  for path, var in flat:
    path = tuple(path)
    stacked = model.scan_layers and path[0] == "blocks"  # a leading depth axis
    per_layer = [(path[0], i, *path[1:]) for i in range(model.depth)] if stacked else [path]
    want = tuple(var.shape[1:] if stacked else var.shape)
    values = []
    for one in per_layer:
      name = dit_name(one)
      if name not in tensors:
        missing.append(name)
        continue
      value = _to_ours(name, np.asarray(tensors.pop(name), np.float32), model)
      if value.shape != want:
        misshaped.append(f"{name}: file {list(checkpoint.tensors[name].shape)}, our "
                         f"{'/'.join(map(str, one))} needs {list(want)} in our layout")
        continue
      values.append(value)
    complete = len(values) == len(per_layer)
    leaves.append(None if not complete else np.stack(values) if stacked else values[0])
  pos = tensors.pop("pos_embed", None)
  want_pos = sincos_position_embedding(model.grid, model.hidden_size)[None]
  if pos is not None and pos.shape != want_pos.shape:
    misshaped.append(f"pos_embed: file {list(pos.shape)}, this DiT needs {list(want_pos.shape)}")
  elif pos is not None and not np.allclose(pos, want_pos, atol=_POS_EMBED_ATOL):
    misshaped.append("pos_embed: not DiT's fixed sin-cos embedding (ours is computed, not "
                     "learned)")
  unexpected = sorted(tensors)
  if missing or misshaped or unexpected:
    ours = Architecture(model.hidden_size, model.depth, model.patch_size, model.channels,
                        _final_channels(model), model.num_classes, model.num_tokens)
    lines = [f"DiT checkpoint {checkpoint.path or '(tensors)'} ({checkpoint.source}) does not "
             f"fit the configured network:", f"  the file: {found.describe()}",
             f"  the config: {ours.describe()}",
             "  (set model.dit.size / hidden_size, depth, num_heads, patch, "
             "model.num_classes and data.image_size to match the file)"]
    for title, items in (("missing", missing), ("mis-shaped", misshaped),
                         ("unexpected", unexpected)):
      if items:
        lines.append(f"  {len(items)} {title}: " + "; ".join(items[:12])
                     + (f"; … ({len(items) - 12} more)" if len(items) > 12 else ""))
    raise ValueError("\n".join(lines))
  for (_, var), leaf in zip(flat, leaves):
    var.set_value(leaf.astype(var.dtype))
  notes = [f"read {found.describe()} from {checkpoint.path or 'tensors'} ({checkpoint.source} "
           f"weights{'; train.py args ' + str(checkpoint.args) if checkpoint.args else ''})"]
  if found.learn_sigma:
    notes.append(
        "dropped DiT's learned-σ outputs (the second half of final_layer.linear: its reverse-"
        "process variance, not our head's log squared error); "
        + ("the uncertainty head starts from zero (its calibrated start)" if model.uncertainty
           else "this model has no uncertainty head"))
  elif model.uncertainty:
    notes.append("the file has no learned σ; the uncertainty head starts from zero")
  return flat.to_nested_state(), notes


def load_dit_checkpoint(model: DiT, path: str | os.PathLike[str]) -> list[str]:
  """Loads a DiT checkpoint into a concrete `model` in place; returns the notes of
  `dit_params`."""
  params, notes = dit_params(read_checkpoint(path), model)
  nnx.update(model, jax.tree.map(jnp.asarray, params))
  return notes


def dit_state_dict(model: DiT, *, learn_sigma: bool = True) -> dict[str, np.ndarray]:
  """Our DiT as a DiT state dict (numpy, PyTorch layouts): `{k: torch.from_numpy(v)}` loads
  into DiT's `DiT(..., learn_sigma=learn_sigma)` with `strict=True`.

  For scalar-level use with DiT's own sampler, so the model must read levels as DiT timesteps
  (`level_embedding='dit'`) and predict ε. Our uncertainty head is not exported; with
  `learn_sigma` the σ outputs are zero, i.e. `v = 0`: DiT's sampler then uses the log-variance
  midway between log β_t and log β̃_t.
  """
  _check_model(model)
  if model.level_embed.kind != "dit" or model.parametrization != "eps":
    raise ValueError(f"exporting to DiT needs level_embedding='dit' and parametrization='eps' "
                     f"(DiT's timesteps and ε); this model has {model.level_embed.kind!r} and "
                     f"{model.parametrization!r}")
  p, c, d = model.patch_size, model.channels, model.hidden_size
  out = {"pos_embed": sincos_position_embedding(model.grid, d)[None]}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(jax.device_get(var.get_value()), np.float32)
    path = tuple(path)
    layers = ([(path, value)] if not (model.scan_layers and path[0] == "blocks") else
              [((path[0], i, *path[1:]), value[i]) for i in range(model.depth)])
    for one, v in layers:
      name = dit_name(one)
      if name.startswith("final_layer.linear."):
        per_pixel = v.reshape(*v.shape[:-1], p * p, -1)[..., :c]  # ε channels only
        if learn_sigma:
          per_pixel = np.concatenate([per_pixel, np.zeros_like(per_pixel)], axis=-1)
        v = per_pixel.reshape(*v.shape[:-1], -1)
      if name == "x_embedder.proj.weight":
        v = v.reshape(p, p, c, d).transpose(3, 2, 0, 1)
      elif v.ndim == 2 and name != "y_embedder.embedding_table.weight":
        v = v.T
      out[name] = np.array(v, order="C")  # a writable copy (torch.from_numpy wants one)
  return out
