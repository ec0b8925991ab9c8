"""Tests of dpjax.data.image_source: reading folders and archives (every kind), ignored files, the
digests, and the one pass that checks each image (errors name the file)."""

import hashlib

import numpy as np
import pytest

from dpjax.data import image_source
from dpjax.data import local_files
from dpjax.data import records
from dpjax.data import testing

ARCHIVES = ["a.tar", "a.tar.gz", "a.tgz", "a.zip"]


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / "images"
  pixels = testing.write_image_folder(root, classes=("x", "y"), counts={"train": 2, "test": 1})
  (root / ".DS_Store").write_bytes(b"junk")
  (root / "__MACOSX" / "train").mkdir(parents=True)
  (root / "__MACOSX" / "train" / "._0.png").write_bytes(b"junk")
  (root / "train" / "x" / ".hidden.png").write_bytes(b"junk")
  return root, pixels


def _files(source):
  return {str(path): data for path, data in image_source.members(source) if data is not None}


@pytest.mark.parametrize("name", ARCHIVES)
def test_archives_hold_what_the_folder_holds_ignored_files_left_out(folder, tmp_path, name):
  root, pixels = folder
  want = {path: (root / path).read_bytes() for path in pixels}
  assert _files(root) == want
  assert _files(testing.pack(root, tmp_path / name)) == want
  folders = {str(p) for p, data in image_source.members(testing.pack(root, tmp_path / name))
             if data is None}
  assert folders == {"train", "test", "train/x", "train/y", "test/x", "test/y"}


def test_tree_digest_is_the_same_for_a_folder_and_its_archive(folder, tmp_path):
  root, _ = folder
  digest = image_source.sha256_source(root)
  staged = image_source.stage(testing.pack(root, tmp_path / "a.tgz", top="wrapped"),
                              tmp_path / "staging", None)
  unwrapped = {image.path.relative_to("wrapped"): image.sha256 for image in staged.images}
  assert image_source.tree_digest(unwrapped) == digest
  (root / "train" / "x" / "0.png").write_bytes(testing.encoded(np.zeros((8, 8, 3), np.uint8),
                                                               "PNG"))
  assert image_source.sha256_source(root) != digest  # any changed image changes it
  archive = tmp_path / "a.tar"
  assert image_source.sha256_source(testing.pack(root, archive)) == hashlib.sha256(
      archive.read_bytes()).hexdigest()  # an archive: the file's own SHA-256


def test_stage_keeps_the_bytes_and_counts_the_pixels(folder, tmp_path):
  root, pixels = folder
  staged = image_source.stage(root, tmp_path / "staging", None)
  assert staged.shape == (8, 8, 3) and len(staged.images) == 6
  reader = records.array_record_module.ArrayRecordReader(str(tmp_path / "staging"))
  for image, data in zip(staged.images, reader.read_all()):
    assert data == (root / image.path).read_bytes()
  train_x = np.stack([pixels[f"train/x/{i}{s}"] for i, s in ((0, ".png"), (1, ".jpg"))])
  for c in range(3):
    want = np.bincount(train_x[..., c].ravel(), minlength=256)
    np.testing.assert_array_equal(staged.histograms[("train", "x")][c], want)


def test_unreadable_archives_name_the_archive(folder, tmp_path):
  root, _ = folder
  for name in ("a.tar.gz", "a.zip"):
    archive = testing.pack(root, tmp_path / name)
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(image_source.ImageFolderError, match=f"{archive} is not a readable"):
      image_source.stage(archive, tmp_path / "staging", None)


@pytest.mark.parametrize("name", ["images", "a.tar.gz", "a.zip"])
@pytest.mark.parametrize("bad, match", [
    ("corrupt", r"train/y/1.jpg is not a readable image"),
    ("truncated", r"train/y/1.jpg does not decode .*truncated"),
    ("gif", r"train/y/1.jpg holds a GIF image, not a JPEG or PNG one"),
    ("size", r"train/y/1.jpg has shape \(9, 8, 3\) \(H, W, C\), but .*0.png \(the first image "
             r"read\) has \(8, 8, 3\)"),
    ("grey", r"train/y/1.jpg has shape \(8, 8, 1\)")])
def test_bad_images_are_errors_naming_the_file(folder, tmp_path, name, bad, match):
  root, _ = folder
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = {"corrupt": b"\xff\xd8 not really a JPEG",
          "truncated": testing.encoded(noise, "JPEG")[:2000],
          "gif": testing.encoded(noise[:8, :8], "GIF"),
          "size": testing.encoded(noise[:9, :8], "JPEG"),
          "grey": testing.encoded(noise[:8, :8, :1], "JPEG")}[bad]
  (root / "train" / "y" / "1.jpg").write_bytes(data)
  source = root if name == "images" else testing.pack(root, tmp_path / name)
  with pytest.raises(local_files.DataFormatError, match=match):
    image_source.stage(source, tmp_path / "staging", None)


def test_a_declared_shape_is_checked_from_the_first_image(folder, tmp_path):
  root, _ = folder
  with pytest.raises(image_source.ImageFolderError,
                     match=r"test/x/0.png has shape \(8, 8, 3\) .*but the declared image shape "
                           r"has \(8, 8, 1\)"):
    image_source.stage(root, tmp_path / "staging", (8, 8, 1))
