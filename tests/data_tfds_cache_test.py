"""Tests of dpjax.data.tfds_cache on a tiny fake CIFAR-10 (no real data, no network)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpjax.data import local_files
from dpjax.data import locations
from dpjax.data import testing
from dpjax.data import tfds_cache


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
  """(data_dir, cache_root) with a fake CIFAR-10 (20 images per batch) cached once."""
  data_dir = tmp_path_factory.mktemp("data")
  testing.write_fake_cifar10(data_dir, images_per_batch=20)
  cache_root = tfds_cache.ensure_cache("cifar10", tmp_path_factory.mktemp("cache"), data_dir,
                                       verify=False)
  return data_dir, cache_root


def _cache_files(cache_root):
  return {p: p.stat().st_mtime_ns for p in (cache_root / "dpjax_local").rglob("*") if p.is_file()}


def test_cache_is_array_record_read_by_tfds_data_source(fake_cifar):
  _, cache_root = fake_cifar
  assert any(".array_record" in p.name for p in _cache_files(cache_root))
  source = tfds.data_source("dpjax_local/cifar10", split="test", data_dir=cache_root,
                            download=False)
  record = source[0]
  assert len(source) == 20 and record["image"].shape == (32, 32, 3)
  assert record["image"].dtype == np.uint8 and set(record) == {"image", "label", "index"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_read_back_in_original_order(fake_cifar, split):
  data_dir, cache_root = fake_cifar
  images, labels = tfds_cache.read_cached_split("cifar10", split, cache_root)
  want_images, want_labels = local_files.read_split(
      "cifar10", split, locations.resolve_data_dir("cifar10", data_dir), verify=False)
  np.testing.assert_array_equal(images, want_images)
  np.testing.assert_array_equal(labels, want_labels)
  assert labels.dtype == np.int32


def test_records_are_stored_shuffled(fake_cifar):
  """Guards the test above: TFDS really reorders records, so the index field matters."""
  _, cache_root = fake_cifar
  source = tfds.data_source("dpjax_local/cifar10", split="train", data_dir=cache_root,
                            download=False)
  stored_order = [source[i]["index"] for i in range(len(source))]
  assert sorted(stored_order) == list(range(100)) and stored_order != list(range(100))


def test_second_ensure_does_not_rebuild(fake_cifar, monkeypatch):
  data_dir, cache_root = fake_cifar
  before = _cache_files(cache_root)
  def fail(*args, **kwargs):
    raise AssertionError("the cache was rebuilt")
  monkeypatch.setattr(local_files, "read_split", fail)
  monkeypatch.setattr(locations, "resolve_data_dir", fail)
  assert tfds_cache.ensure_cache("cifar10", cache_root, data_dir, verify=False) == cache_root
  assert _cache_files(cache_root) == before


def test_default_cache_dir_comes_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv(tfds_cache.CACHE_DIR_ENV, str(tmp_path / "c"))
  assert tfds_cache.default_cache_dir() == tmp_path / "c"
  monkeypatch.delenv(tfds_cache.CACHE_DIR_ENV)
  assert tfds_cache.default_cache_dir().parts[-2:] == (".cache", "dpjax")


def test_missing_files_raise_data_not_found(tmp_path):
  with pytest.raises(locations.DataNotFoundError, match="CIFAR-10 files not found"):
    tfds_cache.ensure_cache("cifar10", tmp_path / "cache", tmp_path / "no_data")


def test_unofficial_files_fail_verification_and_leave_no_cache(tmp_path):
  testing.write_fake_cifar10(tmp_path / "data", images_per_batch=2, tarball=True)
  with pytest.raises(local_files.ChecksumError):
    tfds_cache.ensure_cache("cifar10", tmp_path / "cache", tmp_path / "data")
  assert not list((tmp_path / "cache").rglob("dataset_info.json"))


def test_losing_the_build_race_to_another_process_is_fine(fake_cifar, tmp_path, monkeypatch):
  data_dir, cache_root = fake_cifar
  def rename_fails(self, **kwargs):
    raise OSError("Directory not empty")
  monkeypatch.setattr(tfds_cache.DpjaxLocal, "download_and_prepare", rename_fails)
  tfds_cache._build("cifar10", cache_root, data_dir, verify=False)  # the cache is there: fine
  with pytest.raises(OSError, match="not empty"):
    tfds_cache._build("cifar10", tmp_path, data_dir, verify=False)  # no cache: the error stays


def test_load_tfds_by_name_is_tfds_data_source(fake_cifar):
  _, cache_root = fake_cifar
  source = tfds_cache.load_tfds_by_name("dpjax_local/cifar10", "train", cache_root,
                                        download=False)
  assert len(source) == 100 and source[3]["image"].shape == (32, 32, 3)
