"""Any TFDS image-classification dataset by name (`data.name = "tfds:<name>"`), read lazily from
its ArrayRecord files in a TFDS data_dir with `tfds.data_source` (random access, no TensorFlow).

A name is what `tfds.builder` takes: "cifar100", "imagenet2012", "<name>/<config>:<version>".
The dataset must have an `image` feature (`tfds.features.Image`, uint8) and a `label` feature
(`tfds.features.ClassLabel`: num_classes comes from it); the other features are ignored. dpjax's
"train" split is TFDS's "train", its "test" split TFDS's "test" (or "validation" where there is
no "test"). Examples come in TFDS's record order (TFDS shuffles them once when it prepares the
dataset), the same order on every read.

Not prepared in the data_dir: `download_and_prepare(file_format="array_record")` is tried
(downloading needs network; `manual_dir` holds the files TFDS cannot download, imagenet2012's
tars). TFDS encodes `Image` features with TensorFlow when a builder yields pixel arrays (cifar100
does), so preparing such a dataset needs TensorFlow installed; reading a prepared one does not.

Images must all have one shape (the model is built for it): the Image feature's shape, or where
it leaves H or W open (imagenet2012) the first record's, and a record of another shape is a
`records.RecordError` when it is read. Images are decoded as stored (Pillow), never resized.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from dpjax.data import lazy_images
from dpjax.data import locations
from dpjax.data import records

IMAGE_KEY = "image"
LABEL_KEY = "label"
_LABEL_CHUNK = 4096  # records parsed at once when reading labels: bounds the memory used
_TFDS_SPLITS = {"train": ("train",), "test": ("test", "validation")}


def _feature(record: bytes, key: str) -> Any:
  """Feature `key` of a serialized tf.Example (TFDS's own proto: no TensorFlow)."""
  return tf_example_pb2.Example.FromString(record).features.feature[key]


def _data_source(name: str, split: str, data_dir: str | None) -> Sequence[bytes]:
  """The serialized records of a prepared split, random access."""
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


class TfdsImages(lazy_images.LazyImages):
  """uint8 [N, H, W, C] images of one split of a prepared TFDS dataset (or a view of some of
  them), read lazily: a `lazy_images.LazyImages` (NumPy indexing, `take`, `append`, picklable)
  whose reads decode only the records asked for."""

  def __init__(self, name: str, split: str, data_dir: str | None,
               image_shape: tuple[int, int, int], num_records: int,
               positions: np.ndarray | None = None, extra: np.ndarray | None = None):
    """`name`, `split` (TFDS's), `data_dir`: where the prepared dataset is (None: TFDS's
    default); `positions`, `extra`: as `LazyImages`'s."""
    self.name, self.split, self.data_dir = name, split, data_dir
    super().__init__(image_shape, num_records, positions, extra)

  def __repr__(self) -> str:
    return f"TfdsImages({self.name}, split={self.split}, shape={self.shape})"

  def _open_reader(self) -> Sequence[bytes]:
    source = _data_source(self.name, self.split, self.data_dir)
    if len(source) != self.num_records:
      raise records.RecordError(f"TFDS {self.name} split {self.split} holds {len(source)} "
                                f"records, expected {self.num_records}: it changed since it "
                                "was loaded; load it again.")
    return source

  def _decode_records(self, reader: Sequence[bytes], positions: np.ndarray) -> list[np.ndarray]:
    images = []
    for position, data in zip(positions, reader.__getitems__(positions.tolist())):
      where = f"TFDS {self.name} split {self.split} record {position}"
      pixels = _pixels(data, where)
      if pixels.shape != self.image_shape:
        raise records.RecordError(
            f"{where} is an image of shape {pixels.shape}, the others {self.image_shape}: the "
            "model needs images of one fixed size and dpjax does not resize. Use a dataset (or "
            "TFDS config) whose images all have one size.")
      images.append(pixels)
    return images


def _pixels(record: bytes, where: str) -> np.ndarray:
  """uint8 [H, W, C] pixels of a serialized record's encoded image (Pillow, `records`)."""
  values = _feature(record, IMAGE_KEY).bytes_list.value
  if len(values) != 1:
    raise records.RecordError(f"{where} has no encoded {IMAGE_KEY!r} image.")
  return records.image_pixels(records.open_image(values[0], where), where)


def load(name: str, split: str, data_dir: str | os.PathLike | None = None,
         manual_dir: str | os.PathLike | None = None) -> tuple[TfdsImages, np.ndarray, int]:
  """Split `split` ("train" or "test") of TFDS dataset `name`, prepared first if needed.

  Args:
    name: a TFDS name ("cifar100", "<name>/<config>:<version>"), without "tfds:".
    split: dpjax's split: "train", or "test" (TFDS's "test", else its "validation").
    data_dir: the TFDS data_dir (None: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: files TFDS cannot download (None: <data_dir>/downloads/manual).

  Returns:
    (images, labels, num_classes): images a `TfdsImages` uint8 [N, H, W, C], labels int32 [N] in
    [0, num_classes) (read once, images not decoded).

  Raises:
    ValueError: TFDS has no dataset `name`, or it has no uint8 `image` / ClassLabel `label`.
    locations.DataNotFoundError: not prepared and preparing it failed (the message says why and
      what to do).
    records.RecordError: a label out of range (an unlabelled split), an image that does not
      decode.
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = prepared_builder(name, data_dir, manual_dir)
  num_classes = _check_features(name, builder.info.features)
  tfds_split = _tfds_split(name, split, builder.info.splits)
  source = _data_source(name, tfds_split, data_dir)
  where = f"TFDS {name} split {tfds_split}"
  labels = _read_labels(source, where, num_classes)
  shape = tuple(builder.info.features[IMAGE_KEY].shape)
  if None in shape:  # H or W left open: the first record's, the others must agree
    shape = _pixels(source.__getitems__([0])[0], f"{where} record 0").shape
  return TfdsImages(name, tfds_split, data_dir, shape, len(labels)), labels, num_classes


def prepared_builder(name: str, data_dir: str | None,
                     manual_dir: str | os.PathLike | None = None) -> Any:
  """The TFDS builder of `name` in `data_dir`, prepared as ArrayRecord files (here, if it was
  not); errors saying what to do when it cannot be."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise ValueError(f"data.name 'tfds:{name}': TFDS has no dataset {name!r}. Name a TFDS "
                     f"image-classification dataset, e.g. 'tfds:cifar100' ({e}).") from e
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir))
    try:
      builder.download_and_prepare(file_format="array_record", download_config=config)
    except Exception as e:  # network, TensorFlow, manual files: TFDS raises many kinds
      raise locations.DataNotFoundError(
          f"TFDS dataset {name} is not prepared in {builder.data_dir} and preparing it failed "
          f"({type(e).__name__}: {e}). Prepare it where there is network (and TensorFlow, which "
          "TFDS needs to encode images of most datasets), e.g. `tfds build "
          f"{name} --file_format=array_record --data_dir=DIR`, then set data.dir to DIR; for "
          "files TFDS cannot download (imagenet2012) put them in data.manual_dir "
          "(default <data_dir>/downloads/manual).") from e
  formats = builder.info.available_file_formats() or {builder.info.file_format}
  if tfds.core.FileFormat.ARRAY_RECORD not in formats:
    raise locations.DataNotFoundError(
        f"TFDS dataset {name} in {builder.data_dir} is prepared as "
        f"{', '.join(str(f.value) for f in formats if f)}; dpjax reads ArrayRecord files "
        f"(random access). Prepare it again with `tfds build {name} "
        "--file_format=array_record` into an empty data_dir and set data.dir to it.")
  return builder


