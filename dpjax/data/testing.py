"""Helpers for tests of dpjax.data and of code that uses it (no pytest dependency)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import io
import pickle
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from dpjax.data import locations
from dpjax.data import specs

NO_DATA_REASON = (f"real datasets not found: {locations.DATA_DIR_ENV} is unset (or not a folder) "
                  "and <repo>/../shared/data does not exist; set "
                  f"{locations.DATA_DIR_ENV}=/path/to/shared/data to run these tests")


def find_shared_data(test_file: str) -> Path | None:
  """$DPJAX_DATA_DIR if set, else `test_file`'s <repo>/../shared/data; None if it is missing.

  `test_file` is a test's __file__, i.e. <repo>/tests/<name>_test.py.
  """
  env = os.environ.get(locations.DATA_DIR_ENV)
  path = Path(env) if env else Path(test_file).resolve().parents[2] / "shared" / "data"
  return path if path.is_dir() else None


def write_fake_idx(root: Path, name: str = "mnist", examples: tuple[int, int] = (6, 4),
                   seed: int = 0) -> Path:
  """Writes a tiny MNIST-like dataset in the original format: root/<subfolder>/*-idx?-ubyte.gz.

  `examples` is (train, test); images are random uint8 [n, 28, 28], labels random in [0, 10).
  Returns the folder (what `locations.resolve_data_dir(name, root)` finds).
  """
  spec = specs.get_spec(name)
  rng = np.random.default_rng(seed)
  folder = root / spec.subfolders[0]
  folder.mkdir(parents=True)
  for split, n in zip(specs.SPLITS, examples):
    image_file, label_file = spec.files[split]
    write_idx(folder / image_file, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(folder / label_file, rng.integers(0, 10, n, dtype=np.uint8))
  return folder


def write_idx(path: Path, array: np.ndarray) -> Path:
  """Writes uint8 `array` [N] or [N, H, W] as a gzip'd IDX file (magic 2049 or 2051)."""
  header = (0x800 + array.ndim).to_bytes(4, "big")
  header += b"".join(d.to_bytes(4, "big") for d in array.shape)
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))
  return path


def spec_of_files(name: str, folder: Path) -> specs.DatasetSpec:
  """`name`'s spec with the checksums and counts of the IDX files in `folder`, so that tests can
  make tiny files pass as the official release (monkeypatch it into specs._SPECS)."""
  spec = specs.get_spec(name)
  raw = {f: gzip.decompress((folder / f).read_bytes()) for f in spec.all_files}
  md5 = {f.removesuffix(".gz"): hashlib.md5(data).hexdigest() for f, data in raw.items()}
  counts = {split: int.from_bytes(raw[spec.files[split][1]][4:8], "big") for split in specs.SPLITS}
  return dataclasses.replace(spec, md5=md5, num_examples=counts)


def write_fake_cifar10(root: Path, images_per_batch: int = 3, seed: int = 0,
                       tarball: bool = False) -> tuple[Path, dict[str, dict[bytes, object]]]:
  """Writes a tiny CIFAR-10 in the original format: root/cifar-10-batches-py/<batch> pickles.

  Each batch is a dict with b"data" uint8 [images_per_batch, 3072] (rows in CHW order),
  b"labels" (list of ints in [0, 10)), b"batch_label" and b"filenames", as in the original.

  Returns:
    (path, batches): path is the folder, or root/cifar-10-python.tar.gz when `tarball` (then the
    folder is removed); batches maps batch file name -> the dict that was pickled.
  """
  rng = np.random.default_rng(seed)
  folder = root / specs.CIFAR10_FOLDER
  folder.mkdir(parents=True)
  batches = {}
  for name in specs.get_spec("cifar10").all_files:
    batches[name] = _fake_batch(rng, name, images_per_batch)
    (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
  if not tarball:
    return folder, batches
  return _pack(folder, root / specs.CIFAR10_TARBALL), batches


def _fake_batch(rng: np.random.Generator, name: str, n: int) -> dict[bytes, object]:
  return {b"batch_label": name.encode(),
          b"labels": rng.integers(0, 10, n).tolist(),
          b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
          b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}


def _pack(folder: Path, tarball: Path) -> Path:
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(folder, arcname=folder.name)
  for f in folder.iterdir():
    f.unlink()
  folder.rmdir()
  return tarball


def write_image_folder(root: Path, classes: Sequence[str] = ("ant", "bee", "cat"),
                       counts: Mapping[str, int] | None = None,
                       shape: tuple[int, int, int] = (8, 8, 3), seed: int = 0,
                       suffixes: Sequence[str] = (".png", ".jpg")) -> dict[str, np.ndarray]:
  """Writes random images as root/<split>/<class>/<i><suffix> (suffixes taken in turn).

  counts: split -> images per class (default train 4, test 2). shape: (H, W, C), C 1 or 3.

  Returns:
    relative path -> its pixels uint8 [H, W, C] as Pillow decodes the file (JPEG is lossy).
  """
  rng = np.random.default_rng(seed)
  pixels = {}
  for split, n in (counts or {"train": 4, "test": 2}).items():
    for name in classes:
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        path = f"{split}/{name}/{i}{suffixes[i % len(suffixes)]}"
        write_image(root / path, rng.integers(0, 256, shape, dtype=np.uint8))
        pixels[path] = np.asarray(PIL.Image.open(root / path)).reshape(shape)
  return pixels


def write_image(path: Path, pixels: np.ndarray) -> Path:
  """Saves uint8 pixels [H, W, C] (C 1 or 3) as the image format `path`'s suffix names."""
  PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
  return path


def encoded(pixels: np.ndarray, image_format: str) -> bytes:
  """uint8 pixels [H, W, C] encoded as an image file of `image_format` ("PNG", "JPEG", ...)."""
  out = io.BytesIO()
  PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(out, image_format)
  return out.getvalue()


def pack(folder: Path, archive: Path, top: str = "", reverse: bool = False) -> Path:
  """Packs the files and folders below `folder` into `archive` (.tar, .tar.gz, .tgz or .zip, by
  its name), below a folder `top` if given, in sorted order (reversed if `reverse`)."""
  archive.parent.mkdir(parents=True, exist_ok=True)
  paths = sorted(folder.rglob("*"), reverse=reverse)
  names = [str(Path(top) / p.relative_to(folder)) for p in paths]
  if archive.name.endswith(".zip"):
    with zipfile.ZipFile(archive, "w") as z:
      for path, name in zip(paths, names):
        z.write(path, name)
    return archive
  mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
  with tarfile.open(archive, mode) as tar:
    for path, name in zip(paths, names):
      tar.add(path, name, recursive=False)
  return archive
