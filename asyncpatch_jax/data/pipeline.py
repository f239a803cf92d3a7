"""grain input pipelines that give every process its own rows of each global batch.

The training stream is defined globally, independent of the number of processes: position `g`
of the stream is record `shuffle_e(g mod N)` of epoch `e = g // N` (grain's index shuffle,
reseeded every epoch), with its random flip seeded by `(seed, g)`. Global batch `k` is positions
`[k·G, (k+1)·G)`. Each process reads only the rows its devices hold (`ProcessRows`), so one
process with 8 devices and two processes with 4 each see exactly the same global batches, and
the grain iterator state (saved with the model) resumes the stream exactly.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from asyncpatch_jax.data import sources
from asyncpatch_jax.data.latent_cache import LatentPreprocess
from asyncpatch_jax.data.preprocess import Preprocess


@dataclasses.dataclass(frozen=True)
class ProcessRows:
  """The contiguous rows `[start, start + size)` of each global batch that this process loads."""

  global_batch: int
  start: int
  size: int


def process_rows(sharding: NamedSharding, global_batch: int) -> ProcessRows:
  """Which batch rows this process's devices hold under `sharding` (batch on axis 0)."""
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                  for s in index_map.values()})
  start, stop = spans[0][0], spans[0][1]
  for lo, hi in spans[1:]:
    if lo != stop:
      raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {spans}; "
                       "order the mesh devices by process")
    stop = hi
  return ProcessRows(global_batch=global_batch, start=start, size=stop - start)


class TrainStream:
  """Local element `m` of this process → its position in the global, reshuffled stream."""

  def __init__(self, source: Any, preprocess: Preprocess, *, seed: int, rows: ProcessRows):
    if len(source) == 0:
      raise ValueError(f"data source {source!r} is empty")
    self._source, self._preprocess, self._seed, self._rows = source, preprocess, seed, rows
    self._order = grain.MapDataset.range(len(source)).shuffle(seed=seed % 2**32).repeat()

  def __len__(self) -> int:
    return sys.maxsize

  def global_position(self, m: int) -> int:
    k, j = divmod(int(m), self._rows.size)
    return k * self._rows.global_batch + self._rows.start + j

  def __getitem__(self, m: int) -> dict[str, np.ndarray]:
    g = self.global_position(m)
    record = self._source[int(self._order[g]) % len(self._source)]
    return self._preprocess(record, flip_key=(self._seed, g))


class EvalStream:
  """One pass over a split in order (no shuffle, no flip); the last partial batch is dropped."""

  def __init__(self, source: Any, preprocess: Preprocess, *, rows: ProcessRows,
               max_batches: int | None = None):
    num_batches = len(source) // rows.global_batch
    if num_batches == 0:
      raise ValueError(f"the eval split has {len(source)} records, fewer than one global batch "
                       f"of {rows.global_batch}")
    if max_batches:
      num_batches = min(num_batches, int(max_batches))
    self._source, self._preprocess, self._rows = source, preprocess, rows
    self.num_batches = num_batches

  def __len__(self) -> int:
    return self.num_batches * self._rows.size

  def __getitem__(self, m: int) -> dict[str, np.ndarray]:
    k, j = divmod(int(m), self._rows.size)
    return self._preprocess(self._source[k * self._rows.global_batch + self._rows.start + j])


class Pipeline:
  """Iterates global batches `{'image': uint8 [B, H, W, C], 'label': int32 [B]}` as jax.Arrays
  (`'image'` float32 `[B, h, w, c]` latents for a latent cache).

  `iterator` is the grain `DatasetIterator`; checkpoint it (see `train/checkpoint.py`) to resume
  the stream exactly.
  """

  def __init__(self, dataset: grain.IterDataset, sharding: NamedSharding, rows: ProcessRows,
               num_batches: int | None = None):
    self.dataset, self.sharding, self.rows = dataset, sharding, rows
    self.num_batches = num_batches
    self.iterator = iter(dataset)

  def __iter__(self) -> Pipeline:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self.iterator)
    return {k: jax.make_array_from_process_local_data(
        self.sharding, v, (self.rows.global_batch, *v.shape[1:])) for k, v in local.items()}

  def close(self) -> None:
    """Stops reading threads and worker processes (otherwise they linger until exit)."""
    close = getattr(self.iterator, "close", None)
    if close is not None:
      close()


