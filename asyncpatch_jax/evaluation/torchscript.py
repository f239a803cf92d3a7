"""Read a TorchScript `.pt` archive without torch: its module tree, tensors and code.

A TorchScript file is a zip: `<root>/data.pkl` pickles the module tree (each module an object of
a `__torch__.*` class whose state is a dict of attributes and parameters), tensors refer to raw
storages `<root>/data/<key>` through pickle persistent ids, and `<root>/code/` holds the modules'
TorchScript source (where hyper-parameters declared `Final`, such as pooling sizes, live).

The unpickler here maps only the handful of torch globals such files use onto numpy
(`asyncpatch_jax.torch_pickle`, shared with `torch.save` files), and refuses every other global,
so reading an archive never runs code from it.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from asyncpatch_jax import torch_pickle


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


def _identity(x, *unused):
  del unused
  return x


_GLOBALS = {**torch_pickle.TENSOR_GLOBALS, ("torch.jit._pickle", "restore_type_tag"): _identity}


class _Unpickler(torch_pickle.TorchZipUnpickler):
  """The tensor globals of `torch_pickle`, TorchScript's list builders and type tags, and every
  `__torch__.*` class as a ScriptObject."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str, what: str):
    super().__init__(file, archive, root, _GLOBALS, what)
    self._classes: dict[str, type[ScriptObject]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith("__torch__"):
      qualname = f"{module}.{name}"
      if qualname not in self._classes:
        self._classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
      return self._classes[qualname]
    if module == "torch.jit._pickle" and name.startswith("build_"):
      return list
    return super().find_class(module, name)


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
    root = torch_pickle.archive_root(archive, path, "TorchScript archive")
    with archive.open(f"{root}/data.pkl") as f:
      module = _Unpickler(f, archive, root, f"TorchScript archive {path}").load()
    if not isinstance(module, ScriptObject):
      raise ValueError(f"{path}: data.pkl holds {type(module)}, not a module")
    code = {}
    prefix = f"{root}/code/"
    for name in names:
      if name.startswith(prefix) and name.endswith(".py"):
        dotted = name[len(prefix):-len(".py")].replace("/", ".")
        code[dotted] = archive.read(name).decode()
  return TorchScriptArchive(path=path, module=module, code=code)
