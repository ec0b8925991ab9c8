"""One split of images on disk as ArrayRecord records, read lazily: `RecordImages`.

A split is two files in a folder:
  <split>.array_record   record i is example i of the split (written in index order, so there is
                         no shuffle to undo): a header (`HEADER`: its index i, its label, its
                         image shape H, W, C, whether the payload is raw pixels) and the payload,
                         the image as stored in its source file (JPEG stays JPEG: never re-encoded)
                         or raw uint8 pixels [H, W, C] in C order.
  <split>.labels.npy     int32 [N], the labels again, so that loading a split's labels reads
                         4 bytes per example rather than every record.

`RecordImages` is a uint8 [N, H, W, C] array-like over a split's records (`lazy_images`):
indexing reads and decodes only the records asked for (Pillow for encoded images). It holds no
open file in a pickle: a process that unpickles it (a data-loading worker) opens the file on its
first read.
"""

from __future__ import annotations

import dataclasses
import io
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import PIL.Image
from array_record.python import array_record_module

from dpjax.data import lazy_images
from dpjax.data import local_files

HEADER = struct.Struct("<qiHHHB")  # index int64, label int32, H, W, C uint16, raw uint8
RECORDS_SUFFIX = ".array_record"
LABELS_SUFFIX = ".labels.npy"
# Record groups of one record give random access to single records (what grain recommends);
# encoded images do not compress further, raw pixels do (zstd).
_WRITER_OPTIONS = {False: "group_size:1,uncompressed", True: "group_size:1"}
_READER_OPTIONS = "readahead_buffer_size:0"  # random access: no read-ahead
# Pillow modes that are 8-bit pixels once expanded: palette and 1-bit images, other colour spaces.
_EXPAND_MODE = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB"}
_EIGHT_BIT_MODES = ("L", "LA", "RGB", "RGBA")
# What Pillow raises for bytes that are not a (complete) image.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


class RecordError(local_files.DataFormatError):
  """A record or an encoded image cannot be read; the message names where it comes from."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One parsed record: example `index` of its split, its label, image shape (H, W, C), whether
  `payload` is raw pixels (else an encoded image file's bytes)."""
  index: int
  label: int
  shape: tuple[int, int, int]
  raw: bool
  payload: bytes


def encode_record(record: Record) -> bytes:
  """The bytes of `record` as stored: HEADER, then the payload."""
  return HEADER.pack(record.index, record.label, *record.shape, record.raw) + record.payload


def parse_record(data: bytes, where: str) -> Record:
  """Parses what `encode_record` wrote; RecordError naming `where` if it is too short."""
  if len(data) < HEADER.size:
    raise RecordError(f"{where}: a record of {len(data)} bytes is shorter than its header "
                      f"({HEADER.size} bytes).")
  index, label, height, width, channels, raw = HEADER.unpack_from(data)
  return Record(index, label, (height, width, channels), bool(raw), data[HEADER.size:])


def image_pixels(image: PIL.Image.Image, where: str) -> np.ndarray:
  """The pixels of an opened Pillow image as uint8 [H, W, C] (C = 1 grey, 2 grey + alpha, 3 RGB,
  4 RGBA); palette, 1-bit and CMYK/YCbCr images are expanded to 8-bit L/RGB(A). No resizing and
  no EXIF rotation: the pixels as stored. RecordError naming `where` for other modes (16-bit,
  float) or a file that does not decode (truncated, corrupt)."""
  try:
    image.load()
  except _PIL_ERRORS as e:
    raise RecordError(f"{where} does not decode ({type(e).__name__}: {e}): it is truncated or "
                      "corrupt. Replace or remove it.") from e
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  elif image.mode in _EXPAND_MODE:
    image = image.convert(_EXPAND_MODE[image.mode])
  if image.mode not in _EIGHT_BIT_MODES:
    raise RecordError(f"{where} has pixel mode {image.mode!r}; dpjax reads 8-bit images "
                      f"({', '.join(_EIGHT_BIT_MODES)} or palette). Convert it to 8-bit.")
  pixels = np.asarray(image, np.uint8)
  return pixels.reshape(pixels.shape[:2] + (-1,))


