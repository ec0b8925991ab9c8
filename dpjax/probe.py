"""Linear-probe evaluation of frozen representations.

`extract_features` runs a (frozen) feature map over a dataset in fixed-size batches;
`linear_probe` fits multinomial logistic regression on the features and reports accuracies.

Privacy: the probe is trained non-privately on whatever labelled data it is given. It measures
representation quality and is no part of any DP guarantee; probing on private data releases
information about that data that no accountant has counted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

_STD_FLOOR = 1e-6


def extract_features(features_fn: Callable[[np.ndarray], jax.Array], images: np.ndarray,
                     batch_size: int = 1000) -> np.ndarray:
  """Applies `features_fn` to `images` batch by batch.

  Args:
    features_fn: maps float32 images [batch_size, H, W, C] to features [batch_size, k]. It is
      always called with exactly `batch_size` rows (the last batch is zero-padded), so a jitted
      one compiles once.
    images: float [n, H, W, C], n >= 1.
    batch_size: rows per call, >= 1.

  Returns:
    float32 numpy [n, k]; row i is features_fn's output for images[i].
  """
  images = np.asarray(images)
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be float [n, H, W, C], got {images.dtype} {images.shape}.")
  if len(images) == 0:
    raise ValueError("images is empty; there is nothing to extract features from.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  images = images.astype(np.float32, copy=False)
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    rows = len(batch)
    if rows < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - rows,) + batch.shape[1:], batch.dtype)])
    features = np.asarray(features_fn(batch), np.float32)
    if features.ndim != 2 or features.shape[0] != batch_size:
      raise ValueError(f"features_fn must return [{batch_size}, k] for [{batch_size}, H, W, C] "
                       f"images, got shape {features.shape}.")
    out.append(features[:rows])
  return np.concatenate(out)


def _check(features: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> None:
  if features.ndim != 2:
    raise ValueError(f"{name}_features must be 2-D [n, k], got shape {features.shape}.")
  if labels.shape != features.shape[:1]:
    raise ValueError(f"{name}_labels must have shape [{features.shape[0]}] (one per feature "
                     f"row), got {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name}_labels must be integers, got {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name}_labels must lie in [0, {num_classes}), got values in "
                     f"[{labels.min()}, {labels.max()}].")


def standardize_features(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """(x - mean) / max(std, 1e-6) per feature, with mean and std [k] from `train` [n, k] only.

  Returns float32 [train, *others], each shaped as given.
  """
  train64 = np.asarray(train, np.float64)
  mean = train64.mean(axis=0)
  std = np.maximum(train64.std(axis=0), _STD_FLOOR)
  return [((np.asarray(x, np.float64) - mean) / std).astype(np.float32) for x in (train, *others)]


def _cross_entropy(params: tuple[jax.Array, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  w, b = params
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y))


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit(w0: jax.Array, x: jax.Array, y: jax.Array, l2: jax.Array, learning_rate: jax.Array,
         steps: int) -> tuple[jax.Array, jax.Array]:
  """Full-batch Adam on mean cross-entropy + l2/2·|w|²; x float32 [n, k], y int [n], w0 [k, c]."""
  optimizer = optax.adam(learning_rate)

  def objective(params):
    return _cross_entropy(params, x, y) + 0.5 * l2 * jnp.sum(params[0] ** 2)

  def step(_, carry):
    params, opt_state = carry
    grads = jax.grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = (w0, jnp.zeros(w0.shape[1:], jnp.float32))
  params, _ = jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))
  return params


def _accuracy(params: tuple[jax.Array, jax.Array], x: np.ndarray, y: np.ndarray) -> float:
  w, b = params
  return float(np.mean(np.argmax(np.asarray(x @ w + b), axis=1) == y)) if len(y) else float("nan")


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, num_classes: int, l2: float = 1e-4,
                 steps: int = 300, learning_rate: float = 0.1, seed: int = 0) -> dict[str, float]:
  """Fits multinomial logistic regression on frozen features; reports train and test accuracy.

  Features are standardised with the train set's per-feature mean and std (std floored at 1e-6),
  then weights [k, num_classes] and biases are fitted by `steps` full-batch Adam steps on the mean
  cross-entropy plus l2/2·|weights|² (biases unpenalised), in one jitted loop. The result is a
  deterministic function of the inputs and `seed`.

  Args:
    train_features: float [n_train, k]; train_labels: int [n_train] in [0, num_classes).
    test_features: float [n_test, k]; test_labels: int [n_test] in [0, num_classes).
    num_classes: number of classes, >= 2.
    l2: weight-decay coefficient, >= 0.
    steps: number of full-batch optimizer steps, >= 1.
    learning_rate: Adam's learning rate, > 0.
    seed: seeds the small random initial weights (N(0, 0.01²)).

  Returns:
    {"train_accuracy", "test_accuracy", "train_loss"}: floats; train_loss is the mean
    cross-entropy on the train set (without the l2 term).

  Privacy: the probe is trained non-privately on the labelled data given to it. It measures the
  quality of the representation and is not part of any DP guarantee.
  """
  train_features, test_features = np.asarray(train_features), np.asarray(test_features)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
  _check(train_features, train_labels, num_classes, "train")
  _check(test_features, test_labels, num_classes, "test")
  if len(train_labels) == 0:
    raise ValueError("train_features is empty; the probe needs training examples.")
  if test_features.shape[1] != train_features.shape[1]:
    raise ValueError(f"train and test features must have the same width, got "
                     f"{train_features.shape[1]} and {test_features.shape[1]}.")
  if not (l2 >= 0 and steps >= 1 and learning_rate > 0):
    raise ValueError(f"need l2 >= 0, steps >= 1 and learning_rate > 0, got l2={l2!r}, "
                     f"steps={steps!r}, learning_rate={learning_rate!r}.")
  x_train, x_test = standardize_features(train_features, test_features)
  y_train = train_labels.astype(np.int32)
  w0 = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (x_train.shape[1], num_classes))
  params = _fit(w0, x_train, y_train, jnp.float32(l2), jnp.float32(learning_rate), int(steps))
  return {
      "train_accuracy": _accuracy(params, x_train, y_train),
      "test_accuracy": _accuracy(params, x_test, test_labels),
      "train_loss": float(_cross_entropy(params, x_train, y_train)),
  }
