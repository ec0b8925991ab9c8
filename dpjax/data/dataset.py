"""The form of a dataset the trainer uses, and how to load one."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from dpjax.data import image_folder
from dpjax.data import lazy_images
from dpjax.data import specs
from dpjax.data import tfds_cache
from dpjax.data import tfds_images


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images and labels of one split (or part of one).

  Attributes:
    images: uint8 [N, H, W, C]: a NumPy array in memory, or a `lazy_images.LazyImages` that
      reads and decodes only the rows indexed (image-folder and TFDS datasets). Both index like
      NumPy (`images[index_array]` -> uint8 [n, H, W, C]) and have `take(indices, axis=0)`.
    labels: int32 [N], in [0, num_classes), in memory.
    num_classes: number of classes.
    name: dataset name, e.g. "mnist".
    split: which split (or part of one) this is, e.g. "train"; used to catch overlaps.
  """
  images: np.ndarray | lazy_images.LazyImages
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
    """Returns a copy holding examples `indices` [n] (in that order); `part` names it. Lazy
    images stay lazy (a view: nothing is read)."""
    return dataclasses.replace(self, images=self.images.take(indices, axis=0),
                               labels=self.labels[indices], split=f"{self.split}[{part}]")


def in_memory(dataset: Dataset, threads: int = 8, chunk: int = 2048) -> Dataset:
  """`dataset` with its images decoded into a uint8 [N, H, W, C] NumPy array (`threads` decoding
  chunks of `chunk` at once); a dataset already in memory is returned as it is."""
  if isinstance(dataset.images, np.ndarray):
    return dataset
  images = np.empty(dataset.images.shape, np.uint8)
  def decode(start):
    images[start:start + chunk] = dataset.images[start:start + chunk]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(decode, range(0, len(dataset), chunk)))
  return dataclasses.replace(dataset, images=images)


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, verify: bool = True, *,
                 classes: Sequence[str] | None = None,
                 image_shape: Sequence[int] | None = None,
                 manual_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads a split of a known dataset through its cache.

  "mnist", "fashion_mnist", "cifar10": the first call converts the original files (found by
  `locations.resolve_data_dir(name, data_dir)`) into the TFDS ArrayRecord cache; later calls read
  the cache entry built from the same files (checked by their SHA-256s), or without the files the
  one usable entry (`tfds_cache`). Images are read into memory.
  "cifar10_jpeg", "image_folder" (the folder or archive `data_dir` names): the first call checks
  every image and writes the cache entry (`image_folder`); images stay on disk, read lazily.
  "tfds:<name>" (any TFDS image-classification dataset, `tfds_images`): read from its ArrayRecord
  files in the TFDS data_dir `data_dir` (None: TFDS's default), prepared there first if needed;
  images stay on disk, read lazily.

  Args:
    name: one of `specs.KNOWN_DATASETS` or "tfds:<name>"; anything else raises ValueError.
    split: "train" or "test".
    data_dir: configured folder of the original files (None: $DPJAX_DATA_DIR, system folders);
      for "image_folder" the folder or archive itself (required); for "tfds:" names the TFDS
      data_dir (None: TFDS's default).
    cache_dir: cache root (None: $DPJAX_CACHE_DIR or ~/.cache/dpjax).
    verify: require the official release, of the files and of the cache entry read
      ("image_folder" and "tfds:" names have none: no effect).
    classes, image_shape: "image_folder" only: class folder names in label order (None: sorted),
      and the (H, W, C) every image must have (None: the first image's).
    manual_dir: "tfds:" names only: files TFDS cannot download (None: <data_dir>/downloads/manual).

  Returns:
    A Dataset with images uint8 [N, H, W, C] and labels int32 [N]: in the original file order, or
    for image folders in the order `image_folder` describes (a fixed shuffle of the files), for
    TFDS datasets in TFDS's record order.
  """
  specs.check_split(split)
  tfds_name = specs.tfds_name(name)
  spec = None if tfds_name else specs.get_spec(name)
  if isinstance(spec, specs.ImageFolderSpec):
    images, labels, info = image_folder.load(name, split, data_dir, cache_dir, verify, classes,
                                             image_shape)
    return Dataset(images=images, labels=labels, num_classes=len(info.classes), name=name,
                   split=split)
  if classes or image_shape:
    raise ValueError(f"classes and image_shape are for image_folder only; {name} has its own.")
  if tfds_name:
    images, labels, num_classes = tfds_images.load(tfds_name, split, data_dir, manual_dir)
    return Dataset(images=images, labels=labels, num_classes=num_classes, name=name, split=split)
  if manual_dir:
    raise ValueError(f"manual_dir is for 'tfds:' datasets only, not {name}.")
  entry = tfds_cache.ensure_cache(name, cache_dir, data_dir, verify)
  images, labels = tfds_cache.read_cached_split(name, split, entry)
  return Dataset(images=images, labels=labels, num_classes=spec.num_classes, name=name,
                 split=split)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images [..., C] in [0, 255] -> float32 in [0, 1], same shape."""
  return np.asarray(images, np.float32) / np.float32(255.0)


def normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) [C] float32 of `name`'s training images scaled to [0, 1].

  Public constants of a known dataset (its spec). "image_folder" has none: its training split's
  statistics (`image_folder.FolderInfo`) are computed from its images, private ones when the
  training split is, and preprocessing private data with them is a release the DP guarantee does
  not cover; ValueError says so. "tfds:" datasets have none in dpjax either (ValueError).
  """
  if specs.tfds_name(name):
    raise ValueError(f"dpjax has no normalization constants for {name}. Scale images to [0, 1] "
                     "instead (data.standardize=False).")
  spec = specs.get_spec(name)
  if not spec.mean:
    raise ValueError(f"{spec.title} has no public normalization constants: the mean and std of its "
                     "training images are computed from them, so standardising with them would "
                     "leak private data outside the DP guarantee. Scale images to [0, 1] instead "
                     "(data.standardize=False).")
  return np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)


def standardize(images: np.ndarray, name: str) -> np.ndarray:
  """uint8 images [..., C] -> float32 (x/255 - mean) / std with `name`'s constants."""
  mean, std = normalization(name)
  return (to_float(images) - mean) / std
