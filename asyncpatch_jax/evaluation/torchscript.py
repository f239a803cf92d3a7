"""Read a TorchScript `.pt` archive without torch: its module tree, tensors and code.

A TorchScript file is a zip: `<root>/data.pkl` pickles the module tree (each module an object of
a `__torch__.*` class whose state is a dict of attributes and parameters), tensors refer to raw
storages `<root>/data/<key>` through pickle persistent ids, and `<root>/code/` holds the modules'
TorchScript source (where hyper-parameters declared `Final`, such as pooling sizes, live).

The unpickler here maps only the handful of torch globals such files use onto numpy, and refuses
every other global, so reading an archive never runs code from it.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

# Legacy typed storages (`torch.FloatStorage`) and dtype objects (`torch.float32`) → numpy.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: Any


class ScriptObject:
  """One pickled TorchScript module: its class name and its attributes (state dict).

  The unpickler makes one subclass per TorchScript class, carrying its `qualname`.
  """

  qualname: str = ""

  def __new__(cls, *unused: Any) -> ScriptObject:
    obj = super().__new__(cls)
    obj.attributes = {}
    return obj

  def __setstate__(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"{self.qualname}: expected a dict state, got {type(state)}")
    self.attributes = dict(state)

  @property
  def class_name(self) -> str:
    return self.qualname.rsplit(".", 1)[-1]

  def children(self) -> Iterator[tuple[str, ScriptObject]]:
    for name, value in self.attributes.items():
      if isinstance(value, ScriptObject):
        yield name, value

  def __getitem__(self, path: str) -> Any:
    node: Any = self
    for part in path.split("."):
      node = node.attributes[part]
    return node

  def __repr__(self) -> str:
    return f"ScriptObject({self.qualname}, {list(self.attributes)})"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  itemsize = storage.dtype.itemsize
  if not size:
    return np.array(storage[storage_offset])
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride),
      writeable=False)
  return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _identity(x, *unused):
  del unused
  return x


class _Unpickler(pickle.Unpickler):
  """Maps TorchScript's torch globals onto numpy; every `__torch__.*` class to ScriptObject."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str):
    super().__init__(file)
    self._archive, self._root, self._byteorder = archive, root, byteorder
    self._storages: dict[str, np.ndarray] = {}
    self._classes: dict[str, type[ScriptObject]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith("__torch__"):
      qualname = f"{module}.{name}"
      if qualname not in self._classes:
        self._classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
      return self._classes[qualname]
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    if module == "torch" and name in _TORCH_DTYPES:
      return _StorageType(np.dtype(_TORCH_DTYPES[name]))
    if module == "torch.jit._pickle" and name.startswith("build_"):
      return list
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return _identity
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    raise pickle.UnpicklingError(f"TorchScript archive refers to {module}.{name}, which this "
                                 "reader does not map (it runs no code from the archive)")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._root}/data/{key}")
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
    return self._storages[key]


@dataclasses.dataclass
class TorchScriptArchive:
  """A TorchScript file's module tree (`module`) and code files (`code`, by module path)."""

  path: str
  module: ScriptObject
  code: dict[str, str]

  def state_dict(self) -> dict[str, np.ndarray]:
    """Every tensor in the module tree, by dotted path (`layers.conv.weight`)."""
    return dict(_tensors(self.module, ""))

  def final_constants(self, qualname: str) -> dict[str, Any]:
    """The `name : Final[type] = value` constants of class `qualname` in the archive's code.

    TorchScript stores such hyper-parameters (kernel sizes, strides of pooling layers) in the
    class source rather than in the pickled state.
    """
    module, _, name = qualname.rpartition(".")
    source = self.code.get(module)
    if source is None:
      raise KeyError(f"no code for module {module} in {self.path}")
    match = re.search(rf"^class {re.escape(name)}\(Module\):\n((?:[ \t]+.*\n?)*)", source, re.M)
    if match is None:
      raise KeyError(f"no class {name} in the code of {module}")
    constants = {}
    for line in match.group(1).splitlines():
      const = re.match(r"^\s+(\w+)\s*:\s*Final\[[^\]]*\]\s*=\s*(.+?)\s*$", line)
      if const:
        constants[const.group(1)] = ast.literal_eval(const.group(2))
    return constants


def _tensors(node: ScriptObject, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
  for name, value in node.attributes.items():
    if isinstance(value, np.ndarray):
      yield prefix + name, value
    elif isinstance(value, ScriptObject):
      yield from _tensors(value, f"{prefix}{name}.")


def load(path: str | os.PathLike[str]) -> TorchScriptArchive:
  """Reads a TorchScript archive: module tree with numpy tensors, and its code (no torch)."""
  path = os.fspath(path)
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path} is not a TorchScript archive (no single <root>/data.pkl)")
    root = pickles[0].split("/", 1)[0]
    byteorder = "little"
    if f"{root}/byteorder" in names:
      byteorder = archive.read(f"{root}/byteorder").decode().strip()
    with archive.open(pickles[0]) as f:
      module = _Unpickler(f, archive, root, byteorder).load()
    if not isinstance(module, ScriptObject):
      raise ValueError(f"{path}: data.pkl holds {type(module)}, not a module")
    code = {}
    prefix = f"{root}/code/"
    for name in names:
      if name.startswith(prefix) and name.endswith(".py"):
        dotted = name[len(prefix):-len(".py")].replace("/", ".")
        code[dotted] = archive.read(name).decode()
  return TorchScriptArchive(path=path, module=module, code=code)
