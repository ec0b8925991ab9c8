"""Host-side batch samplers for private data, and the dp_accounting event each one implies.

Both samplers are deterministic functions of (seed, step), so a resumed run draws exactly the
batches an uninterrupted run would have, and every process of a multi-host job can draw the same
global batch and keep its own slice. The Poisson sampler's seed is secret (fresh OS entropy unless
given; the trainer's comes from its run secret, `dpjax.privacy.randomness`).

- `PoissonSampler`: each example is in the batch independently with probability q (the batch size
  is random, possibly zero). This is the sampling that privacy amplification by subsampling
  assumes; its event is `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` per step.
- `ShuffleSampler`: fixed-size batches from a fresh permutation every epoch. It carries **no
  amplification guarantee**; its event is the honest one without amplification (one Gaussian per
  epoch under replace-one adjacency), far weaker than Poisson's. It must be asked for explicitly.

A realised batch is padded to a whole number of fixed-size microbatches with a mask, so the jitted
step sees one shape and never recompiles. The realised size depends on private data: it must not
be released (the noise transformation divides by the expected size).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Iterator

import dp_accounting
import numpy as np

from dpjax.privacy import randomness

_POISSON_STREAM = 0x9015
_SHUFFLE_STREAM = 0x5AFF


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
  """A batch padded to `num_microbatches * microbatch_size` rows.

  indices: int64 [k·m] dataset indices; padding rows repeat index 0 (their content is masked).
  mask: bool [k·m], True for real examples.
  microbatch_size: m.
  """
  indices: np.ndarray
  mask: np.ndarray
  microbatch_size: int

  @property
  def num_microbatches(self) -> int:
    return len(self.indices) // self.microbatch_size

  @property
  def size(self) -> int:
    """The realised number of real examples. Private under Poisson sampling: never release it."""
    return int(self.mask.sum())

  def microbatches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (indices [m], mask [m]) for each microbatch."""
    m = self.microbatch_size
    for start in range(0, len(self.indices), m):
      yield self.indices[start:start + m], self.mask[start:start + m]

  def for_process(self, process_index: int, process_count: int) -> "PaddedBatch":
    """This process's contiguous share of the global batch (padded so all shares are equal)."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    k = -(-self.num_microbatches // process_count)  # microbatches per process
    padded = pad_to_microbatches(self.indices[self.mask], self.microbatch_size,
                                 k * process_count)
    rows = slice(process_index * k * self.microbatch_size,
                 (process_index + 1) * k * self.microbatch_size)
    return PaddedBatch(padded.indices[rows], padded.mask[rows], self.microbatch_size)


def pad_to_microbatches(indices: np.ndarray, microbatch_size: int,
                        min_microbatches: int = 0) -> PaddedBatch:
  """Pads `indices` with masked rows to a whole number of microbatches (at least the minimum)."""
  if microbatch_size <= 0:
    raise ValueError(f"microbatch_size must be > 0, got {microbatch_size}.")
  k = max(-(-len(indices) // microbatch_size), min_microbatches)
  padded = np.zeros(k * microbatch_size, np.int64)
  padded[:len(indices)] = indices
  mask = np.zeros(k * microbatch_size, bool)
  mask[:len(indices)] = True
  return PaddedBatch(padded, mask, microbatch_size)


def _check_rate(sampling_rate: float) -> None:
  if not (0 < sampling_rate <= 1):
    raise ValueError(f"The sampling rate q (sampling_rate) must be in (0, 1], got {sampling_rate!r}. "
                     "It is the expected batch size divided by the number of private examples.")


def _check_count(name: str, value: int) -> None:
  if int(value) != value or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PoissonSampling:
  """Poisson sampling at rate q, as far as privacy goes: public facts only, no seed.

  The one place the privacy event of a Poisson-sampled Gaussian step is written: the sampler
  (`PoissonSampler.sampling`), the trainer's plan, the ledger (`accounting.PrivacyLedger`, which
  rebuilds it from `name` and q) and the privacy statement all take it from here, so they cannot
  disagree.
  """
  sampling_rate: float
  name: ClassVar[str] = "poisson"
  description: ClassVar[str] = "Poisson"
  adjacency: ClassVar[str] = "add/remove"

  def __post_init__(self):
    _check_rate(self.sampling_rate)

  def dp_event(self, noise_multiplier: float, steps: int = 1) -> dp_accounting.DpEvent:
    """`steps` steps of the Poisson-subsampled Gaussian mechanism of noise multiplier σ (the
    std of the noise over the sensitivity), under add/remove adjacency."""
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
      raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}.")
    if int(steps) != steps or steps < 1:
      raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps))

  def sampler(self, num_examples: int, microbatch_size: int, seed: int | None = None
              ) -> PoissonSampler:
    """The sampler of this description over `num_examples` (its seed secret: see PoissonSampler)."""
    return PoissonSampler(num_examples, self.sampling_rate, microbatch_size, seed=seed)


# Sampling descriptions by name: how a ledger entry finds the event of its steps.
SAMPLINGS: dict[str, type] = {PoissonSampling.name: PoissonSampling}


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
  """Poisson sampling at rate q over `num_examples` private examples.

  Each step's batch is a subset in which every example appears independently with probability q:
  drawn as a Binomial(N, q) size and then a uniform subset of that size without replacement, which
  is the same distribution. No example appears twice. Batches may be empty.

  seed: None (the default) draws a 64-bit seed of fresh OS entropy, as amplification by
  subsampling needs the batches to be secret; the trainer passes its run secret's
  (`randomness.sampler_seed`). A seed the adversary knows reveals which examples each step used.
  It is left out of the repr.
  """
  num_examples: int
  sampling_rate: float
  microbatch_size: int
  seed: int | None = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.seed is None:
      object.__setattr__(self, "seed", randomness.fresh_sampler_seed())
    _check_count("num_examples", self.num_examples)
    _check_count("microbatch_size", self.microbatch_size)
    _check_rate(self.sampling_rate)

  @property
  def expected_batch_size(self) -> float:
    return self.sampling_rate * self.num_examples

  def indices(self, step: int) -> np.ndarray:
    """Sorted dataset indices of step `step`'s batch (length ~ Binomial(N, q))."""
    rng = np.random.default_rng([self.seed, int(step), _POISSON_STREAM])
    size = rng.binomial(self.num_examples, self.sampling_rate)
    return np.sort(rng.choice(self.num_examples, size=size, replace=False))

  def batch(self, step: int) -> PaddedBatch:
    return pad_to_microbatches(self.indices(step), self.microbatch_size)

  @property
  def sampling(self) -> PoissonSampling:
    """This sampler's public description: what the plan, the ledger and the statement use."""
    return PoissonSampling(self.sampling_rate)

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The event of `steps` steps of the subsampled Gaussian mechanism (add/remove adjacency)."""
    return self.sampling.dp_event(noise_multiplier, steps)


class NoAmplificationError(ValueError):
  """Raised when shuffled batches are used without acknowledging they give no amplification."""


@dataclasses.dataclass(frozen=True)
class ShuffleSampler:
  """Fixed-size batches from a fresh permutation per epoch (the last partial batch is dropped).

  Gives NO privacy amplification by subsampling. Its `dp_event` is the guarantee that holds without
  amplification: under replace-one adjacency an example's change moves one step per epoch by at
  most 2·C, so each epoch is one Gaussian mechanism with noise multiplier σ/2.
  Pass `no_amplification=True` to acknowledge this.
  """
  num_examples: int
  batch_size: int
  microbatch_size: int
  seed: int = 0
  no_amplification: bool = False

  def __post_init__(self):
    if not self.no_amplification:
      raise NoAmplificationError(
          "Shuffled fixed-size batches give no privacy amplification by subsampling, so the ε of "
          "a Poisson-sampled run does not apply to them. Use PoissonSampler, or pass "
          "no_amplification=True to accept the (much weaker) guarantee without amplification.")
    _check_count("num_examples", self.num_examples)
    _check_count("batch_size", self.batch_size)
    _check_count("microbatch_size", self.microbatch_size)
    if self.batch_size > self.num_examples:
      raise ValueError(f"batch_size {self.batch_size} exceeds num_examples {self.num_examples}.")

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def indices(self, step: int) -> np.ndarray:
    epoch, within = divmod(int(step), self.steps_per_epoch)
    permutation = epoch_permutation(self.num_examples, self.seed, epoch, _SHUFFLE_STREAM)
    return permutation[within * self.batch_size:(within + 1) * self.batch_size]

  def batch(self, step: int) -> PaddedBatch:
    return pad_to_microbatches(self.indices(step), self.microbatch_size)

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """One Gaussian(σ/2) per epoch touched (replace-one adjacency, no amplification)."""
    epochs = math.ceil(steps / self.steps_per_epoch)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier / 2), epochs)


def epoch_permutation(num_examples: int, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
  """The permutation of range(num_examples) used in `epoch`: a pure function of its arguments."""
  return np.random.default_rng([seed, epoch, stream]).permutation(num_examples)
