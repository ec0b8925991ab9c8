"""The trainer: public/private mixed DP training with accounting, evaluation and checkpoints.

Host side per step t: α = schedule(t) (public); a public batch if α > 0; a Poisson batch of private
indices if α < 1, fetched one fixed-shape microbatch at a time; the budget guard before every
private step; the ledger records the step (public-only steps cost nothing). Device side: see
`dpjax.train.step`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dpjax import config as config_lib
from dpjax import data, finetune, mixing, parallel
from dpjax.privacy import accounting, clipping, noise, randomness, sampling
from dpjax.train import checkpoint, metrics, microbatch_size, monitor as monitor_lib
from dpjax.train import state as state_lib, step as step_lib, workdir_lock


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """The privacy mechanism a config implies, fixed before training starts (public facts only).

  noise_multiplier is None only when the schedule has no private step. source: the run whose
  params this one starts from (`state.read_source`), None without finetune.init_from.
  clip_fraction_noise: σ_c of the clip count each private step releases (0: not released);
  effective_noise_multiplier: σ_eff, what the ledger and the budget guard account per private
  step (σ itself when σ_c = 0; `accounting.effective_noise_multiplier`).
  """
  num_private_examples: int
  expected_batch_size: float
  sampling_rate: float
  planned_private_steps: int
  noise_multiplier: float | None
  delta: float
  accountant: str
  target_epsilon: float | None
  clip: str
  clip_norm: float
  sensitivity: float
  source: state_lib.Source | None = None
  clip_fraction_noise: float = 0.0
  effective_noise_multiplier: float | None = None

  def __post_init__(self):
    if self.effective_noise_multiplier is None and self.noise_multiplier is not None:
      object.__setattr__(self, "effective_noise_multiplier", accounting.effective_noise_multiplier(
          self.noise_multiplier, self.clip_fraction_noise))


def plan_privacy(config: ml_collections.ConfigDict, num_private: int,
                 schedule: mixing.AlphaSchedule, sensitivity: float,
                 source: state_lib.Source | None = None) -> PrivacyPlan:
  """Sampling rate, private step count and noise multiplier (calibrated to the target ε if unset;
  with a source, so that the composition of the source's ledger and this run hits the target;
  with dp.clip_fraction_noise, σ_eff is calibrated and σ follows, `accounting.plan_noise`).

  Uses public facts only: the config, the schedule, the number of private examples, the source's
  ledger.
  """
  dp = config.dp
  private_steps = mixing.count_private_steps(schedule, config.schedule.total_steps)
  if num_private == 0:
    if private_steps:
      raise ValueError(f"The α schedule has {private_steps} private steps (α < 1) but there is no "
                       "private data (data.public_fraction = 1?).")
    return PrivacyPlan(0, 0.0, 0.0, 0, None, dp.delta, dp.accountant, dp.target_epsilon, dp.clip,
                       dp.clip_norm, sensitivity, source)
  q = dp.expected_batch_size / num_private
  if not 0 < q <= 1:
    raise ValueError(f"dp.expected_batch_size = {dp.expected_batch_size} must be in (0, "
                     f"{num_private}], the number of private examples.")
  accounting.check_delta(dp.delta, num_private)
  count_noise = float(dp.get("clip_fraction_noise", 0.0))
  prior = source.ledger if source else None
  sigma = effective = None
  if private_steps:
    sigma, effective = accounting.plan_noise(dp.noise_multiplier, count_noise, dp.target_epsilon,
                                             dp.delta, q, private_steps, dp.accountant, prior)
  elif count_noise and dp.noise_multiplier is None and isinstance(schedule, mixing.AutoSwitch):
    # Refuse now a σ_c that the earliest switch (the most private steps) would refuse.
    most = config.schedule.total_steps - max(config.mixing.auto.min_switch_step, 0)
    if most > 0:
      accounting.plan_noise(None, count_noise, dp.target_epsilon, dp.delta, q, most,
                            dp.accountant, prior)
  return PrivacyPlan(num_private, float(dp.expected_batch_size), q, private_steps, sigma,
                     dp.delta, dp.accountant, dp.target_epsilon, dp.clip, dp.clip_norm,
                     sensitivity, source, count_noise, effective)


def randomness_statement(config: ml_collections.ConfigDict) -> str:
  """Where the mechanism's randomness (noise, Poisson batches) came from (never its value)."""
  if config.dp.get("insecure_reproducible_seed") is None:
    return ("secret: 128 bits of fresh OS entropy drawn at the run's start, kept only in its "
            "training checkpoints")
  return ("INSECURE reproducible mode (dp.insecure_reproducible_seed): the noise and the batches "
          "follow from that integer; the guarantee holds only while it stays secret, and runs "
          "sharing it share their noise")


