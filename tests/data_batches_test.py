"""Tests of dpjax.data.batches: public batches are a pure function of (seed, step)."""

import numpy as np
import pytest

from dpjax.data import batches
from dpjax.data.dataset import Dataset


def _toy(n):
  images = (np.arange(n * 4) % 256).astype(np.uint8).reshape(n, 2, 2, 1)
  return Dataset(images, (np.arange(n) % 10).astype(np.int32), 10, "toy", "train")


def test_same_batch_at_same_step_after_resume():
  uninterrupted = batches.ShuffledBatches(_toy(100), batch_size=8, seed=5)
  first_run = [uninterrupted.indices(t) for t in range(40)]
  resumed = batches.ShuffledBatches(_toy(100), batch_size=8, seed=5)
  for t in [37, 12, 0, 25, 39]:  # out of order, as after restarts
    np.testing.assert_array_equal(resumed.indices(t), first_run[t])


def test_epoch_covers_each_index_once():
  sampler = batches.ShuffledBatches(_toy(96), batch_size=8, seed=0)
  assert sampler.steps_per_epoch == 12
  for epoch in range(3):
    steps = range(epoch * 12, (epoch + 1) * 12)
    seen = np.concatenate([sampler.indices(t) for t in steps])
    np.testing.assert_array_equal(np.sort(seen), np.arange(96))


def test_remainder_is_skipped_and_batches_keep_their_size():
  sampler = batches.ShuffledBatches(_toy(10), batch_size=4, seed=0)
  epoch = [sampler.indices(t) for t in range(sampler.steps_per_epoch)]
  assert [len(b) for b in epoch] == [4, 4]
  assert len(set(np.concatenate(epoch).tolist())) == 8


def test_a_batch_larger_than_the_data_reads_it_whole_several_times():
  """Regime C of experiments/bu2024_cifar.py: 500 public images, batches of 1024 (450 after the
  automatic switch's hold-out). Each index appears floor or ceil(B / N) times per batch, the
  batches differ between steps, and a resumed run draws the same ones."""
  for n, size in [(500, 1024), (450, 1024), (7, 7 * 3)]:
    order = batches.ShuffledOrder(n, size, seed=3)
    steps = [order.indices(t) for t in range(4)]
    for batch in steps:
      counts = np.bincount(batch, minlength=n)
      assert len(batch) == size and counts.min() == size // n and counts.max() == -(-size // n)
    assert not np.array_equal(steps[0], steps[1])
    resumed = batches.ShuffledOrder(n, size, seed=3)
    for t in [3, 0, 2]:
      np.testing.assert_array_equal(resumed.indices(t), steps[t])


def test_an_empty_public_part_is_refused():
  with pytest.raises(ValueError, match="num_examples >= 1"):
    batches.ShuffledOrder(0, 8, seed=0)
  with pytest.raises(ValueError, match="batch_size >= 1"):
    batches.ShuffledOrder(8, 0, seed=0)


def test_epochs_and_seeds_differ():
  a = batches.ShuffledBatches(_toy(1000), batch_size=100, seed=0)
  b = batches.ShuffledBatches(_toy(1000), batch_size=100, seed=1)
  # Each fails by chance with probability 1/1000!.
  assert not np.array_equal(a.permutation(0), a.permutation(1))
  assert not np.array_equal(a.permutation(0), b.permutation(0))


def test_indices_are_copies():
  sampler = batches.ShuffledBatches(_toy(10), batch_size=5, seed=0)
  first = sampler.indices(0)
  first[:] = -1
  assert (sampler.indices(0) >= 0).all()


def test_gather_matches_a_loop():
  toy = _toy(30)
  indices = np.array([7, 3, 29, 3])
  batch = batches.gather(toy, indices)
  assert batch["image"].shape == (4, 2, 2, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  for row, i in enumerate(indices):
    np.testing.assert_array_equal(batch["image"][row], toy.images[i] / np.float32(255))
    assert batch["label"][row] == toy.labels[i]


def test_batch_is_gather_of_indices():
  sampler = batches.ShuffledBatches(_toy(30), batch_size=6, seed=2)
  got = sampler.batch(9)
  want = batches.gather(sampler.dataset, sampler.indices(9))
  np.testing.assert_array_equal(got["image"], want["image"])
  np.testing.assert_array_equal(got["label"], want["label"])


def test_negative_step_raises():
  with pytest.raises(ValueError, match="step"):
    batches.ShuffledBatches(_toy(30), batch_size=3, seed=0).indices(-1)
