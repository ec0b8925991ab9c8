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

  With batch_size <= num_examples, epoch e = step // steps_per_epoch walks a permutation of
  range(num_examples) drawn from (seed, e), `batch_size` examples per step; the last
  num_examples % batch_size examples of each permutation are skipped, so every batch has the same
  shape. A public part smaller than the batch (regime C of experiments/bu2024_cifar.py: 500 public
  images, batches of 1024) is read whole several times per step: step t concatenates the
  permutations of epochs t·k, ..., t·k + k - 1, k = ceil(batch_size / num_examples), and keeps the
  first `batch_size`, so each example appears floor or ceil(batch_size / num_examples) times in
  every batch; `view_ids` tells the copies apart, so that each is augmented on its own. A resumed
  run therefore draws the same batch at step t as an uninterrupted one; no state needs saving.
  Small and picklable (the streaming pipeline's worker processes draw from it); holds no data.
  """
  num_examples: int
  batch_size: int
  seed: int

  def __post_init__(self):
    if self.num_examples < 1 or self.batch_size < 1:
      raise ValueError(f"ShuffledOrder needs num_examples >= 1 (the public data size) and "
                       f"batch_size >= 1, got {self.num_examples} and {self.batch_size}.")

  @property
  def steps_per_epoch(self) -> int:
    """Steps per permutation, or 1 when a step reads several (batch_size > num_examples)."""
    return max(1, self.num_examples // self.batch_size)

  @property
  def epochs_per_step(self) -> int:
    """Permutations one step reads: 1, or ceil(batch_size / num_examples) when larger."""
    return max(1, -(-self.batch_size // self.num_examples))

  def permutation(self, epoch: int) -> np.ndarray:
    """The order [N] in which epoch `epoch` visits the examples."""
    return _permutation(self.num_examples, self.seed, epoch)

  def indices(self, step: int) -> np.ndarray:
    """Example indices [batch_size] of the batch at `step` (step >= 0)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if self.batch_size > self.num_examples:
      epochs = range(step * self.epochs_per_step, (step + 1) * self.epochs_per_step)
      return np.concatenate([self.permutation(e) for e in epochs])[:self.batch_size]
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    return self.permutation(epoch)[start:start + self.batch_size].copy()

  def view_ids(self, step: int) -> np.ndarray:
    """Ids [batch_size] of the batch at `step` for its augmentation views (`dpjax.data.views`):
    `indices(step)`, plus c·num_examples for the c-th copy of an example in the batch (c > 0 only
    when batch_size > num_examples). Example id % num_examples is the example read."""
    copy = np.arange(self.batch_size) // self.num_examples
    return self.indices(step) + copy * self.num_examples


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