def released_statement(plan: PrivacyPlan) -> str:
  """What each private step releases: everything the ledger accounts for."""
  if plan.noise_multiplier is None:
    return "nothing (no private step)"
  released = ("the clipped gradient sum + N(0, (σ·S)²·I), over the expected batch size (through "
              "the update, or SPARTA's selection scores)")
  if not plan.clip_fraction_noise:
    return released
  return (released + "; and, from the same Poisson sample, the number of examples whose gradient "
          "norm exceeds the clip norm + N(0, σ_c²), logged over the expected batch size as "
          "noisy_clip_fraction. Together one Gaussian mechanism of noise multiplier σ_eff = "
          "(σ⁻² + σ_c⁻²)^(-1/2), the one accounted")


def privacy_statement(plan: PrivacyPlan, ledger: accounting.PrivacyLedger,
                      config: ml_collections.ConfigDict | None = None,
                      noise_values_per_step: int = 0) -> dict[str, Any]:
  """What was guaranteed, in the terms a reader needs to check it. With a source (the run this
  one started from), ε composes its ledger, and composed_from says what was composed. With the
  config, where the mechanism's randomness came from. With noise_values_per_step (the values the
  noise draws each private step, `noise.values_per_step`), noise_tail_delta: what the float
  sampler's missing tail adds to δ for this run's private steps (`noise.tail_delta`)."""
  conversion = {"pld": "PLD (dp_accounting PLDAccountant, pessimistic discretisation)",
                "rdp": "RDP, dp_accounting's RDP-to-(ε, δ) conversion",
                "rdp_classic": "RDP, classic conversion min_α RDP(α) + log(1/δ)/(α−1)"}
  statement = dict(
      epsilon=ledger.epsilon(plan.delta, plan.accountant), delta=plan.delta,
      accountant=plan.accountant, conversion=conversion[plan.accountant],
      private_steps=ledger.private_steps, public_steps=ledger.public_steps,
      sampling_rate=plan.sampling_rate, sampling="Poisson",
      expected_batch_size=plan.expected_batch_size, noise_multiplier=plan.noise_multiplier,
      clip_fraction_noise=plan.clip_fraction_noise,
      effective_noise_multiplier=plan.effective_noise_multiplier, released=released_statement(plan),
      clip=plan.clip, clip_norm=plan.clip_norm, sensitivity=plan.sensitivity,
      unit_of_privacy="one training example (image and label) of the private set; add/remove "
                      "adjacency",
      num_private_examples=plan.num_private_examples,
      non_private=plan.num_private_examples == 0,
      randomness=None if config is None else randomness_statement(config),
      epsilon_by_accountant={a: ledger.epsilon(plan.delta, a) for a in accounting.ACCOUNTANTS})
  if noise_values_per_step and ledger.private_steps:
    drawn = noise_values_per_step + (1 if plan.clip_fraction_noise else 0)  # + the count's
    statement["noise_tail_delta"] = noise.tail_delta(drawn, ledger.private_steps,
                                                     statement["epsilon"])
  if plan.source is not None:
    statement["composed_from"] = state_lib.composition_record(plan.source, ledger, plan.delta,
                                                              plan.accountant)
    statement["epsilon_this_run"] = ledger.alone().epsilon(plan.delta, plan.accountant)
  return statement


def format_statement(s: dict[str, Any]) -> str:
  if s["non_private"]:
    return ("Privacy: none. Every training example was used as public data (no private set), so "
            "this run gives no differential-privacy guarantee." + _format_source(s))
  sigma = "none" if s["noise_multiplier"] is None else f"{s['noise_multiplier']:.4f}"
  return (f"Privacy: ({s['epsilon']:.3f}, {s['delta']:g})-DP for {s['unit_of_privacy']}.\n"
          f"  accountant: {s['conversion']}; the same steps under every accountant: "
          + ", ".join(f"{k} {v:.3f}" for k, v in s["epsilon_by_accountant"].items()) + "\n"
          f"  {s['private_steps']} private steps (Poisson sampling, q = {s['sampling_rate']:.5f}, "
          f"expected batch {s['expected_batch_size']:g} of {s['num_private_examples']}), "
          f"{s['public_steps']} public-only steps (no privacy cost)\n"
          f"  noise multiplier {sigma}, clip rule {s['clip']} (norm {s['clip_norm']:g}, "
          f"sensitivity {s['sensitivity']:.4g})" + _format_source(s)
          + (f"\n  the float noise sampler's tail beyond 12.06σ adds {s['noise_tail_delta']:.2g} "
             f"to δ (noise.tail_delta)" if s.get("noise_tail_delta") else "")
          + (f"\n  clip count released with noise σ_c = {s['clip_fraction_noise']:g}; each "
             f"private step accounted as one Gaussian of σ_eff = "
             f"{s['effective_noise_multiplier']:.4f} (σ = {sigma} on the gradient)"
             if s.get("clip_fraction_noise") and s["noise_multiplier"] is not None else "")
          + (f"\n  released per private step: {s['released']}" if s.get("released") else "")
          + (f"\n  randomness: {s['randomness']}" if s.get("randomness") else ""))


