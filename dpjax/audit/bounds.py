"""Empirical lower bounds on ε from membership guesses, each valid at a stated confidence.

Two designs, two theorems:

* **One training run** (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training
  Run"): m canaries, each inserted into the training set independently with probability 1/2; the
  auditor guesses "in" or "out" for r of them (abstaining on the rest) and gets v right. If the
  training algorithm is (ε, δ)-DP for add/remove of one example, then
      P[V ≥ v] ≤ P[Bin(r, q) ≥ v] + 2·m·δ·max_{1≤i≤v} (1/i)·P[v − i ≤ Bin(r, q) < v],
  with q = e^ε / (1 + e^ε), the accuracy of ε-randomised response. `one_run_p_value` is the right
  side; the lower bound is the largest ε that this p-value rejects at level β = 1 − confidence.
  With δ = 0 it is the one-sided Clopper–Pearson lower limit on the guessing accuracy, mapped
  through logit.
* **Independent trials** (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021): each trial trains
  afresh with or without the canary. For (ε, δ)-DP every test has FPR and FNR with
  FPR + e^ε·FNR ≥ 1 − δ and FNR + e^ε·FPR ≥ 1 − δ. Clopper–Pearson upper limits on both rates give
  the bound. It is **not** valid for many canaries in one run (their guesses are not independent
  trials); use the one-run bound there.

Choosing the number of guesses (or a threshold) after looking at the scores costs confidence:
`best_one_run_bound` divides β among the choices it tries (Bonferroni).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats

_EPSILON_MAX = 60.0  # no audit of any size can show more: e^60 ≫ any count of guesses
# Numbers of guesses `best_one_run_bound` tries, as fractions of the canaries (fixed in advance).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
                    delta: float) -> float:
  """P[≥ num_correct right of num_guesses] under the null "the run was (ε, δ)-DP" (see module).

  Args:
    num_canaries: m, canaries each inserted with probability 1/2 (guessed or not).
    num_guesses: r ≤ m, canaries guessed (the rest abstained on).
    num_correct: v ≤ r, right guesses.
    epsilon, delta: the null hypothesis' DP parameters; ε ≥ 0, δ in [0, 1].
  """
  m, r, v = int(num_canaries), int(num_guesses), int(num_correct)
  if not 0 <= v <= r <= m:
    raise ValueError(f"Need 0 <= num_correct <= num_guesses <= num_canaries, got v={v}, r={r}, "
                     f"m={m}.")
  if epsilon < 0 or not 0 <= delta <= 1:
    raise ValueError(f"Need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}.")
  q = special.expit(epsilon)
  tail = stats.binom.sf(v - 1, r, q)  # P[Bin(r, q) >= v]
  if delta == 0 or v == 0:
    return float(min(1.0, tail))
  below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ...
  ratio = np.max(np.cumsum(below) / np.arange(1, v + 1))  # max_i P[v-i <= Bin < v] / i
  return float(min(1.0, tail + 2.0 * m * delta * ratio))


def one_run_epsilon_lower_bound(num_canaries: int, num_guesses: int, num_correct: int,
                                delta: float, confidence: float = 0.95) -> float:
  """The largest ε that `one_run_p_value` rejects at level 1 − confidence (0 if none).

  With probability ≥ `confidence` over the canaries' coin flips and the training randomness, a
  run that is (ε, δ)-DP gives a bound ≤ ε.
  """
  beta = _check_confidence(confidence)
  p = lambda eps: one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta)
  if p(0.0) >= beta:
    return 0.0
  if p(_EPSILON_MAX) < beta:
    return _EPSILON_MAX
  # p increases with ε: the bound is where it crosses β.
  return float(optimize.brentq(lambda eps: p(eps) - beta, 0.0, _EPSILON_MAX, xtol=1e-6))


@dataclasses.dataclass(frozen=True)
class OneRunAudit:
  """The outcome of guessing the canaries' membership from scores (see `best_one_run_bound`)."""
  epsilon_lower_bound: float
  confidence: float
  num_canaries: int
  num_guesses: int
  num_correct: int
  choices_tried: int


