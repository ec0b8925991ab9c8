"""Tests of dpjax.audit.canaries and of how the trainer's data loading inserts them."""

import ml_collections
import numpy as np
import pytest

from dpjax import config as config_lib
from dpjax.audit import canaries as canaries_lib
from dpjax.data.dataset import Dataset
from dpjax.train import loop, state as state_lib
from tests.conftest import require_data


def _dataset(n=400, classes=10):
  """Image i holds the number i in its first two pixels, so rows can be traced."""
  images = np.zeros((n, 4, 4, 1), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
  return Dataset(images, (np.arange(n) % classes).astype(np.int32), classes, "toy", "train")


def _audit(**overrides):
  return ml_collections.ConfigDict(dict(config_lib.default_config().audit.to_dict(), **overrides))


def _ids(images):
  return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 1, 0]


def test_mislabelled_canaries_leave_the_training_split_with_a_wrong_label():
  train = _dataset()
  rest, c = canaries_lib.take_canaries(train, _audit(canaries=50, kind="mislabel"))
  assert len(c) == 50 and len(rest) == 350
  assert set(_ids(c.images)) == set(c.source_indices) and not set(_ids(rest.images)) & set(
      c.source_indices)
  assert np.all(c.labels != train.labels[c.source_indices])
  assert c.labels.dtype == np.int32 and c.part == "private"


def test_canaries_depend_on_their_seed_and_coin_flips_on_the_inclusion_seed_only():
  train = _dataset()
  _, a = canaries_lib.take_canaries(train, _audit(canaries=200, inclusion_seed=0))
  _, b = canaries_lib.take_canaries(train, _audit(canaries=200, inclusion_seed=1))
  _, c = canaries_lib.take_canaries(train, _audit(canaries=200, seed=1))
  assert np.array_equal(a.source_indices, b.source_indices) and np.array_equal(a.labels, b.labels)
  assert not np.array_equal(a.included, b.included)
  assert np.array_equal(a.included, c.included) and not np.array_equal(a.source_indices,
                                                                        c.source_indices)
  assert 70 < a.included.sum() < 130  # Bernoulli(1/2) coin flips


def test_noise_canaries_take_nothing_and_insert_appends_only_the_included():
  train = _dataset()
  rest, c = canaries_lib.take_canaries(train, _audit(canaries=30, kind="noise"))
  assert rest is train and np.all(c.source_indices == -1)
  assert np.all((0 <= c.labels) & (c.labels < 10))
  part = canaries_lib.insert(train, c)
  assert len(part) == len(train) + c.included.sum()
  np.testing.assert_array_equal(part.images[:len(train)], train.images)
  np.testing.assert_array_equal(part.images[len(train):], c.images[c.included])
  assert canaries_lib.insert(train, None) is train
  assert canaries_lib.take_canaries(train, _audit())[1] is None


@pytest.mark.parametrize("overrides,match", [(dict(canaries=-1), "canaries"),
                                             (dict(kind="gradient"), "kind"),
                                             (dict(insert_into="test"), "insert_into"),
                                             (dict(canaries=300), "half")])
def test_bad_audit_blocks_are_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    canaries_lib.take_canaries(_dataset(), _audit(**overrides))


def test_the_trajectory_view_holds_the_audit_block_only_with_canaries():
  c = config_lib.default_config()
  assert "audit" not in config_lib.trajectory_view(c)
  c.audit.canaries = 10
  assert config_lib.trajectory_view(c)["audit"]["canaries"] == 10


def test_canaries_in_a_part_no_step_reads_are_refused():
  c = config_lib.default_config()
  c.audit.canaries = 10
  c.mixing.update(schedule="constant", alpha=1.0)  # public steps only
  with pytest.raises(ValueError, match="never be trained on"):
    loop.check_canaries_train(c, state_lib.alpha_schedule(c))
  c.audit.insert_into = "public"
  loop.check_canaries_train(c, state_lib.alpha_schedule(c))


def test_training_data_appends_the_included_canaries_to_the_private_part(dataset_cache):
  require_data()
  c = config_lib.default_config()
  c.data.update(name="mnist", public_fraction=0.1, train_examples=5000)
  c.audit.update(canaries=100, kind="mislabel")
  loaded = state_lib.load_training_data(c)
  k = int(loaded.canaries.included.sum())
  assert len(loaded.parts.public) == 490 and len(loaded.parts.private) == 4410 + k
  assert loaded.canaries.source_indices.max() < 5000 and len(loaded.test) == 10000
  # The sampling rate's N counts the canaries as m/2, whatever the coin flips gave.
  assert state_lib.accounting_size(loaded) == 4410 + 50
  np.testing.assert_array_equal(loaded.parts.private.labels[-k:],
                                loaded.canaries.labels[loaded.canaries.included])
  c.data.train_examples = 70000
  with pytest.raises(ValueError, match="train_examples"):
    state_lib.load_training_data(c)
