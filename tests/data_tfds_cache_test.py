"""Tests of dpjax.data.tfds_cache on tiny fake CIFAR-10 and MNIST files (no real data, no
network): the cache, which entry is used for which files, and what is refused."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpjax.data import cache_manifest
from dpjax.data import local_files
from dpjax.data import locations
from dpjax.data import specs
from dpjax.data import testing
from dpjax.data import tfds_cache


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
  """(data_dir, cache entry) with a fake CIFAR-10 (20 images per batch) cached once."""
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


def _forbid_builds(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the cache was rebuilt")
  monkeypatch.setattr(local_files, "read_split", fail)
  monkeypatch.setattr(tfds_cache.DpjaxLocal, "download_and_prepare", fail)


def test_second_ensure_does_not_rebuild(fake_cifar, tmp_path, monkeypatch):
  data_dir, entry = fake_cifar
  before = _cache_files(entry)
  _forbid_builds(monkeypatch)
  root = entry.parents[2]
  assert tfds_cache.ensure_cache("cifar10", root, data_dir, verify=False) == entry
  # Without the original files, the one entry there is is used.
  assert tfds_cache.ensure_cache("cifar10", root, tmp_path / "gone", verify=False) == entry
  assert _cache_files(entry) == before


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
  assert not list((tmp_path / "cache" / "dpjax_local" / "cifar10").iterdir())  # no .tmp-* left


def test_losing_the_build_race_to_another_process_is_fine(fake_cifar, tmp_path, monkeypatch):
  """Another process renames the same entry into place while this one builds: it is used."""
  data_dir, entry = fake_cifar
  real_build = tfds_cache.DpjaxLocal.download_and_prepare
  def other_process_first(placed):
    def build(self, **kwargs):
      shutil.copytree(placed, tmp_path / "cache" / entry.relative_to(entry.parents[2]))
      return real_build(self, **kwargs)
    return build
  monkeypatch.setattr(tfds_cache.DpjaxLocal, "download_and_prepare", other_process_first(entry))
  won = tfds_cache.ensure_cache("cifar10", tmp_path / "cache", data_dir, verify=False)
  assert won.name == entry.name and _cache_files(won).keys() != set()
  # What the other process placed is not a trusted entry: the rename's error stays.
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "x").write_text("x")
  monkeypatch.setattr(tfds_cache.DpjaxLocal, "download_and_prepare", other_process_first(junk))
  with pytest.raises(OSError):
    tfds_cache.ensure_cache("cifar10", tmp_path / "cache2", data_dir, verify=False)


def test_load_tfds_by_name_is_tfds_data_source(fake_cifar):
  _, cache_root = fake_cifar
  source = tfds_cache.load_tfds_by_name("dpjax_local/cifar10", "train", cache_root,
                                        download=False)
  assert len(source) == 100 and source[3]["image"].shape == (32, 32, 3)


# Which entry is used for which files. Tiny MNIST-like IDX files; `official` makes them pass as
# the official release (their checksums and counts patched into the spec).


@pytest.fixture
def tiny_mnist(tmp_path):
  """(data root, cache root) with tiny MNIST files that are not the official release."""
  testing.write_fake_idx(tmp_path / "data", "mnist", examples=(6, 4))
  return tmp_path / "data", tmp_path / "cache"


def _official(monkeypatch, data_root):
  monkeypatch.setitem(specs._SPECS, "mnist", testing.spec_of_files("mnist", data_root / "mnist"))


def _manifest(entry):
  return json.loads((entry / cache_manifest.MANIFEST).read_text())


def test_unverified_entry_is_never_used_by_a_verified_run(tiny_mnist, tmp_path):
  data_root, cache = tiny_mnist
  entry = tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  assert _manifest(entry)["verified"] is False
  with pytest.raises(local_files.ChecksumError) as error:  # the same files, now verified
    tfds_cache.ensure_cache("mnist", cache, data_root, verify=True)
  assert "t10k-images-idx3-ubyte.gz" in str(error.value) and str(entry) in str(error.value)
  assert specs.get_spec("mnist").md5["t10k-images-idx3-ubyte"] in str(error.value)
  # Without the files, the unverified entry is refused too, and the error says why.
  with pytest.raises(locations.DataNotFoundError, match="not the official release"):
    tfds_cache.ensure_cache("mnist", cache, tmp_path / "gone", verify=True)
  assert tfds_cache.ensure_cache("mnist", cache, tmp_path / "gone", verify=False) == entry


def test_unverified_entry_of_official_files_is_marked_verified(tiny_mnist, tmp_path,
                                                               monkeypatch):
  data_root, cache = tiny_mnist
  _official(monkeypatch, data_root)
  entry = tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  _forbid_builds(monkeypatch)
  assert tfds_cache.ensure_cache("mnist", cache, data_root, verify=True) == entry
  assert _manifest(entry)["verified"] is True
  assert tfds_cache.ensure_cache("mnist", cache, tmp_path / "gone", verify=True) == entry


def test_changed_source_content_gets_its_own_entry(tiny_mnist, tmp_path):
  data_root, cache = tiny_mnist
  first = tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  labels_path = data_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
  stat = labels_path.stat()
  labels = local_files.read_idx(labels_path, local_files.IDX_LABELS_MAGIC)
  testing.write_idx(labels_path, (labels + 1) % 10)
  os.utime(labels_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before
  assert labels_path.stat().st_size == stat.st_size
  second = tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  assert second != first
  _, read_back = tfds_cache.read_cached_split("mnist", "test", second)
  np.testing.assert_array_equal(read_back, (labels + 1) % 10)
  # Without the files, two entries built from different files: neither is picked.
  with pytest.raises(cache_manifest.CacheEntryError, match="different files"):
    tfds_cache.ensure_cache("mnist", cache, tmp_path / "gone", verify=False)


@pytest.mark.parametrize("damage,reason", [
    (lambda e: (e / "manifest.json").write_text('{"format": 1, "datas'), "unreadable"),
    (lambda e: (e / "manifest.json").unlink(), "no manifest.json"),
    (lambda e: (e / "manifest.json").write_text(json.dumps({**_manifest(e), "format": 0})),
     "not a manifest of format 1"),
    (lambda e: next(e.rglob("*test.array_record*")).write_bytes(b"x"), "differ"),
], ids=["partial_write", "missing", "old_format", "changed_file"])
def test_damaged_entry_is_not_trusted(tiny_mnist, tmp_path, damage, reason):
  data_root, cache = tiny_mnist
  entry = tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  want = tfds_cache.read_cached_split("mnist", "test", entry)
  damage(entry)
  with pytest.raises(locations.DataNotFoundError, match=reason):  # refused without the files
    tfds_cache.ensure_cache("mnist", cache, tmp_path / "gone", verify=False)
  assert tfds_cache.ensure_cache("mnist", cache, data_root, verify=False) == entry  # rebuilt
  got = tfds_cache.read_cached_split("mnist", "test", entry)
  np.testing.assert_array_equal(got[0], want[0])
  assert _manifest(entry)["format"] == cache_manifest.FORMAT


def test_interrupted_build_leaves_nothing_that_looks_complete(tiny_mnist, monkeypatch):
  data_root, cache = tiny_mnist
  real = local_files.read_split
  def interrupted(name, split, *args):
    if split == "test":
      raise KeyboardInterrupt
    return real(name, split, *args)
  monkeypatch.setattr(local_files, "read_split", interrupted)
  with pytest.raises(KeyboardInterrupt):
    tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  assert not list((cache / "dpjax_local" / "mnist").iterdir())
  monkeypatch.setattr(local_files, "read_split", real)
  entry = tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  assert len(tfds_cache.read_cached_split("mnist", "test", entry)[1]) == 4


def test_corrupt_source_file_is_named(tiny_mnist):
  data_root, cache = tiny_mnist
  path = data_root / "mnist" / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-20])  # a truncated download
  with pytest.raises(local_files.DataFormatError) as error:
    tfds_cache.ensure_cache("mnist", cache, data_root, verify=False)
  assert str(path) in str(error.value) and "download it again" in str(error.value)
  assert not list((cache / "dpjax_local" / "mnist").iterdir())
