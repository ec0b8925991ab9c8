"""The device side of a run, built once: jitted steps, the mechanism a plan implies, batches.

- `Steps`: the public gradient, the private microbatch accumulation (vmap or ghost), the zero sum
  and the evaluation, compiled once per shape (`dpjax.train.step`).
- `Mechanism`: what a `PrivacyPlan` implies on the device: the noise transformation (σ·S once per
  private step), the apply step (noise, mixing, optimizer) and SPARTA's score step. A new plan
  (an automatic switch) gets a new Mechanism; nothing else is rebuilt.
- `Batches`: the public, private and evaluation batches, streamed by grain pipelines
  (`dpjax.data.pipeline`) and split over the mesh (each process reads and preprocesses only the
  rows its devices hold).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

from dpjax import data, finetune, parallel
from dpjax import private as private_lib
from dpjax.data import pipeline
from dpjax.data import views as views_lib
from dpjax.privacy import clipping, noise, sampling
from dpjax.train import microbatch_size, plan as plan_lib, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class Steps:
  """The run's jitted step functions (see `dpjax.train.step`) and its layout. example_loss: one
  example's loss on its image as it is (no augmentation views: the curvature statistics');
  public_grad and accumulate average each example's loss over its views (`make_steps`)."""
  layout: parallel.Layout
  example_loss: Callable
  public_grad: Callable
  accumulate: Callable
  zero_sum: Callable
  evaluate: Callable


def make_steps(perf, model, rule: clipping.ClipRule, tuning: state_lib.FineTuning,
               layout: parallel.Layout, views: views_lib.Views | None = None) -> Steps:
  """Builds (and so compiles once) the run's step functions from the perf block (its spec,
  `dpjax.config.blocks.PerfSpec`) and the model. views: the augmentation views of every
  training example, public and private (`dpjax.data.views.make_views`; None: the images as they
  are); evaluation never sees them."""
  example_loss = step_lib.make_example_loss(model, perf.dtype, perf.remat)
  training_loss = (example_loss if views is None
                   else step_lib.make_example_loss(model, perf.dtype, perf.remat, views))
  batch_losses = (step_lib.make_batch_losses(model, perf.dtype, perf.remat, views)
                  if perf.per_example_method == "ghost" else None)  # ghost: no per-example grads
  accumulate = step_lib.make_accumulate(training_loss, rule, trainable=tuning.trainable,
                                        layout=layout, grad_dtype=step_lib.grad_dtype(perf.dtype),
                                        batch_losses=batch_losses, masked=tuning.masked,
                                        row_masks=tuning.masked,  # finetune's masks: whole rows
                                        views=1 if views is None else views.count)
  return Steps(layout, example_loss, step_lib.make_public_grad(training_loss, layout), accumulate,
               step_lib.make_zero_sum(rule, layout), step_lib.make_evaluate(model, layout))


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """The device functions of one plan. noise_tx is None for a plan without private steps (its
  state, the secret key, still comes from the initial state or the checkpoint); clip_count is
  set when private steps release a noisy clip count; score is SPARTA's selection step."""
  noise_tx: optax.GradientTransformation | None
  apply: Callable
  score: Callable | None
  clip_count: noise.ClipCountRelease | None


def make_mechanism(plan: plan_lib.PrivacyPlan, optimizer: optax.GradientTransformation,
                   layout: parallel.Layout, trainable: Any, sparta: bool) -> Mechanism:
  noise_tx = clip_count = score = None
  if plan.noise_multiplier is not None:
    noise_tx = noise.add_gaussian_noise(plan.noise_multiplier, plan.sensitivity,
                                        plan.expected_batch_size, trainable=trainable,
                                        split=parallel.split_leaves(layout.params))
    if plan.clip_fraction_noise:
      clip_count = noise.ClipCountRelease(plan.clip_fraction_noise, plan.expected_batch_size)
    if sparta:
      score = step_lib.make_score(noise_tx, layout, clip_count)
  apply = step_lib.make_apply(noise_tx, optimizer, layout, donate=True, clip_count=clip_count)
  return Mechanism(noise_tx, apply, score, clip_count)


