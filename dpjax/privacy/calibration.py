"""Noise calibration: the noise multiplier σ that spends a target ε at δ, and σ_eff when a step
also releases a noisy count.

`calibrate_noise` returns a σ whose ε, verified with the accountant that will report it (prior
included), is at most the target and within CALIBRATION_TOLERANCE of it; it never returns σ = 0
and always ends after a bounded number of ε evaluations (`MIN_NOISE_MULTIPLIER` says why there is
a floor). ε itself, the ledger and the budget guard are in `accounting`.
"""

from __future__ import annotations

import functools
import math


from dpjax.privacy import accounting

CALIBRATION_TOLERANCE = 0.01  # calibrated ε lies in [(1 − tol)·target, target]
# Calibration searches σ in [MIN, MAX] (`calibrate_noise` says why there is a floor).
MIN_NOISE_MULTIPLIER = 0.25
MAX_NOISE_MULTIPLIER = 2.0 ** 20
BISECTION_STEPS = 40  # halvings of log σ: from a factor 2 to a factor 1 + 2e-11


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
               prior: accounting.PrivacyLedger | None = None) -> tuple[float, float]:
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
                    accountant: str = "pld", prior: accounting.PrivacyLedger | None = None) -> float:
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
  at = lambda resolution: functools.cache(lambda s: accounting.epsilon_after(
      prior, s, sampling_rate, steps, delta, accountant, resolution))
  exact, coarse = at(accounting.PLD_DISCRETIZATION), at(10 * accounting.PLD_DISCRETIZATION)
  # The coarse grid is pessimistic: it narrows the bracket only where it sees room below the target.
  if accountant == "pld" and (spent == 0 or accounting.epsilon_of_event(
      prior.dp_event(), delta, accountant, 10 * accounting.PLD_DISCRETIZATION) < target_epsilon):
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
