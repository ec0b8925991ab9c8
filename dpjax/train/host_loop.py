"""The host loop every trainer runs: steps, hooks, the budget guard, checkpoints and faults.

`HostLoop.run` is the loop: for each step, the hooks' `before_step`, α = schedule(t) (public), the
budget guard before a private step, `one_step` (the task's device work and its ledger entry),
the hooks' `after_step`; then the end of the run (`finish`). A subclass is one kind of training
(`loop.Trainer`: classification and fine-tuning; `contrastive_loop.ContrastiveTrainer`); it
provides `one_step`, `finish` and its hooks, and gets from here what every run must do alike:

- the mechanism's secret (fresh OS entropy, or the checkpoint's on resume) and the device state;
- restore: the checkpoint's state, secret and ledger (checked against the state's step and the
  source's ledger), and each hook's state; save: never a non-finite state (`faults.FiniteWatch`);
- the privacy plan (`replan`: the plan before training, then any automatic switch's), whose
  sampling draws the private batches and whose events the ledger records;
- the budget guard (`accounting.PrivacyBudget`) before every private step;
- preemption (`faults.PreemptionGuard`): SIGTERM/SIGINT saves a checkpoint and returns
  stopped="preempted".
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from dpjax import config as config_lib, mixing, parallel
from dpjax.privacy import accounting, randomness, sampling
from dpjax.train import checkpoint, faults, hooks as hooks_lib, metrics
from dpjax.train import plan as plan_lib, state as state_lib, train_state


class RunConfig(NamedTuple):
  """A run's config as given (`config`: its trajectory view is what checkpoints compare) and as
  parsed once (`spec`, `dpjax.config.parse`: what the trainers read), and its workdir."""
  config: ml_collections.ConfigDict
  spec: config_lib.RunSpec
  workdir: str


class HostLoop:
  """A run's host state (device state, secret, ledger, plan) and its loop."""

  def __init__(self, run: RunConfig, mesh: jax.sharding.Mesh,
               optimizer: optax.GradientTransformation, params: Any,
               source: state_lib.Source | None = None):
    self.config, self.spec, self.workdir = run
    self.mesh, self.source = mesh, source
    spec = self.spec
    self.total = spec.schedule.total_steps
    self.main = parallel.is_main_process()
    self.optimizer = optimizer
    # Drawn on every run start (a collective in a multi-process run); a resumed run replaces it
    # by its checkpoint's (`restore`).
    self.secret = randomness.run_secret(spec.dp.insecure_reproducible_seed)
    self.state = train_state.initial_state(optimizer, params, mesh, self.secret)
    self.ledger = state_lib.starting_ledger(source)
    self.checkpointer = checkpoint.Checkpointer(self.workdir, spec.checkpoint.max_to_keep)
    self.watch = faults.FiniteWatch(spec.log_every_steps)
    self.plans: list[plan_lib.PrivacyPlan] = []  # the plan before training, then any switch's
    self.hooks: list[hooks_lib.Hook] = []
    self.budget: accounting.PrivacyBudget | None = None
    self.sampler, self.writer, self.logs, self.alpha = None, None, {}, 1.0
    self.schedule: mixing.AlphaSchedule = mixing.constant(0.0)
    self.first_private_step: int | None = None

  # --- what a kind of training provides -------------------------------------------------------
  def one_step(self, step: int) -> None:
    """Step `step` at α = self.alpha: device work, `self.state`, `self.logs`, the ledger."""
    raise NotImplementedError

  def finish(self, done: int, stopped: str | None, seconds: float) -> dict[str, Any]:
    """The end of a run that was not preempted: save, evaluate, state the privacy, results."""
    raise NotImplementedError

  def on_start(self, start: int) -> None:
    """Called once the metrics writer is open, before the first step (`start`)."""
    del start

  def progress_values(self) -> dict[str, Any]:
    """Values the progress bar shows besides α and ε (only those that exist)."""
    return {}

  def trajectory(self) -> dict:
    """The config a checkpoint must agree with to be resumed."""
    return config_lib.trajectory_view(self.config)

  def microbatch_size(self) -> int:
    return self.spec.perf.microbatch_size

  def make_sampler(self) -> Any:
    """The private batches' sampler: the plan's sampling, seeded by the run's secret (made once
    the secret is known: drawn, or restored)."""
    if self.plan.sampling is None:
      return None
    n, m = self.plan.num_private_examples, self.microbatch_size()
    capacity = (sampling.capacity_microbatches(n, self.plan.sampling_rate, m)
                if self.spec.dp.constant_time else 0)
    return self.plan.sampling.sampler(n, m, randomness.sampler_seed(self.secret), capacity)

  def on_new_plan(self, plan: plan_lib.PrivacyPlan) -> None:
    """Builds what the device needs for `plan` (its mechanism)."""
    del plan

  # --- shared ---------------------------------------------------------------------------------
  def replan(self, plan: plan_lib.PrivacyPlan, schedule: mixing.AlphaSchedule | None = None):
    """Makes `plan` the run's plan from now on (an automatic switch's new plan comes with the
    controller that decided it, now the schedule)."""
    self.plan = plan
    self.plans.append(plan)
    if schedule is not None:
      self.schedule = schedule
    if self.budget is None and self.spec.dp.target_epsilon is not None:
      self.budget = accounting.PrivacyBudget(self.spec.dp.target_epsilon, plan.delta,
                                             plan.accountant)
    self.first_private_step = mixing.first_private_step(self.schedule, self.total)
    self.on_new_plan(plan)

  def on_stop(self) -> None:
    """Called once when `run` ends, however it ends (the data pipelines' workers stop here)."""

  def run(self, show_progress: bool) -> dict[str, Any]:
    try:
      return self._run(show_progress)
    finally:
      try:
        self.on_stop()
      finally:
        self.checkpointer.close()

  def _run(self, show_progress: bool) -> dict[str, Any]:
    start = self.restore()
    self.sampler = self.make_sampler()
    self.writer = metrics.MetricsWriter(self.workdir, enabled=self.main, resume_step=start)
    bar = metrics.Progress(self.total, start, show_progress and self.main)
    self.on_start(start)
    all_hooks = self.hooks + [hooks_lib.ProgressBar(bar, self.progress_values)]
    stopped, started, done = None, time.time(), start
    with faults.PreemptionGuard(jax.process_count(), self.spec.log_every_steps) as guard:
      for step in range(start, self.total):
        for hook in all_hooks:
          hook.before_step(self, step)
        self.alpha = self.schedule(step)
        if mixing.reads_private(self.alpha) and not self._budget_allows():
          stopped = "budget"
          break
        self.one_step(step)
        done = step + 1
        self.watch.after_step(done, self.state.params)
        for hook in all_hooks:
          hook.after_step(self, done)
        if done < self.total and guard.requested(done):
          stopped = "preempted"
          break
    bar.close()
    if stopped == "preempted":
      self.save(done)
      self.writer.close()
      self.say(f"Stopped by {guard.signal_name} after step {done}: checkpoint saved in "
               f"{self.checkpointer.directory}. Rerun the same command to resume.")
      return dict(steps=done, stopped="preempted", signal=guard.signal_name, privacy=None)
    return self.finish(done, stopped, time.time() - started)

  def say(self, message: str) -> None:
    if self.main:
      print(message)

  def epsilon(self) -> float:
    return self.ledger.epsilon(self.plan.delta, self.plan.accountant)

  def _budget_allows(self) -> bool:
    if self.budget is None:
      return True
    try:
      self.budget.check(self.ledger, self.plan.sampling_rate, self.plan.effective_noise_multiplier,
                        hint=self.plan.planned_private_steps)
    except accounting.BudgetExceededError as e:
      self.say(f"Stopping before step {self.ledger.private_steps + self.ledger.public_steps}: {e}")
      return False
    return True

  def record(self) -> dict:
    """The checkpoint's JSON record: ledger, config, plans, the hooks' states."""
    hook_states = {h.name: h.state_dict() for h in self.hooks if h.state_dict() is not None}
    return dict(ledger=self.ledger.to_json(), config=self.trajectory(),
                plan=self.plan.summary(), plans=[p.summary() for p in self.plans[1:]],
                hooks=hook_states)

  def save(self, done: int) -> None:
    """Checkpoints the state after `done` steps; never a non-finite one (NonFiniteError)."""
    self.watch.check(done, self.state.params)
    self.checkpointer.save(done, train_state.checkpoint_tree(self.state, done, self.secret,
                                                             self.mesh), self.record())

  def restore(self) -> int:
    """Restores the latest checkpoint if there is one; returns the step to start from."""
    template = train_state.checkpoint_tree(self.state, 0, self.secret, self.mesh)
    restored = self.checkpointer.restore(template, self.trajectory())
    if restored is None:
      return 0
    tree, record = restored
    self.state, step, self.secret = train_state.from_checkpoint_tree(tree)
    ledger = accounting.PrivacyLedger.from_json(record["ledger"])
    state_lib.check_resumed_prior(ledger, self.source)
    if ledger.private_steps + ledger.public_steps != step:
      raise checkpoint.CheckpointError(
          f"The checkpoint's ledger counts {ledger.private_steps + ledger.public_steps} steps but "
          f"its state is at step {step}; the checkpoint is inconsistent. Use a new --workdir.")
    self.ledger = ledger
    states = dict(record.get("hooks") or {})
    if record.get("auto_switch"):  # records written before hooks had states of their own
      states.setdefault("auto_switch", json.loads(record["auto_switch"]))
    for hook in self.hooks:
      if states.get(hook.name) is not None:
        hook.load_state_dict(states[hook.name])
      hook.after_restore(self)
    return step
