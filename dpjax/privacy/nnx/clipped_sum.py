"""The clipped per-example gradient sum of an NNX model: `clipped_grad_sum`, by vmap or by ghost
clipping (`nnx.ghost`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax import pytrees
from dpjax.privacy import clipping
from dpjax.privacy.nnx import ghost
from dpjax.privacy.nnx.model import Split, example_keys, reject_batch_norm

PyTree = Any
NnxLossFn = Callable[[nnx.Module, PyTree], jax.Array]  # loss_fn(model, one example) -> scalar
METHODS = ("vmap", "ghost")


def check_batch(examples: PyTree, mask: jax.Array) -> None:
  """ValueError unless mask is [n] and every leaf of `examples` has n rows."""
  if jnp.ndim(mask) != 1:
    raise ValueError(f"mask must be a vector [n] (1 for real rows, 0 for padding), got shape "
                     f"{jnp.shape(mask)}.")
  n = jnp.shape(mask)[0]
  for path, leaf in zip(pytrees.leaf_paths(examples), jax.tree_util.tree_leaves(examples)):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
      raise ValueError(
          f"examples/{'/'.join(path)} has shape {jnp.shape(leaf)}, but the mask has {n} rows: "
          "every leaf of the batch needs a leading example axis of the mask's length (pad the "
          "batch and the mask together).")


def clipped_grad_sum(loss_fn: NnxLossFn, model: nnx.Module, examples: PyTree, mask: jax.Array,
                     rule: clipping.ClipRule, *, microbatch_size: int | None = None,
                     method: str = "vmap", fallback: str = "vmap",
                     wrt: Any = nnx.Param) -> clipping.ClippedSum:
  """Sum of clipped per-example gradients of an NNX model over a padded batch.

  Args:
    loss_fn: loss_fn(model, example) -> scalar, for ONE example (no batch axis). It gets a copy
      of `model` merged inside the trace: call it as in non-private code (dropout included, each
      example with its own mask); what it mutates on the copy is dropped.
    model: the nnx.Module (no nnx.BatchNorm: `reject_batch_norm`). Its RNG streams are advanced
      once (in place); nothing else of it changes.
    examples: pytree whose leaves have a leading example axis [n, ...].
    mask: [n] array, 1 for real examples and 0 for padding.
    rule: the `clipping.ClipRule`; its group paths are the state's paths (e.g. ('Dense_0',
      'kernel')), as Linen's params' without the 'params' level.
    microbatch_size: examples per vmap call; n must be a multiple. None means n.
    method: 'vmap' (per-example gradients) or 'ghost' (ghost clipping: `dpjax.privacy.nnx.ghost`,
      the same sum up to rounding, without per-example gradients of the supported layers).
    fallback: for method='ghost', the params no supported layer covers: 'vmap' (per-example
      gradients for them only; `ghost.ghost_plan` names them) or 'error'.
    wrt: an nnx filter of the variables to differentiate (default nnx.Param); the others are
      held fixed.

  Returns:
    `clipping.ClippedSum` whose grad_sum is an nnx.State of the `wrt` variables (float32), as
    `nnx.grad` returns: `DPOptimizer.update(model, grad_sum)` takes it.

  Privacy: ‖grad_sum(D) − grad_sum(D ± one example)‖₂ ≤ rule.sensitivity over the `wrt`
  variables together; padded rows (mask 0) and examples whose gradient is not finite add exactly
  zero. This needs loss_fn(model, example) to read one example only (the model's other state is
  shared by all examples and not updated from them).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  reject_batch_norm(model)
  check_batch(examples, mask)
  keys = example_keys(model, int(mask.shape[0]))
  split = Split(model, wrt)
  if method == "ghost":
    found = ghost.clipped_grad_sum(loss_fn, split, examples, keys, mask, rule, microbatch_size,
                                   fallback)
  else:
    one_loss = lambda params, packed: loss_fn(split.copy(params, packed[1]), packed[0])
    found = clipping.clipped_grad_sum(one_loss, split.pure_params, (examples, keys), mask, rule,
                                      microbatch_size=microbatch_size)
  return found._replace(grad_sum=split.as_variables(found.grad_sum))
