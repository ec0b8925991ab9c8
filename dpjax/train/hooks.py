"""The host loop's hooks: small objects called around each step, each with its own schedule.

A hook has `before_step(run, step)` (runs before step `step`'s batches are drawn: it may change
the optimizer state or the plan, from public data only) and `after_step(run, done)` (runs after
`done` steps: it may read device values, write records, save). A hook whose state must survive a
restart returns it from `state_dict()` (JSON-able), and `load_state_dict` takes it back; the
trainer keeps it in the checkpoint record under the hook's `name`.

`due` is the one place that decides whether an interval hook fires: after every `every` steps,
except after the last step, which the run's end handles (final checkpoint, evaluation, results).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

import jax
import numpy as np

from dpjax import finetune, mixing, parallel
from dpjax.train import metrics, plan as plan_lib, step as step_lib


def due(done: int, every: int, total: int) -> bool:
  """Whether an interval hook fires after `done` steps of `total` (every > 0)."""
  return done % every == 0 and done != total


class Hook(Protocol):
  name: str

  def before_step(self, run: Any, step: int) -> None: ...

  def after_step(self, run: Any, done: int) -> None: ...

  def state_dict(self) -> dict | None: ...

  def load_state_dict(self, state: dict) -> None: ...

  def after_restore(self, run: Any) -> None: ...


class BaseHook:
  """No-op defaults: a hook overrides what it needs."""
  name = ""

  def before_step(self, run: Any, step: int) -> None:
    del run, step

  def after_step(self, run: Any, done: int) -> None:
    del run, done

  def state_dict(self) -> dict | None:
    return None

  def load_state_dict(self, state: dict) -> None:
    del state

  def after_restore(self, run: Any) -> None:
    """Called once a checkpoint is restored (after every hook's `load_state_dict`)."""
    del run


class TrainMetrics(BaseHook):
  """Writes the step's public metrics (α, the public loss, the noisy clip fraction: nothing
  computed from private data unless noised and accounted) every `every` steps and after the last.
  Device values are read only here: no host synchronisation on the other steps."""
  name = "train_metrics"

  def __init__(self, every: int):
    self.every = every
    self.last_loss: float | None = None

  def after_step(self, run, done):
    if done % self.every and done != run.total:
      return
    values = {k: float(v) for k, v in run.logs.items()}
    self.last_loss = values.get("loss", self.last_loss)
    run.writer.write(done, "train", dict(alpha=run.alpha, **values))


class Evaluation(BaseHook):
  """Evaluates on the test set every `every` steps (the end's evaluation is the run's own)."""
  name = "evaluation"

  def __init__(self, every: int):
    self.every = every
    self.last_accuracy: float | None = None

  def after_step(self, run, done):
    if not due(done, self.every, run.total):
      return
    run.watch.check(done, run.state.params)  # never evaluate (release) a non-finite state
    evaluation = run.evaluate_test(run.state.params)
    self.last_accuracy = evaluation["test_accuracy"]
    run.writer.write(done, "eval", dict(evaluation, epsilon=run.epsilon()))


class Checkpointing(BaseHook):
  """Saves a checkpoint every `every` steps (`Trainer.save` refuses a non-finite state)."""
  name = "checkpointing"

  def __init__(self, every: int):
    self.every = every

  def after_step(self, run, done):
    if due(done, self.every, run.total):
      run.save(done)


class ProgressBar(BaseHook):
  """The progress bar: α, the ε spent so far and what `extras()` returns; only values that exist,
  no placeholders. ε is recomputed at most once per `refresh_s` seconds and at the last step: a
  PLD ε takes the host 0.2-0.8 s, time the loop would not dispatch steps in. A hidden bar
  (`bar.enabled` False: `--progress=false`, every run of launch/sweep.py) computes nothing."""
  name = "progress"

  def __init__(self, bar: metrics.Progress, extras: Callable[[], dict[str, Any]],
               refresh_s: float = 30.0):
    self.bar, self.extras, self.refresh_s = bar, extras, refresh_s
    self._epsilon: float | None = None
    self._epsilon_at = -float("inf")

  def after_step(self, run, done):
    if not self.bar.enabled:
      self.bar.update(1)
      return
    shown: dict[str, Any] = dict(alpha=run.alpha)
    if run.ledger.total_private_steps:
      now = time.monotonic()
      if now - self._epsilon_at >= self.refresh_s or done == run.total:
        self._epsilon, self._epsilon_at = run.epsilon(), now
      shown["eps"] = self._epsilon
    shown.update({k: v for k, v in self.extras().items() if v is not None})
    self.bar.update(1, **shown)


class MomentReset(BaseHook):
  """Zeroes the optimizer moments named by mixing.reset_moments at the first private step of a
  fixed schedule or of the plan an automatic switch made (Bu et al.: resetting m works best)."""
  name = "moment_reset"

  def __init__(self, which: str):
    self.which = which

  def before_step(self, run, step):
    if step == run.first_private_step:
      state = run.state
      run.state = state.replace(opt_state=state.opt_state._replace(
          base=step_lib.reset_moments(state.opt_state.base, self.which)))


class PublicStatistics(BaseHook):
  """Curvature statistics of public data every `curvature_every` steps, and the automatic
  switch's checks (every `check_every` steps from `min_switch_step` until it decides, and at its
  `max_switch_step`, so that the cap holds between two checks).

  Reads public data and public quantities only (`monitor.PublicMonitor`): the switch step, and so
  the new plan it makes (`plan.switched`), depend on no private example. The controller's state
  is the hook's: restored with `mixing.AutoSwitch.from_state_dict`.
  """
  name = "auto_switch"

  def __init__(self, monitor, auto: mixing.AutoSwitch | None, curvature_every: int,
               check_every: int, min_switch_step: int):
    self.monitor, self.auto = monitor, auto
    self.curvature_every, self.check_every = curvature_every, check_every
    self.min_switch_step = min_switch_step

  def before_step(self, run, step):
    auto_check = (self.auto is not None and self.auto.switch_step is None
                  and mixing.is_check_step(step, self.check_every, self.min_switch_step,
                                           self.auto.max_switch_step))
    curvature = bool(self.curvature_every) and step % self.curvature_every == 0
    if not (auto_check or curvature):
      return
    sigma = (run.plan.noise_multiplier if run.first_private_step is not None
             else self.monitor.predicted_noise_multiplier(step))
    needs_terms = curvature or (auto_check and self.auto.needs_curvature)
    stats = self.monitor.statistics(step, parallel.local_copy(run.state.params), sigma,
                                    lookahead=auto_check,  # it only informs the switch
                                    with_curvature=needs_terms)
    run.writer.write(step, "curvature", stats)
    if auto_check and self.auto.observe(step, stats.get("loss_improvement_public"),
                                        stats.get("loss_improvement_dp"),
                                        stats.get("heldout_loss"), stats.get("dp_efficiency"),
                                        stats.get("public_train_loss"),
                                        stats.get("lookahead_heldout_fall"),
                                        stats.get("heldout_accuracy")):
      run.replan(plan_lib.switched(run.plan, run.config, self.auto), self.auto)
      run.writer.write(step, "switch", dict(noise_multiplier=run.plan.noise_multiplier,
                                            reason=self.auto.reason))
      run.say(f"Switching to private training at step {step}: {self.auto.reason}; noise "
              f"multiplier {run.plan.noise_multiplier:.4f} for "
              f"{run.plan.planned_private_steps} private steps.")

  def state_dict(self):
    return None if self.auto is None else self.auto.state_dict()

  def load_state_dict(self, state):
    if self.auto is not None and state is not None:
      self.auto = mixing.AutoSwitch.from_state_dict(state)

  def after_restore(self, run):
    """The plan the switch decided before the checkpoint, made again from its public state."""
    if self.auto is not None and self.auto.switch_step is not None:
      run.replan(plan_lib.switched(run.plan, run.config, self.auto), self.auto)


class SpartaPhases(BaseHook):
  """SPARTA's phases (the plan's "selection" phase between warm-up and sparse fine-tuning): at
  the first selection step every selected element trains and the scores start at zero; at the
  first sparse step the top rows by score are kept and the first moments reset (as SPARTA)."""
  name = "sparta"

  def __init__(self, tuning, fraction: float, selection: tuple[int, int]):
    self.tuning, self.fraction = tuning, fraction
    self.start, self.stop = selection

  def before_step(self, run, step):
    if step not in (self.start, self.stop):
      return
    host = parallel.to_host(run.state.opt_state)
    state = finetune.find_mask_state(host.base)
    shapes = state.scores  # params' structure and shapes
    if step == self.start:
      state = finetune.MaskState(finetune.selection_mask(shapes, self.tuning.selection),
                                 jax.tree_util.tree_map(np.zeros_like, state.scores))
      base = host.base
    else:
      rows = (self.tuning.selection, self.tuning.order)
      state = state._replace(mask=finetune.top_rows(finetune.score_rows(state.scores), shapes,
                                                    self.tuning.selection, self.fraction,
                                                    self.tuning.order))
      finetune.check_row_masks(state.mask)
      base = step_lib.reset_moments(host.base, "first")
      run.say(f"SPARTA: rows selected at step {step}; kept fractions "
              f"{finetune.kept_fraction(state.mask, shapes, *rows)}")
    host = host._replace(base=finetune.replace_mask_state(base, state))
    run.state = run.state.replace(opt_state=parallel.place(host, run.mesh))
