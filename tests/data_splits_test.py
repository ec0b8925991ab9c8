"""Tests of dpjax.data.splits: public/private splits are disjoint, covering and deterministic."""

import numpy as np
import pytest

from dpjax.data import splits
from dpjax.data.dataset import Dataset


def _toy(n=10, name="toy", split="train", shape=(2, 2, 1), num_classes=10):
  images = np.arange(n * int(np.prod(shape)), dtype=np.uint8).reshape(n, *shape)
  return Dataset(images, np.arange(n, dtype=np.int32) % num_classes, num_classes, name, split)


@pytest.mark.parametrize("n, fraction", [(1000, 0.1), (7, 0.5), (5, 0.0), (5, 1.0), (0, 0.3)])
def test_split_is_disjoint_covering_and_sized(n, fraction):
  public, private = splits.public_private_split(n, fraction, seed=3)
  assert len(public) == round(fraction * n) and len(public) + len(private) == n
  assert not set(public.tolist()) & set(private.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([public, private])), np.arange(n))


def test_split_is_deterministic_from_seed():
  a = splits.public_private_split(1000, 0.2, seed=7)
  b = splits.public_private_split(1000, 0.2, seed=7)
  c = splits.public_private_split(1000, 0.2, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])  # fails with probability ~1/C(1000, 200)


def test_split_is_random_not_a_prefix():
  public, _ = splits.public_private_split(1000, 0.1, seed=0)
  assert not np.array_equal(public, np.arange(100))


def test_bad_fraction_raises():
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    splits.public_private_split(10, 1.5, seed=0)


def test_check_disjoint():
  splits.check_disjoint(np.array([0, 2]), np.array([1, 3]))
  with pytest.raises(splits.OverlapError, match="overlap in 2 examples"):
    splits.check_disjoint(np.array([0, 1, 2]), np.array([2, 1, 5]))


def test_split_dataset_parts_hold_the_right_examples():
  toy = _toy(20)
  parts = splits.split_dataset(toy, public_fraction=0.25, seed=1)
  public_idx, private_idx = splits.public_private_split(20, 0.25, seed=1)
  np.testing.assert_array_equal(parts.public.images, toy.images[public_idx])
  np.testing.assert_array_equal(parts.private.labels, toy.labels[private_idx])
  assert (parts.public.split, parts.private.split) == ("train[public]", "train[private]")
  assert len(parts.public) == 5 and len(parts.private) == 15


def test_pair_datasets():
  public, private = _toy(name="emnist"), _toy(name="mnist")
  parts = splits.pair_datasets(public, private)
  assert parts.public is public and parts.private is private
  with pytest.raises(splits.OverlapError, match="split_dataset"):
    splits.pair_datasets(_toy(name="mnist"), private)
  with pytest.raises(ValueError, match="does not match"):
    splits.pair_datasets(_toy(name="cifar", shape=(3, 3, 3)), private)


def test_split_by_class_draws_public_examples_from_those_classes_only():
  ds = _toy(n=200)
  parts = splits.split_dataset(ds, 0.1, seed=3, public_classes=(0, 1, 2, 3, 4))
  assert len(parts.public) == 20 and len(parts.private) == 180
  assert set(parts.public.labels.tolist()) <= {0, 1, 2, 3, 4}
  assert set(parts.private.labels.tolist()) == set(range(10))  # every class stays private too
  pub, priv = splits.public_private_split_by_class(ds.labels, 0.1, 3, (0, 1, 2, 3, 4))
  splits.check_disjoint(pub, priv)
  assert np.array_equal(np.sort(np.concatenate([pub, priv])), np.arange(200))
  again, _ = splits.public_private_split_by_class(ds.labels, 0.1, 3, (0, 1, 2, 3, 4))
  other, _ = splits.public_private_split_by_class(ds.labels, 0.1, 4, (0, 1, 2, 3, 4))
  assert np.array_equal(pub, again) and not np.array_equal(pub, other)
  with pytest.raises(ValueError, match="cannot come from classes"):
    splits.split_dataset(ds, 0.2, seed=0, public_classes=(0,))  # class 0 holds 20 < 40
  with pytest.raises(ValueError, match="not all labels"):
    splits.split_dataset(ds, 0.01, seed=0, public_classes=(10,))
