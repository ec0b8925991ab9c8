"""Privacy accounting: ε of a schedule, noise calibration, a ledger and a budget guard.

All composition goes through `dp_accounting`. Three accountants are offered, and every reported ε
should name the one used:

- "pld": privacy loss distributions (dp_accounting's `PLDAccountant`), the tightest; the default.
- "rdp": Rényi DP with dp_accounting's (tighter) RDP→(ε, δ) conversion.
- "rdp_classic": Rényi DP with the classic conversion ε = min_α RDP(α) + log(1/δ)/(α−1), the one
  that TF-Privacy, Opacus and the published MNIST/CIFAR numbers used.

Privacy: the ledger counts only steps that touched private data (public-only steps are recorded as
`NoOpDpEvent`s and cost nothing). A ledger may carry a prior: the ledger of the run whose params
this run started from (itself composed with its own prior), so that its ε covers every private
step that shaped the params. `PrivacyBudget.check` refuses a step that would take ε (prior
included) above the target; calibration never returns a noise multiplier whose verified ε (prior
included) exceeds the target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import dp_accounting
import numpy as np

from dpjax.privacy import sampling as sampling_lib

ACCOUNTANTS = ("pld", "rdp", "rdp_classic")
# TF-Privacy's orders: 1.1, 1.2, ..., 10.9 and 12, ..., 63.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
PLD_DISCRETIZATION = 1e-4


class BudgetExceededError(RuntimeError):
  """Raised instead of taking a step that would spend more than the privacy budget."""


def _check_accountant(accountant: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def check_delta(delta: float, num_examples: int | None = None) -> None:
  """δ must be in (0, 1), and below 1/N when the dataset size N is known."""
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}.")
  if num_examples is not None and delta >= 1.0 / num_examples:
    raise ValueError(
        f"delta = {delta:g} is not below 1/N = {1.0 / num_examples:g} for N = {num_examples} "
        "private examples: such a δ allows releasing an example outright. Use δ < 1/N (1e-5 is "
        "the usual choice for N around 50k).")


def _check_rate(sampling_rate: float) -> None:
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}.")


def poisson_gaussian_event(noise_multiplier: float, sampling_rate: float,
                           steps: int) -> dp_accounting.DpEvent:
  """`steps` compositions of the Poisson-subsampled Gaussian mechanism; NoOp when steps == 0.
  The event is the sampler's own (`sampling.PoissonSampling.dp_event`)."""
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps!r}.")
  sampling = sampling_lib.PoissonSampling(sampling_rate)
  if steps == 0:
    sampling.dp_event(noise_multiplier, 1)  # validates σ
    return dp_accounting.NoOpDpEvent()
  return sampling.dp_event(noise_multiplier, steps)


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld",
                     pld_discretization: float = PLD_DISCRETIZATION) -> float:
  """ε at δ of any dp_accounting event, with the named accountant.

  PLD discretisation is pessimistic: a coarser `pld_discretization` gives a larger (still valid)
  upper bound on ε, faster.
  """
  _check_accountant(accountant)
  check_delta(delta)
  if accountant == "pld":
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=pld_discretization)
    return float(acc.compose(event).get_epsilon(delta))
  acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
  acc.compose(event)
  if accountant == "rdp":
    return float(acc.get_epsilon(delta))
  return classic_rdp_to_epsilon(np.asarray(acc.orders), np.asarray(acc.rdp), delta)


def classic_rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
  """The classic conversion: ε = min_α RDP(α) + log(1/δ)/(α − 1) (Mironov 2017, Prop. 3)."""
  with np.errstate(invalid="ignore"):
    eps = rdp + math.log(1.0 / delta) / (orders - 1.0)
  eps = np.where(np.isnan(eps), np.inf, eps)
  return float(max(np.min(eps), 0.0))


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "pld", pld_discretization: float = PLD_DISCRETIZATION) -> float:
  """ε of `steps` steps of DP-SGD with Poisson sampling at rate q and noise multiplier σ."""
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  event = poisson_gaussian_event(noise_multiplier, sampling_rate, steps)
  return epsilon_of_event(event, delta, accountant, pld_discretization)


def epsilon_after(prior: PrivacyLedger | None, noise_multiplier: float, sampling_rate: float,
                  steps: int, delta: float, accountant: str = "pld",
                  pld_discretization: float = PLD_DISCRETIZATION) -> float:
  """ε of `prior`'s events composed with `steps` steps at (q, σ); `epsilon` when prior is None."""
  if prior is None or not prior.total_private_steps:
    return epsilon(noise_multiplier, sampling_rate, steps, delta, accountant, pld_discretization)
  if steps and noise_multiplier == 0:
    return math.inf
  event = dp_accounting.ComposedDpEvent(
      [prior.dp_event(), poisson_gaussian_event(noise_multiplier, sampling_rate, steps)])
  return epsilon_of_event(event, delta, accountant, pld_discretization)


