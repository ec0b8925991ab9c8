"""Helpers for tests of dpjax.data and of code that uses it (no pytest dependency)."""

from __future__ import annotations

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
