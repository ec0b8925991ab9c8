"""The in-memory form of a dataset the trainer uses, and how to load one."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dpjax.data import specs
from dpjax.data import tfds_cache


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images and labels of one split, in memory.

  Attributes:
    images: uint8 [N, H, W, C].
    labels: int32 [N], in [0, num_classes).
    num_classes: number of classes.
    name: dataset name, e.g. "mnist".
    split: which split (or part of one) this is, e.g. "train"; used to catch overlaps.
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  split: str = ""

  def __post_init__(self):
    if self.images.ndim != 4 or self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} "
                       f"{self.images.shape}.")
    if self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32:
      raise ValueError(f"labels must be int32 [{len(self.images)}], got {self.labels.dtype} "
                       f"{self.labels.shape}.")

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.images.shape[1:])

  def subset(self, indices: np.ndarray, part: str) -> "Dataset":
    """Returns a copy holding examples `indices` [n] (in that order); `part` names it."""
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                               split=f"{self.split}[{part}]")


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, verify: bool = True) -> Dataset:
  """Loads a split of "mnist", "fashion_mnist" or "cifar10" through the TFDS ArrayRecord cache.

  The first call converts the original files (found by `locations.resolve_data_dir(name,
  data_dir)`) into the cache; later calls read the cache entry built from the same files (checked
  by their SHA-256s), or without the files the one usable entry (`tfds_cache`).

  Args:
    name: one of `specs.KNOWN_DATASETS`; anything else raises ValueError listing them.
    split: "train" or "test".
    data_dir: configured folder of the original files (None: $DPJAX_DATA_DIR, system folders).
    cache_dir: cache root (None: $DPJAX_CACHE_DIR or ~/.cache/dpjax).
    verify: require the official release, of the files and of the cache entry read.

  Returns:
    A Dataset with images uint8 [N, H, W, C] and labels int32 [N] in the original file order.
  """
  spec = specs.get_spec(name)
  specs.check_split(split)
  entry = tfds_cache.ensure_cache(name, cache_dir, data_dir, verify)
  images, labels = tfds_cache.read_cached_split(name, split, entry)
  return Dataset(images=images, labels=labels, num_classes=spec.num_classes, name=name,
                 split=split)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images [..., C] in [0, 255] -> float32 in [0, 1], same shape."""
  return np.asarray(images, np.float32) / np.float32(255.0)


def normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) [C] float32 of `name`'s training images scaled to [0, 1]."""
  spec = specs.get_spec(name)
  return np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)


def standardize(images: np.ndarray, name: str) -> np.ndarray:
  """uint8 images [..., C] -> float32 (x/255 - mean) / std with `name`'s constants."""
  mean, std = normalization(name)
  return (to_float(images) - mean) / std