@dataclasses.dataclass
class LedgerEntry:
  """`steps` consecutive private steps at one sampling rate and noise multiplier, sampled as
  `sampling` names (a key of `sampling.SAMPLINGS`, whose description gives the steps' event)."""
  sampling_rate: float
  noise_multiplier: float
  steps: int
  sampling: str = sampling_lib.PoissonSampling.name

  def dp_event(self) -> dp_accounting.DpEvent:
    if self.sampling not in sampling_lib.SAMPLINGS:
      raise ValueError(f"A ledger entry names the sampling {self.sampling!r}, which this version "
                       f"of dpjax does not know ({sorted(sampling_lib.SAMPLINGS)}).")
    description = sampling_lib.SAMPLINGS[self.sampling](self.sampling_rate)
    return description.dp_event(self.noise_multiplier, self.steps)


@dataclasses.dataclass
class PrivacyLedger:
  """The record of what ran: private steps (q, σ, count), and public-only steps that cost nothing.

  Consecutive steps with the same (q, σ) are merged. Serialises to and from JSON.

  prior: the ledger of the run whose params this run started from (`finetune.init_from`), with
  its own prior, and so on: the private steps that shaped the starting params. None when the run
  started afresh, from a source declared public, or from one without private steps. `epsilon` and
  `dp_event` compose the prior; `private_steps` and `public_steps` count this run's steps only.
  """
  entries: list[LedgerEntry] = dataclasses.field(default_factory=list)
  public_steps: int = 0
  prior: PrivacyLedger | None = None

  def record_private(self, sampling_rate: float, noise_multiplier: float, steps: int = 1,
                     sampling: str = sampling_lib.PoissonSampling.name) -> None:
    """Records `steps` private steps of the Gaussian mechanism (σ) on batches sampled as
    `sampling` names at rate q (the trainer passes its plan's `sampling`, the sampler's own)."""
    entry = LedgerEntry(float(sampling_rate), float(noise_multiplier), int(steps), sampling)
    entry.dp_event()  # validates the arguments
    last = self.entries[-1] if self.entries else None
    if last and (last.sampling, last.sampling_rate, last.noise_multiplier) == (
        entry.sampling, entry.sampling_rate, entry.noise_multiplier):
      last.steps += entry.steps
    else:
      self.entries.append(entry)

  def record_public(self, steps: int = 1) -> None:
    self.public_steps += int(steps)

  @property
  def private_steps(self) -> int:
    """This run's private steps (the prior's not counted)."""
    return sum(e.steps for e in self.entries)

  @property
  def total_private_steps(self) -> int:
    """Private steps of this run and of every run in its prior chain."""
    return self.private_steps + (self.prior.total_private_steps if self.prior else 0)

  def alone(self) -> PrivacyLedger:
    """This run's steps without the prior."""
    return PrivacyLedger([dataclasses.replace(e) for e in self.entries], self.public_steps)

  def dp_event(self) -> dp_accounting.DpEvent:
    """The composition of everything recorded (public steps as NoOp events), prior first."""
    events = [self.prior.dp_event()] if self.prior is not None else []
    events += [e.dp_event() for e in self.entries]
    if self.public_steps:
      events.append(dp_accounting.SelfComposedDpEvent(dp_accounting.NoOpDpEvent(),
                                                      self.public_steps))
    return dp_accounting.ComposedDpEvent(events) if events else dp_accounting.NoOpDpEvent()

  def epsilon(self, delta: float, accountant: str = "pld") -> float:
    """ε at δ of everything recorded, prior included."""
    if not self.total_private_steps:
      return 0.0
    if (self.private_steps == self.total_private_steps and len(self.entries) == 1
        and self.entries[0].sampling == sampling_lib.PoissonSampling.name):
      e = self.entries[0]  # the cached closed form for the common case
      return epsilon(e.noise_multiplier, e.sampling_rate, e.steps, delta, accountant)
    return _ledger_epsilon(self.to_json(), delta, accountant)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> PrivacyLedger:
    return cls._from_dict(json.loads(text))

  @classmethod
  def _from_dict(cls, data: dict) -> PrivacyLedger:
    prior = data.get("prior")  # absent from ledgers written before priors existed
    return cls([LedgerEntry(**e) for e in data["entries"]], int(data["public_steps"]),
               None if prior is None else cls._from_dict(prior))


