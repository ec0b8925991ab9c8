"""The streaming pipeline (dpjax/data/pipeline.py): exactly the sampler's rows, any process split,
padding that reads nothing, resumption, restarts, worker processes."""

import numpy as np
import pytest

from dpjax.data import batches, pipeline
from dpjax.data import views as views_lib
from dpjax.privacy import sampling

N = 500


def _data():
  """Images whose pixels spell their index (so the rows read can be checked), labels i % 7."""
  ids = np.arange(N)
  images = np.stack([ids // 256, ids % 256], -1).astype(np.uint8).reshape(N, 1, 2, 1)
  return images, (ids % 7).astype(np.int32)


def _index_of(image: np.ndarray) -> np.ndarray:
  """The index a float image [..., 1, 2, 1] in [0, 1] spells."""
  pixels = np.rint(image[..., 0, :, 0] * 255).astype(np.int64)
  return pixels[..., 0] * 256 + pixels[..., 1]


class CountingImages:
  """An image array that counts the rows read (like a lazy record dataset)."""

  def __init__(self, images):
    self.images, self.rows_read = images, []

  def __getitem__(self, rows):
    self.rows_read.extend(np.asarray(rows).tolist())
    return self.images[rows]


def _read(sampler, rows=slice(None), images=None):
  data, labels = _data()
  return pipeline.ReadStep(data if images is None else images, labels,
                           pipeline.PrivateDraw(sampler), rows, batches.to_float)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_rows_read_are_exactly_the_samplers_indices_over_processes(processes):
  sampler = sampling.PoissonSampler(N, 0.1, microbatch_size=8, seed=1)
  per_process = 8 // processes
  for step in range(20):
    ids, labels, images = [], [], []
    for p in range(processes):  # each process reads its rows of every microbatch
      element = _read(sampler, slice(p * per_process, (p + 1) * per_process))(step)
      assert element["image"].shape[1:] == (per_process, 1, 2, 1)
      assert int(element["read_step"]) == step and (element["step"] == step).all()
      mask = element["mask"]
      ids.append(element["id"][mask])
      labels.append(element["label"][mask])
      images.append(_index_of(element["image"])[mask])
      assert (element["image"][~mask] == 0).all() and (element["id"][~mask] == 0).all()
    ids, labels, images = map(np.concatenate, (ids, labels, images))
    np.testing.assert_array_equal(np.sort(ids), sampler.indices(step))  # each once, none else
    np.testing.assert_array_equal(images, ids)  # the image of the id, not another
    np.testing.assert_array_equal(labels, ids % 7)


def test_padding_rows_read_nothing_and_an_empty_batch_has_no_microbatches():
  sampler = sampling.PoissonSampler(N, 0.03, microbatch_size=8, seed=2)
  counting = CountingImages(_data()[0])
  read = _read(sampler, images=counting)
  for step in range(10):
    counting.rows_read.clear()
    element = read(step)
    assert sorted(counting.rows_read) == sampler.indices(step).tolist()
    assert element["mask"].shape == (sampler.batch(step).num_microbatches, 8)
  empty = _read(sampling.PoissonSampler(N, 1e-4, microbatch_size=8, seed=0))
  step = next(t for t in range(1000) if not len(empty.draw.sampler.indices(t)))
  assert empty(step)["image"].shape == (0, 8, 1, 2, 1)


def test_a_constant_work_read_reads_every_row_and_returns_what_the_plain_read_does():
  """dp.constant_time: padding rows read an image too (then zeroed), so the rows read per step
  are the capacity's, whatever the batch size; the element is the plain read's."""
  sampler = sampling.PoissonSampler(N, 0.05, microbatch_size=8, seed=2,
                                    min_microbatches=sampling.capacity_microbatches(N, 0.05, 8))
  data, labels = _data()
  counting = CountingImages(data)
  constant = pipeline.ReadStep(counting, labels, pipeline.PrivateDraw(sampler), slice(None),
                               batches.to_float, read_every_row=True)
  for step in range(10):
    counting.rows_read.clear()
    element = constant(step)
    assert len(counting.rows_read) == sampler.min_microbatches * 8
    _assert_same(element, _read(sampler)(step))


def _stream(reads_at=lambda t: t % 3 != 0, workers=0):
  sampler = sampling.PoissonSampler(N, 0.05, microbatch_size=8, seed=3)
  return pipeline.StepStream(_read(sampler), reads_at, 60, pipeline.Options(workers=workers))


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_resumed_stream_reads_what_an_uninterrupted_one_does():
  straight = _stream()
  whole = {t: straight.get(t) for t in range(60) if t % 3}
  resumed = _stream()
  for t in range(31, 60):
    if t % 3:
      _assert_same(resumed.get(t), whole[t])
  assert straight.restarts == resumed.restarts == 1  # planned once each


def test_an_unplanned_step_restarts_the_stream_and_a_step_that_reads_nothing_is_refused():
  stream = _stream()
  first = stream.get(1)
  _assert_same(stream.get(10), _stream().get(10))  # skipped ahead: restarted there
  _assert_same(stream.get(1), first)  # back: restarted again, same batch
  assert stream.restarts == 3
  with pytest.raises(ValueError, match="does not read"):
    stream.get(3)
  stream.close()


def test_public_and_sequential_draws():
  order = batches.ShuffledOrder(N, 16, seed=0)
  public = pipeline.PublicDraw(order)(5)
  assert public.num_microbatches == 1 and public.mask.all()
  np.testing.assert_array_equal(public.indices, order.indices(5))
  draw = pipeline.SequentialDraw(N, 64)
  assert draw.num_batches == 8
  last = draw(7)
  assert last.mask.sum() == N - 7 * 64
  np.testing.assert_array_equal(last.indices[last.mask], np.arange(7 * 64, N))


def test_a_public_batch_larger_than_its_part_reads_every_copy_with_its_own_view_id():
  """Regime C's public part (500 images, batches of 1024): each row reads the image of its
  example, and the copies of one example have distinct ids, so different augmentation views."""
  images, labels = _data()
  order = batches.ShuffledOrder(N, 1024, seed=4)
  element = pipeline.ReadStep(images, labels, pipeline.PublicDraw(order), slice(None),
                              batches.to_float)(7)
  ids, examples = element["id"][0], order.indices(7)
  assert element["mask"].all() and len(set(ids.tolist())) == 1024
  np.testing.assert_array_equal(ids % N, examples)
  np.testing.assert_array_equal(_index_of(element["image"][0]), examples)
  np.testing.assert_array_equal(element["label"][0], examples % 7)
  twice = np.flatnonzero(examples == examples[0])  # example examples[0]'s copies
  views = views_lib.Views("crop_flip", 1, seed=0).of_batch(
      np.broadcast_to(np.arange(64.0).reshape(1, 8, 8, 1), (len(twice), 8, 8, 1)),
      ids[twice], np.full(len(twice), 7))
  assert len(twice) >= 2 and not np.array_equal(views[0], views[1])


def test_worker_processes_read_the_same_batches():
  """Two grain worker processes (spawned: each unpickles the reader) give what threads give."""
  threads, processes = _stream(), _stream(workers=2)
  try:
    for t in range(40, 60):
      if t % 3:
        _assert_same(processes.get(t), threads.get(t))
  finally:
    processes.close()


def test_options_are_checked():
  with pytest.raises(ValueError, match="workers >= 0"):
    pipeline.Options(workers=-1)
  with pytest.raises(ValueError, match="prefetch >= 1"):
    pipeline.Options(prefetch=0)
