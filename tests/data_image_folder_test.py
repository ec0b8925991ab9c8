"""Tests of dpjax.data.image_folder on small generated folders and archives (no network): what a
build holds (every image, label and path, in a fixed order), the checksummed cache, bad layouts
(each error names the file or folder), cifar10_jpeg's checks, and the real cifar10_jpeg once."""

import json
import os
import pathlib
import tarfile
import time

import numpy as np
import PIL.Image
import pytest

from dpjax.data import cache_manifest
from dpjax.data import dataset
from dpjax.data import image_folder
from dpjax.data import image_source
from dpjax.data import local_files
from dpjax.data import locations
from dpjax.data import records
from dpjax.data import specs
from dpjax.data import testing

CLASSES = ("ant", "bee", "cat")


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "images"
  return root, testing.write_image_folder(root, CLASSES)


def _load(source, split, cache, **kwargs):
  return image_folder.load("image_folder", split, source, cache, **kwargs)


def _entry(images):
  return images.path.parent


@pytest.mark.parametrize("name", [None, "a.tar", "a.tar.gz", "a.tgz", "a.zip", "wrapped.tgz"])
def test_every_image_label_and_path_round_trips(folder, tmp_path, name):
  root, pixels = folder
  source = root if name is None else testing.pack(root, tmp_path / name,
                                                  top="pets" if "wrapped" in name else "")
  for split, n in (("train", 12), ("test", 6)):
    images, labels, info = _load(source, split, tmp_path / "cache")
    assert isinstance(images, records.RecordImages) and images.shape == (n, 8, 8, 3)
    assert labels.dtype == np.int32 and info.classes == CLASSES
    paths = image_folder.read_paths(_entry(images), split)
    relative = [p.removeprefix("pets/") for p in paths]
    assert sorted(relative) == sorted(p for p in pixels if p.startswith(split))
    np.testing.assert_array_equal(labels, [CLASSES.index(p.split("/")[1]) for p in relative])
    np.testing.assert_array_equal(records.read_labels(_entry(images), split), labels)
    order = np.random.default_rng(1).permutation(n)
    np.testing.assert_array_equal(images[order], np.stack([pixels[relative[i]] for i in order]))


def test_order_is_fixed_by_the_files_and_mixes_classes(folder, tmp_path):
  root, _ = folder
  images, labels, _ = _load(root, "train", tmp_path / "c1")
  reversed_tar = testing.pack(root, tmp_path / "r.tar", reverse=True)  # members stored backwards
  images_r, labels_r, _ = _load(reversed_tar, "train", tmp_path / "c2")
  assert image_folder.read_paths(_entry(images), "train") == image_folder.read_paths(
      _entry(images_r), "train")
  np.testing.assert_array_equal(labels, labels_r)
  assert len(set(labels[:4].tolist())) > 1  # a prefix is not one class


