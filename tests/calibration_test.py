"""Noise calibration (dpjax.privacy.calibration): σ lands within 1% below the target, with or
without a prior; the search ends after a bounded number of ε evaluations; clear errors."""

import math

import pytest

from dpjax.privacy import accounting, calibration
from tests.accounting_test import DELTA, _chain


def test_a_non_positive_target_is_refused():
  with pytest.raises(ValueError, match="target_epsilon"):
    calibration.calibrate_noise(0.0, DELTA, 0.1, 10)


@pytest.mark.parametrize("accountant", accounting.ACCOUNTANTS)
@pytest.mark.parametrize("target,q,steps", [(3.0, 0.01, 500), (1.0, 0.05, 100), (8.0, 0.004, 2000)])
def test_calibration_lands_within_one_percent_below_the_target(accountant, target, q, steps):
  sigma = calibration.calibrate_noise(target, DELTA, q, steps, accountant)
  eps = accounting.epsilon(sigma, q, steps, DELTA, accountant)
  assert 0.99 * target <= eps <= target


def _count_accountant_calls(monkeypatch, limit):
  """Counts calibrate_noise's ε evaluations (each one call of epsilon_after, σ recorded) and
  fails the test at call limit + 1, so a calibration that would not end fails instead."""
  calls = []
  real = accounting.epsilon_after
  def counted(*args, **kwargs):
    calls.append(args[1])
    if len(calls) > limit:
      raise AssertionError(f"calibration evaluated ε more than {limit} times: σ = {calls}")
    return real(*args, **kwargs)
  monkeypatch.setattr(accounting, "epsilon_after", counted)
  return calls


# Before the floor, a target met by tiny σ halved σ towards 1e-4; PLD's cost grows as 1/σ²
# (38 s at σ = 0.03 for q = 0.01, 100 steps), so this hung. Bounded call counts stand in for time.
@pytest.mark.parametrize("accountant,target,q,steps", [
    ("pld", 1e6, 1.0, 1), ("rdp", 1e6, 0.01, 100), ("rdp_classic", 1e6, 0.01, 100),
    ("rdp", 60.0, 1.0, 1)])  # 60: reachable, but only at σ ≈ 0.14 < the floor
def test_a_target_met_without_noise_gets_the_floor_at_once(monkeypatch, accountant, target, q,
                                                           steps):
  # σ = 1, 0.5, 0.25 (the coarse grid for PLD), then the floor verified at full resolution.
  calls = _count_accountant_calls(monkeypatch, limit=4)
  sigma = calibration.calibrate_noise(target, DELTA, q, steps, accountant)
  assert sigma == calibration.MIN_NOISE_MULTIPLIER > 0
  assert min(calls) == calibration.MIN_NOISE_MULTIPLIER
  monkeypatch.undo()  # stop counting
  assert accounting.epsilon(sigma, q, steps, DELTA, accountant) <= target
  assert calibration.plan_noise(None, 0.0, target, DELTA, q, steps, accountant) == (sigma, sigma)


def test_unreachable_targets_fail_fast_with_a_clear_error(monkeypatch):
  limit = 2 * (22 + calibration.BISECTION_STEPS)  # brackets (σ = 1, 2, ..., 2^20) and bisections
  calls = _count_accountant_calls(monkeypatch, limit)
  # The classic RDP conversion over orders up to 63 never goes below log(1/δ)/62 ≈ 0.19.
  with pytest.raises(ValueError, match="No noise multiplier up to 1.04858e\\+06 reaches"):
    calibration.calibrate_noise(0.1, DELTA, 1.0, 1, "rdp_classic")
  assert len(calls) <= 22
  del calls[:]
  # PLD's ε moves in steps of its grid near 1e-3 here: no σ lands within 1% of the target.
  with pytest.raises(ValueError, match="below the accountant's resolution"):
    calibration.calibrate_noise(1e-3, DELTA, 0.01, 100, "pld")
  for target in (math.inf, math.nan, -1.0):
    with pytest.raises(ValueError, match="finite and > 0.*dp.noise_multiplier"):
      calibration.calibrate_noise(target, DELTA, 0.1, 10)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_with_a_prior_lands_the_composition_on_the_target(accountant):
  prior = _chain()[1]
  spent = prior.epsilon(DELTA, accountant)
  target = spent + 1.0
  sigma = calibration.calibrate_noise(target, DELTA, 0.02, 50, accountant, prior=prior)
  trial = accounting.PrivacyLedger(prior=prior)
  trial.record_private(0.02, sigma, 50)
  assert 0.99 * target <= trial.epsilon(DELTA, accountant) <= target
  # More noise than without the prior, which would land this run alone on the whole target.
  assert sigma > calibration.calibrate_noise(target, DELTA, 0.02, 50, accountant)
  with pytest.raises(ValueError, match="prior private steps alone spend"):
    calibration.calibrate_noise(spent, DELTA, 0.02, 50, accountant, prior=prior)
