"""Public/private gradient mixing: g = α·g_pub + (1 − α)·g_priv with α a schedule of the step.

α is evaluated on the host from the step number alone (public information), so it can decide which
data a step reads: α = 1 steps read no private data and spend no privacy budget; α = 0 steps read no
public data. Mixing a DP gradient with a public one is post-processing and costs nothing extra.

Schedules (each a callable `step -> float` with values in [0, 1]):
  constant(alpha)                   α for every step.
  switch(switch_step)               1 before `switch_step` (public pre-training), 0 from it on
                                    (DP continual pre-training, Bu et al. 2024).
  linear(start, end, begin, until)  from `start` at step `begin` to `end` at step `until`.
  cosine(start, end, until)         cosine decay from `start` at step 0 to `end` at `until`.
  sample_ratio(public_batch_size, private_batch_size)
                                    α = B_pub / (B_pub + B_priv): each example weighs the same.
  `AutoSwitch`                      public until a controller fed with PUBLIC statistics only
                                    decides to switch, then private (α = 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

AlphaSchedule = Callable[[int], float]
PyTree = Any


class AlphaOutOfRangeError(ValueError):
  """α outside [0, 1]."""


def check_alpha(alpha: float, what: str = "alpha") -> float:
  """Returns α as a float, or raises `AlphaOutOfRangeError` if it is not in [0, 1]."""
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise AlphaOutOfRangeError(
        f"{what} = {alpha} is outside [0, 1]. α is the weight of the public gradient in "
        "g = α·g_pub + (1 − α)·g_priv: 1 means public only, 0 private only.")
  return alpha


def constant(alpha: float) -> AlphaSchedule:
  alpha = check_alpha(alpha)
  return lambda step: alpha


def switch(switch_step: int) -> AlphaSchedule:
  if switch_step < 0:
    raise ValueError(f"switch_step must be >= 0, got {switch_step}.")
  return lambda step: 1.0 if step < switch_step else 0.0


def linear(start: float, end: float, begin: int, until: int) -> AlphaSchedule:
  start, end = check_alpha(start, "start"), check_alpha(end, "end")
  if until <= begin:
    raise ValueError(f"linear α schedule needs until > begin, got begin={begin}, until={until}.")
  def schedule(step):
    frac = min(max((step - begin) / (until - begin), 0.0), 1.0)
    return start + frac * (end - start)
  return schedule


def cosine(start: float, end: float, until: int) -> AlphaSchedule:
  start, end = check_alpha(start, "start"), check_alpha(end, "end")
  if until <= 0:
    raise ValueError(f"cosine α schedule needs until > 0, got {until}.")
  def schedule(step):
    frac = min(max(step / until, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))
  return schedule


def sample_ratio(public_batch_size: float, private_batch_size: float) -> AlphaSchedule:
  """α = B_pub/(B_pub + B_priv): the public share of the examples in a step (expected sizes)."""
  if public_batch_size <= 0 or private_batch_size <= 0:
    raise ValueError("sample_ratio needs positive public and private batch sizes, got "
                     f"{public_batch_size} and {private_batch_size}.")
  return constant(public_batch_size / (public_batch_size + private_batch_size))


SCHEDULES = {"constant": constant, "switch": switch, "linear": linear, "cosine": cosine,
             "sample_ratio": sample_ratio}


def make_schedule(kind: str, **kwargs) -> AlphaSchedule:
  """Builds an α schedule by name; every value it returns is checked to lie in [0, 1]."""
  if kind not in SCHEDULES:
    raise ValueError(f"Unknown α schedule {kind!r}; choose one of {sorted(SCHEDULES)}.")
  schedule = SCHEDULES[kind](**kwargs)
  return lambda step: check_alpha(schedule(step), f"alpha({step})")


def reads_public(alpha: float) -> bool:
  return alpha > 0.0


def reads_private(alpha: float) -> bool:
  return alpha < 1.0


def count_private_steps(schedule: AlphaSchedule, total_steps: int) -> int:
  """How many of steps 0..total_steps-1 touch private data (α < 1): what the accountant plans for."""
  return sum(reads_private(schedule(t)) for t in range(total_steps))


def first_private_step(schedule: AlphaSchedule, total_steps: int) -> int | None:
  """The first step with α < 1 that follows at least one public-only step (the switch), or None."""
  for t in range(1, total_steps):
    if reads_private(schedule(t)) and not reads_private(schedule(t - 1)):
      return t
  return None


def mix(alpha: jax.Array | float, public_grad: PyTree | None, private_grad: PyTree | None) -> PyTree:
  """α·g_pub + (1 − α)·g_priv; a missing side (None) must have weight 0 and is skipped."""
  if public_grad is None:
    return jax.tree_util.tree_map(lambda g: (1 - alpha) * g, private_grad)
  if private_grad is None:
    return jax.tree_util.tree_map(lambda g: alpha * g, public_grad)
  return jax.tree_util.tree_map(lambda p, q: alpha * p + (1 - alpha) * q.astype(p.dtype),
                                public_grad, private_grad)



@dataclasses.dataclass
class AutoSwitch:
  """Decides when to switch from public (α = 1) to private (α = 0) training.

  It sees only what `observe` is given: the predicted per-step loss improvement of a public step
  and of a DP step (from curvature estimated on public data, `dpjax.curvature`) and the loss on a
  held-out part of the public data. So the switch step is a function of public data and public
  constants; it spends no privacy budget and reveals nothing about the private data.

  criterion: "improvement" switches once the predicted DP improvement per step reaches the public
    one (Bu et al.: the decelerator has shrunk enough); "plateau" once the held-out public loss has
    not improved by more than `min_delta` (and, with `min_rel_delta` > 0, by more than that share
    of the best loss so far) for `patience` checks; with `plateau_metric="accuracy"` it watches
    the held-out public error (1 − accuracy) instead of the loss, which keeps falling while an
    overfitting model's loss rises; "either" on the first of the two;
    "efficiency" once a DP step's efficiency r (its predicted progress over a non-private step's
    of the same batch, with the σ the remaining budget implies: `curvature.adam_dp_efficiency`
    for Adam, `curvature.dp_efficiency` for SGD) reaches
    the public steps' generalisation g (the held-out public loss's fall over the public training
    loss's fall over the last `generalisation_checks` checks, in [0, 1]; 0 when the training loss
    no longer falls; no decision until that many checks lie behind). Both
    say what share of an ideal step on fresh data a step would deliver: a DP step on private data
    r, a public step on the public data it has seen g.
    "lookahead" once K = `lookahead_steps` simulated DP steps from the current params, on public
    examples the model has not seen (`dpjax.lookahead`), lower the loss of other unseen public
    examples at least as much as K more public steps are doing: the held-out loss's fall since
    the last check, scaled to K steps. Both falls are measured on the same held-out examples;
    a fall ≤ 0 of the simulated DP steps never switches.
  max_switch_step: the switch happens at this step at the latest (the trainer checks at this
    step too, whatever `check_every`: `is_check_step`).
  """
  criterion: str = "either"
  patience: int = 3
  min_delta: float = 0.0
  min_rel_delta: float = 0.0
  max_switch_step: int | None = None
  switch_step: int | None = None
  plateau_metric: str = "loss"  # or "accuracy": the plateau watches 1 − held-out accuracy
  best_loss: float = math.inf  # the plateau's best value so far (held-out loss or error)
  checks_without_improvement: int = 0
  reason: str = ""
  # (held-out, public training) losses at the last `generalisation_checks` checks, oldest first.
  loss_history: tuple[tuple[float, float], ...] = ()
  generalisation_checks: int = 1
  lookahead_steps: int = 10
  last_heldout: tuple[int, float] | None = None  # (step, held-out loss) at the last check

  CRITERIA = ("improvement", "plateau", "either", "efficiency", "lookahead")
  PLATEAU_METRICS = ("loss", "accuracy")
  CURVATURE_CRITERIA = ("improvement", "either", "efficiency")  # the others read held-out losses

  @property
  def needs_curvature(self) -> bool:
    """Whether a check needs the curvature terms (else only the held-out losses)."""
    return self.criterion in self.CURVATURE_CRITERIA

  def __post_init__(self):
    if self.criterion not in self.CRITERIA:
      raise ValueError(f"AutoSwitch criterion must be one of {', '.join(self.CRITERIA)}, got "
                       f"{self.criterion!r}.")
    if self.plateau_metric not in self.PLATEAU_METRICS:
      raise ValueError(f"AutoSwitch plateau_metric must be one of "
                       f"{', '.join(self.PLATEAU_METRICS)}, got {self.plateau_metric!r}.")
    if self.generalisation_checks < 1:
      raise ValueError(f"AutoSwitch generalisation_checks must be >= 1, got "
                       f"{self.generalisation_checks}.")
    self.loss_history = tuple(tuple(pair) for pair in self.loss_history)
    if self.last_heldout is not None:
      self.last_heldout = tuple(self.last_heldout)

  def __call__(self, step: int) -> float:
    """α at `step`: 1 until the switch, 0 from it on."""
    return 1.0 if self.switch_step is None or step < self.switch_step else 0.0

  def observe(self, step: int, public_improvement: float | None = None,
              private_improvement: float | None = None, heldout_loss: float | None = None,
              dp_efficiency: float | None = None, public_train_loss: float | None = None,
              lookahead_fall: float | None = None,
              heldout_accuracy: float | None = None) -> bool:
    """Feeds one check's public statistics; returns True if training switches at `step`."""
    if self.switch_step is not None:
      return False
    reasons = []
    if self.criterion == "lookahead":
      public_fall = self.public_fall(step, heldout_loss)
      if (_finite(public_fall) and _finite(lookahead_fall) and lookahead_fall > 0
          and lookahead_fall >= public_fall):
        reasons.append(f"{self.lookahead_steps} simulated DP steps lower the held-out public "
                       f"loss by {lookahead_fall:.3g} >= {public_fall:.3g} for as many public "
                       "steps")
    if self.criterion == "efficiency":
      generalisation = self.public_generalisation(heldout_loss, public_train_loss)
      if _finite(generalisation) and _finite(dp_efficiency) and dp_efficiency >= generalisation:
        reasons.append(f"DP step efficiency {dp_efficiency:.3g} >= public generalisation "
                       f"{generalisation:.3g}")
    # A degenerate estimate (non-finite, or no predicted public progress at all, as when the
    # estimated ‖G‖² is <= 0 on a small batch) is no evidence either way.
    if (self.criterion in ("improvement", "either") and _finite(public_improvement)
        and _finite(private_improvement) and public_improvement > 0):
      if private_improvement >= public_improvement:
        reasons.append(f"predicted DP improvement {private_improvement:.3g} >= public "
                       f"{public_improvement:.3g}")
    watched, what = ((heldout_loss, "loss") if self.plateau_metric == "loss" else
                     (None if heldout_accuracy is None else 1.0 - heldout_accuracy, "error"))
    if self.criterion in ("plateau", "either") and _finite(watched):
      needed = max(self.min_delta, self.min_rel_delta * abs(self.best_loss)
                   if math.isfinite(self.best_loss) else 0.0)
      if watched < self.best_loss - needed:
        self.best_loss, self.checks_without_improvement = watched, 0
      else:
        self.checks_without_improvement += 1
      if self.checks_without_improvement >= self.patience:
        reasons.append(f"held-out public {what} has not improved for {self.patience} checks")
    if self.max_switch_step is not None and step >= self.max_switch_step:
      reasons.append(f"reached max_switch_step {self.max_switch_step}")
    if reasons:
      self.switch_step, self.reason = step, "; ".join(reasons)
    return bool(reasons)

  def public_generalisation(self, heldout_loss: float | None,
                            public_train_loss: float | None) -> float | None:
    """g in [0, 1]: the held-out public loss's fall over the public training loss's (0 if the
    training loss did not fall), both since the check `generalisation_checks` checks back; None
    until that many checks with losses lie behind, or without losses. Remembers the losses."""
    if not (_finite(heldout_loss) and _finite(public_train_loss)):
      return None
    history = self.loss_history
    self.loss_history = (history + ((float(heldout_loss), float(public_train_loss)),))[
        -self.generalisation_checks:]
    if len(history) < self.generalisation_checks:
      return None
    past = history[-self.generalisation_checks]
    heldout_fall, train_fall = past[0] - heldout_loss, past[1] - public_train_loss
    if train_fall <= 0:
      return 0.0
    return min(max(heldout_fall / train_fall, 0.0), 1.0)

  def public_fall(self, step: int, heldout_loss: float | None) -> float | None:
    """The held-out loss's fall per `lookahead_steps` steps since the last check (None at the
    first check or without a loss). Remembers this check's loss."""
    if not _finite(heldout_loss):
      return None
    last, self.last_heldout = self.last_heldout, (int(step), float(heldout_loss))
    if last is None or step <= last[0]:
      return None
    return (last[1] - heldout_loss) * self.lookahead_steps / (step - last[0])

  def state_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_state_dict(cls, state: dict) -> "AutoSwitch":
    state = dict(state)
    last = state.pop("last_losses", None)  # checkpoints before generalisation_checks
    if last is not None:
      state["loss_history"] = (tuple(last),)
    return cls(**state)


def is_check_step(step: int, check_every: int, min_switch_step: int,
                  max_switch_step: int | None) -> bool:
  """Whether the trainer asks the automatic switch at `step` (while it has not switched): every
  `check_every` steps from `min_switch_step` on, and at `max_switch_step`, so that the cap holds
  between two checks. The trainer's hook and the replay of logged runs both read it."""
  return ((step % check_every == 0 and step >= min_switch_step)
          or (max_switch_step is not None and step == max_switch_step))


def _finite(x: float | None) -> bool:
  return x is not None and math.isfinite(x)