def one_run_guesses(scores: np.ndarray, num_guesses: int) -> np.ndarray:
  """Guesses in {+1 (in), −1 (out), 0 (abstain)} per canary from scores [m] (higher: more likely
  in): the top ⌈r/2⌉ "in", the bottom ⌊r/2⌋ "out" (ties broken by canary index)."""
  scores = np.asarray(scores, np.float64)
  if not 0 <= num_guesses <= len(scores):
    raise ValueError(f"num_guesses must be in [0, {len(scores)}], got {num_guesses}.")
  order = np.argsort(-scores, kind="stable")
  guesses = np.zeros(len(scores), np.int8)
  k_in = (num_guesses + 1) // 2
  guesses[order[:k_in]] = 1
  guesses[order[len(scores) - (num_guesses - k_in):]] = -1
  return guesses


def best_one_run_bound(scores: np.ndarray, included: np.ndarray, delta: float,
                       confidence: float = 0.95,
                       guess_fractions: Sequence[float] = GUESS_FRACTIONS) -> OneRunAudit:
  """The best one-run bound over numbers of guesses r = fraction·m, each tested at level
  β / len(guess_fractions), so the reported bound holds at `confidence` (Bonferroni).

  Args:
    scores: float [m], one per canary; higher means "more likely inserted".
    included: bool [m], which canaries were inserted (the coin flips).
    delta: the run's δ.
    confidence: the bound is ≤ the true ε with at least this probability.
    guess_fractions: fractions of m to guess; fixed before looking at the scores.
  """
  scores, included = np.asarray(scores), np.asarray(included, bool)
  if scores.shape != included.shape or scores.ndim != 1 or not len(scores):
    raise ValueError(f"scores {scores.shape} and included {included.shape} must be the same "
                     "non-empty [m] vectors.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite (a NaN loss would make every guess arbitrary).")
  m = len(scores)
  beta = _check_confidence(confidence) / len(guess_fractions)
  best = None
  for fraction in guess_fractions:
    r = max(1, min(m, int(round(fraction * m))))
    guesses = one_run_guesses(scores, r)
    v = int(np.sum((guesses == 1) & included) + np.sum((guesses == -1) & ~included))
    bound = one_run_epsilon_lower_bound(m, r, v, delta, 1.0 - beta)
    if best is None or bound > best.epsilon_lower_bound:
      best = OneRunAudit(bound, confidence, m, r, v, len(guess_fractions))
  return best


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95
                    ) -> tuple[float, float]:
  """Two-sided Clopper–Pearson interval for a binomial proportion (each side at (1−c)/2)."""
  if not 0 <= successes <= trials or trials <= 0:
    raise ValueError(f"Need 0 <= successes <= trials and trials > 0, got {successes}/{trials}.")
  tail = _check_confidence(confidence) / 2
  low = 0.0 if successes == 0 else stats.beta.ppf(tail, successes, trials - successes + 1)
  high = 1.0 if successes == trials else stats.beta.ppf(1 - tail, successes + 1,
                                                        trials - successes)
  return float(low), float(high)


def independent_trials_epsilon_lower_bound(false_positives: int, negatives: int,
                                           false_negatives: int, positives: int, delta: float,
                                           confidence: float = 0.95) -> float:
  """ε lower bound from one fixed test's errors over independent training runs (see module).

  `negatives` runs without the canary (false_positives of them called "in"), `positives` runs
  with it (false_negatives called "out"). Each rate gets a one-sided Clopper–Pearson upper limit
  at level (1 − confidence)/2, so the bound holds at `confidence`. The test (threshold) must be
  fixed independently of these runs.
  """
  # The upper end of a two-sided interval at `confidence` fails with probability (1 − c)/2; a
  # union bound over the two rates gives 1 − c in all.
  fpr = clopper_pearson(false_positives, negatives, confidence)[1]
  fnr = clopper_pearson(false_negatives, positives, confidence)[1]
  candidates = [0.0]
  for a, b in ((fpr, fnr), (fnr, fpr)):
    if a > 0 and 1 - delta - b > a:
      candidates.append(math.log((1 - delta - b) / a))
  return max(candidates)


def _check_confidence(confidence: float) -> float:
  """β = 1 − confidence, after checking confidence is in (0, 1)."""
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  return 1.0 - confidence