def pipeline_options(data_spec) -> pipeline.Options:
  """The data block's (`dpjax.config.blocks.DataSpec`) pipeline settings."""
  return pipeline.Options(data_spec.workers, data_spec.threads, data_spec.prefetch)


class Batches:
  """The run's batches laid out on the mesh, streamed by `dpjax.data.pipeline` (each process reads
  and preprocesses only the rows its devices hold, ahead of the step).

  public(t): step t's public batch, in the order `public_order` (`data.ShuffledOrder`) gives.
  private(t, sampler): step t's private microbatches, exactly the sampler's Poisson draw.
  evaluation(dataset, size): a dataset's batches of `size` rows, for evaluation.
  reads_public / reads_private: t -> whether step t reads that part (what the pipelines read
  ahead; a wrong guess costs a restart, never a wrong batch). preprocess: uint8 -> float32 on the
  host, picklable.
  """

  def __init__(self, mesh: jax.sharding.Mesh, preprocess: Callable, parts: data.PublicPrivate,
               public_order: data.ShuffledOrder | None, options: pipeline.Options,
               total_steps: int, reads_public: Callable[[int], bool],
               reads_private: Callable[[int], bool]):
    self.mesh, self.preprocess, self.parts, self.options = mesh, preprocess, parts, options
    self.total_steps, self.reads_private = total_steps, reads_private
    self._public_rows = None if public_order is None else public_order.batch_size
    self._public = None if public_order is None else pipeline.StepStream(
        self._reader(parts.public, pipeline.PublicDraw(public_order), public_order.batch_size),
        reads_public, total_steps, options)
    self._private: tuple[Any, pipeline.StepStream] | None = None  # (sampler, its stream)

  def _reader(self, dataset: data.Dataset, draw: Callable, rows: int,
              read_every_row: bool = False) -> pipeline.ReadStep:
    return pipeline.ReadStep(dataset.images, dataset.labels, draw,
                             parallel.process_rows(self.mesh, rows), self.preprocess,
                             read_every_row)

  def public(self, step: int) -> dict:
    """Step `step`'s public batch (its order a function of the config seed and the step)."""
    batch, _ = next(pipeline.microbatches(self._public.get(step)))  # one microbatch, all real
    return self._global(batch, self._public_rows)

  def private(self, step: int, sampler: Any) -> Iterator[tuple[dict, Any]]:
    """Step `step`'s private microbatches (batch, mask) of the sampler's draw, on the mesh."""
    if self._private is None or self._private[0] is not sampler:
      self.close_private()
      self._private = (sampler, pipeline.StepStream(
          self._reader(self.parts.private, pipeline.PrivateDraw(sampler), sampler.microbatch_size,
                       sampler.constant_work),
          self.reads_private, self.total_steps, self.options))
    element = self._private[1].get(step)
    for batch, mask in pipeline.microbatches(element):
      yield self._global(batch, sampler.microbatch_size), self._global(mask,
                                                                        sampler.microbatch_size)

  def evaluation(self, dataset: data.Dataset, size: int) -> Iterator[tuple[dict, Any]]:
    """(batch, mask) of `dataset`'s consecutive batches of `size` rows (the last one padded)."""
    draw = pipeline.SequentialDraw(len(dataset), size)
    stream = pipeline.StepStream(self._reader(dataset, draw, size), lambda b: True,
                                 draw.num_batches, dataclasses.replace(self.options, workers=0))
    try:
      for b in range(draw.num_batches):
        batch, mask = next(pipeline.microbatches(stream.get(b)))
        yield self._global(batch, size), self._global(mask, size)
    finally:
      stream.close()

  def _global(self, local: Any, rows: int) -> Any:
    return parallel.global_batch(self.mesh, local, rows)

  def close_private(self) -> None:
    if self._private is not None:
      self._private[1].close()
      self._private = None

  def close(self) -> None:
    """Stops the pipelines' worker processes."""
    self.close_private()
    if self._public is not None:
      self._public.close()


