"""Tests of dpjax.data.records: the record format, RecordImages against a NumPy array of the same
images (every kind of index), lazy reads, views, pickling, damaged files and image decoding."""

import pickle

import numpy as np
import PIL.Image
import pytest
from array_record.python import array_record_module

from dpjax.data import records
from dpjax.data import testing

SHAPE = (6, 5, 3)


def _raw_split(folder, n=20, seed=0, split="train"):
  """Writes n raw-pixel records; returns (images uint8 [n, *SHAPE], labels int32 [n])."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8)
  labels = rng.integers(0, 7, n).astype(np.int32)
  records.write_split(folder, split, (records.Record(i, int(labels[i]), SHAPE, True,
                                                     images[i].tobytes()) for i in range(n)))
  return images, labels


@pytest.fixture
def split(tmp_path):
  images, labels = _raw_split(tmp_path)
  return records.RecordImages(tmp_path, "train", SHAPE, len(labels)), images, labels


@pytest.mark.parametrize("key", [
    3, -1, np.int64(7), slice(None), slice(2, 9, 3), slice(None, None, -2), slice(5, 5),
    [4, 1, 1, 19, 0], np.array([-3, 2]), np.array([], np.int64), np.arange(20) % 3 == 0])
def test_indexing_is_numpys(split, key):
  lazy, images, _ = split
  np.testing.assert_array_equal(lazy[key], images[key])
  assert lazy[key].dtype == np.uint8


def test_shape_dtype_len_and_asarray(split):
  lazy, images, _ = split
  assert (lazy.shape, lazy.dtype, lazy.ndim, len(lazy)) == (images.shape, np.uint8, 4, 20)
  np.testing.assert_array_equal(np.asarray(lazy), images)
  np.testing.assert_array_equal(np.asarray(lazy, np.float32), images.astype(np.float32))


def test_take_is_a_view_that_indexes_like_numpy(split, monkeypatch):
  lazy, images, _ = split
  decoded = []
  monkeypatch.setattr(records, "decode", lambda record, where: decoded.append(record.index) or
                      np.frombuffer(record.payload, np.uint8).reshape(record.shape))
  view = lazy.take(np.array([5, 0, 19, 5, 8]), axis=0).take([4, 2, 0])
  assert decoded == [] and view.shape == (3,) + SHAPE
  np.testing.assert_array_equal(view[:], images[[8, 19, 5]])
  np.testing.assert_array_equal(view[[-1, 0]], images[[5, 8]])
  assert decoded == [8, 19, 5, 5, 8]  # only the records asked for, in that order
  with pytest.raises(ValueError, match="axis=0"):
    lazy.take([0], axis=1)


def test_appended_images_follow_the_view_in_memory(split):
  lazy, images, _ = split
  more = np.full((2,) + SHAPE, 7, np.uint8)
  grown = lazy.take([4, 9]).append(more).append(more[:1] + 1)
  want = np.concatenate([images[[4, 9]], more, more[:1] + 1])
  assert grown.shape == want.shape
  np.testing.assert_array_equal(grown[:], want)
  np.testing.assert_array_equal(grown.take([4, 0, 2])[:], want[[4, 0, 2]])
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(grown))[[-1, 1]], want[[-1, 1]])
  with pytest.raises(ValueError, match="uint8"):
    lazy.append(more.astype(np.int32))


def test_bad_indices_are_index_errors(split):
  lazy, _, _ = split
  for key in (20, -21, [0, 20], np.zeros(3, bool), np.array([[0]]), np.array([0.5]), (0, 1)):
    with pytest.raises(IndexError):
      lazy[key]


def test_pickle_holds_no_reader_and_reopens(split):
  lazy, images, _ = split
  view = lazy.take([3, 1])
  view[:]  # opens the file
  state = view.__getstate__()
  assert "_reader" not in state and "_lock" not in state
  data = pickle.dumps(view)
  assert len(data) < 1000  # the path and the view, no pixels
  np.testing.assert_array_equal(pickle.loads(data)[:], images[[3, 1]])


def test_labels_round_trip_without_reading_records(tmp_path):
  images, labels = _raw_split(tmp_path, n=9)
  (tmp_path / "train.array_record").unlink()
  got = records.read_labels(tmp_path, "train")
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, labels)


def test_records_carry_index_label_shape_and_the_bytes_unchanged(tmp_path):
  png = testing.encoded(np.zeros((4, 3, 3), np.uint8), "PNG")
  records.write_split(tmp_path, "test", [records.Record(0, 5, (4, 3, 3), False, png)])
  reader = array_record_module.ArrayRecordReader(str(tmp_path / "test.array_record"))
  record = records.parse_record(reader.read(), "r")
  assert record == records.Record(0, 5, (4, 3, 3), False, png)


def test_encoded_images_decode_like_pillow(tmp_path):
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  files = [testing.encoded(p, fmt) for p, fmt in zip(pixels, ["PNG", "JPEG", "PNG", "JPEG"])]
  records.write_split(tmp_path, "train", (records.Record(i, 0, (8, 8, 3), False, f)
                                          for i, f in enumerate(files)))
  lazy = records.RecordImages(tmp_path, "train", (8, 8, 3), 4)
  want = np.stack([np.asarray(PIL.Image.open(testing.io.BytesIO(f))) for f in files])
  np.testing.assert_array_equal(lazy[[3, 0, 1, 2]], want[[3, 0, 1, 2]])
  np.testing.assert_array_equal(lazy[[0, 2]], pixels[[0, 2]])  # PNG is lossless


def test_write_split_refuses_records_out_of_order_and_empty_splits(tmp_path):
  record = records.Record(1, 0, SHAPE, True, bytes(np.prod(SHAPE)))
  with pytest.raises(ValueError, match="index order"):
    records.write_split(tmp_path, "train", [record])
  with pytest.raises(ValueError, match="no records"):
    records.write_split(tmp_path, "test", [])


def test_damaged_files_are_errors_naming_them(tmp_path):
  _raw_split(tmp_path, n=4)
  with pytest.raises(records.RecordError, match="holds 4 records, expected 5"):
    records.RecordImages(tmp_path, "train", SHAPE, 5)[0]
  with pytest.raises(records.RecordError, match=r"train.array_record record 0 holds example 0 of "
                                                r"shape \(6, 5, 3\), expected .* \(5, 6, 3\)"):
    records.RecordImages(tmp_path, "train", (5, 6, 3), 4)[0]
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "bad.array_record"))
  writer.write(records.encode_record(records.Record(1, 0, SHAPE, True, bytes(90))))  # index 1
  writer.write(b"short")
  writer.close()
  bad = records.RecordImages(tmp_path, "bad", SHAPE, 2)
  with pytest.raises(records.RecordError, match="record 0 holds example 1"):
    bad[0]
  with pytest.raises(records.RecordError, match="record 1: a record of 5 bytes"):
    bad[1]
  np.save(tmp_path / "bad.labels.npy", np.zeros(2, np.int64))
  with pytest.raises(records.RecordError, match="expected int32"):
    records.read_labels(tmp_path, "bad")


def test_image_pixels_expands_8_bit_modes_and_refuses_others():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  assert records.image_pixels(PIL.Image.fromarray(grey), "g").shape == (3, 4, 1)
  palette = PIL.Image.fromarray(np.stack([grey] * 3, -1)).convert("P")
  assert records.image_pixels(palette, "p").shape == (3, 4, 3)
  bits = PIL.Image.fromarray(grey > 5)
  np.testing.assert_array_equal(records.image_pixels(bits, "b")[..., 0], (grey > 5) * 255)
  deep = PIL.Image.fromarray(grey.astype(np.uint16) * 1000)
  with pytest.raises(records.RecordError, match="deep.png has pixel mode 'I;16'"):
    records.image_pixels(deep, "deep.png")


def test_corrupt_and_truncated_images_are_errors_naming_them():
  with pytest.raises(records.RecordError, match="x.jpg is not a readable image"):
    records.open_image(b"not an image", "x.jpg")
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  jpeg = testing.encoded(noise, "JPEG")
  with pytest.raises(records.RecordError, match="cut.jpg does not decode.*truncated"):
    records.image_pixels(records.open_image(jpeg[:len(jpeg) // 2], "cut.jpg"), "cut.jpg")
