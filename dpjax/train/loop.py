"""The trainer: public/private mixed DP training with accounting, evaluation and checkpoints.

One host loop (`Trainer.run`): for each step, the hooks' `before_step` (public statistics and the
automatic switch, SPARTA's phases, moment resets), α = schedule(t) (public), the budget guard
before a private step, the step itself (`one_step`: a public batch if α > 0, a Poisson batch of
private indices if α < 1, fetched one fixed-shape microbatch at a time; device side in
`dpjax.train.step`), the ledger (public-only steps cost nothing), then the hooks' `after_step`
(metrics, evaluation, checkpoints, the progress bar; `dpjax.train.hooks`). The privacy plan
(`dpjax.train.plan`) is fixed before the steps it covers; an automatic switch replaces it by a new
plan value (`replan`), recorded in the checkpoint and the results.

Faults (`dpjax.train.faults`): SIGTERM/SIGINT saves a checkpoint and returns stopped="preempted";
a non-finite step raises NonFiniteError before its state is saved or another step is taken; a
workdir held by another run is refused (`workdir_lock`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dpjax import config as config_lib
from dpjax import data, finetune, mixing, parallel, provenance
from dpjax.data import views as views_lib
from dpjax.privacy import clipping, noise, randomness
from dpjax.train import checkpoint, engine, hooks as hooks_lib, host_loop, per_example
from dpjax.train import monitor as monitor_lib, plan as plan_lib, state as state_lib
from dpjax.train import statement as statement_lib, step as step_lib, train_state, workdir_lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       show_progress: bool = True) -> dict[str, Any]:
  """Trains as `config` says, resuming from `workdir`'s latest checkpoint; returns the results.
  A workdir that another run holds is refused at once (`workdir_lock`). A run stopped by
  SIGTERM/SIGINT returns stopped="preempted" after saving a checkpoint (no final evaluation, no
  results.json); rerun the same command to resume."""
  run = host_loop.RunConfig(config, config_lib.validate(config), workdir)
  with workdir_lock.for_this_process(workdir, parallel.is_main_process()):
    return Trainer(build_inputs(run)).run(show_progress)


@dataclasses.dataclass(frozen=True)
class RunInputs:
  """What a run is built from: its config, data, model and initial params (public facts and the
  data; nothing about the mechanism's secret)."""
  run: host_loop.RunConfig
  loaded: state_lib.TrainingData
  schedule: mixing.AlphaSchedule
  model: Any
  params: Any
  tuning: state_lib.FineTuning
  rule: clipping.ClipRule
  mesh: jax.sharding.Mesh
  source: state_lib.Source | None


def build_inputs(run: host_loop.RunConfig) -> RunInputs:
  config, spec = run.config, run.spec
  parallel.check_same_config(config_lib.agreement_view(config))
  mesh = parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp)
  if spec.perf.microbatch_size:  # 0: chosen from the free memory, a multiple of the devices
    parallel.check_divides(spec.perf.microbatch_size, mesh, "perf.microbatch_size")
  loaded = state_lib.load_training_data(config)
  if len(loaded.parts.public):
    parallel.check_divides(spec.schedule.public_batch_size, mesh, "schedule.public_batch_size")
  schedule = state_lib.alpha_schedule(config)
  check_canaries_train(config, schedule)
  model, params = state_lib.create_model(config, loaded.parts.private)
  order = state_lib.module_order(model, params, loaded.parts.private)
  params, source = state_lib.finetune_start(config, params, order)
  tuning = state_lib.finetuning(config, params, order)
  rule = clipping.make_clip_rule(spec.dp.clip, spec.dp.clip_norm, params, spec.dp.stability)
  return RunInputs(run, loaded, schedule, model, params, tuning, rule, mesh, source)


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
  template = train_state.initial_state(optimizer, params, mesh, secret)
  with checkpoint.Checkpointer(workdir) as checkpointer:
    restored = checkpointer.restore(train_state.checkpoint_tree(template, 0, secret, mesh),
                                    config_lib.trajectory_view(config))
  if restored is None:
    raise checkpoint.CheckpointError(f"There is no checkpoint in {workdir}/checkpoints.")
  tree, record = restored
  return tree["params"], dict(record, step=int(tree["step"]))


