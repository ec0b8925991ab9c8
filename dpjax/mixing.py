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
"""

from __future__ import annotations

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


SCHEDULES = {"constant": constant, "switch": switch, "linear": linear, "cosine": cosine}


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

