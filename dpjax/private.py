"""One call for the whole private setup of a training loop you write yourself (Opacus users know
it as `make_private_with_epsilon`).

`make_private_with_epsilon(loss_fn, optax.adam(1e-3), num_examples=N, target_epsilon=3.0,
delta=1e-5, expected_batch_size=256, epochs=2)` returns a `PrivateSetup` holding:

- `sampler`: the Poisson sampler (rate q = B/N, secret seed of fresh OS entropy);
- `grad_fn`: the clipped per-example gradient sum of loss_fn (`dpjax.privacy.grad`), with the
  SAME microbatch size as the sampler (given once: `sampler.microbatch_size is
  grad_fn.microbatch_size`), so a padded batch always splits into whole microbatches;
  `per_example_method='ghost'` makes it ghost-clip the Linen layers loss_fn calls (faster; the
  same sum up to float32 rounding, the same plan and guarantee);
- `noise_multiplier`: σ calibrated (`calibration.calibrate_noise`) so that the planned steps spend
  at most the target ε at δ under the chosen accountant;
- `optimizer`: `noise.dp_optimizer(base, σ, grad_fn.sensitivity, B)`, its noise key fresh OS
  entropy held in its state (keep that state as private as the data);
- `ledger` and `budget` (`accounting.PrivacyLedger`, `PrivacyBudget`): `batches()` records each
  step before yielding its batch and refuses (BudgetExceededError) a step beyond the target;
  `epsilon()` reports ε of what was recorded and `statement()` says what was guaranteed.

Privacy: the guarantee is the plan's by construction: the sampler's q, σ, the sensitivity of
grad_fn (add/remove adjacency, the relation of the Poisson accounting) and the ledger's events all
come from this one call. It holds if each step runs grad_fn once on the rows of one recorded
batch and feeds its `.grad` to `optimizer` once, and nothing else computed from the private rows
leaves the device. The statement is built here rather than by `dpjax.train.statement`, which
needs a trainer's plan and config (importing it pulls in the whole trainer and its data
pipelines).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Sequence

import numpy as np
import optax
import scipy.stats

from dpjax.privacy import accounting, calibration, clipping, grad, noise, sampling

MAX_AUTO_MICROBATCH = 128  # the automatic microbatch size's cap (memory: [m, *params] gradients)
AUTO_PADDING = 0.10  # the automatic size's bound on the expected padding, a fraction of B


def expected_padding(num_examples: int, sampling_rate: float, microbatch_size: int) -> float:
  """E[padded rows − real rows] / B of a Poisson batch (size ~ Binomial(N, q)) padded to whole
  microbatches of m rows, at least one (an empty batch is one masked microbatch)."""
  n, q, m = num_examples, sampling_rate, microbatch_size
  mean, sd = n * q, math.sqrt(n * q * (1 - q))
  sizes = np.arange(max(0, int(mean - 12 * sd) - 1), min(n, int(mean + 12 * sd) + 2) + 1)
  padded = np.maximum(np.ceil(sizes / m), 1) * m
  return float(np.sum(scipy.stats.binom.pmf(sizes, n, q) * (padded - sizes)) / mean)


def choose_microbatch_size(num_examples: int, sampling_rate: float) -> int:
  """The largest power of two m ≤ MAX_AUTO_MICROBATCH whose expected padding is at most
  AUTO_PADDING (10%) of the expected batch size (1 if none is). Larger m: fewer microbatches per
  step and fewer distinct batch shapes (each compiles the jitted step once); smaller m: less
  padding. (The issue's recipe, m = 64 at B = 128, padded ~24%.)"""
  m = 1
  while (2 * m <= MAX_AUTO_MICROBATCH
         and expected_padding(num_examples, sampling_rate, 2 * m) <= AUTO_PADDING):
    m *= 2
  return m


def steps_for_epochs(epochs: float, num_examples: int, expected_batch_size: float) -> int:
  """⌈epochs · N / B⌉: an epoch is N / B expected batches (a Poisson batch has B rows on
  average)."""
  return math.ceil(epochs * num_examples / expected_batch_size - 1e-9)


@dataclasses.dataclass(frozen=True)
class PrivateSetup:
  """What `make_private_with_epsilon` returns; see the module docstring. The ledger is the one
  mutable part: it records the private steps taken."""
  sampler: sampling.PoissonSampler
  grad_fn: grad.ClippedGradFn
  optimizer: optax.GradientTransformation
  noise_multiplier: float
  steps: int
  target_epsilon: float
  delta: float
  accountant: str
  ledger: accounting.PrivacyLedger
  budget: accounting.PrivacyBudget

  @property
  def microbatch_size(self) -> int:
    return self.grad_fn.microbatch_size

  @property
  def expected_padding(self) -> float:
    """Expected masked rows per step over B (`expected_padding`): compute spent on padding."""
    return expected_padding(self.sampler.num_examples, self.sampler.sampling_rate,
                            self.microbatch_size)

  def record_step(self) -> None:
    """Records one private step in the ledger. Call it BEFORE the step runs: it raises
    accounting.BudgetExceededError, recording nothing, if the step would take ε above the target."""
    q, sigma = self.sampler.sampling_rate, self.noise_multiplier
    self.budget.check(self.ledger, q, sigma, hint=self.steps)
    self.ledger.record_private(q, sigma, sampling=self.sampler.sampling.name)

  def batches(self, steps: int | None = None) -> Iterator[sampling.PaddedBatch]:
    """The next `steps` (default: the rest of the planned) Poisson batches, each padded with
    masked rows to whole microbatches (at least one), each recorded (`record_step`) before it is
    yielded. `indices` rows to gather, `mask` to pass to grad_fn: the realised size is private."""
    first = self.ledger.private_steps
    stop = self.steps if steps is None else first + steps
    for step in range(first, stop):
      self.record_step()
      yield sampling.pad_to_microbatches(self.sampler.indices(step), self.microbatch_size, 1)

  def epsilon(self, steps: int | None = None) -> float:
    """ε at δ (this setup's accountant) of the steps recorded so far, or of `steps` steps."""
    if steps is None:
      return self.ledger.epsilon(self.delta, self.accountant)
    return accounting.epsilon(self.noise_multiplier, self.sampler.sampling_rate, steps,
                              self.delta, self.accountant)

  def statement(self) -> str:
    """The privacy guarantee of the steps recorded so far, in words a reader can check."""
    q, rule = self.sampler.sampling_rate, self.grad_fn.rule
    by_accountant = ", ".join(f"{a} {self.ledger.epsilon(self.delta, a):.3f}"
                              for a in accounting.ACCOUNTANTS)
    return (
        f"Privacy: ({self.epsilon():.3f}, {self.delta:g})-DP for one example (one row of the "
        f"batch arguments) of the {self.sampler.num_examples} private examples, "
        f"{self.sampler.sampling.adjacency} adjacency; accountant {self.accountant} (the same "
        f"steps under every accountant: {by_accountant}).\n"
        f"  {self.ledger.private_steps} of {self.steps} planned private steps "
        f"({self.sampler.sampling.description} sampling, q = {q:.5g}, expected batch "
        f"{self.sampler.expected_batch_size:g}); noise multiplier {self.noise_multiplier:.4f} "
        f"(calibrated for the {self.steps} steps to ε <= {self.target_epsilon:g}); clip rule "
        f"{rule!r}, sensitivity {self.grad_fn.sensitivity:.4g}.\n"
        "  Released per step: the clipped gradient sum + N(0, (σ·S)²·I) over the expected batch "
        "size, through the optimizer's update; nothing else computed from the private rows.\n"
        "  Randomness: the noise key and the sampler's seed are fresh OS entropy (the noise key "
        "lives in the optimizer state: keep it as private as the data).")


def make_private_with_epsilon(
    loss_fn: Callable, optimizer: optax.GradientTransformation, *, num_examples: int,
    target_epsilon: float, delta: float, expected_batch_size: float,
    epochs: float | None = None, steps: int | None = None,
    clip: clipping.ClipRule | float = 1.0, accountant: str = "pld",
    microbatch_size: int | None = None, argnums: int | Sequence[int] = 0,
    has_aux: bool = False, batch_argnums: int | Sequence[int] = (1,),
    key_argnums: int | Sequence[int] = (), example_axis: str = "drop",
    per_example_method: str = "vmap") -> PrivateSetup:
  """The sampler, calibrated noise, DP optimizer, clipped gradient and ledger of a private run.

  Args:
    loss_fn: the per-example loss, as `grad.clipped_grad` takes it (argnums, has_aux,
      batch_argnums, key_argnums, example_axis and per_example_method are passed on to it).
    optimizer: the base optax optimizer; the DP one noises the clipped sum, divides it by B and
      then applies this one.
    num_examples: N, the number of private examples (the sampler draws from range(N)).
    target_epsilon, delta: the (ε, δ) target; 0 < δ < 1/N.
    expected_batch_size: B = q·N, in (0, N].
    epochs / steps: exactly one: the planned private steps, or epochs of them, converted to
      ⌈epochs · N / B⌉ steps (`steps_for_epochs`).
    clip: a `clipping.ClipRule`, or a number C for FlatClip(C). Adjacency is add/remove (that of
      the Poisson accounting): for replace-one, use `grad.clipped_grad(adjacency='replace_one')`
      with your own accounting.
    accountant: "pld" (default), "rdp" or "rdp_classic" (`accounting.ACCOUNTANTS`): calibrates σ
      and reports ε.
    microbatch_size: rows per vmap call, shared by the sampler's padding and grad_fn. None: the
      largest power of two ≤ 128 whose expected padding is ≤ 10% of B (`choose_microbatch_size`;
      `PrivateSetup.expected_padding` states the result).
    per_example_method: 'vmap' (default) or 'ghost': ghost clipping of the Linen layers loss_fn
      calls through `model.apply({'params': params}, ...)` (`grad.clipped_grad`): the same clipped
      sum up to float32 rounding, usually much faster; the privacy plan does not change.

  Raises ValueError for ε ≤ 0 or not finite, δ outside (0, 1/N), B outside (0, N], both or
  neither of epochs and steps, a non-positive count.
  """
  if isinstance(num_examples, bool) or int(num_examples) != num_examples or num_examples <= 0:
    raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
  if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon)
          and target_epsilon > 0):
    raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}.")
  accounting.check_delta(delta, num_examples)
  if accountant not in accounting.ACCOUNTANTS:
    raise ValueError(f"Unknown accountant {accountant!r}; choose one of {accounting.ACCOUNTANTS}.")
  if not 0 < expected_batch_size <= num_examples:
    raise ValueError(f"expected_batch_size = {expected_batch_size!r} must be in (0, "
                     f"{num_examples}] (num_examples): it is the mean size of a Poisson batch.")
  if (epochs is None) == (steps is None):
    raise ValueError(f"Give exactly one of epochs and steps (got epochs={epochs!r}, "
                     f"steps={steps!r}): the plan needs its number of private steps.")
  if epochs is not None:
    if not epochs > 0:
      raise ValueError(f"epochs must be > 0, got {epochs!r}.")
    steps = steps_for_epochs(epochs, num_examples, expected_batch_size)
  if isinstance(steps, bool) or int(steps) != steps or steps <= 0:
    raise ValueError(f"steps must be a positive integer, got {steps!r}.")
  q = expected_batch_size / num_examples
  m = choose_microbatch_size(num_examples, q) if microbatch_size is None else microbatch_size
  rule = clip if isinstance(clip, clipping.ClipRule) else clipping.FlatClip(clip)
  grad_fn = grad.clipped_grad(loss_fn, rule, argnums=argnums, has_aux=has_aux,
                              batch_argnums=batch_argnums, key_argnums=key_argnums,
                              microbatch_size=m, example_axis=example_axis,
                              per_example_method=per_example_method)
  sampler = sampling.PoissonSampler(num_examples, q, grad_fn.microbatch_size)
  sigma = calibration.calibrate_noise(target_epsilon, delta, q, int(steps), accountant)
  dp_opt = noise.dp_optimizer(optimizer, noise_multiplier=sigma, sensitivity=grad_fn.sensitivity,
                              expected_batch_size=sampler.expected_batch_size)
  return PrivateSetup(sampler, grad_fn, dp_opt, sigma, int(steps), float(target_epsilon), delta,
                      accountant, accounting.PrivacyLedger(),
                      accounting.PrivacyBudget(float(target_epsilon), delta, accountant))
