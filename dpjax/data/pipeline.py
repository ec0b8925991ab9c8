"""Streaming step batches with grain: each step's rows read, decoded and preprocessed ahead of it.

The host loop asks for step t's batch of one part (public, private or the evaluation set); a grain
pipeline over the steps that read that part has it ready:

  steps that read the part  ->  draw(t): the rows of step t (Poisson sampler, public order, ...)
    -> this process's rows only  ->  images[rows] (an ArrayRecord dataset reads and decodes just
    those records)  ->  preprocess  ->  padded fixed-shape microbatches  ->  prefetch (threads, and
    `workers` processes)

Nothing is read whole: memory is the prefetch buffer, not the dataset. `draw` is the single source
of which examples a step trains on: for private data it is the plan's Poisson sampler
(`dpjax.privacy.sampling`), so the privacy event and the rows read cannot disagree. Every element
is a pure function of (draw, step), so a resumed run reads exactly the batches an uninterrupted run
would, and the order of the workers does not matter.

Padding rows (to whole microbatches) read nothing: their images are zeros, their label and id 0,
their mask False. Which rows are padding depends on the Poisson draw: only the mask says so, and
the step must never release it (`sampling.PaddedBatch.size`).

Privacy: a grain worker process holds the sampler (its seed is the run's secret) in memory; it
never writes it anywhere. Augmentation randomness is not drawn here: the losses draw views on the
device from the config seed and the rows' step and id (`dpjax.data.views`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator

import grain
from absl import flags
import numpy as np

from dpjax.privacy import sampling

# How many steps ahead a pipeline is planned at once; after that many it is restarted (cheap with
# threads; with worker processes, a few seconds every WINDOW steps).
WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class Options:
  """How a part is read. workers: grain worker processes decoding and preprocessing (0: threads
  of this process only); threads: reading threads per process; prefetch: steps read ahead."""
  workers: int = 0
  threads: int = 4
  prefetch: int = 2

  def __post_init__(self):
    if self.workers < 0 or self.threads < 1 or self.prefetch < 1:
      raise ValueError(f"data pipeline options must have workers >= 0, threads >= 1 and "
                       f"prefetch >= 1, got {self}.")


@dataclasses.dataclass(frozen=True)
class PublicDraw:
  """step -> the public batch of `order` (`data.ShuffledOrder`): one microbatch, all rows real.
  Its indices are the order's `view_ids`: a batch larger than the public part holds example i's
  c-th copy as i + c·N, so that each copy gets its own augmentation views."""
  order: Any

  def __call__(self, step: int) -> sampling.PaddedBatch:
    return sampling.pad_to_microbatches(self.order.view_ids(step), self.order.batch_size)


@dataclasses.dataclass(frozen=True)
class PrivateDraw:
  """step -> the Poisson sampler's padded batch (`sampling.PoissonSampler.batch`)."""
  sampler: sampling.PoissonSampler

  def __call__(self, step: int) -> sampling.PaddedBatch:
    return self.sampler.batch(step)


