"""Tests for dpjax.data.views: K views per example, keyed by (seed, step, id, view) only."""

import jax
import numpy as np
import pytest

from dpjax.data import augment, views as views_lib
from dpjax.privacy import randomness


def _batch(n=8, shape=(8, 8, 3), seed=0, step=5):
  rng = np.random.default_rng(seed)
  return (rng.uniform(size=(n,) + shape).astype(np.float32),
          np.arange(100, 100 + n, dtype=np.int32), np.full(n, step, np.int32))


def test_the_views_are_drawn_as_documented():
  """View j of example `id` at step t: crop_flip_one(fold_in(fold_in(fold_in(stream key, t),
  id), j), image), the stream key that of the config seed (public randomness)."""
  views = views_lib.Views("crop_flip", 3, seed=11)
  images, ids, steps = _batch(2)
  got = np.asarray(views.of_example(images[1], ids[1], steps[1]))
  key = jax.random.fold_in(jax.random.fold_in(
      randomness.stream_key(11, views_lib.STREAM), 5), 101)
  for j in range(3):
    np.testing.assert_array_equal(
        got[j], augment.crop_flip_one(jax.random.fold_in(key, j), images[1]))


def test_of_batch_is_example_major_and_each_row_is_of_example():
  views = views_lib.Views("crop_flip", 4, seed=0)
  images, ids, steps = _batch()
  batched = np.asarray(jax.jit(views.of_batch)(images, ids, steps))
  assert batched.shape == (8 * 4,) + images.shape[1:]
  for i in range(8):
    np.testing.assert_array_equal(batched[4 * i:4 * i + 4],
                                  views.of_example(images[i], ids[i], steps[i]))


def test_a_view_depends_on_the_seed_step_id_and_image_only():
  """The privacy property: an example's views do not move with its position or the other rows;
  they change with the step, the id and the seed (fresh views each step)."""
  views = views_lib.Views("crop_flip", 4, seed=0)
  images, ids, steps = _batch(16)
  base = np.asarray(views.of_batch(images, ids, steps)).reshape(16, 4, *images.shape[1:])
  perm = np.random.default_rng(1).permutation(16)
  moved = np.asarray(views.of_batch(images[perm], ids[perm], steps[perm]))
  np.testing.assert_array_equal(moved.reshape(base.shape), base[perm])
  others = images.copy()
  others[1:] = _batch(15, seed=3)[0]
  np.testing.assert_array_equal(views.of_batch(others, ids, steps)[:4], base[0])
  for changed in (views.of_batch(images, ids, steps + 1), views.of_batch(images, ids + 16, steps),
                  views_lib.Views("crop_flip", 4, seed=1).of_batch(images, ids, steps)):
    assert np.mean(np.all(np.asarray(changed).reshape(base.shape) == base, axis=(2, 3, 4))) < 0.2


def test_an_examples_views_differ():
  """4 views of each of 32 examples: two views coincide with probability 1/162 (81 windows x 2),
  so a mean of at least 3.5 distinct views per example fails with probability < 1e-6."""
  views = views_lib.Views("crop_flip", 4, seed=0)
  images, ids, steps = _batch(32)
  got = np.asarray(views.of_batch(images, ids, steps)).reshape(32, 4, -1)
  distinct = [len({row.tobytes() for row in example}) for example in got]
  assert np.mean(distinct) >= 3.5


def test_make_views_and_bad_views():
  assert views_lib.make_views("none", 1, 0) is None
  assert views_lib.make_views("crop_flip", 1, 3) == views_lib.Views("crop_flip", 1, 3)
  with pytest.raises(ValueError, match="need an augmentation"):
    views_lib.make_views("none", 2, 0)
  with pytest.raises(ValueError, match="Unknown augmentation"):
    views_lib.Views("blur", 2, 0)
  with pytest.raises(ValueError, match="count >= 1"):
    views_lib.Views("crop_flip", 0, 0)