def open_image(data: bytes, where: str) -> PIL.Image.Image:
  """Opens encoded image bytes with Pillow (the pixels are decoded later, by `image_pixels`);
  RecordError naming `where` if they are not an image Pillow knows."""
  try:
    return PIL.Image.open(io.BytesIO(data))
  except _PIL_ERRORS as e:
    raise RecordError(f"{where} is not a readable image ({type(e).__name__}: {e}). Replace or "
                      "remove it.") from e


def decode(record: Record, where: str) -> np.ndarray:
  """uint8 [H, W, C] pixels of `record`; RecordError naming `where` if they do not have the shape
  the record states."""
  if record.raw:
    if len(record.payload) != np.prod(record.shape):
      raise RecordError(f"{where}: {len(record.payload)} bytes of raw pixels, shape "
                        f"{record.shape} needs {np.prod(record.shape)}.")
    return np.frombuffer(record.payload, np.uint8).reshape(record.shape)
  pixels = image_pixels(open_image(record.payload, where), where)
  if pixels.shape != record.shape:
    raise RecordError(f"{where} decodes to shape {pixels.shape}, its record says {record.shape}.")
  return pixels


def write_split(folder: Path, split: str, records: Iterable[Record]) -> int:
  """Writes `records` (indices 0, 1, ... in that order, all raw or all encoded) as split `split`
  of `folder` (the module docstring's two files); returns how many it wrote."""
  labels, writer = [], None
  path = folder / f"{split}{RECORDS_SUFFIX}"
  try:
    for record in records:
      if record.index != len(labels):
        raise ValueError(f"records must come in index order: got index {record.index} at "
                         f"position {len(labels)}.")
      if writer is None:
        writer = array_record_module.ArrayRecordWriter(str(path), _WRITER_OPTIONS[record.raw])
      writer.write(encode_record(record))
      labels.append(record.label)
  finally:
    if writer is not None:
      writer.close()
  if writer is None:
    raise ValueError(f"split {split!r} has no records to write.")
  np.save(folder / f"{split}{LABELS_SUFFIX}", np.asarray(labels, np.int32))
  return len(labels)


def read_labels(folder: Path, split: str) -> np.ndarray:
  """int32 [N]: the labels of split `split` of `folder`, from its labels file (no record read)."""
  path = folder / f"{split}{LABELS_SUFFIX}"
  labels = np.load(path, allow_pickle=False)
  if labels.dtype != np.int32 or labels.ndim != 1:
    raise RecordError(f"{path} holds {labels.dtype} {labels.shape}, expected int32 [N].")
  return labels


class RecordImages(lazy_images.LazyImages):
  """uint8 [N, H, W, C] images of one split's records (or a view of some of them), read lazily:
  a `lazy_images.LazyImages` (NumPy indexing, `take`, `append`, picklable) over the file
  `write_split` wrote."""

  def __init__(self, folder: Path | str, split: str, image_shape: tuple[int, int, int],
               num_records: int, positions: np.ndarray | None = None,
               extra: np.ndarray | None = None):
    """`folder`/`split`: the files `write_split` wrote (`num_records` records of images of shape
    `image_shape`); `positions`, `extra`: as `LazyImages`'s."""
    self.path = Path(folder) / f"{split}{RECORDS_SUFFIX}"
    super().__init__(image_shape, num_records, positions, extra)

  def __repr__(self) -> str:
    return f"RecordImages({self.path}, shape={self.shape})"

  def _open_reader(self):
    reader = array_record_module.ArrayRecordReader(str(self.path), _READER_OPTIONS)
    if reader.num_records() != self.num_records:
      raise RecordError(f"{self.path} holds {reader.num_records()} records, expected "
                        f"{self.num_records}: the cache entry is damaged; delete it to "
                        "rebuild it.")
    return reader

  def _decode_records(self, reader, positions: np.ndarray) -> list[np.ndarray]:
    images = []
    for position, data in zip(positions, reader.read(positions.tolist())):
      where = f"{self.path} record {position}"
      record = parse_record(data, where)
      if record.index != position or record.shape != self.image_shape:
        raise RecordError(f"{where} holds example {record.index} of shape {record.shape}, "
                          f"expected example {position} of shape {self.image_shape}: the cache "
                          "entry is damaged; delete it to rebuild it.")
      images.append(decode(record, where))
    return images
