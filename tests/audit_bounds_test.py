"""Tests of dpjax.audit.bounds on synthetic mechanisms whose true ε is known."""

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from dpjax.audit import bounds


def _reference_p_value(m, r, v, eps, delta):
  """The one-run p-value written out term by term with exact binomial coefficients."""
  q = math.exp(eps) / (1 + math.exp(eps))
  pmf = lambda k: math.comb(r, k) * q ** k * (1 - q) ** (r - k)
  tail = sum(pmf(k) for k in range(v, r + 1))
  ratio = max((sum(pmf(k) for k in range(v - i, v)) / i for i in range(1, v + 1)), default=0.0)
  return min(1.0, tail + 2 * m * delta * ratio)


@pytest.mark.parametrize("m,r,v,eps,delta", [(100, 40, 30, 0.5, 1e-3), (100, 40, 40, 2.0, 1e-2),
                                             (10, 10, 3, 0.0, 0.05), (50, 20, 0, 1.0, 1e-3),
                                             (1000, 200, 150, 1.2, 0.0)])
def test_p_value_matches_the_theorem_written_out(m, r, v, eps, delta):
  assert bounds.one_run_p_value(m, r, v, eps, delta) == pytest.approx(
      _reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_with_delta_zero_the_bound_is_the_clopper_pearson_limit_through_logit():
  for r, v in [(100, 80), (500, 300), (50, 50)]:
    lower = stats.beta.ppf(0.05, v, r - v + 1)  # one-sided 95% Clopper-Pearson lower limit
    assert bounds.one_run_epsilon_lower_bound(1000, r, v, 0.0, 0.95) == pytest.approx(
        special.logit(lower), abs=1e-5)


def test_randomized_response_bound_holds_at_its_confidence_and_is_tight():
  """ε-randomised response is the extremal ε-DP mechanism: v ~ Bin(r, q_ε). The bound must
  exceed ε in at most ~5% of runs (else it is invalid) and in some (else it is loose)."""
  eps, r, runs = 2.0, 400, 2000
  rng = np.random.default_rng(0)
  correct = rng.binomial(r, special.expit(eps), runs)
  found = np.array([bounds.one_run_epsilon_lower_bound(r, r, int(v), 0.0, 0.95)
                    for v in correct])
  exceed = np.mean(found > eps)
  assert exceed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)
  assert exceed >= 0.02
  assert np.median(found) > 0.8 * eps


def _gaussian_epsilon(mu, delta):
  """ε(δ) of the Gaussian mechanism with sensitivity mu and σ = 1 (Balle & Wang 2018)."""
  phi = stats.norm.cdf
  excess = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2) - delta
  return optimize.brentq(excess, 0.0, 100.0)


def test_gaussian_canaries_never_bound_above_their_true_epsilon():
  """Scores of inserted canaries are shifted by mu: an (ε(δ), δ)-DP release of each coin flip."""
  mu, delta, m = 3.0, 1e-5, 2000
  true_eps = _gaussian_epsilon(mu, delta)
  rng = np.random.default_rng(1)
  found = []
  for _ in range(40):
    included = rng.random(m) < 0.5
    audit = bounds.best_one_run_bound(mu * included + rng.normal(size=m), included, delta)
    found.append(audit.epsilon_lower_bound)
    assert audit.num_correct <= audit.num_guesses <= m
  assert max(found) <= true_eps, (max(found), true_eps)
  assert min(found) > 1.0  # a strong signal gives a clearly non-zero bound


def test_random_scores_give_no_bound():
  rng = np.random.default_rng(2)
  included = rng.random(1000) < 0.5
  assert bounds.best_one_run_bound(rng.normal(size=1000), included, 1e-5).epsilon_lower_bound < 0.3


def test_guesses_take_the_top_as_in_and_the_bottom_as_out():
  g = bounds.one_run_guesses(np.array([0.1, 5.0, -3.0, 2.0, 0.0]), 3)
  assert g.tolist() == [0, 1, -1, 1, 0]
  assert bounds.one_run_guesses(np.arange(4.0), 0).tolist() == [0, 0, 0, 0]


def test_independent_trials_bound_holds_and_is_tight_for_randomized_response():
  eps, n = 1.5, 20000
  q = special.expit(eps)
  rng = np.random.default_rng(3)
  found = [bounds.independent_trials_epsilon_lower_bound(rng.binomial(n, 1 - q), n,
                                                         rng.binomial(n, 1 - q), n, 0.0)
           for _ in range(300)]
  assert np.mean(np.array(found) > eps) <= 0.05
  assert np.median(found) > 0.9 * eps


def test_clopper_pearson_interval_covers_and_matches_the_beta_quantiles():
  low, high = bounds.clopper_pearson(3, 10, 0.9)
  assert low == pytest.approx(stats.beta.ppf(0.05, 3, 8))
  assert high == pytest.approx(stats.beta.ppf(0.95, 4, 7))
  assert bounds.clopper_pearson(0, 10)[0] == 0.0 and bounds.clopper_pearson(10, 10)[1] == 1.0


@pytest.mark.parametrize("call", [
    lambda: bounds.one_run_p_value(10, 5, 6, 1.0, 0.0),
    lambda: bounds.one_run_p_value(10, 5, 3, -1.0, 0.0),
    lambda: bounds.one_run_epsilon_lower_bound(10, 5, 3, 0.0, 1.5),
    lambda: bounds.best_one_run_bound(np.array([0.0, np.nan]), np.array([True, False]), 0.0),
    lambda: bounds.best_one_run_bound(np.zeros(3), np.zeros(4, bool), 0.0),
    lambda: bounds.clopper_pearson(11, 10),
])
def test_bad_inputs_are_refused(call):
  with pytest.raises(ValueError):
    call()
