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
CALIBRATION_TOLERANCE = 0.01  # calibrated ε lies in [(1 − tol)·target, target]
# Calibration searches σ in [MIN, MAX] (`calibrate_noise` says why there is a floor).
MIN_NOISE_MULTIPLIER = 0.25
MAX_NOISE_MULTIPLIER = 2.0 ** 20
BISECTION_STEPS = 40  # halvings of log σ: from a factor 2 to a factor 1 + 2e-11


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


def effective_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
  """σ_eff = (σ⁻² + σ_c⁻²)^(-1/2): the noise multiplier of a step that releases the clipped
  gradient sum with noise multiplier σ and the count of clipped examples with noise σ_c.

  count_noise: σ_c; 0 means the count is not released, and then σ_eff = σ exactly.

  Why one Gaussian mechanism of multiplier σ_eff: the step releases, on ONE Poisson sample B,
    (Σ_{i∈B} clip(g_i) + N(0, σ²S²·I),  Σ_{i∈B} b_i + N(0, σ_c²)),
  with ‖clip(g_i)‖ ≤ S and b_i ∈ {0, 1} the example's clip flag. Dividing the first part by σS
  and the second by σ_c (an invertible public map, so the privacy loss is unchanged) gives
  Σ_{i∈B} v_i + N(0, I) with v_i = (clip(g_i)/(σS), b_i/σ_c), a sum over the sample with
  isotropic unit noise. Adding or removing one example x adds or removes v_x, whose norm is at
  most (1/σ² + 1/σ_c²)^(1/2) = 1/σ_eff. That is exactly the Gaussian sum mechanism with
  sensitivity 1 and noise σ_eff (its privacy loss depends only on the norm of the change), so
  the subsampled step is PoissonSampled(q, Gaussian(σ_eff)) in dp_accounting's terms, with no
  composition slack. The two noises must be independent (separate keys: `noise.count_noise_key`).
  """
  for name, value in (("noise_multiplier", noise_multiplier), ("count_noise", count_noise)):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
  if count_noise == 0:
    return float(noise_multiplier)
  if noise_multiplier == 0:
    return 0.0
  return (noise_multiplier ** -2 + count_noise ** -2) ** -0.5


def gradient_noise_multiplier(effective: float, count_noise: float) -> float:
  """The σ on the clipped sum that makes σ_eff = `effective` when the count is released with
  noise σ_c = `count_noise`: σ = (σ_eff⁻² − σ_c⁻²)^(-1/2) (σ_eff itself when σ_c = 0).

  Raises ValueError if σ_c ≤ σ_eff: the count alone would spend the whole budget.
  """
  if not (math.isfinite(effective) and effective > 0):
    raise ValueError(f"The effective noise multiplier must be finite and > 0, got {effective!r}.")
  if count_noise == 0:
    return float(effective)
  if not (math.isfinite(count_noise) and count_noise > effective):
    raise ValueError(
        f"dp.clip_fraction_noise = {count_noise:g} is not above the noise multiplier "
        f"{effective:.4g} that the privacy target needs per step: releasing the clip count alone "
        f"would spend the whole budget. Raise dp.clip_fraction_noise (e.g. to "
        f"{3 * effective:.3g}: the gradient then needs {1 / math.sqrt(1 - 1 / 9) - 1:.0%} more "
        f"noise) or set it to 0 (the count is not released).")
  return (effective ** -2 - count_noise ** -2) ** -0.5


