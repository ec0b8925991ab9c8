"""Tests of dpjax.data.local_files: IDX and CIFAR readers, checksums, format checks."""

import gzip
import pickle
import shutil

import numpy as np
import pytest

from dpjax.data import local_files
from dpjax.data import testing

DATA_DIR = testing.find_shared_data(__file__)
needs_data = pytest.mark.skipif(DATA_DIR is None, reason=testing.NO_DATA_REASON)


def _regzip_test_split(src, dst, rewrite=lambda raw: raw):
  """Writes `src`'s t10k files into `dst`, re-gzip'd by Python (a new header) after `rewrite`."""
  dst.mkdir()
  for f in src.glob("t10k-*.gz"):
    raw = rewrite(gzip.decompress(f.read_bytes()))
    (dst / f.name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
  return dst


@needs_data
def test_mnist_test_split_shapes_and_labels():
  images, labels = local_files.read_split("mnist", "test", DATA_DIR / "mnist")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.int32
  assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_data
def test_corrupted_copy_raises_checksum_error(tmp_path):
  def flip_last_byte(raw):
    return raw[:-1] + bytes([raw[-1] ^ 1])
  folder = _regzip_test_split(DATA_DIR / "mnist", tmp_path / "mnist", flip_last_byte)
  with pytest.raises(local_files.ChecksumError) as error:
    local_files.read_split("mnist", "test", folder)
  message = str(error.value)
  assert "t10k-images-idx3-ubyte.gz" in message and str(folder) in message
  assert "2646ac647ad5339dbf082846283269ea" in message  # expected md5
  assert "download it again" in message
  # The corruption keeps the format valid, so only the checksum can catch it.
  images, _ = local_files.read_split("mnist", "test", folder, verify=False)
  assert images.shape == (10000, 28, 28, 1)


@needs_data
def test_debian_style_copy_passes(tmp_path):
  """Same decompressed bytes, different gzip header (as Debian's dataset-fashion-mnist)."""
  folder = _regzip_test_split(DATA_DIR / "fashion-mnist", tmp_path / "fmnist")
  name = "t10k-labels-idx1-ubyte.gz"
  assert (folder / name).read_bytes() != (DATA_DIR / "fashion-mnist" / name).read_bytes()
  images, labels = local_files.read_split("fashion_mnist", "test", folder)
  assert images.shape == (10000, 28, 28, 1)
  assert np.bincount(labels).tolist() == [1000] * 10


def _write_idx(path, magic, dims, payload):
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
  path.write_bytes(gzip.compress(header + payload))
  return path


def test_idx_wrong_magic_is_rejected(tmp_path):
  path = _write_idx(tmp_path / "x.gz", local_files.IDX_IMAGES_MAGIC, [2, 2, 2], bytes(8))
  with pytest.raises(local_files.DataFormatError, match="magic number 2051, expected 2049"):
    local_files.read_idx(path, local_files.IDX_LABELS_MAGIC)


def test_idx_truncated_is_rejected(tmp_path):
  path = _write_idx(tmp_path / "x.gz", local_files.IDX_IMAGES_MAGIC, [2, 2, 2], bytes(7))
  with pytest.raises(local_files.DataFormatError, match="shape"):
    local_files.read_idx(path, local_files.IDX_IMAGES_MAGIC)


def test_idx_reads_dims_from_header(tmp_path):
  path = _write_idx(tmp_path / "x.gz", local_files.IDX_IMAGES_MAGIC, [2, 3, 4], bytes(range(24)))
  images = local_files.read_idx(path, local_files.IDX_IMAGES_MAGIC)
  np.testing.assert_array_equal(images, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


def _reference_hwc(batches, names):
  """Per-pixel reference: image[i, h, w, c] = row[c * 1024 + h * 32 + w]."""
  rows = np.concatenate([batches[n][b"data"] for n in names])
  images = np.zeros((len(rows), 32, 32, 3), np.uint8)
  for c in range(3):
    for h in range(32):
      for w in range(32):
        images[:, h, w, c] = rows[:, c * 1024 + h * 32 + w]
  labels = np.concatenate([batches[n][b"labels"] for n in names])
  return images, labels


@pytest.mark.parametrize("split, names", [
    ("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])])
def test_cifar_folder_matches_reference(tmp_path, split, names):
  folder, batches = testing.write_fake_cifar10(tmp_path, images_per_batch=3)
  images, labels = local_files.read_split("cifar10", split, folder, verify=False)
  want_images, want_labels = _reference_hwc(batches, names)
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  assert images.dtype == np.uint8 and labels.dtype == np.int32


def test_cifar_folder_verify_checks_official_counts(tmp_path):
  folder, _ = testing.write_fake_cifar10(tmp_path, images_per_batch=2)
  with pytest.raises(local_files.DataFormatError, match="official release has 50000"):
    local_files.read_split("cifar10", "train", folder)


def test_cifar_tarball_checksum_and_contents(tmp_path):
  tarball, batches = testing.write_fake_cifar10(tmp_path, images_per_batch=2, tarball=True)
  with pytest.raises(local_files.ChecksumError, match="c58f30108f718f92721af3b95e74349a"):
    local_files.read_split("cifar10", "test", tarball)
  images, labels = local_files.read_split("cifar10", "test", tarball, verify=False)
  want_images, want_labels = _reference_hwc(batches, ["test_batch"])
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)


def test_cifar_batch_with_foreign_class_is_refused(tmp_path):
  folder, _ = testing.write_fake_cifar10(tmp_path, images_per_batch=1)
  (folder / "test_batch").write_bytes(pickle.dumps({b"data": shutil.rmtree}))
  with pytest.raises(local_files.DataFormatError, match="test_batch.*refusing") as error:
    local_files.read_split("cifar10", "test", folder, verify=False)
  assert isinstance(error.value.__cause__, pickle.UnpicklingError)


# A corrupt file raises DataFormatError naming it and saying what to do.
@pytest.mark.parametrize("cut", [10, 100])  # the gzip header only, or part of the stream
def test_truncated_gzip_is_named(tmp_path, cut):
  path = testing.write_idx(tmp_path / "x-idx1-ubyte.gz", np.arange(200, dtype=np.uint8))
  path.write_bytes(path.read_bytes()[:cut])
  with pytest.raises(local_files.DataFormatError, match="not a readable gzip") as error:
    local_files.read_idx(path, local_files.IDX_LABELS_MAGIC)
  assert str(path) in str(error.value) and "download it again" in str(error.value)


def test_idx_header_cut_short_is_named(tmp_path):
  path = tmp_path / "x.gz"
  path.write_bytes(gzip.compress(local_files.IDX_IMAGES_MAGIC.to_bytes(4, "big") + bytes(5)))
  with pytest.raises(local_files.DataFormatError, match="header needs 16 bytes") as error:
    local_files.read_idx(path, local_files.IDX_IMAGES_MAGIC)
  assert str(path) in str(error.value)


def test_truncated_cifar_tarball_is_named(tmp_path):
  tarball, _ = testing.write_fake_cifar10(tmp_path, images_per_batch=50, tarball=True)
  tarball.write_bytes(tarball.read_bytes()[:-1000])
  with pytest.raises(local_files.DataFormatError, match="not a readable tar.gz") as error:
    local_files.read_split("cifar10", "test", tarball, verify=False)
  assert str(tarball) in str(error.value) and "download it again" in str(error.value)


def test_damaged_cifar_batch_is_named(tmp_path):
  folder, _ = testing.write_fake_cifar10(tmp_path, images_per_batch=2)
  path = folder / "data_batch_3"
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(local_files.DataFormatError, match="not a readable CIFAR batch") as error:
    local_files.read_split("cifar10", "train", folder, verify=False)
  assert str(path) in str(error.value)


def test_cifar_batch_with_wrong_width_is_rejected(tmp_path):
  folder, _ = testing.write_fake_cifar10(tmp_path, images_per_batch=1)
  bad = {b"data": np.zeros((1, 3000), np.uint8), b"labels": [0]}
  (folder / "test_batch").write_bytes(pickle.dumps(bad))
  with pytest.raises(local_files.DataFormatError, match=r"\[n, 3072\]"):
    local_files.read_split("cifar10", "test", folder, verify=False)
