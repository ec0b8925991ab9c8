"""Names the config accepts and what each builds: optimizers, learning-rate schedules and sparse
fine-tuning masks. The specs check names against these; `dpjax.train.state` builds from them.
(α schedules: `dpjax.config.mixing_block.SCHEDULES`; models: `dpjax.models.build_model`.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax

from dpjax import finetune
from dpjax.config.fields import Registry

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Entry:
  """build: the constructor; reads: the block's optional fields it reads (a changed field that
  the chosen entry does not read is refused, `fields.refuse_unread`)."""
  build: Callable[..., Any]
  reads: tuple[str, ...] = ()


def _sgd(lr, o) -> optax.GradientTransformation:
  opt = optax.sgd(lr, momentum=o.momentum or None)
  return optax.chain(optax.add_decayed_weights(o.weight_decay), opt) if o.weight_decay else opt


# name -> Entry(build(learning_rate or schedule, OptimizerSpec) -> GradientTransformation).
OPTIMIZERS = Registry("optimizer.name", {
    "sgd": Entry(_sgd, ("momentum", "weight_decay")),
    "adam": Entry(lambda lr, o: optax.adam(lr, b1=o.b1, b2=o.b2), ("b1", "b2")),
    "adamw": Entry(lambda lr, o: optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
                   ("b1", "b2", "weight_decay")),
})

# name -> Entry(build(peak learning rate, ScheduleSpec) -> float or optax schedule).
LR_SCHEDULES = Registry("schedule.lr_schedule", {
    "constant": Entry(lambda lr, s: lr),
    "cosine": Entry(lambda lr, s: optax.warmup_cosine_decay_schedule(
        0.0, lr, max(s.warmup_steps, 1), s.total_steps), ("warmup_steps",)),
})


def _no_sparsity(params, selection, trainable, order, sparse, seed):
  del order, sparse, seed
  return None if trainable is None else finetune.selection_mask(params, selection)


def _sparta(params, selection, trainable, order, sparse, seed):
  del trainable, seed
  return (finetune.warmup_mask(params, selection, order) if sparse.warmup_steps > 0
          else finetune.selection_mask(params, selection))


def _top_rows(scores: Callable[[PyTree, int], PyTree]):
  def build(params, selection, trainable, order, sparse, seed):
    del trainable
    return finetune.top_rows(scores(params, seed), params, selection, sparse.fraction, order)
  return build


# name -> Entry(build(params, selection, trainable, order, SparseSpec, seed) -> the initial
# element mask, or None for no restriction). Sparse steps count as private steps. No `reads`:
# one base config is swept over the methods (experiments/finetune.sh).
SPARSE_MASKS = Registry("finetune.sparse.method", {
    "none": Entry(_no_sparsity),
    "sparta": Entry(_sparta),
    "magnitude": Entry(_top_rows(lambda params, seed: finetune.magnitude_rows(params))),
    "random": Entry(_top_rows(finetune.random_rows)),
})
