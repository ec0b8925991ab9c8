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
be released (the noise transformation divides by the expected size). The number of microbatches,
and so a step's work and time, follows it too, unless the sampler pads every batch to a fixed
capacity (`min_microbatches`, `capacity_microbatches`): then the work is constant except when a
batch exceeds the capacity, with probability `overflow_probability` per step, which
`timing_delta` adds to δ.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Iterator

import dp_accounting
import numpy as np
import scipy.stats

from dpjax.privacy import randomness

_POISSON_STREAM = 0x9015
_SHUFFLE_STREAM = 0x5AFF
CAPACITY_TAIL = 2.0 ** -64  # P(a Poisson batch exceeds its capacity), at most, per step


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

  def sampler(self, num_examples: int, microbatch_size: int, seed: int | None = None,
              min_microbatches: int = 0) -> PoissonSampler:
    """The sampler of this description over `num_examples` (its seed secret: see PoissonSampler),
    its batches padded to at least `min_microbatches` microbatches."""
    return PoissonSampler(num_examples, self.sampling_rate, microbatch_size, seed=seed,
                          min_microbatches=min_microbatches)


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
  min_microbatches: int = 0  # pad every batch to at least this many (a fixed capacity)

  def __post_init__(self):
    if self.seed is None:
      object.__setattr__(self, "seed", randomness.fresh_sampler_seed())
    _check_count("num_examples", self.num_examples)
    _check_count("microbatch_size", self.microbatch_size)
    _check_rate(self.sampling_rate)
    if int(self.min_microbatches) != self.min_microbatches or self.min_microbatches < 0:
      raise ValueError(f"min_microbatches must be an integer >= 0, got {self.min_microbatches!r}.")

  @property
  def constant_work(self) -> bool:
    """Whether every batch is padded to a fixed capacity (`min_microbatches` > 0), so that a
    step's work does not depend on its batch size unless the batch exceeds it."""
    return self.min_microbatches > 0

  @property
  def expected_batch_size(self) -> float:
    return self.sampling_rate * self.num_examples

  def indices(self, step: int) -> np.ndarray:
    """Sorted dataset indices of step `step`'s batch (length ~ Binomial(N, q))."""
    rng = np.random.default_rng([self.seed, int(step), _POISSON_STREAM])
    size = rng.binomial(self.num_examples, self.sampling_rate)
    return np.sort(rng.choice(self.num_examples, size=size, replace=False))

  def batch(self, step: int) -> PaddedBatch:
    """The step's batch padded to whole microbatches, at least `min_microbatches` of them. A
    batch larger than that capacity keeps every example (more microbatches): it is never cut."""
    return pad_to_microbatches(self.indices(step), self.microbatch_size, self.min_microbatches)

  @property
  def sampling(self) -> PoissonSampling:
    """This sampler's public description: what the plan, the ledger and the statement use."""
    return PoissonSampling(self.sampling_rate)

  def dp_event(self, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """The event of `steps` steps of the subsampled Gaussian mechanism (add/remove adjacency)."""
    return self.sampling.dp_event(noise_multiplier, steps)


def overflow_probability(num_examples: int, sampling_rate: float, capacity: int) -> float:
  """P(a Poisson batch of N examples at rate q has more than `capacity` examples): the Binomial
  tail P(Binomial(N, q) > capacity). Public: a function of N, q and the capacity."""
  return float(scipy.stats.binom.sf(capacity, num_examples, sampling_rate))


def capacity_microbatches(num_examples: int, sampling_rate: float, microbatch_size: int,
                          tail: float = CAPACITY_TAIL) -> int:
  """The fewest microbatches of `microbatch_size` rows (at least one) that hold a Poisson batch
  except with probability <= `tail`: the capacity of a sampler whose work is constant."""
  _check_count("num_examples", num_examples)
  _check_count("microbatch_size", microbatch_size)
  _check_rate(sampling_rate)
  count = max(1, math.ceil(num_examples * sampling_rate / microbatch_size))
  while overflow_probability(num_examples, sampling_rate, count * microbatch_size) > tail:
    count += 1
  return count


def timing_delta(sampler: PoissonSampler, steps: int, epsilon: float) -> float | None:
  """What the overflow of a constant-work sampler adds to δ over `steps` private steps:
  (1 + e^ε)·η with η = steps · P(a batch exceeds its capacity).

  Privacy: if the run is (ε, δ)-DP as a function of its noised outputs, the run together with
  the work of each step (its number of microbatches and rows read, and so its time) is
  (ε, δ + timing_delta)-DP. On the event E that no step's batch exceeds the capacity the work
  is the same constant under any dataset, so the work adds nothing there; E fails with
  probability at most η under any dataset (the batch size's law depends on N and q only, and a
  neighbour's N differs by one, which the tail bound at N + 1 covers: the tail grows with N,
  so η is computed at N + 1). For any set S of (outputs, work) and neighbours D, D':
    P[(M(D), W(D)) ∈ S] <= P[M(D) ∈ S_c] + η <= e^ε·P[M(D') ∈ S_c] + δ + η
                        <= e^ε·(P[(M(D'), W(D')) ∈ S] + η) + δ + η,
  with S_c the outputs that S pairs with the constant work. Without a capacity the work is
  ceil(|B|/m) microbatches and |B| rows read per step, a function of the private batch size
  that no guarantee here covers; None then.
  """
  if not sampler.constant_work:
    return None
  if steps == 0:
    return 0.0
  capacity = sampler.min_microbatches * sampler.microbatch_size
  eta = steps * overflow_probability(sampler.num_examples + 1, sampler.sampling_rate, capacity)
  return (1.0 + math.exp(epsilon)) * eta if math.isfinite(epsilon) else math.inf


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
