"""The device mesh from the config and parameter shardings from rules over abstract state.

Two mesh axes: `data` (pure data parallelism, parameters replicated) and `fsdp` (data
parallelism with parameters and optimizer state sharded). The batch is split over both.
Parameter shardings come from an ordered list of `(regex, spec)` rules — the first regex found in
the parameter's path ("encoder/0/res/conv1/kernel") wins — evaluated on the abstract
(`nnx.eval_shape`) state, so nothing is allocated before it is placed. A spec is:
  'fsdp'       shard the largest axis divisible by the fsdp size (replicate if none is, or if
               the parameter has fewer than `mesh.min_shard_size` elements),
  'replicate'  keep a full copy on every device,
  a tuple      an explicit PartitionSpec, e.g. (None, 'fsdp').
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1 to take the remaining devices."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == 0 or fsdp == 0 or data < -1 or fsdp < -1 or (data == -1 and fsdp == -1):
    raise ValueError(f"mesh sizes must be positive, with at most one -1 (fill), got "
                     f"data={data}, fsdp={fsdp}")
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  elif fsdp == -1:
    if num_devices % data:
      raise ValueError(f"mesh.data={data} does not divide the {num_devices} devices")
    fsdp = num_devices // data
  if data * fsdp != num_devices:
    raise ValueError(f"mesh data×fsdp = {data}×{fsdp} = {data * fsdp} does not match the "
                     f"{num_devices} available devices; set --config.mesh.data=-1 to fill")
  return data, fsdp


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: all), with automatic (GSPMD) axes."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  if devices == jax.devices():
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * 2, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device; the other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_string(path: Sequence[Any]) -> str:
  """'a/b/kernel' for a pytree key path (dict keys, attributes, sequence indices).

  The `.value` attribute of NNX Variables is left out, so rules read like module paths.
  """
  parts = []
  for k in path:
    if getattr(k, "name", None) == "value":
      continue
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  # Largest axis first; ties go to the last axis (output features), which keeps matmul inputs
  # local in the common [in, out] kernel layout.
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for axis in order:
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def spec_for(path: str, shape: Sequence[int], rules: Sequence[tuple[str, Any]], fsdp: int,
             min_size: int) -> P:
  """The PartitionSpec of one parameter: the first rule whose regex matches `path`."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if spec == "fsdp":
        return _fsdp_spec(shape, fsdp, min_size)
      if spec in ("replicate", None, ()):
        return P()
      spec = tuple(spec)
      if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} gives {spec} for {path} of shape "
                         f"{tuple(shape)}")
      for axis_name, size in zip(spec, shape):
        names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        n = math.prod(fsdp if a == "fsdp" else 1 for a in names if a)
        if size % n:
          raise ValueError(f"sharding rule {pattern!r}: {path} axis of size {size} is not "
                           f"divisible by {n}")
      return P(*spec)
  return P()


def param_shardings(abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                    min_size: int) -> Any:
  """NamedShardings for every leaf of an abstract pytree, from the rules."""
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(path_string(path), shape, rules, fsdp, min_size))

  return jax.tree_util.tree_map_with_path(one, abstract)


def shard_like_params(tree: Any, params_abstract: Any, params_shardings: Any,
                      mesh: Mesh) -> Any:
  """Shardings for optimizer / EMA state: a leaf shaped like a parameter follows its sharding.

  Optimizer states (Adam moments, EMA copies) mirror the parameter tree; their leaves are
  matched to parameters by path suffix and shape, and anything else (counters, scalars) is
  replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                                    jax.tree.leaves(params_shardings)):
    by_path[path_string(path)] = (tuple(leaf.shape), sharding)

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    parts = path_string(path).split("/")
    for i in range(len(parts)):
      match = by_path.get("/".join(parts[i:]))
      if match is not None and match[0] == shape:
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)
