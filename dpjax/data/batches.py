"""Fixed-size shuffled batches of PUBLIC data, and gathering examples into a batch.

Shuffling gives no privacy amplification, so `ShuffledBatches` is for public data only; private
data is sampled by `dpjax.privacy.sampling` (Poisson) and fetched with `gather`.
"""

from __future__ import annotations

import numpy as np

from dpjax.data.dataset import Dataset
from dpjax.data.dataset import to_float

_BATCH_STREAM = 0xBA7C4  # keeps this generator apart from others seeded with the same seed


def gather(dataset: Dataset, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Fetches examples `indices` [n] (in that order).

  Returns:
    {"image": float32 [n, H, W, C] in [0, 1], "label": int32 [n]}.
  """
  indices = np.asarray(indices)
  return {"image": to_float(dataset.images[indices]), "label": dataset.labels[indices]}


class ShuffledBatches:
  """Batches of `batch_size` public examples, a pure function of (seed, step).

  Epoch e = step // steps_per_epoch walks a permutation of the dataset drawn from (seed, e),
  `batch_size` examples per step; the last len(dataset) % batch_size examples of each
  permutation are skipped, so every batch has the same shape. A resumed run therefore draws the
  same batch at step t as an uninterrupted one; no state needs saving.
  """

  def __init__(self, dataset: Dataset, batch_size: int, seed: int):
    if not 0 < batch_size <= len(dataset):
      raise ValueError(f"batch_size must be in [1, {len(dataset)}] (the public data size), "
                       f"got {batch_size}.")
    self.dataset = dataset
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = len(dataset) // batch_size
    self._cached: tuple[int, np.ndarray] | None = None  # (epoch, permutation): a memo only

  def permutation(self, epoch: int) -> np.ndarray:
    """The order [N] in which epoch `epoch` visits the examples."""
    if self._cached is None or self._cached[0] != epoch:
      rng = np.random.default_rng([self.seed, _BATCH_STREAM, epoch])
      self._cached = (epoch, rng.permutation(len(self.dataset)))
    return self._cached[1]

  def indices(self, step: int) -> np.ndarray:
    """Example indices [batch_size] of the batch at `step` (step >= 0)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    return self.permutation(epoch)[start:start + self.batch_size].copy()

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step`: see `gather` for shapes."""
    return gather(self.dataset, self.indices(step))
