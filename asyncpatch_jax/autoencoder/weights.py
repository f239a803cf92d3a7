"""Loading the public SD VAE weights (safetensors) into `AutoencoderKL`, without torch.

Where to get the weights: the Hugging Face repositories `stabilityai/sd-vae-ft-ema` and
`stabilityai/sd-vae-ft-mse` each hold `diffusion_pytorch_model.safetensors` (335 MB, float32):

    https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors
    https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors

(or `huggingface-cli download stabilityai/sd-vae-ft-ema diffusion_pytorch_model.safetensors`).
DiT and fast-DiT use `ft-ema` for ImageNet; either works with the same scaling factor 0.18215.

Accepted key layouts, recognised per tensor:
- diffusers (`encoder.down_blocks.0.resnets.0.conv1.weight`,
  `decoder.mid_block.attentions.0.to_q.weight`, …), including the older attention names
  `query` / `key` / `value` / `proj_attn` that the `sd-vae-ft-*` files were saved with;
- the original CompVis / LDM names (`encoder.down.0.block.0.conv1.weight`,
  `encoder.mid.attn_1.q.weight`, `nin_shortcut`, …) of `vae-ft-mse-840000-ema-pruned.safetensors`,
  optionally under the `first_stage_model.` prefix of a full SD checkpoint (other keys of such a
  checkpoint are then ignored).
Conv weights OIHW → HWIO, linear weights [out, in] (or 1×1 conv [out, in, 1, 1]) → [in, out],
GroupNorm weight → scale. A file with missing, unexpected or mis-shaped tensors is a ValueError
that lists them.

Files are read and written with the `safetensors` library (numpy API, memory-mapped reads);
float16 and bfloat16 files load too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import nnx

from asyncpatch_jax import file_io
from asyncpatch_jax.autoencoder.vae import SD_VAE, AutoencoderKL, VAEConfig, abstract_vae

HF_REPOS = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
HF_FILENAME = "diffusion_pytorch_model.safetensors"

class WeightsNotFoundError(FileNotFoundError):
  """The VAE weights file is missing; the message says where to download it."""


def missing_weights_message(path: str) -> str:
  urls = "\n".join(f"  https://huggingface.co/{r}/resolve/main/{HF_FILENAME}" for r in HF_REPOS)
  return (f"VAE weights file {path!r} not found. Download Stable Diffusion's VAE "
          f"(ft-EMA is DiT's choice for ImageNet; ft-MSE also works) from\n{urls}\n"
          f"(or `huggingface-cli download stabilityai/sd-vae-ft-ema {HF_FILENAME}`) and pass its "
          f"path.")


# ---------------------------------------------------------------------------------------------
# The safetensors format.


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of a safetensors file as numpy arrays, and its `__metadata__`.

  Read with the `safetensors` library (memory-mapped, with its checks of the header and byte
  ranges); a damaged or foreign file is a ValueError naming the path. A bucket URL is read from
  a temporary local copy (`file_io.local_file`; safetensors opens local files only).
  """
  path = os.fspath(path)
  try:
    with (file_io.local_file(path) as local,
          safetensors.safe_open(local, framework="np") as f):
      metadata = f.metadata() or {}
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path}: not a safetensors file, or a damaged one ({e})") from e
  return tensors, dict(metadata)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` with the `safetensors` library, atomically (`file_io.atomic_path`)."""
  arrays = {}
  for name, value in tensors.items():
    a = np.ascontiguousarray(value)
    arrays[name] = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
  metadata = {str(k): str(v) for k, v in (metadata or {}).items()} or None
  try:
    with file_io.atomic_path(path) as tmp:
      safetensors.numpy.save_file(arrays, os.fspath(tmp), metadata=metadata)
  except (safetensors.SafetensorError, ValueError, TypeError) as e:
    raise ValueError(f"cannot store these tensors in safetensors: {e}") from e


def file_sha256(path: str | os.PathLike, chunk: int = 2**24) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Key mapping.


def diffusers_key(path: tuple[Any, ...]) -> str:
  """The diffusers name of the NNX parameter at `path` (`to_out` is diffusers' `to_out.0`)."""
  *modules, leaf = (str(p) for p in path)
  modules = [m if m != "to_out" else "to_out.0" for m in modules]
  return ".".join([*modules, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(flax_shape) == 4:  # conv HWIO → OIHW
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:  # linear [in, out] → [out, in]
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def expected_tensors(config: VAEConfig = SD_VAE) -> dict[str, tuple[int, ...]]:
  """diffusers key → tensor shape (PyTorch layout) of every parameter of the architecture."""
  state = nnx.state(abstract_vae(config), nnx.Param)
  return {diffusers_key(tuple(p)): _torch_shape(tuple(v.shape))
          for p, v in nnx.to_flat_state(state)}


_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(\w+)$")
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}


def _from_ldm(key: str, num_blocks: int) -> str | None:
  """The diffusers name of a CompVis / LDM VAE key, or None if it is not one."""
  parts = key.split(".")
  if parts[0] not in ("encoder", "decoder") or len(parts) < 3:
    return None
  side, rest = parts[0], parts[1:]
  if rest[0] in ("norm_out",):
    return ".".join([side, "conv_norm_out", *rest[1:]])
  if rest[0] == "mid" and len(rest) >= 3:
    if rest[1] in ("block_1", "block_2"):
      resnet = ".".join(rest[2:]).replace("nin_shortcut", "conv_shortcut")
      return f"{side}.mid_block.resnets.{int(rest[1][-1]) - 1}.{resnet}"
    if rest[1] == "attn_1" and rest[2] in _LDM_ATTENTION:
      return ".".join([side, "mid_block.attentions.0", _LDM_ATTENTION[rest[2]], *rest[3:]])
    return None
  if rest[0] in ("down", "up") and len(rest) >= 4 and rest[1].isdigit():
    level = int(rest[1])
    if rest[0] == "up":  # LDM counts decoder levels from the finest; diffusers from the coarsest
      block = f"up_blocks.{num_blocks - 1 - level}"
    else:
      block = f"down_blocks.{level}"
    if rest[2] == "block" and rest[3].isdigit():
      tail = ".".join(rest[4:]).replace("nin_shortcut", "conv_shortcut")
      return f"{side}.{block}.resnets.{rest[3]}.{tail}"
    if rest[2] in ("downsample", "upsample"):
      return ".".join([side, block, f"{rest[2]}rs.0", *rest[3:]])
  return None


def _to_ldm(key: str, num_blocks: int) -> str:
  """The CompVis / LDM name of a diffusers VAE key (the inverse of `_from_ldm`)."""
  parts = key.split(".")
  side, rest = parts[0], parts[1:]
  if side not in ("encoder", "decoder"):
    return key
  if rest[0] == "conv_norm_out":
    return ".".join([side, "norm_out", *rest[1:]])
  if rest[0] == "mid_block":
    if rest[1] == "resnets":
      tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
      return f"{side}.mid.block_{int(rest[2]) + 1}.{tail}"
    name = {v: k for k, v in _LDM_ATTENTION.items()}[
        "to_out.0" if rest[3] == "to_out" else rest[3]]
    return ".".join([side, "mid.attn_1", name, *rest[5 if rest[3] == "to_out" else 4:]])
  if rest[0] in ("down_blocks", "up_blocks"):
    level = int(rest[1]) if rest[0] == "down_blocks" else num_blocks - 1 - int(rest[1])
    kind = "down" if rest[0] == "down_blocks" else "up"
    if rest[2] == "resnets":
      tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
      return f"{side}.{kind}.{level}.block.{rest[3]}.{tail}"
    return ".".join([side, kind, str(level), f"{kind}sample", *rest[4:]])
  return key


def canonical_key(key: str, num_blocks: int = 4) -> str:
  """A file's tensor name in current diffusers naming (old attention and LDM names mapped)."""
  match = _OLD_ATTENTION_RE.match(key)
  if match:
    return f"{match.group(1)}.{_OLD_ATTENTION[match.group(2)]}.{match.group(3)}"
  return _from_ldm(key, num_blocks) or key


def to_ldm_names(tensors: Mapping[str, np.ndarray], num_blocks: int = 4) -> dict[str, np.ndarray]:
  """diffusers-named tensors renamed to CompVis / LDM names (attention weights as 1×1 convs)."""
  out = {}
  for key, value in tensors.items():
    if ".attentions." in key and key.endswith(".weight") and value.ndim == 2:
      value = value[:, :, None, None]
    out[_to_ldm(key, num_blocks)] = value
  return out


def to_old_attention_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """diffusers-named tensors with the attention layers renamed to `query/key/value/proj_attn`."""
  new = {v: k for k, v in _OLD_ATTENTION.items()}
  out = {}
  for key, value in tensors.items():
    for name, old in new.items():
      key = key.replace(f".{name}.", f".{old}.")
    out[key] = value
  return out


# ---------------------------------------------------------------------------------------------
# Loading and saving.


def _select(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A full SD checkpoint's VAE: the `first_stage_model.` tensors with the prefix removed."""
  prefix = "first_stage_model."
  if any(k.startswith(prefix) for k in tensors):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  return dict(tensors)


def _convert(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
  """A PyTorch-layout tensor in the NNX parameter's layout, or None if the shape is wrong."""
  torch_shape = _torch_shape(flax_shape)
  if len(flax_shape) == 4 and value.shape == torch_shape:
    return np.transpose(value, (2, 3, 1, 0))
  if len(flax_shape) == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # a 1×1 conv written attention weight
      value = value[:, :, 0, 0]
    return value.T if value.shape == torch_shape else None
  return value if value.shape == torch_shape else None


def _mapped_state(tensors: Mapping[str, np.ndarray], config: VAEConfig, source: str,
                  dtype: Any) -> tuple[Any, Any]:
  graphdef, state = nnx.split(abstract_vae(config, dtype=dtype))
  flat = nnx.to_flat_state(state)
  num_blocks = len(config.block_out_channels)
  renamed: dict[str, tuple[str, np.ndarray]] = {}
  duplicates = []
  for key, value in _select(tensors).items():
    name = canonical_key(key, num_blocks)
    if name in renamed:
      duplicates.append(f"{renamed[name][0]} and {key} (both {name})")
    renamed[name] = (key, value)
  missing, misshaped, leaves = [], [], []
  for path, var in flat:
    name = diffusers_key(tuple(path))
    if name not in renamed:
      missing.append(f"{name} {list(_torch_shape(tuple(var.shape)))}")
      leaves.append(None)
      continue
    file_key, value = renamed.pop(name)
    converted = _convert(np.asarray(value), tuple(var.shape))
    if converted is None:
      misshaped.append(f"{file_key}: file {list(value.shape)}, expected "
                       f"{list(_torch_shape(tuple(var.shape)))}")
      leaves.append(None)
      continue
    leaves.append(converted.astype(var.dtype))
  unexpected = [f"{k} {list(v.shape)}" for k, v in (renamed[n] for n in sorted(renamed))]
  if missing or unexpected or misshaped or duplicates:
    lines = [f"VAE weights {source} do not match the architecture "
             f"(block_out_channels={config.block_out_channels}, "
             f"latent_channels={config.latent_channels}):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped), ("duplicated", duplicates)):
      if items:
        lines.append(f"  {len(items)} {title}: " + "; ".join(items[:20])
                     + (f"; … ({len(items) - 20} more)" if len(items) > 20 else ""))
    raise ValueError("\n".join(lines))
  for (_, var), leaf in zip(flat, leaves):
    var.set_value(jax.numpy.asarray(leaf))
  return graphdef, flat.to_nested_state()


def load_vae(weights: str | os.PathLike | Mapping[str, np.ndarray],
             config: VAEConfig = SD_VAE, *, dtype: Any = jax.numpy.float32
             ) -> AutoencoderKL:
  """`AutoencoderKL` with the parameters of a safetensors file (or a dict of its tensors).

  Built from the abstract module, so the random initialisation is never computed.
  """
  if isinstance(weights, Mapping):
    tensors, source = weights, "(tensor dict)"
  else:
    path = os.fspath(weights)
    if not epath.Path(path).exists():
      raise WeightsNotFoundError(missing_weights_message(path))
    tensors, _ = read_safetensors(path)
    source = repr(path)
  graphdef, state = _mapped_state(tensors, config, source, dtype)
  return nnx.merge(graphdef, state)


def vae_tensors(model: AutoencoderKL) -> dict[str, np.ndarray]:
  """The model's parameters as diffusers-named, PyTorch-layout float numpy arrays."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(jax.device_get(var.get_value()))
    if value.ndim == 4:
      value = np.transpose(value, (3, 2, 0, 1))
    elif value.ndim == 2:
      value = value.T
    out[diffusers_key(tuple(path))] = np.ascontiguousarray(value)
  return out


def save_vae(model: AutoencoderKL, path: str | os.PathLike,
             metadata: Mapping[str, str] | None = None) -> None:
  """Writes the model as a diffusers-layout safetensors file (loadable by diffusers too)."""
  write_safetensors(path, vae_tensors(model), {"format": "pt", **(metadata or {})})


def params_fingerprint(model: AutoencoderKL) -> str:
  """A SHA-256 of the architecture and every parameter value: the identity of a VAE.

  Equal for the same weights however they were loaded (file, LDM names, fp16 → fp32 copies
  give the same float32 values), so latent caches can check that they were written by it.
  """
  h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
  for name, value in sorted(vae_tensors(model).items()):
    value = np.ascontiguousarray(value, dtype="<f4")
    h.update(f"{name}:{list(value.shape)};".encode())
    h.update(value.tobytes())
  return h.hexdigest()