def choose_microbatch_size(spec, plan: plan_lib.PrivacyPlan, steps: Steps, initial: Any,
                           private: data.Dataset, preprocess: Callable, may_go_private: bool,
                           say: Callable[[str], None]) -> dict[str, Any]:
  """perf.microbatch_size, or (0) the largest candidate whose accumulate step XLA estimates to
  fit in perf.memory_fraction of the free memory, the same on every process. Performance only:
  the privacy plan is fixed before and does not depend on it. Returns what to record."""
  perf, mesh = spec.perf, steps.layout.mesh
  if perf.microbatch_size:
    if len(private) and may_go_private:
      _say_padding(plan, perf.microbatch_size, spec.dp.constant_time, say)
    return dict(microbatch_size=perf.microbatch_size, microbatch_size_auto=False)
  candidates = microbatch_size.candidate_sizes(plan.expected_batch_size, parallel.mesh_size(mesh))
  if not len(private) or not may_go_private:
    return dict(microbatch_size=candidates[0], microbatch_size_auto=True)  # never used
  measure = _accumulate_bytes(steps, initial, private, preprocess, spec.finetune.sparse.method
                              != "none")
  free = microbatch_size.free_memory_bytes(mesh.local_devices)
  size = microbatch_size.choose_on_every_process(measure, free, candidates, perf.memory_fraction)
  say(f"perf.microbatch_size = 0: chose {size} (largest of {candidates} within "
      f"{perf.memory_fraction:g} of {free / 2**20:.0f} MiB free per device; XLA estimates "
      f"{measure(size) / 2**20:.1f} MiB for its accumulate step).")
  _say_padding(plan, size, spec.dp.constant_time, say)
  return dict(microbatch_size=size, microbatch_size_auto=True, step_bytes=measure(size),
              free_bytes=free)


PADDING_HINT = 0.1  # say so when the expected padding exceeds this share of the expected batch


def _say_padding(plan: plan_lib.PrivacyPlan, size: int, constant_time: bool,
                 say: Callable[[str], None]) -> None:
  """Says how much of the DP step's work pads Poisson batches to whole microbatches of `size`
  (with dp.constant_time, to the sampler's fixed capacity), when that exceeds PADDING_HINT.
  Computed from N, q and the size (public), never from a batch."""
  n, q = plan.num_private_examples, plan.sampling_rate
  if not n:
    return

  def pad(m: int) -> float:
    if not constant_time:
      return private_lib.expected_padding(n, q, m)
    return sampling.capacity_microbatches(n, q, m) * m / (n * q) - 1

  padded = ("padded to one capacity (dp.constant_time) in" if constant_time else
            "padded to whole")
  if size > 1 and pad(size) > PADDING_HINT:
    say(f"Padding: Poisson batches are {padded} microbatches of {size} rows, about "
        f"{pad(size):.0%} of the expected batch in padding rows, which the DP step computes for "
        f"nothing; perf.microbatch_size={size // 2} would pad about {pad(size // 2):.0%}.")


def element_mask(state: Any, masked: bool) -> Any:
  """accumulate's element_mask argument: the optimizer state's element mask when masked, else
  None (an empty pytree: nothing to dispatch)."""
  return finetune.find_mask_state(state.opt_state.base).mask if masked else None


def _accumulate_bytes(steps: Steps, initial: Any, private: data.Dataset, preprocess: Callable,
                      masked: bool) -> Callable[[int], int]:
  """m -> XLA's estimate (bytes per device) for `steps.accumulate` on a microbatch of m rows,
  compiled on abstract arguments shaped like the private data's (each m once)."""
  acc = jax.eval_shape(steps.zero_sum, initial.params)
  one = (dict(image=preprocess(private.images[:1]), label=private.labels[:1],
              id=np.zeros(1, np.int32), step=np.zeros(1, np.int32)),
         np.ones(1, bool))  # one row of (microbatch, mask), as `pipeline.microbatches` gives
  mask = element_mask(initial, masked)
  return functools.cache(microbatch_size.measure_jitted(
      steps.accumulate,
      lambda m: (acc, initial.params, mask,
                 *microbatch_size.abstract_rows(one, m, steps.layout.batch), np.bool_(True))))
