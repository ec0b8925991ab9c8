"""Statistics of training computed on PUBLIC data only: curvature terms, predicted per-step loss
improvements of public and DP steps, the decelerator, α*, and the held-out public loss.

They are logged as "curvature" records and feed the automatic public→private switch
(`dpjax.mixing.AutoSwitch`). The monitor is built from the public part of the data and never holds
the private part, and `dpjax.curvature` refuses non-public batches, so nothing it reports (and no
switch decision) depends on private data.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np

from dpjax import curvature, data, lookahead
from dpjax.data import public_batch as public_batch_lib
from dpjax.privacy import calibration, clipping, randomness
from dpjax.train import state as state_lib

_MONITOR_STREAM = 0xC0A7
ADAM_LIKE = ("adam", "adamw")  # optimizers whose DP efficiency is `curvature.adam_dp_efficiency`


class CurvatureLoss(NamedTuple):
  """What the curvature terms are computed from: the loss of ONE example (`step.make_example_loss`),
  the clip rule private steps use, and the host preprocessing of uint8 images."""
  example_loss: Callable
  rule: clipping.ClipRule
  preprocess: Callable


class PublicMonitor:
  """Computes public-data statistics at a step for the current params.

  public_train / heldout: the public training part and the held-out public part (None without);
  dataset_metrics: (params, dataset) -> {"loss": its mean loss, "accuracy": its accuracy};
  num_private: N, for the predicted σ. With a held-out part, the statistics hold its loss and
  accuracy and the loss of as many public training examples (a fixed subset), which the
  automatic switch's generalisation g compares.
  lookahead_steps: K > 0 (needs a held-out part of >= 2 examples): the held-out part is halved,
  and each check also takes K simulated DP steps on the first half (`dpjax.lookahead`) and
  reports the fall of the second half's loss they bring (`lookahead_heldout_fall`);
  `heldout_loss` is then the second half's.
  """

  def __init__(self, config: ml_collections.ConfigDict, public_train: data.Dataset,
               heldout: data.Dataset | None, loss: CurvatureLoss,
               dataset_metrics: Callable | None, num_private: int, lookahead_steps: int = 0):
    self.config, self.public, self.heldout = config, public_train, heldout
    self.example_loss, self.rule, self.preprocess = loss
    self.dataset_metrics = dataset_metrics
    self.num_private = num_private
    self.lookahead_steps, self.lookahead_train = lookahead_steps, None
    if lookahead_steps:
      if heldout is None or len(heldout) < 2:
        raise ValueError("The lookahead needs a held-out public part of at least 2 examples: set "
                         "mixing.auto.holdout_fraction > 0.")
      half = len(heldout) // 2
      self.lookahead_train = heldout.subset(np.arange(half), "lookahead train")
      self.heldout = heldout.subset(np.arange(half, len(heldout)), "lookahead eval")
      self.optimizer = state_lib.create_optimizer(config)
      self.shadow_step = lookahead.make_shadow_step(self.example_loss, self.rule, self.optimizer)
    self.train_probe = None
    if self.heldout is not None:
      rows = np.random.default_rng([config.seed, _MONITOR_STREAM]).permutation(len(public_train))
      self.train_probe = public_train.subset(np.sort(rows[:len(self.heldout)]), "train probe")

  def statistics(self, step: int, params: Any, noise_multiplier: float | None,
                 lookahead: bool = True, with_curvature: bool = True) -> dict[str, float]:
    """Curvature terms on a public batch drawn from (seed, step), what they predict, and the
    held-out losses.

    noise_multiplier: σ of the private phase (known, or predicted for a switch at `step`).
    lookahead: also run the lookahead's simulated DP steps (with lookahead_steps > 0); False at
    checks that decide nothing, such as the curvature records after the switch.
    with_curvature: compute the curvature terms (per-example gradients, Hutchinson probes); False at
    a check whose criterion reads the held-out losses only (plateau, lookahead).
    """
    size = min(self.config.curvature.batch_size, len(self.public))
    stats = self._curvature(step, params, noise_multiplier, size) if with_curvature else {}
    if self.heldout is not None:
      heldout = self.dataset_metrics(params, self.heldout)
      stats["heldout_loss"], stats["heldout_accuracy"] = heldout["loss"], heldout["accuracy"]
      stats["public_train_loss"] = self.dataset_metrics(params, self.train_probe)["loss"]
    if lookahead and self.lookahead_steps and noise_multiplier is not None:
      stats["lookahead_heldout_fall"] = stats["heldout_loss"] - self.dataset_metrics(
          self._lookahead(step, params, size, noise_multiplier), self.heldout)["loss"]
    return stats

  def _curvature(self, step: int, params: Any, noise_multiplier: float | None,
                 size: int) -> dict[str, float]:
    c = self.config
    rng = np.random.default_rng([c.seed, step, _MONITOR_STREAM])
    rows = rng.choice(len(self.public), size, replace=False)
    batch = public_batch_lib.public_batch(self.public, rows, self.preprocess)
    terms = curvature.curvature_terms(self.example_loss, params, batch, self.rule,
                                      jax.random.fold_in(
                                          randomness.stream_key(c.seed, "curvature probes"), step),
                                      num_probes=c.curvature.num_probes)
    stats = dict(terms._asdict())
    b_pub, b_priv = c.schedule.public_batch_size, c.dp.expected_batch_size
    stats["loss_improvement_public"] = curvature.loss_improvement_sgd(terms, b_pub)
    if noise_multiplier is not None:
      stats.update(
          noise_multiplier=noise_multiplier,
          decelerator=curvature.decelerator(terms, b_priv, noise_multiplier),
          loss_improvement_dp=curvature.loss_improvement_dp(terms, b_priv, noise_multiplier),
          dp_efficiency_sgd=curvature.dp_efficiency(terms, b_priv, noise_multiplier),
          alpha_star=curvature.optimal_alpha(terms, b_pub, b_priv, noise_multiplier))
      stats["dp_efficiency"] = stats["dp_efficiency_sgd"]
      if c.optimizer.name in ADAM_LIKE:  # a second per-example pass: only where it is the model
        stats["dp_efficiency"] = stats["dp_efficiency_adam"] = curvature.adam_dp_efficiency(
            self.example_loss, params, batch, self.rule, b_priv, noise_multiplier)
    return stats

  def _lookahead(self, step: int, params: Any, size: int, noise_multiplier: float) -> Any:
    """The params after K simulated DP steps on batches of the lookahead's training half."""
    c = self.config
    rng = np.random.default_rng([c.seed, step, _MONITOR_STREAM, 1])
    size = min(size, len(self.lookahead_train))
    batches = (public_batch_lib.public_batch(
        self.lookahead_train, rng.choice(len(self.lookahead_train), size, replace=False),
        self.preprocess) for _ in range(self.lookahead_steps))
    noise_std = noise_multiplier * float(self.rule.sensitivity) / c.dp.expected_batch_size
    return lookahead.shadow_dp_params(
        self.shadow_step, self.optimizer, params, batches,
        jax.random.fold_in(randomness.stream_key(c.seed, "lookahead noise"), step), noise_std)

  def predicted_noise_multiplier(self, step: int) -> float | None:
    """σ a private phase starting at `step` would use: the configured one, or calibrated to the
    target ε for the steps left (with dp.clip_fraction_noise, the gradient's share of the
    calibrated σ_eff, `calibration.gradient_noise_multiplier`; None if σ_c leaves it none).
    Public: depends on the config and the step only.

    The prediction calibrates with RDP (fast; slightly more noise than PLD for the same ε) since
    it only steers the switch; the σ actually used is calibrated with the run's accountant.
    """
    dp = self.config.dp
    if dp.noise_multiplier is not None:
      return float(dp.noise_multiplier)
    remaining = self.config.schedule.total_steps - step
    if remaining <= 0 or self.num_private == 0:
      return None
    effective = _calibrated(dp.target_epsilon, dp.delta,
                            dp.expected_batch_size / self.num_private, remaining, "rdp")
    count_noise = dp.get("clip_fraction_noise", 0.0)
    if count_noise and count_noise <= effective:
      return None
    return calibration.gradient_noise_multiplier(effective, count_noise)


@functools.lru_cache(maxsize=256)
def _calibrated(target, delta, q, steps, accountant) -> float:
  return calibration.calibrate_noise(target, delta, q, steps, accountant)


def split_heldout(public: data.Dataset, fraction: float, seed: int
                  ) -> tuple[data.Dataset, data.Dataset | None]:
  """(public training part, held-out public part) — disjoint, deterministic from the seed."""
  if fraction <= 0:
    return public, None
  heldout_idx, train_idx = data.public_private_split(len(public), fraction, seed + 1)
  data.check_disjoint(heldout_idx, train_idx, ("held-out public", "public training"))
  return public.subset(train_idx, "train"), public.subset(heldout_idx, "heldout")
