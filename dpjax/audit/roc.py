"""ROC curves of membership-inference scores: AUC and TPR at low FPR, with bootstrap intervals.

Convention: a higher score means "more likely a member"; an example is called a member when its
score is ≥ the threshold. Members are the positives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FPRS = (0.001, 0.01)


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr), each float [k+1] and non-decreasing, from (0, 0) to (1, 1): one point per
  distinct score, thresholds descending."""
  pos, neg = _check(member_scores, "member_scores"), _check(nonmember_scores, "nonmember_scores")
  scores = np.concatenate([pos, neg])
  is_member = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
  order = np.argsort(-scores, kind="stable")
  scores, is_member = scores[order], is_member[order]
  last_of_value = np.r_[scores[1:] != scores[:-1], True]  # ties move together
  tp = np.cumsum(is_member)[last_of_value]
  fp = np.cumsum(1 - is_member)[last_of_value]
  return np.r_[0.0, fp / len(neg)], np.r_[0.0, tp / len(pos)]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
  """Area under the ROC curve (ties count half: the curve is linear across them)."""
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target_fpr: float) -> float:
  """The highest TPR of a threshold whose FPR is ≤ target_fpr (0 when none is)."""
  return float(np.max(tpr[fpr <= target_fpr]))


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                   fprs: Sequence[float] = DEFAULT_FPRS, num_bootstrap: int = 500,
                   confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
  """AUC and TPR at each FPR in `fprs`, each with a percentile-bootstrap interval at
  `confidence` (members and non-members resampled separately, `num_bootstrap` times).

  Returns a JSON-ready dict: num_members, num_nonmembers, auc, auc_ci, tpr_at_fpr (a dict keyed by
  the FPR as a string, each {value, ci}), confidence, num_bootstrap. An FPR below
  1/num_nonmembers cannot be resolved; its TPR is reported but is 0 by construction.
  """
  pos, neg = _check(member_scores, "member_scores"), _check(nonmember_scores, "nonmember_scores")
  fpr, tpr = roc_curve(pos, neg)
  if num_bootstrap < 1:
    raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}.")
  rng = np.random.default_rng(seed)
  samples = np.empty((num_bootstrap, 1 + len(fprs)))
  for b in range(num_bootstrap):
    f, t = roc_curve(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)))
    samples[b] = [auc(f, t)] + [tpr_at_fpr(f, t, x) for x in fprs]
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
  interval = lambda j: [float(low[j]), float(high[j])]
  return dict(num_members=len(pos), num_nonmembers=len(neg), auc=auc(fpr, tpr),
              auc_ci=interval(0),
              tpr_at_fpr={f"{x:g}": dict(value=tpr_at_fpr(fpr, tpr, x), ci=interval(1 + j),
                                          resolvable=x * len(neg) >= 1)
                          for j, x in enumerate(fprs)},
              confidence=confidence, num_bootstrap=num_bootstrap)


def _check(scores: np.ndarray, name: str) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or not len(scores):
    raise ValueError(f"{name} must be a non-empty vector, got shape {scores.shape}.")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(scores)))} non-finite values; a "
                     "diverged model gives no meaningful audit.")
  return scores