def _format_source(s: dict[str, Any]) -> str:
  source = s.get("composed_from")
  if source is None:
    return ""
  if source["declared_public"]:
    return (f"\n  started from {source['workdir']}, whose training data was declared public "
            "(finetune.init_from_public): not composed")
  return (f"\n  composed at this run's δ with the {source['private_steps']} private steps of "
          f"{source['workdir']} (the run it started from, and its sources; ε = "
          f"{source['epsilon_alone']:.3f} alone); this run alone: ε = {s['epsilon_this_run']:.3f}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       show_progress: bool = True) -> dict[str, Any]:
  """Trains as `config` says, resuming from `workdir`'s latest checkpoint; returns the results.
  A workdir that another run holds is refused at once (`workdir_lock`)."""
  config_lib.validate(config)
  with workdir_lock.for_this_process(workdir, parallel.is_main_process()):
    return _train_and_evaluate(config, workdir, show_progress)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        show_progress: bool) -> dict[str, Any]:
  parallel.check_same_config(config_lib.agreement_view(config))
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  if config.perf.microbatch_size:  # 0: chosen from the free memory, a multiple of the devices
    parallel.check_divides(config.perf.microbatch_size, mesh, "perf.microbatch_size")
  loaded = state_lib.load_training_data(config)
  parts, test = loaded.parts, loaded.test
  if len(parts.public):
    parallel.check_divides(config.schedule.public_batch_size, mesh, "schedule.public_batch_size")
  schedule = state_lib.alpha_schedule(config)
  check_canaries_train(config, schedule)
  model, params = state_lib.create_model(config, parts.private)
  order = state_lib.module_order(model, params, parts.private)
  params, source = state_lib.finetune_start(config, params, order)
  tuning = state_lib.finetuning(config, params, order)
  rule = clipping.make_clip_rule(config.dp.clip, config.dp.clip_norm, params, config.dp.stability)
  run = _Run(config, workdir, parts, test, schedule, model, rule, mesh, params, tuning,
             state_lib.accounting_size(loaded), source)
  return run.train(show_progress)


def check_canaries_train(config: ml_collections.ConfigDict,
                         schedule: mixing.AlphaSchedule) -> None:
  """Refuses canaries inserted into a part that no step of a fixed schedule reads (an audit of
  them would be vacuous); an automatic schedule decides later and is not checked."""
  if not config.audit.canaries or isinstance(schedule, mixing.AutoSwitch):
    return
  # A step with α in (0, 1) reads both parts; α = 0 reads no public data, α = 1 no private data.
  alphas = [schedule(t) for t in range(config.schedule.total_steps)]
  private = any(mixing.reads_private(a) for a in alphas)
  public = any(mixing.reads_public(a) for a in alphas)
  if config.audit.insert_into == "private" and not private:
    raise ValueError("audit.insert_into='private' but no step reads private data (α = 1 "
                     "throughout): the canaries would never be trained on. For a non-private "
                     "run, set audit.insert_into='public'.")
  if config.audit.insert_into == "public" and not public:
    raise ValueError("audit.insert_into='public' but no step reads public data (α = 0 "
                     "throughout): the canaries would never be trained on. Insert them into the "
                     "private set (audit.insert_into='private').")


