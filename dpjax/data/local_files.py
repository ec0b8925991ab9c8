"""Readers for the original distribution files of MNIST, Fashion-MNIST and CIFAR-10.

- MNIST / Fashion-MNIST: gzip'd IDX files (train-images-idx3-ubyte.gz, ...). Checksums are taken
  of the *decompressed* bytes, so copies whose gzip header differs (Debian's) pass.
- CIFAR-10: the python tarball cifar-10-python.tar.gz (md5-checked) or its extracted folder
  cifar-10-batches-py/ (structure-checked only). Batches are pickles; they are read with an
  unpickler that only admits the NumPy classes a CIFAR batch uses.

`verify=True` means "this must be the official release": checksums and example counts are checked.
`verify=False` checks only the format (magic numbers, shapes, label range).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

from dpjax.data import specs

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
REPLACE_IT = "Delete it and download it again, or point data.dir at a good copy."


class ChecksumError(ValueError):
  """A file's md5 differs from the official release's."""


class DataFormatError(ValueError):
  """A file is not in the format its name promises (or is corrupt); the message names it."""


def md5_hex(data: bytes) -> str:
  """Returns the md5 hex digest of `data`."""
  return hashlib.md5(data).hexdigest()


def file_md5_hex(path: Path) -> str:
  """Returns the md5 hex digest of the file at `path`, read in chunks."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "md5").hexdigest()


def check_md5(path: Path, actual: str, expected: str, what: str = "file") -> None:
  """Raises ChecksumError if `actual` != `expected`; `what` names what was hashed."""
  if actual != expected:
    raise ChecksumError(
        f"Checksum mismatch for {path}: md5 of the {what} is {actual}, expected {expected} "
        "(the official release). The file is corrupt, truncated or not the original: delete it "
        "and download it again, or pass verify=False to use it anyway.")


def read_idx(path: Path, expected_magic: int, expected_md5: str | None = None) -> np.ndarray:
  """Reads one IDX file (gzip'd if its name ends in .gz) into a uint8 array.

  Args:
    path: the file.
    expected_magic: IDX_IMAGES_MAGIC (result [N, H, W]) or IDX_LABELS_MAGIC (result [N]).
    expected_md5: md5 of the decompressed bytes, or None to skip the check.

  Raises:
    ChecksumError: on an md5 mismatch.
    DataFormatError: on a wrong magic number or a size that disagrees with the header.
  """
  data = idx_bytes(path)
  if expected_md5 is not None:
    check_md5(path, md5_hex(data), expected_md5, "decompressed bytes")
  return _parse_idx(path, data, expected_magic)


def idx_bytes(path: Path) -> bytes:
  """The bytes of an IDX file, decompressed if its name ends in .gz.

  Raises:
    DataFormatError: naming `path` when it is not a complete gzip stream (truncated, damaged).
  """
  raw = path.read_bytes()
  if path.suffix != ".gz":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
    raise DataFormatError(f"{path} is not a readable gzip file ({e}): it is truncated or "
                          f"corrupt. {REPLACE_IT}") from e


