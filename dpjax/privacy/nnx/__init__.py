"""DP-SGD for Flax NNX models: the clipped per-example gradient sum of an `nnx.Module` and an
`nnx.Optimizer` that noises it.

    grads = dp_nnx.clipped_grad_sum(loss_fn, model, batch, mask, rule, microbatch_size=64)
    optimizer.update(model, grads.grad_sum)  # optimizer = dp_nnx.DPOptimizer(model, tx, ...)

`clipped_grad_sum` splits the model once (`nnx.split(model, wrt, ...)`) and, for each example,
merges a fresh copy from arrays inside the trace (`model.Split`), so the per-example loss may
call the model freely, including layers that update their own variables (an `nnx.Dropout`'s RNG
count): those updates land on the copy, never on the caller's model, and raise no
`TraceContextError`. Do not pass `nnx.Rngs` or a model into the loss by closure: take the model
as the loss's first argument and give it its RNG streams at construction
(`nnx.Dropout(rate, rngs=rngs)`).

Per-example dropout: every `nnx.RngStream` the model holds is advanced once per call on the
caller's model (so each step draws new masks; under `nnx.jit` the advanced count is written
back), and each example's copy is reseeded with its own key split from it: every example gets
its own dropout mask. Dropout keys are not the mechanism's secret.

method="ghost" runs ghost clipping on nnx.Linear, nnx.Conv, nnx.Embed, nnx.LayerNorm and
nnx.GroupNorm (through the Linen layers' factored terms, `ghost`); any other param, or a layer
called twice per example or whose params the loss reads elsewhere, gets per-example gradients by
vmap (`ghost_plan(loss_fn, model, batch)` lists which), or an error with fallback="error".

Layers that mix the examples of a batch are refused (`reject_batch_norm`): `nnx.BatchNorm`, or any
module holding an `nnx.BatchStat`, in both `clipped_grad_sum` and `DPOptimizer`.

Modules: `model` (BatchNorm refusal, RNG streams, the split model), `clipped_sum` (the entry
point; the vmap path), `ghost` (ghost clipping of NNX layers through their Linen twins),
`optimizer` (`DPOptimizer`).
"""

from dpjax.privacy.nnx.clipped_sum import METHODS, clipped_grad_sum
from dpjax.privacy.nnx.ghost import SUPPORTED, NnxGhostUnsupportedError, ghost_plan
from dpjax.privacy.nnx.model import reject_batch_norm
from dpjax.privacy.nnx.optimizer import DPOptimizer

__all__ = ["METHODS", "SUPPORTED", "DPOptimizer", "NnxGhostUnsupportedError", "clipped_grad_sum",
           "ghost_plan", "reject_batch_norm"]