def load_trained_state(config: ml_collections.ConfigDict, workdir: str,
                       parts: data.PublicPrivate | None = None) -> tuple[Any, dict]:
  """(params, record) of `workdir`'s latest checkpoint, laid out on this process's mesh.

  The checkpoint may have been written by any number of processes and devices. record holds the
  privacy ledger (JSON), the plan and the step. Raises CheckpointError when there is none, or
  when it was made with a different config. `parts`: the config's training data, if loaded.
  """
  if parts is None:
    parts = state_lib.load_data(config)[0]
  model, params = state_lib.create_model(config, parts.private)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  tuning = state_lib.finetuning(config, params,
                                state_lib.module_order(model, params, parts.private))
  optimizer = state_lib.create_training_optimizer(config, tuning)
  secret = np.zeros(randomness.SECRET_WORDS, np.uint32)  # a template: restored, never used
  template = _state(*_initial_state(optimizer, params, mesh, secret), 0, mesh, secret)
  restored = checkpoint.Checkpointer(workdir).restore(template,
                                                      config_lib.trajectory_view(config))
  if restored is None:
    raise checkpoint.CheckpointError(f"There is no checkpoint in {workdir}/checkpoints.")
  state, record = restored
  return state["params"], dict(record, step=int(state["step"]))


def _initial_state(optimizer, params, mesh, secret):
  """(params, opt_state) at step 0, laid out on the mesh (replicated, or split over 'fsdp'); the
  noise key comes from the run's mechanism `secret` (`dpjax.privacy.randomness`)."""
  opt_state = step_lib.OptState(noise.init_noise_state(randomness.noise_key(secret)),
                                optimizer.init(params))
  return parallel.place(params, mesh), parallel.place(opt_state, mesh)


def _state(params, opt_state, step, mesh, secret):
  """The pytree a checkpoint holds. `secret` (uint32 [4]) seeds the mechanism: the checkpoint is
  its only copy, so a resumed run draws the noise and batches an uninterrupted one would."""
  return dict(params=params, opt_state=opt_state, step=parallel.replicate(np.int32(step), mesh),
              secret=parallel.replicate(np.asarray(secret, np.uint32), mesh))


