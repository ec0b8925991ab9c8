"""Fixed-size shuffled batches of PUBLIC data, and gathering examples into a batch.

Shuffling gives no privacy amplification, so `ShuffledOrder`/`ShuffledBatches` are for public data
only; private data is sampled by `dpjax.privacy.sampling` (Poisson) and fetched with `gather` or
the streaming pipeline (`dpjax.data.pipeline`).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class ShuffledOrder:
  """Which `batch_size` public examples step t reads: a pure function of (seed, step).

  Epoch e = step // steps_per_epoch walks a permutation of range(num_examples) drawn from
  (seed, e), `batch_size` examples per step; the last num_examples % batch_size examples of each
  permutation are skipped, so every batch has the same shape. A resumed run therefore draws the
  same batch at step t as an uninterrupted one; no state needs saving. Small and picklable (the
  streaming pipeline's worker processes draw from it); holds no data.
  """
  num_examples: int
  batch_size: int
  seed: int

  def __post_init__(self):
    if not 0 < self.batch_size <= self.num_examples:
      raise ValueError(f"batch_size must be in [1, {self.num_examples}] (the public data size), "
                       f"got {self.batch_size}.")

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def permutation(self, epoch: int) -> np.ndarray:
    """The order [N] in which epoch `epoch` visits the examples."""
    return _permutation(self.num_examples, self.seed, epoch)

  def indices(self, step: int) -> np.ndarray:
    """Example indices [batch_size] of the batch at `step` (step >= 0)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    return self.permutation(epoch)[start:start + self.batch_size].copy()


_memo: dict[tuple[int, int], tuple[int, np.ndarray]] = {}  # (N, seed) -> (epoch, permutation)


def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of epoch `epoch`; the latest one per (N, seed) is memoised (a cache only)."""
  cached = _memo.get((num_examples, seed))
  if cached is None or cached[0] != epoch:
    rng = np.random.default_rng([seed, _BATCH_STREAM, epoch])
    cached = _memo[(num_examples, seed)] = (epoch, rng.permutation(num_examples))
  return cached[1]


class ShuffledBatches:
  """Batches of `batch_size` public examples of `dataset` in the order `ShuffledOrder` gives."""

  def __init__(self, dataset: Dataset, batch_size: int, seed: int):
    self.dataset = dataset
    self.order = ShuffledOrder(len(dataset), batch_size, seed)
    self.batch_size, self.seed = batch_size, seed
    self.steps_per_epoch = self.order.steps_per_epoch

  def permutation(self, epoch: int) -> np.ndarray:
    return self.order.permutation(epoch)

  def indices(self, step: int) -> np.ndarray:
    return self.order.indices(step)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step`: see `gather` for shapes."""
    return gather(self.dataset, self.indices(step))