@functools.lru_cache(maxsize=1024)
def _ledger_epsilon(ledger_json: str, delta: float, accountant: str) -> float:
  return epsilon_of_event(PrivacyLedger.from_json(ledger_json).dp_event(), delta, accountant)


@dataclasses.dataclass
class PrivacyBudget:
  """A target (ε, δ) and the accountant that measures it.

  `check` is called *before* a private step; it raises `BudgetExceededError` if recording that
  step would take the ledger's ε (its prior included) above `target_epsilon`. The number of
  remaining steps at a given (q, σ) is computed once by bisection and then counted down, so the
  guard costs no accounting per step.
  """
  target_epsilon: float  # the total: a ledger's prior spends from it too
  delta: float
  accountant: str = "pld"
  _cache: dict[Any, int] = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    _check_accountant(self.accountant)
    check_delta(self.delta)
    if not self.target_epsilon > 0:
      raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon!r}.")

  def spent(self, ledger: PrivacyLedger) -> float:
    return ledger.epsilon(self.delta, self.accountant)

  def steps_allowed(self, ledger: PrivacyLedger, sampling_rate: float, noise_multiplier: float,
                    hint: int | None = None) -> int:
    """How many more private steps at (q, σ) the budget allows after what `ledger` holds.

    hint: a guess (e.g. the planned number of private steps); a good one makes this two ε
    evaluations instead of a search. It never changes the answer.
    """
    key = (ledger.to_json(), sampling_rate, noise_multiplier)
    if key not in self._cache:
      self._cache[key] = self._search_steps(ledger, sampling_rate, noise_multiplier, hint)
    return self._cache[key]

  def check(self, ledger: PrivacyLedger, sampling_rate: float, noise_multiplier: float,
            hint: int | None = None) -> None:
    """Raises `BudgetExceededError` if one more private step at (q, σ) would exceed the target.

    hint: the planned number of private steps at (q, σ). When the budget allows all of them, the
    guard asks no further (a huge target would otherwise search up to 10⁹ steps, each an ε
    evaluation); a run that goes beyond its plan gets the full search then."""
    base = _without_last_run(ledger, sampling_rate, noise_multiplier)
    done = ledger.private_steps - base.private_steps
    if hint and 0 < done + 1 <= hint and self._plan_fits(base, sampling_rate, noise_multiplier,
                                                         hint):
      return
    if done + 1 > self.steps_allowed(base, sampling_rate, noise_multiplier, hint):
      raise BudgetExceededError(
          f"The next private step would take ε above the budget {self.target_epsilon} at "
          f"δ = {self.delta:g} ({self.accountant}); {ledger.private_steps} private steps were "
          f"taken, spending ε = {self.spent(ledger):.4f}. Stop here, or start a new run with a "
          "larger budget or more noise.")

  def _plan_fits(self, ledger: PrivacyLedger, q: float, sigma: float, steps: int) -> bool:
    """Whether `steps` more steps at (q, σ) after `ledger` stay within the target (cached)."""
    key = (ledger.to_json(), q, sigma, "plan", steps)
    if key not in self._cache:
      trial = PrivacyLedger([dataclasses.replace(e) for e in ledger.entries], 0, ledger.prior)
      trial.record_private(q, sigma, steps)
      self._cache[key] = trial.epsilon(self.delta, self.accountant) <= self.target_epsilon
    return self._cache[key]

  def _search_steps(self, ledger, q, sigma, hint) -> int:
    def fits(extra):
      trial = PrivacyLedger([dataclasses.replace(e) for e in ledger.entries], 0, ledger.prior)
      trial.record_private(q, sigma, extra)
      return trial.epsilon(self.delta, self.accountant) <= self.target_epsilon
    if hint and hint > 0 and fits(hint):
      lo, hi = hint, hint + 1
    elif self.spent(ledger) > self.target_epsilon or not fits(1):
      return 0
    else:
      lo, hi = 1, 2
    while fits(hi):
      lo, hi = hi, 2 * hi
      if hi > 10**9:
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi)
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _without_last_run(ledger: PrivacyLedger, q: float, sigma: float) -> PrivacyLedger:
  """The ledger without its trailing run of (q, σ) steps (so the cache key stays fixed)."""
  entries = [dataclasses.replace(e) for e in ledger.entries]
  if entries and (entries[-1].sampling_rate, entries[-1].noise_multiplier) == (q, sigma):
    entries.pop()
  return PrivacyLedger(entries, 0, ledger.prior)