class _Run:
  """One training run's pieces and its loop (host control flow; device work in `step`)."""

  def __init__(self, config, workdir, parts, test, schedule, model, rule, mesh, params, tuning,
               accounting_size, source=None):
    self.config, self.workdir, self.parts, self.schedule = config, workdir, parts, schedule
    self.source = source  # the run whose params this one starts from (state.read_source)
    self.accounting_size = accounting_size  # N of q = B/N (state.accounting_size)
    self.rule, self.tuning = rule, tuning
    self.optimizer = state_lib.create_training_optimizer(config, tuning)
    self.masked = tuning.masked
    self.auto = schedule if isinstance(schedule, mixing.AutoSwitch) else None
    self.main = parallel.is_main_process()
    # Drawn on every run start (a collective in a multi-process run); a resumed run replaces it
    # by its checkpoint's (`_restore`).
    self.secret = randomness.run_secret(config.dp.insecure_reproducible_seed)
    self.mesh = mesh
    self.initial = _initial_state(self.optimizer, params, mesh, self.secret)
    self.layout = parallel.make_layout(mesh, *self.initial)
    example_loss = step_lib.make_example_loss(model, config.perf.dtype, config.perf.remat)
    self.public_grad = step_lib.make_public_grad(example_loss, self.layout)
    # Ghost clipping holds no per-example gradients.
    batch_losses = (step_lib.make_batch_losses(model, config.perf.dtype, config.perf.remat)
                    if config.perf.per_example_method == "ghost" else None)
    if batch_losses is not None:  # ghost's bound needs a forward pass that keeps examples apart
      step_lib.check_ghost_batch_losses(batch_losses, params, parts.private.image_shape,
                                        parts.private.num_classes,
                                        state_lib.preprocessor(config), tuning.trainable)
    self.accumulate = step_lib.make_accumulate(example_loss, rule, trainable=tuning.trainable,
                                              layout=self.layout,
                                              grad_dtype=step_lib.grad_dtype(config.perf.dtype),
                                              batch_losses=batch_losses, masked=self.masked)
    self.zero_sum = step_lib.make_zero_sum(rule, self.layout)
    self._spent_sum = None  # the last private step's sum, reused by the next (`_private_sum`)
    self.evaluate = step_lib.make_evaluate(model, self.layout)
    self.preprocess = state_lib.preprocessor(config)
    self.test_images = self.preprocess(test.images)
    self.test_labels = test.labels
    self.public_train, heldout = monitor_lib.split_heldout(
        parts.public, config.mixing.auto.holdout_fraction if self.auto else 0.0, config.seed)
    self.public_batches = (data.ShuffledBatches(self.public_train,
                                                config.schedule.public_batch_size, config.seed)
                           if len(self.public_train) else None)
    self.monitor = self._make_monitor(model, heldout)
    self.checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint.max_to_keep)
    self._set_plan()
    self.microbatch = self._choose_microbatch_size(parts.private)
    self.sampler = None  # made from the run's secret once it is known (`train`)
    self.budget = (accounting.PrivacyBudget(config.dp.target_epsilon, self.plan.delta,
                                            self.plan.accountant)
                   if config.dp.target_epsilon is not None else None)

  def _set_plan(self):
    """(Re)plans privacy from the schedule as far as it is decided; builds the mechanism."""
    self.plan = plan_privacy(self.config, self.accounting_size, self.schedule,
                             self.rule.sensitivity, self.source)
    # A run without private steps has no Gaussian mechanism at all. Only the transformation's
    # update runs: its state (the secret noise key) comes from `_initial_state` or a checkpoint.
    self.noise_tx = None
    self.clip_count = None  # dp.clip_fraction_noise > 0: private steps release a noisy count
    if self.plan.noise_multiplier is not None:
      self.noise_tx = noise.add_gaussian_noise(self.plan.noise_multiplier, self.rule.sensitivity,
                                               self.plan.expected_batch_size,
                                               trainable=self.tuning.trainable,
                                               split=parallel.split_leaves(self.layout.params))
      if self.plan.clip_fraction_noise:
        self.clip_count = noise.ClipCountRelease(self.plan.clip_fraction_noise,
                                                 self.plan.expected_batch_size)
    self.apply = step_lib.make_apply(self.noise_tx, self.optimizer, self.layout, donate=True,
                                     clip_count=self.clip_count)
    self.score = (step_lib.make_score(self.noise_tx, self.layout, self.clip_count)
                  if self.noise_tx is not None and self.config.finetune.sparse.method == "sparta"
                  else None)
    self.switch_step = mixing.first_private_step(self.schedule, self.config.schedule.total_steps)

  def _choose_microbatch_size(self, private: data.Dataset) -> dict[str, Any]:
    """perf.microbatch_size, or (0) the largest candidate whose accumulate step XLA estimates to
    fit in perf.memory_fraction of the free memory, the same on every process. Performance only:
    the privacy plan is fixed before and does not depend on it. Returns what to record."""
    perf = self.config.perf
    if perf.microbatch_size:
      return dict(microbatch_size=perf.microbatch_size, microbatch_size_auto=False)
    candidates = microbatch_size.candidate_sizes(self.plan.expected_batch_size,
                                                 parallel.mesh_size(self.mesh))
    if not len(private) or (self.auto is None and not self.plan.planned_private_steps):
      return dict(microbatch_size=candidates[0], microbatch_size_auto=True)  # never used
    measure = self._accumulate_bytes(private)
    free = microbatch_size.free_memory_bytes(self.mesh.local_devices)
    size = microbatch_size.choose_on_every_process(measure, free, candidates,
                                                   perf.memory_fraction)
    self._say(f"perf.microbatch_size = 0: chose {size} (largest of {candidates} within "
              f"{perf.memory_fraction:g} of {free / 2**20:.0f} MiB free per device; XLA estimates "
              f"{measure(size) / 2**20:.1f} MiB for its accumulate step).")
    return dict(microbatch_size=size, microbatch_size_auto=True, step_bytes=measure(size),
                free_bytes=free)

  def _accumulate_bytes(self, private: data.Dataset) -> Callable[[int], int]:
    """m -> XLA's estimate (bytes per device) for `self.accumulate` on a microbatch of m rows,
    compiled on abstract arguments shaped like the private data's (each m once)."""
    params, opt_state = self.initial
    inputs = (params, finetune.find_mask_state(opt_state.base).mask) if self.masked else params
    acc = jax.eval_shape(self.zero_sum, params)
    one = (dict(image=self.preprocess(private.images[:1]), label=private.labels[:1]),
           np.ones(1, bool))  # one row of (microbatch, mask)
    return functools.cache(microbatch_size.measure_jitted(
        self.accumulate,
        lambda m: (acc, inputs, *microbatch_size.abstract_rows(one, m, self.layout.batch),
                   np.bool_(True))))

  def _make_monitor(self, model, heldout):
    if not (self.auto or self.config.curvature.every_steps) or not len(self.public_train):
      return None
    heldout_loss = None
    if heldout is not None:
      images, labels = self.preprocess(heldout.images), heldout.labels
      # The monitor works on a local copy of the params (parallel.local_copy); evaluation runs
      # on the mesh, so the copy is laid out there again.
      heldout_loss = lambda params: self._eval_on(parallel.place(params, self.mesh), images,
                                                  labels)["test_loss"]
    return monitor_lib.PublicMonitor(self.config, self.public_train, heldout,
                                     step_lib.make_example_loss(model), self.rule,
                                     self.preprocess, heldout_loss, self.accounting_size)

  # ---------------------------------------------------------------------------------------------
  def _make_sampler(self) -> sampling.PoissonSampler | None:
    if not len(self.parts.private):
      return None
    return sampling.PoissonSampler(len(self.parts.private), self.plan.sampling_rate,
                                   self.microbatch["microbatch_size"],
                                   seed=randomness.sampler_seed(self.secret))

  def train(self, show_progress: bool) -> dict[str, Any]:
    params, opt_state, start, ledger = self._restore(*self.initial)
    self.sampler = self._make_sampler()
    total = self.config.schedule.total_steps
    writer = metrics.MetricsWriter(self.workdir, enabled=self.main)
    progress = metrics.Progress(total, start, show_progress and self.main)
    stopped, epsilon, last = None, ledger.epsilon(self.plan.delta, self.plan.accountant), {}
    accuracy = loss = float("nan")  # test accuracy at the last evaluation, loss at the last log
    start_time = time.time()
    writer.write(start, "perf", self.microbatch)
    step = start
    for step in range(start, total):
      self._watch_public_statistics(step, params, writer)
      alpha = self.schedule(step)
      if mixing.reads_private(alpha) and not self._budget_allows(ledger):
        stopped = "budget"
        break
      params, opt_state, last = self._one_step(step, alpha, params, opt_state, ledger)
      done = step + 1
      if done % self.config.log_every_steps == 0 or done == total:
        # Device values are read only here: no host synchronisation on the other steps.
        last = {k: float(v) for k, v in last.items()}
        loss = last.get("loss", loss)
        writer.write(done, "train", dict(alpha=alpha, **last))
      if done % self.config.eval.every_steps == 0 and done != total:
        epsilon = ledger.epsilon(self.plan.delta, self.plan.accountant)
        evaluation = self._eval(params)
        accuracy = evaluation["test_accuracy"]
        writer.write(done, "eval", dict(evaluation, epsilon=epsilon))
      if done % self.config.checkpoint.every_steps == 0 and done != total:
        self._save(done, params, opt_state, ledger)
      progress.update(1, loss=loss, acc=accuracy, eps=epsilon, alpha=alpha)
    else:
      step = total
    progress.close()
    return self._finish(step, params, opt_state, ledger, writer, stopped, time.time() - start_time)

  def _watch_public_statistics(self, step, params, writer):
    """Curvature records every curvature.every_steps; auto-switch checks every check_every."""
    if self.monitor is None:
      return
    auto_check = (self.auto is not None and self.auto.switch_step is None
                  and step % self.config.mixing.auto.check_every == 0
                  and step >= self.config.mixing.auto.min_switch_step)
    every = self.config.curvature.every_steps
    if not auto_check and not (every and step % every == 0):
      return
    sigma = (self.plan.noise_multiplier if self.switch_step is not None
             else self.monitor.predicted_noise_multiplier(step))
    stats = self.monitor.statistics(step, parallel.local_copy(params), sigma)
    writer.write(step, "curvature", stats)
    if auto_check and self.auto.observe(step, stats["loss_improvement_public"],
                                        stats.get("loss_improvement_dp"),
                                        stats.get("heldout_loss")):
      self._set_plan()
      writer.write(step, "switch", dict(noise_multiplier=self.plan.noise_multiplier,
                                        reason=self.auto.reason))
      self._say(f"Switching to private training at step {step}: {self.auto.reason}; noise "
            f"multiplier {self.plan.noise_multiplier:.4f} for {self.plan.planned_private_steps} "
            "private steps.")

  def _one_step(self, step, alpha, params, opt_state, ledger):
    logs = {}
    if step == self.switch_step:
      opt_state = opt_state._replace(
          base=step_lib.reset_moments(opt_state.base, self.config.mixing.reset_moments))
    if self.score is not None:
      opt_state = self._sparta_phase(step, params, opt_state)
      if self._selecting(step):  # a DP step whose release only scores rows: no update
        acc = self._private_sum(step, params, opt_state)
        opt_state, released = self.score(opt_state, acc.grad_sum, acc.stats.num_clipped)
        ledger.record_private(self.plan.sampling_rate, self.plan.effective_noise_multiplier)
        return params, opt_state, {} if released is None else dict(noisy_clip_fraction=released)
    public_grad = None
    if mixing.reads_public(alpha):
      batch = self._fetch(self.parts.public, self.public_batches.indices(step))
      public_grad, loss = self.public_grad(params, batch)
      logs["loss"] = loss
    clipped = num_clipped = None
    if mixing.reads_private(alpha):
      if self.plan.noise_multiplier is None:
        raise AssertionError("a private step without a noise multiplier")
      # Nothing computed from the private batch is logged unnoised (its clip statistics would
      # release the batch size and norms): only noisy, accounted releases leave the device, the
      # update and, with dp.clip_fraction_noise, the noisy clip count.
      acc = self._private_sum(step, params, opt_state)
      clipped = acc.grad_sum
      if self.clip_count is not None:  # else apply does not read it: not passed (dispatch cost)
        num_clipped = acc.stats.num_clipped
    params, opt_state, released = self.apply(params, opt_state, public_grad, clipped,
                                             np.float32(alpha), num_clipped)
    if released is not None:
      logs["noisy_clip_fraction"] = released
    if clipped is not None:
      ledger.record_private(self.plan.sampling_rate, self.plan.effective_noise_multiplier)
    else:
      ledger.record_public()
    return params, opt_state, logs

  def _private_sum(self, step, params, opt_state):
    # Sparse fine-tuning: per-example gradients are masked by the optimizer state's element mask.
    inputs = (params, finetune.find_mask_state(opt_state.base).mask) if self.masked else params
    microbatches = (self._fetch(self.parts.private, indices, mask)
                    for indices, mask in self.sampler.batch(step).microbatches())
    # The first microbatch overwrites the previous private step's sum without reading it: no
    # zero sum is made (and dispatched) each step. That sum (params-sized, float32) stays
    # allocated between steps, so a mixed step's public gradient is computed beside it.
    self._spent_sum = step_lib.sum_microbatches(self.accumulate, self.zero_sum, self._spent_sum,
                                                params, inputs, microbatches)
    return self._spent_sum  # per-device partial sums under a layout: apply (or score) adds them

  # ---------------------------------------------------------------------------------------------
  # SPARTA: warm-up (prunable kernels frozen), selection steps (score rows), sparse fine-tuning.
  @property
  def _rows_args(self):
    return self.tuning.selection, self.tuning.order

  def _selecting(self, step):
    sparse = self.config.finetune.sparse
    return sparse.warmup_steps <= step < sparse.warmup_steps + sparse.selection_steps

  def _sparta_phase(self, step, params, opt_state):
    """At the first selection step: every selected element trains and scores start at zero. At
    the first sparse step: the top rows by score, and the first moments reset (as SPARTA)."""
    sparse = self.config.finetune.sparse
    if step not in (sparse.warmup_steps, sparse.warmup_steps + sparse.selection_steps):
      return opt_state
    host = parallel.to_host(opt_state)
    state = finetune.find_mask_state(host.base)
    shapes = state.scores  # params' structure and shapes
    if step == sparse.warmup_steps:
      state = finetune.MaskState(finetune.selection_mask(shapes, self.tuning.selection),
                                 jax.tree_util.tree_map(np.zeros_like, state.scores))
      base = host.base
    else:
      state = state._replace(mask=finetune.top_rows(finetune.score_rows(state.scores), shapes,
                                                    self.tuning.selection, sparse.fraction,
                                                    self.tuning.order))
      base = step_lib.reset_moments(host.base, "first")
      self._say(f"SPARTA: rows selected at step {step}; kept fractions "
                f"{finetune.kept_fraction(state.mask, shapes, *self._rows_args)}")
    host = host._replace(base=finetune.replace_mask_state(base, state))
    return parallel.place(host, self.mesh)

  def _fetch(self, dataset, indices, mask=None):
    """The global batch of `indices` (and its mask) split over the mesh; this process reads and
    preprocesses only the rows its devices hold."""
    rows = parallel.process_rows(self.mesh, len(indices))
    mine = indices[rows]
    local = dict(image=self.preprocess(dataset.images[mine]), label=dataset.labels[mine])
    batch = parallel.global_batch(self.mesh, local, len(indices))
    return batch if mask is None else (batch, parallel.global_batch(self.mesh, mask[rows],
                                                                    len(indices)))

  def _say(self, message: str) -> None:
    if self.main:
      print(message)

  def _budget_allows(self, ledger) -> bool:
    if self.budget is None:
      return True
    try:
      self.budget.check(ledger, self.plan.sampling_rate, self.plan.effective_noise_multiplier,
                        hint=self.plan.planned_private_steps)
    except accounting.BudgetExceededError as e:
      self._say(f"Stopping before step {ledger.private_steps + ledger.public_steps}: {e}")
      return False
    return True

  def _eval(self, params) -> dict[str, float]:
    return self._eval_on(params, self.test_images, self.test_labels)

  def _eval_on(self, params, images, labels) -> dict[str, float]:
    devices = parallel.mesh_size(self.mesh)
    size = -(-self.config.eval.batch_size // devices) * devices  # rows split over the mesh
    rows = parallel.process_rows(self.mesh, size)
    correct = loss = 0.0
    for start in range(0, len(labels), size):
      idx = np.arange(start, start + size)[rows]
      mask = idx < len(labels)
      idx = np.where(mask, idx, 0)
      put = lambda x: parallel.global_batch(self.mesh, x, size)
      c, l = self.evaluate(params, put(dict(image=images[idx], label=labels[idx])), put(mask))
      correct, loss = correct + float(c), loss + float(l)
    return dict(test_accuracy=correct / len(labels), test_loss=loss / len(labels))

  # ---------------------------------------------------------------------------------------------
  def _record(self, ledger) -> dict:
    return dict(ledger=ledger.to_json(), config=config_lib.trajectory_view(self.config),
                plan=dataclasses.asdict(self.plan),
                auto_switch=json.dumps(self.auto.state_dict()) if self.auto else None)

  def _save(self, done, params, opt_state, ledger):
    self.checkpointer.save(done, _state(params, opt_state, done, self.mesh, self.secret),
                           self._record(ledger))

  def _restore(self, params, opt_state):
    restored = self.checkpointer.restore(_state(params, opt_state, 0, self.mesh, self.secret),
                                         config_lib.trajectory_view(self.config))
    if restored is None:
      return params, opt_state, 0, state_lib.starting_ledger(self.source)
    state, record = restored
    self.secret = randomness.check_secret(np.asarray(parallel.to_host(state["secret"])))
    ledger = accounting.PrivacyLedger.from_json(record["ledger"])
    state_lib.check_resumed_prior(ledger, self.source)
    if self.auto is not None:  # the controller's state, and the plan it decided
      vars(self.auto).update(json.loads(record["auto_switch"]))
      self._set_plan()
    step = int(state["step"])
    if ledger.private_steps + ledger.public_steps != step:
      raise checkpoint.CheckpointError(
          f"The checkpoint's ledger counts {ledger.private_steps + ledger.public_steps} steps but "
          f"its state is at step {step}; the checkpoint is inconsistent. Use a new --workdir.")
    return state["params"], state["opt_state"], step, ledger

  def _finetune_summary(self, params, opt_state) -> dict[str, Any]:
    """How many parameters trained at the end (selected leaves, and the element mask's ones)."""
    sizes = [int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)]
    state = finetune.find_mask_state(opt_state.base)
    masks = (jax.tree_util.tree_leaves(parallel.to_host(state.mask)) if state is not None
             else [np.ones(1)] * len(sizes))
    summary = dict(selection=self.config.finetune.selection,
                   sparse=self.config.finetune.sparse.method, total_params=sum(sizes),
                   trainable_params=int(sum(float(np.mean(m)) * n for m, n in zip(masks, sizes))))
    if self.masked:
      summary["kept_fraction"] = finetune.kept_fraction(parallel.to_host(state.mask),
                                                        parallel.to_host(params), *self._rows_args)
    return summary

  def _finish(self, step, params, opt_state, ledger, writer, stopped, seconds):
    self._save(step, params, opt_state, ledger)
    evaluation = self._eval(params)
    statement = privacy_statement(self.plan, ledger, self.config,
                                  noise.values_per_step(params, self.tuning.trainable))
    writer.write(step, "final", dict(evaluation, epsilon=statement["epsilon"]))
    writer.close()
    results = dict(evaluation, steps=step, stopped=stopped or "completed",
                   train_seconds=seconds, privacy=statement,
                   switch_step=self.auto.switch_step if self.auto else self.switch_step,
                   finetune=self._finetune_summary(params, opt_state), perf=self.microbatch)
    if self.main:
      with open(os.path.join(self.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    self._say(format_statement(statement))
    return results