def _build(stream: Any, rows: ProcessRows, data_config: Any) -> grain.IterDataset:
  ds = grain.MapDataset.source(stream).batch(rows.size, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=int(data_config.read_threads),
      prefetch_buffer_size=int(data_config.prefetch_buffer_size)))
  if data_config.worker_count > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks) use the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data_config.worker_count),
        per_worker_buffer_size=int(data_config.worker_buffer_size)))
  return ds


def finished_example(record: dict[str, Any], flip_key: tuple[int, ...] | None = None
                     ) -> dict[str, Any]:
  """The preprocessing of `data.source='synthetic'`, whose records are examples already."""
  del flip_key
  return record


def make_preprocess(data_config: Any, *, train: bool, source: Any = None) -> Any:
  """Record → example `{'image', 'label'}` for `data_config.source`.

  Images: uint8 crops (`Preprocess`). Latent caches (`source`, a `LatentCacheSource`): float32
  latents already scaled by the cache's factor, the model's data as they are; in training a
  posterior sample of a randomly flipped view, otherwise the unflipped posterior mean.
  """
  if data_config.source == "synthetic":
    return finished_example
  if sources.latent_data(data_config):  # a latent cache ('synthetic' returned above)
    if source is None:
      source = sources.get_source(data_config, data_config.train_split)
    return LatentPreprocess(source.scaling_factor, random_flip=train and data_config.random_flip,
                            sample=train)
  return Preprocess(data_config.image_size, data_config.channels, crop=data_config.crop,
                    random_flip=train and data_config.random_flip)


def create_train_pipeline(data_config: Any, sharding: NamedSharding,
                          source: Any | None = None) -> Pipeline:
  """The endless, shuffled training pipeline; `data_config.batch_size` is the global batch."""
  rows = process_rows(sharding, int(data_config.batch_size))
  source = sources.get_source(data_config, data_config.train_split) if source is None else source
  stream = TrainStream(source, make_preprocess(data_config, train=True, source=source),
                       seed=int(data_config.seed), rows=rows)
  return Pipeline(_build(stream, rows, data_config), sharding, rows)


def create_eval_pipeline(data_config: Any, sharding: NamedSharding, *,
                         max_batches: int | None = None, source: Any | None = None) -> Pipeline:
  """One ordered pass over `data_config.eval_split` (at most `max_batches` global batches)."""
  rows = process_rows(sharding, int(data_config.batch_size))
  source = sources.get_source(data_config, data_config.eval_split) if source is None else source
  stream = EvalStream(source, make_preprocess(data_config, train=False, source=source),
                      rows=rows, max_batches=max_batches)
  return Pipeline(_build(stream, rows, data_config), sharding, rows, stream.num_batches)


def reference_images(data_config: Any, num: int, split: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`num` preprocessed images of a split, uint8 `[num, H, W, C]`, and their int32 labels.

  The same on every host; the fixed known context of the inpainting grids. Strided through the
  split so the grid shows a variety (MNIST-like sets are sorted by class). For a latent cache,
  the scaled posterior means, float32 `[num, h, w, c]`.
  """
  source = sources.get_source(data_config, split or data_config.eval_split)
  preprocess = make_preprocess(data_config, train=False, source=source)
  idx = np.linspace(0, len(source) - 1, num).round().astype(int)
  records = [preprocess(source[int(i)]) for i in idx]
  return (np.stack([r["image"] for r in records]),
          np.asarray([r["label"] for r in records], np.int32))

