"""Membership-inference scores from a model's outputs: loss threshold and LiRA.

Every score is "higher means more likely a member". Inputs are host NumPy arrays computed from
the trained model (and, for LiRA, from shadow models trained the same way on other random
subsets of the candidates).
"""

from __future__ import annotations

import numpy as np
from scipy import special


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Softmax cross-entropy [n] of logits [n, K] against integer labels [n]."""
  logits = np.asarray(logits, np.float64)
  return special.logsumexp(logits, axis=-1) - _label_logit(logits, labels)


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """log(p_y / (1 − p_y)) [n] of the softmax of logits [n, K], computed stably as
  z_y − logsumexp_{j≠y} z_j (LiRA's logit scaling: close to Gaussian across training runs)."""
  logits = np.asarray(logits, np.float64)
  own = _label_logit(logits, labels)
  others = np.where(np.arange(logits.shape[-1]) == np.asarray(labels)[:, None], -np.inf, logits)
  return own - special.logsumexp(others, axis=-1)


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
  """Yeom et al. 2018: a member's loss tends to be lower, so the score is −loss [n]."""
  return -np.asarray(losses, np.float64)


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray,
                online: bool = True, fixed_variance: bool = True) -> np.ndarray:
  """LiRA (Carlini et al. 2022) scores [n] for the target model's logit confidences.

  Args:
    target: float [n], `logit_confidence` of each candidate under the audited model.
    shadow: float [S, n], the same under S shadow models.
    shadow_in: bool [S, n], whether each shadow model trained on each candidate.
    online: the likelihood ratio log N(x; μ_in, σ_in) − log N(x; μ_out, σ_out) (needs IN
      shadows); else offline, the one-sided z-score (x − μ_out)/σ_out.
    fixed_variance: one σ_in and one σ_out pooled over all candidates (recommended with fewer
      than ~64 shadows); else each candidate's own.

  A candidate with no OUT (or IN) shadow uses the mean over all candidates' OUT (IN)
  observations. Raises ValueError without any OUT observation (or IN one, when online).
  """
  target = np.asarray(target, np.float64)
  shadow, shadow_in = np.asarray(shadow, np.float64), np.asarray(shadow_in, bool)
  if shadow.ndim != 2 or shadow.shape != shadow_in.shape or shadow.shape[1] != len(target):
    raise ValueError(f"shadow {shadow.shape} and shadow_in {shadow_in.shape} must both be "
                     f"[S, {len(target)}].")
  mu_out, sd_out = _gaussian(shadow, ~shadow_in, fixed_variance, "OUT")
  if not online:
    return (target - mu_out) / sd_out
  mu_in, sd_in = _gaussian(shadow, shadow_in, fixed_variance, "IN")
  return _log_normal(target, mu_in, sd_in) - _log_normal(target, mu_out, sd_out)


def _gaussian(values, selected, fixed_variance, name):
  """Per-candidate mean and std [n] of `values` [S, n] where `selected` [S, n]."""
  if not selected.any():
    raise ValueError(f"LiRA needs {name} shadow models: no shadow model has a candidate {name} "
                     "of its training set. Train more shadow models.")
  counts = selected.sum(0)
  overall = values[selected].mean()
  mean = np.where(counts > 0, np.sum(values * selected, 0) / np.maximum(counts, 1), overall)
  residual = np.where(selected, values - mean, 0.0)
  if fixed_variance:
    pooled = np.sqrt(np.sum(residual ** 2) / max(selected.sum() - np.sum(counts > 0), 1))
    std = np.full(values.shape[1], pooled)
  else:
    std = np.sqrt(np.sum(residual ** 2, 0) / np.maximum(counts - 1, 1))
  return mean, np.maximum(std, 1e-6)


def _log_normal(x, mean, std):
  return -0.5 * ((x - mean) / std) ** 2 - np.log(std)


def _label_logit(logits, labels):
  return np.take_along_axis(logits, np.asarray(labels)[:, None].astype(np.int64), axis=-1)[:, 0]