class Trainer(host_loop.HostLoop):
  """Classification and fine-tuning: public/private mixed DP steps on labelled images."""

  def __init__(self, inputs: RunInputs):
    config, spec, parts = inputs.run.config, inputs.run.spec, inputs.loaded.parts
    super().__init__(inputs.run, inputs.mesh,
                     state_lib.create_training_optimizer(config, inputs.tuning), inputs.params,
                     inputs.source)
    self.inputs, self.schedule = inputs, inputs.schedule
    self.preprocess = state_lib.preprocessor(config)
    views = views_lib.make_views(spec.data.augment, spec.dp.augmult, spec.seed)
    method, why = per_example.choose(  # ghost's bound needs examples kept apart: checked here
        spec.perf.per_example_method,
        step_lib.make_batch_losses(inputs.model, spec.perf.dtype, spec.perf.remat, views),
        inputs.params, parts.private.image_shape, parts.private.num_classes, self.preprocess,
        inputs.tuning.trainable, views=spec.dp.augmult)
    if spec.perf.per_example_method == "auto":
      self.say(f"perf.per_example_method='auto': {why}.")
    self.steps = engine.make_steps(dataclasses.replace(spec.perf, per_example_method=method),
                                   inputs.model, inputs.rule, inputs.tuning,
                                   parallel.make_layout(self.mesh, self.state.params,
                                                        self.state.opt_state), views)
    auto = self.schedule if isinstance(self.schedule, mixing.AutoSwitch) else None
    public_train, heldout = monitor_lib.split_heldout(
        parts.public, spec.mixing.schedule.holdout_fraction if auto else 0.0, spec.seed)
    self.batches = engine.Batches(
        self.mesh, self.preprocess, dataclasses.replace(parts, public=public_train),
        data.ShuffledOrder(len(public_train), spec.schedule.public_batch_size, spec.seed)
        if len(public_train) else None, engine.pipeline_options(spec.data), self.total, self._reads_public,
        self._reads_private)
    self.replan(plan_lib.plan_privacy(config, state_lib.accounting_size(inputs.loaded),
                                      self.schedule, inputs.rule.sensitivity, inputs.source))
    self.microbatch = engine.choose_microbatch_size(
        spec, self.plan, self.steps, self.state, parts.private, self.preprocess,
        auto is not None or bool(self.plan.planned_private_steps), self.say)
    self.hooks = self._make_hooks(auto, public_train, heldout)
    self._spent_sum = None  # the last private step's sum, reused by the next (`private_sum`)

  def on_new_plan(self, plan: plan_lib.PrivacyPlan) -> None:
    self.mechanism = engine.make_mechanism(plan, self.optimizer, self.steps.layout,
                                           self.inputs.tuning.trainable,
                                           self.spec.finetune.sparse.method == "sparta")

  def _reads_public(self, step: int) -> bool:
    return (self.plan.phase_at(step) != "selection"
            and mixing.reads_public(self.schedule(step)))

  def _reads_private(self, step: int) -> bool:
    return self.plan.phase_at(step) in plan_lib.PRIVATE_PHASES

  def on_stop(self) -> None:
    self.batches.close()

  def microbatch_size(self) -> int:
    return self.microbatch["microbatch_size"]

  def progress_values(self) -> dict[str, Any]:
    return dict(loss=self._train_metrics.last_loss, acc=self._evaluation.last_accuracy)

  def _make_hooks(self, auto, public_train, heldout) -> list[hooks_lib.Hook]:
    c = self.spec
    self._train_metrics = hooks_lib.TrainMetrics(c.log_every_steps)
    self._evaluation = hooks_lib.Evaluation(c.eval.every_steps)
    made: list[hooks_lib.Hook] = []
    if (auto or c.curvature.every_steps) and len(public_train):
      monitor = monitor_lib.PublicMonitor(
          self.config, public_train, heldout,
          monitor_lib.CurvatureLoss(self.steps.example_loss, self.inputs.rule, self.preprocess),
          self._dataset_metrics, state_lib.accounting_size(self.inputs.loaded),
          lookahead_steps=auto.lookahead_steps if auto and auto.criterion == "lookahead" else 0)
      switch = c.mixing.schedule if auto else None  # its spec: `config.AutoSwitchSpec`
      made.append(hooks_lib.PublicStatistics(monitor, auto, c.curvature.every_steps,
                                             switch.check_every if switch else 1,
                                             switch.min_switch_step if switch else 0))
    made.append(hooks_lib.MomentReset(c.mixing.reset_moments))
    sparse = c.finetune.sparse
    if sparse.method == "sparta":
      made.append(hooks_lib.SpartaPhases(self.inputs.tuning, sparse.fraction, (
          sparse.warmup_steps, sparse.warmup_steps + sparse.selection_steps)))
    return made + [self._train_metrics, self._evaluation,
                   hooks_lib.Checkpointing(c.checkpoint.every_steps)]

  def _dataset_metrics(self, params, dataset: data.Dataset) -> dict[str, float]:
    """The mean loss and the accuracy of a (public) dataset. The monitor works on a local copy of
    the params (parallel.local_copy); evaluation runs on the mesh, so the copy is laid out there
    again."""
    found = self.evaluate_on(parallel.place(params, self.mesh), dataset)
    return dict(loss=found["test_loss"], accuracy=found["test_accuracy"])

  def on_start(self, start: int) -> None:
    self.writer.write(start, "perf", self.microbatch)

  def one_step(self, step: int) -> None:
    """Step `step` at α = self.alpha: the device work, then the ledger."""
    logs, state, mechanism, phase = {}, self.state, self.mechanism, self.plan.phase_at(step)
    if phase == "selection":  # SPARTA: a DP step whose release only scores rows: no update
      acc = self.private_sum(step)
      opt_state, released = mechanism.score(state.opt_state, acc.grad_sum,
                                            acc.stats.num_clipped)
      self.state = state.replace(opt_state=opt_state)
      self.plan.record_private(self.ledger)
      self.logs = {} if released is None else dict(noisy_clip_fraction=released)
      return
    public_grad = clipped = num_clipped = None
    if mixing.reads_public(self.alpha):
      public_grad, logs["loss"] = self.steps.public_grad(state.params, self.batches.public(step))
    if mixing.reads_private(self.alpha):
      # Nothing computed from the private batch is logged unnoised (its clip statistics would
      # release the batch size and norms): only noisy, accounted releases leave the device, the
      # update and, with dp.clip_fraction_noise, the noisy clip count.
      acc = self.private_sum(step)
      clipped = acc.grad_sum
      if mechanism.clip_count is not None:  # else apply does not read it (dispatch cost)
        num_clipped = acc.stats.num_clipped
    applied = mechanism.apply(state.params, state.opt_state, public_grad, clipped,
                              np.float32(self.alpha), num_clipped)
    self.state = train_state.TrainState(applied.params, applied.opt_state)
    if applied.noisy_clip_fraction is not None:
      logs["noisy_clip_fraction"] = applied.noisy_clip_fraction
    if clipped is not None:
      self.plan.record_private(self.ledger)
    else:
      self.ledger.record_public()
    self.logs = logs

  def private_sum(self, step: int) -> Any:
    """The step's clipped sum over its Poisson batch's microbatches (per-device partial sums under
    a layout: apply, or score, adds them). Sparse fine-tuning masks per-example gradients by the
    optimizer state's element mask."""
    element_mask = engine.element_mask(self.state, self.inputs.tuning.masked)
    microbatches = self.batches.private(step, self.sampler)
    # The first microbatch overwrites the previous private step's sum without reading it: no
    # zero sum is made (and dispatched) each step. That sum (params-sized, float32) stays
    # allocated between steps, so a mixed step's public gradient is computed beside it.
    self._spent_sum = step_lib.sum_microbatches(self.steps.accumulate, self.steps.zero_sum,
                                                self._spent_sum, self.state.params,
                                                element_mask, microbatches)
    return self._spent_sum

  # ---------------------------------------------------------------------------------------------
  def evaluate_test(self, params) -> dict[str, float]:
    return self.evaluate_on(params, self.inputs.loaded.test)

  def evaluate_on(self, params, dataset: data.Dataset) -> dict[str, float]:
    """Accuracy and mean loss on `dataset` (streamed in batches of eval.batch_size rows, rounded
    up to a multiple of the devices)."""
    devices = parallel.mesh_size(self.mesh)
    size = -(-self.spec.eval.batch_size // devices) * devices  # rows split over the mesh
    correct = loss = 0.0
    for batch, mask in self.batches.evaluation(dataset, size):
      c, l = self.steps.evaluate(params, batch, mask)
      correct, loss = correct + float(c), loss + float(l)
    return dict(test_accuracy=correct / len(dataset), test_loss=loss / len(dataset))

  # ---------------------------------------------------------------------------------------------
  def _finetune_summary(self) -> dict[str, Any]:
    """How many parameters trained at the end (selected leaves, and the element mask's ones)."""
    params, tuning = self.state.params, self.inputs.tuning
    sizes = [int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)]
    state = finetune.find_mask_state(self.state.opt_state.base)
    masks = (jax.tree_util.tree_leaves(parallel.to_host(state.mask)) if state is not None
             else [np.ones(1)] * len(sizes))
    summary = dict(selection=self.spec.finetune.selection,
                   sparse=self.spec.finetune.sparse.method, total_params=sum(sizes),
                   trainable_params=int(sum(float(np.mean(m)) * n for m, n in zip(masks, sizes))))
    if tuning.masked:
      summary["kept_fraction"] = finetune.kept_fraction(parallel.to_host(state.mask),
                                                        parallel.to_host(params),
                                                        tuning.selection, tuning.order)
    return summary

  def finish(self, step: int, stopped: str | None, seconds: float) -> dict[str, Any]:
    self.save(step)
    evaluation = self.evaluate_test(self.state.params)
    statement = statement_lib.privacy_statement(
        self.plan, self.ledger, self.config,
        noise.values_per_step(self.state.params, self.inputs.tuning.trainable), self.sampler)
    if len(self.plans) > 1:
      statement["plan_changes"] = [dict(step=p.decided_at, reason=p.reason,
                                        noise_multiplier=p.noise_multiplier)
                                   for p in self.plans[1:]]
    self.writer.write(step, "final", dict(evaluation, epsilon=statement["epsilon"]))
    self.writer.close()
    auto = self.schedule if isinstance(self.schedule, mixing.AutoSwitch) else None
    results = dict(evaluation, steps=step, stopped=stopped or "completed", train_seconds=seconds,
                   privacy=statement,
                   switch_step=auto.switch_step if auto else self.first_private_step,
                   finetune=self._finetune_summary(), perf=self.microbatch,
                   config=json.loads(self.config.to_json_best_effort()),
                   provenance=provenance.run_provenance())
    if self.main:
      with open(os.path.join(self.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    self.say(statement_lib.format_statement(statement))
    return results
