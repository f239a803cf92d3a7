"""Reading PyTorch's files without torch and without running code from them.

A pickle names the Python objects it rebuilds as globals (`module.name`) and the unpickler calls
them, so loading an untrusted pickle can run anything (`os.system`). Every reader here resolves
only an explicit list of globals, each mapped onto plain numpy or Python data, and refuses any
other global, naming it, before it runs.

`torch.save` (since PyTorch 1.6) and TorchScript both write a zip: `<root>/data.pkl` pickles the
object, whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride)` calls
over storages that pickle persistent ids point at: raw little-endian bytes in `<root>/data/<key>`
(`<root>/byteorder` says otherwise). Tensors come back as contiguous numpy arrays that own
their memory; storages shared between tensors (a state dict saved twice) are read once.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np
from etils import epath

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
class StorageType:
  """What `torch.FloatStorage` (or `torch.float32`) stands for here: a storage's dtype."""

  dtype: np.dtype


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


class Namespace(dict):
  """An `argparse.Namespace` read as the dict of its attributes (how training scripts such as
  DiT's `train.py` save their command line)."""

  def __setstate__(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"argparse.Namespace with a {type(state).__name__} state")
    self.update(state)


# The globals a zip of tensors needs: tensor rebuilding, storage and dtype names, ordered dicts.
TENSOR_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): StorageType(np.dtype(d)) for name, d in _STORAGE_DTYPES.items()},
    **{("torch", name): StorageType(np.dtype(d)) for name, d in _TORCH_DTYPES.items()},
}
NAMESPACE_GLOBALS: dict[tuple[str, str], Any] = {("argparse", "Namespace"): Namespace}


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only `allowed` ((module, name) → object) and refuses every
  other global with an `UnpicklingError` naming it and the file (`what`)."""

  def __init__(self, file: IO[bytes], allowed: Mapping[tuple[str, str], Any], what: str):
    super().__init__(file)
    self._allowed, self._what = dict(allowed), what

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    raise pickle.UnpicklingError(
        f"{self._what} refers to the global {module}.{name}, which this reader does not admit "
        f"(it maps only what rebuilds arrays and plain data); refused without running it")


class TorchZipUnpickler(RestrictedUnpickler):
  """`RestrictedUnpickler` that reads storages from a PyTorch zip archive (`<root>/data/<key>`)."""

  def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, root: str,
               allowed: Mapping[tuple[str, str], Any], what: str):
    super().__init__(file, allowed, what)
    self._archive, self._root = archive, root
    names = archive.namelist()
    byteorder = "little"
    if f"{root}/byteorder" in names:
      byteorder = archive.read(f"{root}/byteorder").decode().strip()
    self._order = "<" if byteorder == "little" else ">"
    self._storages: dict[str, np.ndarray] = {}

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._what}: unsupported persistent id {pid!r}")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, StorageType):
      raise pickle.UnpicklingError(f"{self._what}: unsupported storage type {storage_type!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._root}/data/{key}")
      dtype = storage_type.dtype.newbyteorder(self._order)
      self._storages[key] = np.frombuffer(raw, dtype=dtype).astype(storage_type.dtype)
    return self._storages[key]


def archive_root(archive: zipfile.ZipFile, what: str, kind: str = "PyTorch zip archive") -> str:
  """The archive's one top folder holding `data.pkl` (`torch.save` names it after the file)."""
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError(f"{what} is not a {kind} (no single <root>/data.pkl)")
  return pickles[0].split("/", 1)[0]


def load(path: str | os.PathLike[str],
         allowed: Mapping[tuple[str, str], Any] = TENSOR_GLOBALS) -> Any:
  """The object a `torch.save` zip holds (a local or `epath` path, e.g. `gs://`), tensors as
  numpy arrays; refuses any global outside `allowed`. Pre-1.6 (non-zip) files are refused with
  the way to convert them."""
  path = os.fspath(path)
  with epath.Path(path).open("rb") as f:
    if not zipfile.is_zipfile(f):
      raise ValueError(
          f"{path} is not a PyTorch zip archive; files written by torch < 1.6 use the legacy "
          f"format: re-save them once with `torch.save(torch.load(f), f)` under torch >= 1.6")
    with zipfile.ZipFile(f) as archive:
      root = archive_root(archive, path)
      with archive.open(f"{root}/data.pkl") as data:
        return TorchZipUnpickler(data, archive, root, allowed, path).load()
