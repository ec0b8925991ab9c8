"""`LazyImages`: a uint8 [N, H, W, C] array-like over N stored images, read only when indexed.

The indexing, views, appended images and pickling every lazily read image source shares; a
subclass says how to open its storage (`_open_reader`) and decode some of its records
(`_decode_records`): `records.RecordImages` (dpjax's own ArrayRecord splits) and
`tfds_images.TfdsImages` (a prepared TFDS dataset's ArrayRecord files).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np


class LazyImages:
  """uint8 [N, H, W, C] images of `num_records` stored records (or a view of some of them).

  Indexing follows NumPy: an int gives [H, W, C]; a slice, an int array [n] (in that order,
  repeats allowed, negative indices from the end) or a bool mask [N] gives [n, H, W, C]. Each read
  decodes only the records asked for. `take(indices, axis=0)` is a view (no read), as `Dataset
  .subset` needs; `append(images)` adds a few in-memory images after the view's (canaries);
  `np.asarray(images)` reads every image of the view (fine for a test split, not for a large
  training split).

  Pickling keeps the subclass's location, the shape, view and appended images, never an open
  reader: the unpickled copy opens it on its first read (one reader per process, shared by its
  threads).
  """

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, image_shape: tuple[int, int, int], num_records: int,
               positions: np.ndarray | None = None, extra: np.ndarray | None = None):
    """`num_records` stored records of images of shape `image_shape`; `extra`: uint8 [m, H, W, C]
    images in memory, at positions num_records, ..., num_records + m - 1 after the records;
    `positions` int64 [n]: the positions this view shows (None: all records, then all of
    `extra`, in order)."""
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_records = int(num_records)
    self.extra = np.zeros((0,) + self.image_shape, np.uint8) if extra is None else extra
    self.positions = None if positions is None else np.asarray(positions, np.int64)
    self._reader = None
    self._lock = threading.Lock()

  def _open_reader(self) -> Any:
    """Opens the storage (called once per process, under a lock); returns the reader."""
    raise NotImplementedError

  def _decode_records(self, reader: Any, positions: np.ndarray) -> list[np.ndarray]:
    """uint8 [H, W, C] images of stored records `positions` [n] (each < num_records), read with
    `reader`; a `records.RecordError` naming the record if one cannot be decoded or has another
    shape than `image_shape`."""
    raise NotImplementedError

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self),) + self.image_shape

  def __len__(self) -> int:
    if self.positions is None:
      return self.num_records + len(self.extra)
    return len(self.positions)

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_reader"], state["_lock"]
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _reader=None, _lock=threading.Lock())

  def take(self, indices: np.ndarray, axis: int = 0) -> LazyImages:
    """The view of examples `indices` [n] of this one (NumPy's `take` along axis 0); reads
    nothing."""
    if axis != 0:
      raise ValueError(f"{type(self).__name__}.take works along the example axis only (axis=0), "
                       f"got axis={axis}.")
    return self._view(self._positions(indices), self.extra)

  def append(self, images: np.ndarray) -> LazyImages:
    """This view followed by `images` uint8 [m, H, W, C], kept in memory (a few: canaries)."""
    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      raise ValueError(f"can only append uint8 [m, {', '.join(map(str, self.image_shape))}] "
                       f"images, got {images.dtype} {images.shape}.")
    start = self.num_records + len(self.extra)
    return self._view(np.concatenate([self._positions(slice(None)),
                                      start + np.arange(len(images))]),
                      np.concatenate([self.extra, images]))

  def _view(self, positions: np.ndarray, extra: np.ndarray) -> LazyImages:
    view = copy.copy(self)  # through __getstate__: no reader, a lock of its own
    view.positions, view.extra = positions, extra
    return view

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self._read(self._positions(np.array([key])))[0]
    if isinstance(key, tuple):
      raise IndexError(f"{type(self).__name__} takes one index (an int, a slice or a 1-D index "
                       "array); index the result for the other axes.")
    return self._read(self._positions(key))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # the result is always a new array
    images = self[:]
    return images if dtype is None else images.astype(dtype)

  def _positions(self, key) -> np.ndarray:
    """Positions int64 [n] of the examples `key` (slice, int or bool array) selects."""
    order = np.arange(len(self)) if self.positions is None else self.positions
    if isinstance(key, slice):
      return order[key]
    key = np.asarray(key)
    if key.size == 0 and key.ndim == 1:
      return order[:0]
    if key.dtype == bool:
      if key.shape != (len(self),):
        raise IndexError(f"a boolean index must have shape ({len(self)},), got {key.shape}.")
      return order[key]
    if key.ndim != 1 or not np.issubdtype(key.dtype, np.integer):
      raise IndexError(f"{type(self).__name__} takes an int, a slice or a 1-D int or bool array, "
                       f"got {key.dtype} {key.shape}.")
    if key.size and not -len(self) <= key.min() <= key.max() < len(self):
      raise IndexError(f"index out of range for {len(self)} images: {key.min()}..{key.max()}.")
    return order[key]

  def _open(self) -> Any:
    with self._lock:
      if self._reader is None:
        self._reader = self._open_reader()
    return self._reader

  def _read(self, positions: np.ndarray) -> np.ndarray:
    """Images uint8 [n, H, W, C] at `positions` [n]: records decoded, appended ones copied."""
    out = np.empty((len(positions),) + self.image_shape, np.uint8)
    appended = positions >= self.num_records
    out[appended] = self.extra[positions[appended] - self.num_records]
    rows = np.flatnonzero(~appended)
    if len(rows):
      out[rows] = self._decode_records(self._open(), positions[rows])
    return out
