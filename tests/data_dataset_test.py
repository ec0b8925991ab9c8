"""Tests of dpjax.data.dataset: load_dataset on the real MNIST / Fashion-MNIST, preprocessing."""

import numpy as np
import pytest

from dpjax.data import batches
from dpjax.data import dataset as dataset_lib
from dpjax.data import local_files
from dpjax.data import records
from dpjax.data import splits
from dpjax.data import testing
from dpjax.data import tfds_cache

DATA_DIR = testing.find_shared_data(__file__)
needs_data = pytest.mark.skipif(DATA_DIR is None, reason=testing.NO_DATA_REASON)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def mnist_train(cache_dir):
  return dataset_lib.load_dataset("mnist", "train", DATA_DIR, cache_dir)


@needs_data
def test_mnist_train(mnist_train):
  assert mnist_train.images.shape == (60000, 28, 28, 1) and mnist_train.images.dtype == np.uint8
  assert mnist_train.labels.shape == (60000,) and mnist_train.labels.dtype == np.int32
  assert (mnist_train.num_classes, mnist_train.name, mnist_train.split) == (10, "mnist", "train")
  assert np.bincount(mnist_train.labels).tolist() == MNIST_TRAIN_COUNTS


@needs_data
def test_mnist_is_in_original_file_order(mnist_train):
  images, labels = local_files.read_split("mnist", "train", DATA_DIR / "mnist")
  np.testing.assert_array_equal(mnist_train.images, images)
  np.testing.assert_array_equal(mnist_train.labels, labels)


@needs_data
def test_second_load_reads_the_cache_only(mnist_train, cache_dir):
  files = sorted((cache_dir / "dpjax_local" / "mnist").rglob("*.array_record*"))
  mtimes = [f.stat().st_mtime_ns for f in files]
  # A rebuild would have to find the original files, and there are none at data_dir.
  again = dataset_lib.load_dataset("mnist", "test", data_dir="/nonexistent", cache_dir=cache_dir)
  assert len(again) == 10000 and files
  assert [f.stat().st_mtime_ns for f in files] == mtimes


@needs_data
def test_fashion_mnist_train(tmp_path):
  fmnist = dataset_lib.load_dataset("fashion_mnist", "train", DATA_DIR, tmp_path)
  assert fmnist.images.shape == (60000, 28, 28, 1)
  assert np.bincount(fmnist.labels).tolist() == [6000] * 10


@needs_data
def test_normalization_constants_match_the_data(mnist_train):
  mean, std = dataset_lib.normalization("mnist")
  pixels = dataset_lib.to_float(mnist_train.images)
  np.testing.assert_allclose([pixels.mean()], mean, atol=1e-4)
  np.testing.assert_allclose([pixels.std()], std, atol=1e-4)


def test_fake_cifar10_through_env_cache_dir(tmp_path, monkeypatch):
  _, batches = testing.write_fake_cifar10(tmp_path / "data", images_per_batch=2)
  monkeypatch.setenv(tfds_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
  test = dataset_lib.load_dataset("cifar10", "test", tmp_path / "data", verify=False)
  assert test.images.shape == (2, 32, 32, 3) and test.num_classes == 10
  assert test.labels.tolist() == batches["test_batch"][b"labels"]
  assert (tmp_path / "cache" / "dpjax_local" / "cifar10").is_dir()


def test_an_image_folder_stays_lazy_through_subsets_splits_and_batches(tmp_path):
  testing.write_image_folder(tmp_path / "f", counts={"train": 10, "test": 2})
  train = dataset_lib.load_dataset("image_folder", "train", tmp_path / "f", tmp_path / "cache")
  assert isinstance(train.images, records.RecordImages) and len(train) == 30
  assert (train.image_shape, train.num_classes, train.split) == ((8, 8, 3), 3, "train")
  dense = np.asarray(train.images)
  public_idx, private_idx = splits.public_private_split(30, 0.3, seed=0)
  parts = splits.split_dataset(train, 0.3, seed=0)
  assert isinstance(parts.private.images, records.RecordImages)
  np.testing.assert_array_equal(parts.private.images[:], dense[private_idx])
  np.testing.assert_array_equal(parts.private.labels, train.labels[private_idx])
  batch = batches.gather(parts.public, np.array([2, 0]))
  np.testing.assert_array_equal(batch["image"], dataset_lib.to_float(dense[public_idx[[2, 0]]]))
  with pytest.raises(ValueError, match="image_folder only"):
    dataset_lib.load_dataset("mnist", "train", cache_dir=tmp_path, classes=("a",))


def test_in_memory_decodes_lazy_images_once_into_an_array(tmp_path):
  testing.write_image_folder(tmp_path / "f", counts={"train": 10, "test": 2})
  train = dataset_lib.load_dataset("image_folder", "train", tmp_path / "f", tmp_path / "cache")
  dense = dataset_lib.in_memory(train, threads=3, chunk=7)  # chunks that do not divide 30
  assert isinstance(dense.images, np.ndarray) and dense.images.dtype == np.uint8
  np.testing.assert_array_equal(dense.images, np.asarray(train.images))
  np.testing.assert_array_equal(dense.labels, train.labels)
  assert (dense.name, dense.split, dense.num_classes) == (train.name, train.split, 3)
  assert dataset_lib.in_memory(dense) is dense


def test_normalization_is_public_constants_only():
  mean, std = dataset_lib.normalization("cifar10_jpeg")
  np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465])
  assert std.shape == (3,)
  with pytest.raises(ValueError, match="no public normalization constants.*private data"):
    dataset_lib.normalization("image_folder")


def test_unknown_name_lists_known_ones(tmp_path):
  with pytest.raises(ValueError, match="known: mnist, fashion_mnist, cifar10, .* or 'tfds:<name>'"):
    dataset_lib.load_dataset("svhn", "train", cache_dir=tmp_path)


def test_unknown_split(tmp_path):
  with pytest.raises(ValueError, match="train, test"):
    dataset_lib.load_dataset("mnist", "validation", cache_dir=tmp_path)


def test_to_float_and_standardize():
  images = np.array([0, 51, 255], np.uint8).reshape(1, 3, 1, 1)
  floats = dataset_lib.to_float(images)
  assert floats.dtype == np.float32 and floats.shape == images.shape
  np.testing.assert_allclose(floats.ravel(), [0.0, 0.2, 1.0], rtol=1e-6)
  assert floats.min() == 0.0 and floats.max() == 1.0
  np.testing.assert_allclose(dataset_lib.standardize(images, "mnist").ravel(),
                             (np.array([0.0, 0.2, 1.0]) - 0.1307) / 0.3081, rtol=1e-6)


def test_normalization_has_one_value_per_channel():
  mean, std = dataset_lib.normalization("cifar10")
  assert mean.shape == std.shape == (3,) and (std > 0).all()


def test_dataset_rejects_wrong_dtypes():
  with pytest.raises(ValueError, match="uint8"):
    dataset_lib.Dataset(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32), 10, "x")
  with pytest.raises(ValueError, match="int32"):
    dataset_lib.Dataset(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64), 10, "x")
