"""Multi-host slicing of the eval stream: each process's rows of every global batch, concatenated
over the processes, are the one-process stream; a process holding non-contiguous rows is an error
(issue 25). One process can only hold every row, so the other layouts are given directly as
`ProcessRows`, or as a sharding stand-in that answers `addressable_devices_indices_map`."""

import ml_collections
import numpy as np
import pytest

from asyncpatch_jax.data import pipeline, sources
from asyncpatch_jax.data.preprocess import Preprocess

GLOBAL_BATCH = 8


def _source(n=37):
  """n distinct 2×2 grey images (pixel value = index mod 256 spread over the four pixels)."""
  index = np.arange(n)
  images = np.stack([index % 256, (index * 7) % 256, (index * 13) % 256, (index * 29) % 256],
                    axis=-1).reshape(n, 2, 2, 1).astype(np.uint8)
  return sources.ArraySource(images, index)


def _local_batches(rows, source, max_batches=None):
  """What one process feeds: its rows of each global batch, through the grain pipeline."""
  stream = pipeline.EvalStream(source, Preprocess(2, 1, crop="resize"), rows=rows,
                               max_batches=max_batches)
  data_config = ml_collections.ConfigDict({"read_threads": 1, "prefetch_buffer_size": 2,
                                           "worker_count": 0})
  return stream, list(pipeline._build(stream, rows, data_config))


@pytest.mark.parametrize("layout", [[4, 4], [2, 6], [2, 2, 2, 2], [1, 3, 4]])
def test_eval_stream_slices_concatenate_to_the_one_process_stream(layout):
  source = _source()
  whole_stream, whole = _local_batches(pipeline.ProcessRows(GLOBAL_BATCH, 0, GLOBAL_BATCH),
                                       source)
  assert whole_stream.num_batches == len(whole) == len(source) // GLOBAL_BATCH
  # The one-process stream is the split in order, the last partial batch dropped.
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in whole]),
                                np.arange(len(whole) * GLOBAL_BATCH))
  starts = np.cumsum([0, *layout[:-1]])
  parts = [_local_batches(pipeline.ProcessRows(GLOBAL_BATCH, int(s), size), source)[1]
           for s, size in zip(starts, layout)]
  for k, batch in enumerate(whole):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), batch[key])


def test_eval_stream_max_batches_cuts_every_process_alike():
  source = _source()
  first, a = _local_batches(pipeline.ProcessRows(GLOBAL_BATCH, 0, 4), source, max_batches=2)
  second, b = _local_batches(pipeline.ProcessRows(GLOBAL_BATCH, 4, 4), source, max_batches=2)
  assert first.num_batches == second.num_batches == len(a) == len(b) == 2
  np.testing.assert_array_equal(np.concatenate([a[1]["label"], b[1]["label"]]),
                                np.arange(8, 16))


class _Sharding:
  """Stands in for a NamedSharding on a process whose devices hold the given row spans."""

  def __init__(self, *spans):
    self.spans = spans

  def addressable_devices_indices_map(self, shape):
    assert shape == (GLOBAL_BATCH,)
    return {f"device{i}": (slice(lo, hi),) for i, (lo, hi) in enumerate(self.spans)}


@pytest.mark.parametrize("spans, rows", [
    ([(4, 6), (6, 8)], (4, 4)),                  # the second of two processes
    ([(2, 4), (0, 2), (4, 6)], (0, 6)),           # devices listed out of order
    ([(0, 4), (0, 4)], (0, 4)),                   # replicated rows (fsdp): counted once
    ([(None, None)], (0, GLOBAL_BATCH)),          # a batch not split at all
])
def test_process_rows_merges_contiguous_spans(spans, rows):
  start, size = rows
  assert (pipeline.process_rows(_Sharding(*spans), GLOBAL_BATCH)
          == pipeline.ProcessRows(GLOBAL_BATCH, start, size))


def test_process_rows_rejects_non_contiguous_rows():
  with pytest.raises(ValueError, match=r"non-contiguous batch rows .*order the mesh devices"):
    pipeline.process_rows(_Sharding((0, 2), (4, 6)), GLOBAL_BATCH)