def plan_noise(noise_multiplier: float | None, count_noise: float, target_epsilon: float | None,
               delta: float, sampling_rate: float, steps: int, accountant: str = "pld",
               prior: PrivacyLedger | None = None) -> tuple[float, float]:
  """(σ, σ_eff) of `steps` private steps: σ on the clipped sum, σ_eff the multiplier to account
  (`effective_noise_multiplier`; = σ when count_noise is 0).

  A given noise_multiplier is σ. Otherwise σ_eff is calibrated to target_epsilon
  (`calibrate_noise`, composed with `prior`'s events when given) and σ follows from it (`gradient_noise_multiplier`: ValueError when
  count_noise ≤ σ_eff).
  """
  if noise_multiplier is not None:
    return float(noise_multiplier), effective_noise_multiplier(noise_multiplier, count_noise)
  effective = calibrate_noise(target_epsilon, delta, sampling_rate, steps, accountant, prior)
  return gradient_noise_multiplier(effective, count_noise), effective


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                    accountant: str = "pld", prior: PrivacyLedger | None = None) -> float:
  """The noise multiplier σ whose ε for this schedule lies in [0.99·target, target], or
  MIN_NOISE_MULTIPLIER when even that much noise stays at or below the target.

  prior: private steps taken before this schedule (a ledger, e.g. the run this one starts from);
  then the ε that lands in [0.99·target, target] is the composition of prior and schedule.

  The search considers σ in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER] only, so it ends after
  a bounded number of accountant calls (`_bracket`: at most 2 halvings or 20 doublings from σ = 1,
  `_bisect`: at most BISECTION_STEPS halvings of log σ per resolution). The floor is a choice:
  a target so large that σ < 0.25 would meet it (ε of tens or more) gets σ = 0.25, whose ε is
  verified to be <= the target (a tighter guarantee than asked for; the run's ledger reports the
  true ε). Returning the floor rather than raising keeps runs that calibrate for the few steps
  left (the automatic switch) alive, and σ is never 0: noise is never dropped by accident. Below
  the floor the PLD accountant's cost grows as 1/σ² (minutes per call at σ = 0.03), which is what
  made such targets hang.

  Raises ValueError when the target is not finite and > 0, when the prior alone already spends
  it, when even σ = MAX_NOISE_MULTIPLIER exceeds it, or when the accountant's resolution cannot
  place ε within 1% of it (a target far below the PLD grid).

  Bisection on log σ (ε decreases in σ). For PLD a coarse (pessimistic, so never optimistic) grid
  narrows the bracket first; the answer is always verified with the accountant at its default
  resolution, and a σ whose verified ε exceeds the target is never returned.
  """
  if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
    raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}. For a run "
                     "without a privacy target set dp.noise_multiplier instead.")
  if steps <= 0:
    raise ValueError(f"steps must be > 0 to calibrate noise, got {steps!r}.")
  spent = prior.epsilon(delta, accountant) if prior is not None else 0.0
  if spent >= target_epsilon:
    raise ValueError(f"The prior private steps alone spend ε = {spent:.4f} >= the target "
                     f"{target_epsilon} at δ = {delta:g} ({accountant}): no noise multiplier "
                     "leaves room for more steps.")
  at = lambda resolution: functools.cache(lambda s: epsilon_after(
      prior, s, sampling_rate, steps, delta, accountant, resolution))
  exact, coarse = at(PLD_DISCRETIZATION), at(10 * PLD_DISCRETIZATION)
  # The coarse grid is pessimistic: it narrows the bracket only where it sees room below the target.
  if accountant == "pld" and (spent == 0 or epsilon_of_event(
      prior.dp_event(), delta, accountant, 10 * PLD_DISCRETIZATION) < target_epsilon):
    lo, hi = _bracket(coarse, target_epsilon)
    if lo is not None:
      _, hi = _bisect(coarse, target_epsilon, lo, hi, CALIBRATION_TOLERANCE / 2)
  else:
    lo, hi = _bracket(exact, target_epsilon)
  if lo is None:  # even the floor meets the target (checked at the coarse grid for PLD)
    if exact(MIN_NOISE_MULTIPLIER) <= target_epsilon:
      return MIN_NOISE_MULTIPLIER
    lo, hi = _bracket(exact, target_epsilon)  # exact(floor) > target: a bracket exists
  lo, hi = _bisect(exact, target_epsilon, lo, hi, CALIBRATION_TOLERANCE)
  verified = exact(hi)
  if not (1 - CALIBRATION_TOLERANCE) * target_epsilon <= verified <= target_epsilon:
    raise ValueError(f"Cannot calibrate σ to ε = {target_epsilon} ({accountant}, δ = {delta:g}): "
                     f"ε jumps from {exact(lo):.6g} to {verified:.6g} at σ ≈ {hi:.6g}, so no σ "
                     f"lands within {CALIBRATION_TOLERANCE:.0%} below the target (it is below "
                     "the accountant's resolution). Raise dp.target_epsilon, or set "
                     "dp.noise_multiplier.")
  return hi


def _bracket(eps_of, target: float) -> tuple[float | None, float]:
  """(lo, hi) with eps_of(lo) > target >= eps_of(hi), both in [MIN_NOISE_MULTIPLIER,
  MAX_NOISE_MULTIPLIER] and hi = 2·lo; (None, MIN_NOISE_MULTIPLIER) when eps_of(floor) <= target.

  Calls eps_of at most 22 times (σ = 1, then doublings up to 2^20 or halvings down to 0.25).
  """
  hi = 1.0
  while eps_of(hi) > target:
    if hi >= MAX_NOISE_MULTIPLIER:
      raise ValueError(f"No noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches ε = {target}: "
                       f"σ = {hi:g} still gives ε = {eps_of(hi):.6g}. Raise dp.target_epsilon, "
                       "or take fewer private steps or a lower sampling rate.")
    hi *= 2
  while hi > MIN_NOISE_MULTIPLIER:
    lo = hi / 2
    if eps_of(lo) > target:
      return lo, hi
    hi = lo
  return None, MIN_NOISE_MULTIPLIER


def _bisect(eps_of, target: float, lo: float, hi: float, tol: float) -> tuple[float, float]:
  """Shrinks (lo, hi) until eps_of(hi) is in [(1 − tol)·target, target]; keeps eps_of(lo) > target.
  Stops after BISECTION_STEPS halvings of log(hi/lo) (the caller checks where eps_of(hi) landed)."""
  for _ in range(BISECTION_STEPS):
    if eps_of(hi) >= (1 - tol) * target:
      break
    mid = math.sqrt(lo * hi)
    lo, hi = (mid, hi) if eps_of(mid) > target else (lo, mid)
  return lo, hi


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
