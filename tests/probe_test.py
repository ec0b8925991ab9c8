"""Tests for dpjax.probe: batched feature extraction and the linear probe's accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import probe

NUM_CLASSES = 10


def _clusters(n, k=16, scale=4.0, seed=0):
  """n points of 10 Gaussian clusters (unit sd) in k dims, centres drawn N(0, scale²) from seed 0
  so train and test (different `seed`) share them. Centres ~16 sd apart: separable."""
  centres = np.random.default_rng(0).normal(0, scale, (NUM_CLASSES, k))
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
  return (centres[labels] + rng.normal(size=(n, k))).astype(np.float32), labels


def test_separable_clusters_are_learned():
  x_train, y_train = _clusters(1000, seed=1)
  x_test, y_test = _clusters(1000, seed=2)
  result = probe.linear_probe(x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES)
  assert set(result) == {"train_accuracy", "test_accuracy", "train_loss"}
  assert all(isinstance(v, float) for v in result.values())
  assert result["test_accuracy"] > 0.95 and result["train_accuracy"] > 0.95
  assert result["train_loss"] < 0.2


def test_features_without_label_information_give_chance():
  """Random features and labels: test accuracy ~ Binomial(2000, 0.1) / 2000, sd 0.0067, so
  < 0.3 fails a correct probe with negligible probability (and the seeds are fixed)."""
  rng = np.random.default_rng(3)
  x_train, x_test = rng.normal(size=(1000, 16)), rng.normal(size=(2000, 16))
  y_train, y_test = rng.integers(0, NUM_CLASSES, 1000), rng.integers(0, NUM_CLASSES, 2000)
  result = probe.linear_probe(x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES)
  assert result["test_accuracy"] < 0.3
  assert result["train_accuracy"] > result["test_accuracy"]  # it fits noise, but cannot transfer


def test_standardisation_makes_the_probe_invariant_to_feature_scale_and_shift():
  """Half the clusters' spread makes them overlap, so accuracy is not trivially 1."""
  x_train, y_train = _clusters(1000, scale=0.5, seed=1)
  x_test, y_test = _clusters(1000, scale=0.5, seed=2)
  base = probe.linear_probe(x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES)
  shift = np.random.default_rng(4).normal(0, 50, x_train.shape[1]).astype(np.float32)
  scaled = probe.linear_probe(1000 * x_train + shift, y_train, 1000 * x_test + shift, y_test,
                              num_classes=NUM_CLASSES)
  assert 0.3 < base["test_accuracy"] < 0.99
  for name in base:
    assert abs(scaled[name] - base[name]) <= 2e-3, name


def test_constant_feature_is_harmless():
  """A zero-variance feature hits the std floor instead of dividing by zero."""
  x_train, y_train = _clusters(1000, seed=1)
  x_test, y_test = _clusters(500, seed=2)
  x_train[:, 0], x_test[:, 0] = 7.0, 7.0
  result = probe.linear_probe(x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES)
  assert np.isfinite(result["train_loss"]) and result["test_accuracy"] > 0.95


def test_probe_is_deterministic():
  x_train, y_train = _clusters(1000, scale=0.5, seed=1)
  x_test, y_test = _clusters(500, scale=0.5, seed=2)
  runs = [probe.linear_probe(x_train, y_train, x_test, y_test, num_classes=NUM_CLASSES)
          for _ in range(2)]
  assert runs[0] == runs[1]


def test_extract_features_matches_one_call_and_pads_to_batch_size():
  rng = np.random.default_rng(5)
  images = rng.uniform(size=(23, 6, 6, 2)).astype(np.float32)
  w = jnp.asarray(rng.normal(size=(72, 5)), jnp.float32)
  shapes = []

  @jax.jit
  def jitted(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w)

  def features_fn(x):
    shapes.append(x.shape)
    return jitted(x)

  out = probe.extract_features(features_fn, images, batch_size=8)
  assert out.shape == (23, 5) and out.dtype == np.float32 and isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, jitted(images), atol=1e-5)
  assert shapes == [(8, 6, 6, 2)] * 3
  np.testing.assert_allclose(probe.extract_features(jitted, images, batch_size=100),
                             jitted(images), atol=1e-5)


@pytest.mark.parametrize("args,match", [
    ({"train_labels": np.zeros(9, np.int32)}, "train_labels"),
    ({"test_labels": np.full(10, 3, np.int32)}, "test_labels"),
    ({"train_labels": np.full(10, 3, np.int32)}, r"\[0, 3\)"),
    ({"test_labels": -np.ones(10, np.int32)}, "test_labels"),
    ({"train_features": np.zeros((10, 4, 1), np.float32)}, "2-D"),
    ({"test_features": np.zeros(10, np.float32)}, "2-D"),
    ({"test_features": np.zeros((10, 5), np.float32)}, "width"),
    ({"train_labels": np.zeros(10, np.float32)}, "integers"),
])
def test_linear_probe_rejects_bad_inputs(args, match):
  kwargs = {"train_features": np.zeros((10, 4), np.float32),
            "train_labels": np.zeros(10, np.int32),
            "test_features": np.zeros((10, 4), np.float32),
            "test_labels": np.zeros(10, np.int32)}
  kwargs.update(args)
  with pytest.raises(ValueError, match=match):
    probe.linear_probe(**kwargs, num_classes=3)


def test_extract_features_rejects_bad_inputs():
  def identity(x):
    return x.reshape(x.shape[0], -1)

  with pytest.raises(ValueError, match="images"):
    probe.extract_features(identity, np.zeros((4, 3, 3), np.float32))
  with pytest.raises(ValueError, match="empty"):
    probe.extract_features(identity, np.zeros((0, 3, 3, 1), np.float32))
  with pytest.raises(ValueError, match="batch_size"):
    probe.extract_features(identity, np.zeros((4, 3, 3, 1), np.float32), batch_size=0)
  with pytest.raises(ValueError, match="features_fn"):
    probe.extract_features(lambda x: x, np.zeros((4, 3, 3, 1), np.float32))