def _check_features(name: str, features: Any) -> int:
  """num_classes of `name`'s label; ValueError unless it has a uint8 Image `image` and a
  ClassLabel `label`."""
  image, label = (features[k] if k in features else None for k in (IMAGE_KEY, LABEL_KEY))
  if (not isinstance(image, tfds.features.Image) or image.np_dtype != np.uint8
      or not isinstance(label, tfds.features.ClassLabel)):
    raise ValueError(f"TFDS dataset {name} is not image classification as dpjax reads it: it needs "
                     f"an {IMAGE_KEY!r} feature (tfds.features.Image, uint8) and a {LABEL_KEY!r} "
                     f"feature (tfds.features.ClassLabel); its features are {features}.")
  return label.num_classes


def _tfds_split(name: str, split: str, splits: Any) -> str:
  """TFDS's split for dpjax's `split` (the module docstring)."""
  for candidate in _TFDS_SPLITS[split]:
    if candidate in splits:
      return candidate
  raise ValueError(f"TFDS dataset {name} has no split {' or '.join(_TFDS_SPLITS[split])} (it "
                   f"has {', '.join(splits)}), which dpjax's {split!r} split reads.")


def _read_labels(source: Sequence[bytes], where: str, num_classes: int) -> np.ndarray:
  """int32 [N] labels of every record of `source`, parsed a chunk at a time (images not
  decoded); RecordError if one is outside [0, num_classes)."""
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), _LABEL_CHUNK):
    chunk = range(start, min(start + _LABEL_CHUNK, len(source)))
    labels[start:chunk.stop] = [_feature(r, LABEL_KEY).int64_list.value[0]
                                for r in source.__getitems__(chunk)]
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if len(bad):
    raise records.RecordError(f"{where} record {bad[0]} has label {labels[bad[0]]}, outside "
                              f"[0, {num_classes}) ({len(bad)} such records): the split is not "
                              "labelled for training or evaluation.")
  return labels
