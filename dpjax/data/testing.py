"""Helpers for tests of dpjax.data and of code that uses it (no pytest dependency)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

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