def _parse_idx(path: Path, data: bytes, expected_magic: int) -> np.ndarray:
  magic = struct.unpack(">i", data[:4])[0] if len(data) >= 4 else None
  if magic != expected_magic:
    raise DataFormatError(f"{path} is not an IDX file of the expected kind: magic number "
                          f"{magic}, expected {expected_magic}. {REPLACE_IT}")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataFormatError(f"{path}: the IDX header needs {header} bytes, the file has "
                          f"{len(data)}. {REPLACE_IT}")
  dims = struct.unpack(f">{ndim}I", data[4:header])
  if len(data) != header + int(np.prod(dims)):
    raise DataFormatError(f"{path}: header says shape {dims}, which needs "
                          f"{int(np.prod(dims))} bytes of data, but it has {len(data) - header}. "
                          f"{REPLACE_IT}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def read_idx_split(folder: Path, spec: specs.DatasetSpec, split: str,
                   verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of an IDX dataset: images [N, H, W, 1] uint8, labels [N] int32."""
  image_file, label_file = spec.files[split]
  images = read_idx(folder / image_file, IDX_IMAGES_MAGIC, _idx_md5(spec, image_file, verify))
  labels = read_idx(folder / label_file, IDX_LABELS_MAGIC, _idx_md5(spec, label_file, verify))
  return images[..., None], labels.astype(np.int32)


def _idx_md5(spec: specs.DatasetSpec, file_name: str, verify: bool) -> str | None:
  return specs.official_md5(spec, file_name) if verify else None


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles CIFAR batches: dicts of bytes, lists and uint8 arrays; refuses any other class."""

  _ALLOWED = frozenset({
      ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")})

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which a CIFAR "
                                   "batch never does; refusing to load it.")
    return super().find_class(module, name)


def _parse_cifar_batch(where: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Parses one pickled batch into images [n, 32, 32, 3] uint8 (from CHW rows), labels [n]."""
  try:
    batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # a damaged pickle raises any of a dozen types; all mean the same here
    raise DataFormatError(f"{where} is not a readable CIFAR batch ({type(e).__name__}: {e}). "
                          f"{REPLACE_IT}") from e
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    raise DataFormatError(f"{where} is not a CIFAR batch (a dict with b'data' and b'labels').")
  data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], np.int32)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataFormatError(f"{where}: b'data' is {data.dtype} {data.shape}, expected uint8 "
                          "[n, 3072].")
  if labels.shape != (data.shape[0],):
    raise DataFormatError(f"{where}: {labels.shape[0]} labels for {data.shape[0]} images.")
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_batch_bytes(source: Path, spec: specs.DatasetSpec, names: tuple[str, ...],
                       verify: bool) -> list[bytes]:
  """Returns the raw bytes of the named batch files from a folder or the official tarball."""
  if source.is_dir():
    return [(source / name).read_bytes() for name in names]
  if verify:
    check_md5(source, file_md5_hex(source), specs.official_md5(spec, source.name), "tarball")
  try:
    with tarfile.open(source, "r:gz") as tar:
      members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
      missing = [n for n in names if n not in members]
      if missing:
        raise DataFormatError(f"{source} lacks {', '.join(missing)}. {REPLACE_IT}")
      return [tar.extractfile(members[n]).read() for n in names]
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataFormatError(f"{source} is not a readable tar.gz archive ({e}): it is truncated or "
                          f"corrupt. {REPLACE_IT}") from e


def read_cifar_split(source: Path, spec: specs.DatasetSpec, split: str,
                     verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR split: images [N, 32, 32, 3] uint8, labels [N] int32.

  Args:
    source: the cifar-10-batches-py folder or the cifar-10-python.tar.gz tarball.
    verify: check the tarball's md5 (when `source` is the tarball).
  """
  names = spec.files[split]
  where = (lambda n: str(source / n)) if source.is_dir() else (lambda n: f"{source} (member {n})")
  parts = [_parse_cifar_batch(where(n), raw)
           for n, raw in zip(names, _cifar_batch_bytes(source, spec, names, verify))]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_split(name: str, split: str, source: Path,
               verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of a known dataset from its original files and validates it.

  Args:
    name: a dataset in `specs.LOCAL_DATASETS`.
    split: "train" or "test".
    source: what `locations.resolve_data_dir` returned.
    verify: require the official release (checksums and example counts).

  Returns:
    (images, labels): images [N, H, W, C] uint8, labels [N] int32 in [0, num_classes).
  """
  spec = specs.local_spec(name)
  specs.check_split(split)
  reader = read_idx_split if spec.file_format == "idx" else read_cifar_split
  images, labels = reader(Path(source), spec, split, verify)
  _validate(spec, split, source, images, labels, verify)
  return images, labels


def _validate(spec: specs.DatasetSpec, split: str, source: Path, images: np.ndarray,
              labels: np.ndarray, verify: bool) -> None:
  """Raises DataFormatError if the arrays do not have the shapes and values of `spec`."""
  problems = []
  if images.shape[1:] != spec.image_shape:
    problems.append(f"images have shape {images.shape}, expected [N, {spec.image_shape}]")
  if len(images) != len(labels):
    problems.append(f"{len(images)} images but {len(labels)} labels")
  if labels.size and not 0 <= labels.min() <= labels.max() < spec.num_classes:
    problems.append(f"labels outside [0, {spec.num_classes})")
  if verify and len(images) != spec.num_examples[split]:
    problems.append(f"{len(images)} examples, the official release has "
                    f"{spec.num_examples[split]} (pass verify=False to accept)")
  if problems:
    raise DataFormatError(f"{spec.title} {split} split from {source}: {'; '.join(problems)}.")