def test_info_holds_the_training_images_statistics(folder, tmp_path):
  root, pixels = folder
  _, _, info = _load(root, "test", tmp_path / "cache")
  train = np.stack([p for path, p in pixels.items() if path.startswith("train")]) / 255.0
  np.testing.assert_allclose(info.mean, train.mean((0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(info.std, train.std((0, 1, 2)), rtol=1e-9)
  assert info.num_examples == {"train": 12, "test": 6} and info.image_shape == (8, 8, 3)
  assert info.tree_sha256 == image_source.sha256_source(root)


def test_grey_images_and_a_training_split_alone(tmp_path):
  pixels = testing.write_image_folder(tmp_path / "g", ("b", "a"), {"train": 2}, shape=(4, 6, 1),
                                      suffixes=(".png",))
  images, labels, info = _load(tmp_path / "g", "train", tmp_path / "cache")
  assert info.classes == ("a", "b") and images.shape == (4, 4, 6, 1)
  paths = image_folder.read_paths(_entry(images), "train")
  np.testing.assert_array_equal(images[:], np.stack([pixels[p] for p in paths]))
  with pytest.raises(image_source.ImageFolderError, match=r"g has no test/ folder"):
    _load(tmp_path / "g", "test", tmp_path / "cache")


def test_classes_given_set_the_labels_and_the_entry(folder, tmp_path):
  root, _ = folder
  sorted_images, sorted_labels, _ = _load(root, "train", tmp_path / "cache")
  given = ("cat", "ant", "bee")
  images, labels, info = _load(root, "train", tmp_path / "cache", classes=given)
  assert info.classes == given and _entry(images) != _entry(sorted_images)
  paths = image_folder.read_paths(_entry(images), "train")
  np.testing.assert_array_equal(labels, [given.index(p.split("/")[1]) for p in paths])
  with pytest.raises(ValueError, match="repeat"):
    _load(root, "train", tmp_path / "cache", classes=("ant", "ant", "bee", "cat"))


def _entry_files(cache):
  return {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def test_a_build_is_reused_and_rebuilt_when_a_file_changes(folder, tmp_path, monkeypatch):
  root, pixels = folder
  archive = testing.pack(root, tmp_path / "a.tar.gz")
  cache = tmp_path / "cache"
  first, _, _ = _load(archive, "train", cache)
  before = _entry_files(cache)
  stage = image_source.stage
  monkeypatch.setattr(image_source, "stage", lambda *a: pytest.fail("rebuilt"))
  again, _, _ = _load(archive, "test", cache)
  assert _entry(again) == _entry(first) and _entry_files(cache) == before
  monkeypatch.setattr(image_source, "stage", stage)
  new = np.zeros((8, 8, 3), np.uint8)
  testing.write_image(root / "train" / "bee" / "0.png", new)
  changed, _, _ = _load(testing.pack(root, tmp_path / "a.tar.gz"), "train", cache)
  assert _entry(changed) != _entry(first)
  index = image_folder.read_paths(_entry(changed), "train").index("train/bee/0.png")
  np.testing.assert_array_equal(changed[index], new)
  assert not any(p.name.startswith(".") for p in (cache / "dpjax_records" / "image_folder").iterdir())


def test_a_damaged_entry_is_rebuilt(folder, tmp_path):
  root, _ = folder
  images, _, _ = _load(root, "train", tmp_path / "cache")
  labels_file = _entry(images) / "train.labels.npy"
  np.save(labels_file, np.zeros(12, np.int32))
  with pytest.raises(cache_manifest.CacheEntryError, match="train.labels.npy"):
    cache_manifest.read(_entry(images), "image_folder", image_folder.BUILDER_VERSION)
  _, labels, _ = _load(root, "train", tmp_path / "cache")
  assert labels.any() and cache_manifest.read(_entry(images), "image_folder",
                                              image_folder.BUILDER_VERSION)


def test_a_declared_shape_is_checked_when_built_and_when_reused(folder, tmp_path):
  root, _ = folder
  _load(root, "train", tmp_path / "cache", image_shape=(8, 8, 3))
  with pytest.raises(image_source.ImageFolderError,
                     match=r"images/train/.* \(like every image of .*\) has shape \(8, 8, 3\), not "
                           r"the declared \(8, 8, 1\)"):
    _load(root, "train", tmp_path / "cache", image_shape=(8, 8, 1))
  with pytest.raises(image_source.ImageFolderError, match=r"declared image shape has \(4, 4, 3\)"):
    _load(root, "train", tmp_path / "other", image_shape=(4, 4, 3))


def _break(root, how):
  """Changes a good folder into a bad one; returns what the error must name."""
  if how == "empty class":
    for f in (root / "test" / "bee").iterdir():
      f.unlink()
    return r"images/test/bee/ holds no images"
  if how == "class missing from a split":
    for f in (root / "test" / "cat").iterdir():
      f.unlink()
    (root / "test" / "cat").rmdir()
    return r"images/test/cat/ is missing \(.*images/train/cat/ has 4 images\)"
  if how == "class only in test":
    (root / "test" / "dog").mkdir()
    testing.write_image(root / "test" / "dog" / "0.png", np.zeros((8, 8, 3), np.uint8))
    return r"images/test/dog/ is a class that .*images/train/ do not have"
  if how == "not an image file":
    (root / "train" / "ant" / "notes.txt").write_text("x")
    return r"images/train/ant/notes.txt is not a .jpg, .jpeg or .png image"
  if how == "image outside a class":
    testing.write_image(root / "train" / "stray.png", np.zeros((8, 8, 3), np.uint8))
    return r"images/train/stray.png is not in a class folder"
  if how == "nested folder":
    (root / "train" / "ant" / "more").mkdir()
    return r"images/train/ant/more/ is a folder inside a class folder"
  if how == "unknown split":
    (root / "val" / "ant").mkdir(parents=True)
    return r"images/val is not a split"
  if how == "no training split":
    for f in sorted((root / "train").rglob("*"), reverse=True):
      f.rmdir() if f.is_dir() else f.unlink()
    (root / "train").rmdir()
    return r"images has no train/ folder.*top level holds test"
  raise ValueError(how)


@pytest.mark.parametrize("how", ["empty class", "class missing from a split",
                                 "class only in test", "not an image file",
                                 "image outside a class", "nested folder", "unknown split",
                                 "no training split"])
@pytest.mark.parametrize("archive", [None, "a.tar.gz"])
def test_bad_layouts_are_errors_naming_the_folder_or_file(folder, tmp_path, how, archive):
  root, _ = folder
  match = _break(root, how)
  source = root
  if archive:
    source = testing.pack(root, tmp_path / archive)
    match = match.replace("images/", "a.tar.gz: ").replace("images ", "a.tar.gz ")
  if how == "no training split" and archive:
    match = r"a.tar.gz has no train/ folder \(nor one folder holding it\).*top level holds test"
  if how == "no training split" and not archive:
    with pytest.raises(locations.DataNotFoundError, match=r"looked for an archive"):
      _load(source, "train", tmp_path / "cache")  # a folder without train/ is not one
    return
  with pytest.raises(image_source.ImageFolderError, match=match):
    _load(source, "train", tmp_path / "cache")
  assert not list((tmp_path / "cache").rglob("*.array_record"))  # nothing left behind


def test_classes_given_must_match_the_folders(folder, tmp_path):
  root, _ = folder
  with pytest.raises(image_source.ImageFolderError,
                     match=r"images/train/cat/ is a class that the classes given do not have"):
    _load(root, "train", tmp_path / "cache", classes=("ant", "bee"))
  with pytest.raises(image_source.ImageFolderError,
                     match=r"images/train/dog/ is missing \(the classes given include 'dog'\)"):
    _load(root, "train", tmp_path / "cache", classes=CLASSES + ("dog",))


def test_missing_sources_name_the_path(tmp_path):
  with pytest.raises(locations.DataNotFoundError, match=r"not found in .*gone.tar.gz"):
    _load(tmp_path / "gone.tar.gz", "train", tmp_path / "cache")
  with pytest.raises(locations.DataNotFoundError, match="data.dir is empty"):
    _load(None, "train", tmp_path / "cache")


def _fake_cifar10_jpeg(tmp_path):
  classes = specs.get_spec("cifar10_jpeg").classes
  testing.write_image_folder(tmp_path / "src", classes[::-1], {"train": 2, "test": 1},
                             shape=(32, 32, 3), suffixes=(".jpg",))
  return testing.pack(tmp_path / "src", tmp_path / "data" / "cifar10-jpeg" /
                      specs.CIFAR10_JPEG_ARCHIVE)


def test_cifar10_jpeg_is_found_under_the_data_dir_and_verified(tmp_path, monkeypatch):
  archive = _fake_cifar10_jpeg(tmp_path)
  with pytest.raises(local_files.ChecksumError, match=r"cifar10-jpeg.tar.gz is not the official "
                                                       r"CIFAR-10 \(JPEG re-encoding\) copy"):
    dataset.load_dataset("cifar10_jpeg", "train", tmp_path / "data", tmp_path / "cache")
  train = dataset.load_dataset("cifar10_jpeg", "train", tmp_path / "data", tmp_path / "cache",
                               verify=False)
  assert train.num_classes == 10 and len(train) == 20
  classes = specs.get_spec("cifar10_jpeg").classes
  paths = image_folder.read_paths(_entry(train.images), "train")
  np.testing.assert_array_equal(train.labels, [classes.index(p.split("/")[1]) for p in paths])
  digest = cache_manifest.sha256_file(archive)
  official = specs.get_spec("cifar10_jpeg")
  monkeypatch.setitem(specs._IMAGE_FOLDER_SPECS, "cifar10_jpeg",
                      type(official)(**{**official.__dict__, "sha256": digest}))
  monkeypatch.setenv(locations.DATA_DIR_ENV, str(tmp_path / "data"))
  test = dataset.load_dataset("cifar10_jpeg", "test", cache_dir=tmp_path / "cache")
  manifest = json.loads((_entry(test.images) / cache_manifest.MANIFEST).read_text())
  assert len(test) == 10 and manifest["verified"]
  with pytest.raises(ValueError, match="image_folder only"):
    dataset.load_dataset("cifar10_jpeg", "test", cache_dir=tmp_path / "cache", classes=("a",))


REAL = testing.find_shared_data(__file__)


@pytest.mark.skipif(REAL is None or not (REAL / "cifar10-jpeg").is_dir(),
                    reason=f"{testing.NO_DATA_REASON} (with cifar10-jpeg/)")
def test_real_cifar10_jpeg(tmp_path):
  """The shared archive, verified against PROVENANCE.md: one build (tens of seconds) in a fresh
  cache; counts, a decoded sample against Pillow, and the training statistics."""
  start = time.monotonic()
  train = dataset.load_dataset("cifar10_jpeg", "train", REAL, tmp_path)
  built = time.monotonic() - start
  test = dataset.load_dataset("cifar10_jpeg", "test", REAL, tmp_path)
  assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
  assert np.bincount(train.labels).tolist() == [5000] * 10
  assert np.bincount(test.labels).tolist() == [1000] * 10
  info = image_folder.read_info(_entry(train.images))
  spec = specs.get_spec("cifar10_jpeg")
  np.testing.assert_allclose(info.mean, spec.mean, atol=1e-4)
  np.testing.assert_allclose(info.std, spec.std, atol=1e-4)
  assert info.tree_sha256 == spec.tree_sha256
  rows = [0, 31337, 49999]
  paths = [image_folder.read_paths(_entry(train.images), "train")[i] for i in rows]
  with tarfile.open(REAL / "cifar10-jpeg" / specs.CIFAR10_JPEG_ARCHIVE) as archive:
    want = [np.asarray(PIL.Image.open(archive.extractfile(p))) for p in paths]
  np.testing.assert_array_equal(train.images[rows], np.stack(want))
  print(f"cifar10_jpeg built in {built:.1f} s (pid {os.getpid()}); "
        f"{pathlib.Path(_entry(train.images)).name}")