@dataclasses.dataclass(frozen=True)
class SequentialDraw:
  """batch number b -> examples [b·size, (b+1)·size) of `num_examples` (the last one padded)."""
  num_examples: int
  size: int

  @property
  def num_batches(self) -> int:
    return -(-self.num_examples // self.size)

  def __call__(self, b: int) -> sampling.PaddedBatch:
    stop = min((b + 1) * self.size, self.num_examples)
    return sampling.pad_to_microbatches(np.arange(b * self.size, stop), self.size)


@dataclasses.dataclass(frozen=True)
class ReadStep:
  """step -> this process's rows of the step's padded batch, read and preprocessed.

  images: uint8 [N, H, W, C], an array or a lazy array-like (`dpjax.data.records.RecordImages`)
    indexed by an int array; labels: int32 [N]; draw: step -> `sampling.PaddedBatch` of
    microbatch size m; rows: the rows of each microbatch this process's devices hold
    (`parallel.process_rows`, a slice of range(m)); preprocess: uint8 [n, H, W, C] -> float32,
    picklable (worker processes run it); read_every_row: padding rows read and preprocess an
    image too (then zeroed), so the work does not depend on how many rows are real (a
    constant-work sampler's, `sampling.PoissonSampler.constant_work`); else they read nothing.

  Returns {"image": float32 [k, r, H, W, C], "label": int32 [k, r], "id": int32 [k, r] (index in
  the part; id >= N is a further copy of example id % N, see PublicDraw), "step": int32 [k, r],
  "mask": bool [k, r], "read_step": int64 []} for the step's k microbatches (k = 0 for an empty
  Poisson batch) of which this process holds r rows each.
  """
  images: Any
  labels: np.ndarray
  draw: Callable[[int], sampling.PaddedBatch]
  rows: slice
  preprocess: Callable[[np.ndarray], np.ndarray]
  read_every_row: bool = False

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    batch = self.draw(int(step))
    k = batch.num_microbatches
    ids = batch.indices.reshape(k, batch.microbatch_size)[:, self.rows]
    mask = batch.mask.reshape(k, batch.microbatch_size)[:, self.rows]
    n = len(self.labels)  # an id >= N is a copy (PublicDraw)
    if self.read_every_row:
      pixels = self.preprocess(self.images[ids.reshape(-1) % n])
      image = pixels.reshape(mask.shape + pixels.shape[1:])
      image[~mask] = 0
    else:  # padding reads nothing
      pixels = self.preprocess(self.images[ids[mask] % n])
      image = np.zeros(mask.shape + pixels.shape[1:], pixels.dtype)
      image[mask] = pixels
    return dict(image=image, label=np.where(mask, self.labels[ids % n], 0).astype(np.int32),
                id=np.where(mask, ids, 0).astype(np.int32),
                step=np.full(mask.shape, step, np.int32), mask=mask,
                read_step=np.int64(step))


class StepStream:
  """The elements `read(t)` of the steps t >= a start for which `reads_at(t)`, prefetched.

  `get(t)` returns `read(t)`. Steps are expected in increasing order; asking for a step the
  pipeline did not plan next (a resumed run, an automatic switch that changed which steps read the
  part) restarts it at t, so the answer is always `read(t)`, only slower.
  """

  def __init__(self, read: ReadStep, reads_at: Callable[[int], bool], stop: int,
               options: Options = Options()):
    self.read, self.reads_at, self.stop, self.options = read, reads_at, stop, options
    self._planned: collections.deque[int] = collections.deque()
    self._iterator: Iterator | None = None
    self.restarts = 0

  def get(self, step: int) -> dict[str, np.ndarray]:
    if not self._planned or self._planned[0] != step:
      self._start(step)
    if not self._planned or self._planned[0] != step:
      raise ValueError(f"Step {step} does not read this part (reads_at({step}) is False).")
    self._planned.popleft()
    element = next(self._iterator)
    if int(element["read_step"]) != step:
      raise RuntimeError(f"The data pipeline returned step {int(element['read_step'])}'s batch "
                         f"for step {step}.")
    return element

  def _start(self, step: int) -> None:
    self.close()
    planned = [t for t in range(step, min(self.stop, step + WINDOW)) if self.reads_at(t)]
    self._planned = collections.deque(planned)
    self.restarts += 1
    if not planned:
      return
    # A thread needs a buffer slot to work ahead: buffer max(prefetch, threads) steps.
    dataset = grain.MapDataset.source(planned).map(self.read).to_iter_dataset(
        grain.ReadOptions(num_threads=self.options.threads,
                          prefetch_buffer_size=max(self.options.prefetch, self.options.threads)))
    if self.options.workers:
      if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (a library
        flags.FLAGS.mark_as_parsed()   # caller outside an absl app has not parsed any)
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.options.workers, per_worker_buffer_size=self.options.prefetch))
    self._iterator = iter(dataset)

  def close(self) -> None:
    """Stops the pipeline's workers (a later `get` starts it again)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
    self._iterator = None
    self._planned.clear()


def microbatches(element: dict[str, np.ndarray]) -> Iterator[tuple[dict[str, np.ndarray],
                                                                    np.ndarray]]:
  """(batch, mask) of each microbatch of a `ReadStep` element: batch holds this process's rows
  [r, ...] of image, label, id and step; mask bool [r]."""
  for i in range(len(element["mask"])):
    yield {key: element[key][i] for key in ("image", "label", "id", "step")}, element["mask"][i]
