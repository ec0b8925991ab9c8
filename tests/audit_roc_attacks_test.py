"""Tests of dpjax.audit.roc (ROC, AUC, TPR at low FPR, intervals) and dpjax.audit.attacks."""

import numpy as np
import optax
import pytest
from scipy import special, stats

from dpjax.audit import attacks, roc


def test_auc_equals_the_mann_whitney_statistic_with_ties():
  rng = np.random.default_rng(0)
  pos = np.round(rng.normal(0.5, 1, 300), 1)  # rounding makes many ties
  neg = np.round(rng.normal(0, 1, 400), 1)
  u = stats.mannwhitneyu(pos, neg).statistic
  assert roc.auc(*roc.roc_curve(pos, neg)) == pytest.approx(u / (300 * 400))


def test_auc_extremes_and_chance():
  assert roc.auc(*roc.roc_curve(np.array([2.0, 3.0]), np.array([0.0, 1.0]))) == 1.0
  assert roc.auc(*roc.roc_curve(np.array([0.0, 1.0]), np.array([2.0, 3.0]))) == 0.0
  assert roc.auc(*roc.roc_curve(np.ones(5), np.ones(7))) == 0.5


def test_tpr_at_fpr_uses_only_thresholds_within_the_fpr():
  neg = np.arange(100.0)           # threshold 99 has FPR 1%, threshold 98 has FPR 2%
  pos = np.array([99.5, 98.5, 97.5, 50.0])
  fpr, tpr = roc.roc_curve(pos, neg)
  assert roc.tpr_at_fpr(fpr, tpr, 0.0) == 0.25     # only the 99.5 above every negative
  assert roc.tpr_at_fpr(fpr, tpr, 0.01) == 0.5
  assert roc.tpr_at_fpr(fpr, tpr, 0.02) == 0.75


def test_metrics_intervals_cover_the_true_gaussian_values():
  rng = np.random.default_rng(1)
  mu = 1.0
  m = roc.attack_metrics(rng.normal(mu, 1, 4000), rng.normal(0, 1, 4000), num_bootstrap=200)
  true_auc = stats.norm.cdf(mu / np.sqrt(2))
  true_tpr = 1 - stats.norm.cdf(stats.norm.ppf(0.99) - mu)
  assert m["auc_ci"][0] <= true_auc <= m["auc_ci"][1]
  assert m["auc_ci"][1] - m["auc_ci"][0] < 0.05
  one = m["tpr_at_fpr"]["0.01"]
  assert one["ci"][0] <= true_tpr <= one["ci"][1] and one["resolvable"]
  assert set(m["tpr_at_fpr"]) == {"0.001", "0.01"}


def test_metrics_refuse_non_finite_scores():
  with pytest.raises(ValueError, match="non-finite"):
    roc.attack_metrics(np.array([0.0, np.inf]), np.zeros(3))


def test_loss_and_logit_confidence():
  rng = np.random.default_rng(2)
  logits, labels = rng.normal(size=(50, 10)) * 3, rng.integers(0, 10, 50)
  np.testing.assert_allclose(attacks.per_example_loss(logits, labels),
                             optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-5)
  p = special.softmax(logits, axis=-1)[np.arange(50), labels]
  np.testing.assert_allclose(attacks.logit_confidence(logits, labels), np.log(p / (1 - p)),
                             rtol=1e-9)
  extreme = np.array([[200.0, 0.0, 0.0], [-200.0, 0.0, 0.0]])
  np.testing.assert_allclose(attacks.logit_confidence(extreme, np.array([0, 0])),
                             [200 - np.log(2), -200 - np.log(2)])
  assert np.all(attacks.loss_threshold_scores(np.array([0.1, 2.0])) == [-0.1, -2.0])


def _shadow_world(num_candidates=400, num_shadows=16, gap=1.5, seed=3):
  """Candidates with their own difficulty; membership adds `gap` to the logit confidence."""
  rng = np.random.default_rng(seed)
  difficulty = rng.normal(0, 3, num_candidates)  # spreads candidates far more than membership
  shadow_in = rng.random((num_shadows, num_candidates)) < 0.5
  shadow = difficulty + gap * shadow_in + rng.normal(0, 0.5, shadow_in.shape)
  target_in = rng.random(num_candidates) < 0.5
  target = difficulty + gap * target_in + rng.normal(0, 0.5, num_candidates)
  return target, shadow, shadow_in, target_in


def test_lira_calibrates_per_example_difficulty_that_defeats_a_global_threshold():
  target, shadow, shadow_in, target_in = _shadow_world()
  auc = lambda s: roc.auc(*roc.roc_curve(s[target_in], s[~target_in]))
  raw = auc(target)
  online = auc(attacks.lira_scores(target, shadow, shadow_in, online=True))
  offline = auc(attacks.lira_scores(target, shadow, shadow_in, online=False))
  assert raw < 0.7 and online > 0.9 and offline > 0.9


def test_offline_lira_is_the_z_score_against_out_shadows():
  shadow = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 0.0]])
  shadow_in = np.array([[False, True], [False, False], [True, False]])
  z = attacks.lira_scores(np.array([4.0, 10.0]), shadow, shadow_in, online=False,
                          fixed_variance=False)
  # candidate 0: OUT values 1, 3 (mean 2, sd sqrt(2)); candidate 1: OUT 20, 0 (mean 10)
  np.testing.assert_allclose(z, [2 / np.sqrt(2), 0.0])


def test_lira_needs_out_shadows():
  with pytest.raises(ValueError, match="OUT shadow"):
    attacks.lira_scores(np.zeros(2), np.zeros((2, 2)), np.ones((2, 2), bool), online=False)
