"""Tests of dpjax.data.tfds_images: "tfds:<name>" datasets read lazily from TFDS ArrayRecord files.

The TFDS datasets are tiny builders prepared here into tmp_path (no network). TFDS encodes an
`Image` feature given pixel arrays with TensorFlow, which is not installed: the builders yield
PNG bytes encoded with Pillow (lossless), which TFDS stores as they are.
"""

import io
import pickle

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

from dpjax import config as config_lib
from dpjax.data import dataset as dataset_lib
from dpjax.data import locations
from dpjax.data import records
from dpjax.data import tfds_images
from dpjax.train import state as state_lib

SHAPE = (6, 5, 3)
SIZES = {"train": 11, "test": 4}


def _pixels(index: int, shape=SHAPE) -> np.ndarray:
  """Example `index`'s image: random pixels, pixel (0, 0, 0) = index (TFDS shuffles records)."""
  pixels = np.random.default_rng(index).integers(0, 256, shape, dtype=np.uint8)
  pixels[0, 0, 0] = index
  return pixels


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


class DpjaxTestTinyImages(tfds.core.GeneratorBasedBuilder):
  """3 classes, images SHAPE; test examples are 100, 101, ..."""
  VERSION = tfds.core.Version("1.0.0")
  SHAPES = {}  # index -> another shape for that example (DpjaxTestMixedSizes)

  def _info(self):
    height = None if self.SHAPES else SHAPE[0]
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(height, SHAPE[1], 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(SIZES["train"])),
            "test": self._generate_examples(range(100, 100 + SIZES["test"]))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {"image": _png(_pixels(i, self.SHAPES.get(i, SHAPE))), "label": i % 3}


class DpjaxTestMixedSizes(DpjaxTestTinyImages):
  """Like DpjaxTestTinyImages but example 7's image is 4 pixels taller (as in ImageNet)."""
  SHAPES = {7: (10, 5, 3)}


class DpjaxTestNeedsDownload(DpjaxTestTinyImages):
  """Downloads its files from a closed port first: what a machine without network sees."""

  def _split_generators(self, dl_manager):
    dl_manager.download("http://127.0.0.1:9/tiny.tar")
    return super()._split_generators(dl_manager)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with DpjaxTestTinyImages prepared by `load_dataset` itself."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def train(data_dir):
  return dataset_lib.load_dataset("tfds:dpjax_test_tiny_images", "train", data_dir)


def test_loads_the_generated_pixels_and_labels_lazily(train, data_dir, monkeypatch):
  assert (train.name, train.split, train.num_classes) == ("tfds:dpjax_test_tiny_images",
                                                          "train", 3)
  assert isinstance(train.images, tfds_images.TfdsImages)
  assert train.images.shape == (SIZES["train"],) + SHAPE and train.labels.dtype == np.int32
  opened = []
  open_image = records.open_image
  monkeypatch.setattr(records, "open_image", lambda data, where: opened.append(where) or
                      open_image(data, where))
  two = train.images[np.array([3, 8])]
  assert len(opened) == 2 and all("dpjax_test_tiny_images split train" in w for w in opened)
  np.testing.assert_array_equal(two[1], train.images[8])
  images = np.asarray(train.images)
  indices = images[:, 0, 0, 0].astype(int)  # which generated example each record is
  assert sorted(indices) == list(range(SIZES["train"]))
  np.testing.assert_array_equal(images, np.stack([_pixels(i) for i in indices]))
  np.testing.assert_array_equal(train.labels, indices % 3)
  test = dataset_lib.load_dataset("tfds:dpjax_test_tiny_images", "test", data_dir)
  assert sorted(np.asarray(test.images)[:, 0, 0, 0]) == list(range(100, 100 + SIZES["test"]))


def test_views_appends_and_pickles_like_record_images(train):
  view = train.subset(np.array([9, 2, 2]), "some").images
  np.testing.assert_array_equal(view[:], np.asarray(train.images)[[9, 2, 2]])
  extra = np.full((1,) + SHAPE, 7, np.uint8)
  grown = view.append(extra)
  copy = pickle.loads(pickle.dumps(grown))
  assert isinstance(copy, tfds_images.TfdsImages) and copy.shape == (4,) + SHAPE
  np.testing.assert_array_equal(copy[:], np.concatenate([view[:], extra]))


def test_a_record_of_another_shape_is_an_error_naming_it(tmp_path):
  data = dataset_lib.load_dataset("tfds:dpjax_test_mixed_sizes", "train", tmp_path)
  with pytest.raises(records.RecordError,
                     match=r"dpjax_test_mixed_sizes split train record \d+ is an image of shape "
                           r".*one fixed size and dpjax does not resize"):
    np.asarray(data.images)


def test_not_prepared_without_network_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # no 200 s of retries
  with pytest.raises(locations.DataNotFoundError,
                     match=r"(?s)dpjax_test_needs_download is not prepared in .*preparing it "
                           r"failed \(ConnectionError.*tfds build dpjax_test_needs_download "
                           r"--file_format=array_record --data_dir=DIR.*data.manual_dir"):
    dataset_lib.load_dataset("tfds:dpjax_test_needs_download", "train", tmp_path)


def test_unknown_names_and_other_blocks_keys_are_refused(tmp_path):
  with pytest.raises(ValueError, match="TFDS has no dataset 'dpjax_no_such_set'"):
    dataset_lib.load_dataset("tfds:dpjax_no_such_set", "train", tmp_path)
  with pytest.raises(ValueError, match="for image_folder only"):
    dataset_lib.load_dataset("tfds:dpjax_test_tiny_images", "train", tmp_path, classes=["a"])
  with pytest.raises(ValueError, match="manual_dir is for 'tfds:' datasets only"):
    dataset_lib.load_dataset("mnist", "train", manual_dir=tmp_path)
  with pytest.raises(ValueError, match="no normalization constants for tfds:cifar100"):
    dataset_lib.normalization("tfds:cifar100")


def test_a_config_names_a_tfds_dataset(train, data_dir):
  config = config_lib.default_config()
  config.data.update(name="tfds:dpjax_test_tiny_images", dir=str(data_dir))
  config.dp.noise_multiplier = 1.0
  assert config_lib.parse(config).data.name == "tfds:dpjax_test_tiny_images"
  loaded = state_lib.load_split(config, config.data.name, "train")
  np.testing.assert_array_equal(loaded.labels, train.labels)
  np.testing.assert_array_equal(loaded.images[:], train.images[:])
