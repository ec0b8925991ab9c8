"""DP-SGD for Flax NNX models: the clipped per-example gradient sum of an `nnx.Module` and an
`nnx.Optimizer` that noises it.

    grads = dp_nnx.clipped_grad_sum(loss_fn, model, batch, mask, rule, microbatch_size=64)
    optimizer.update(model, grads.grad_sum)   # optimizer = dp_nnx.DPOptimizer(model, optax.adam(1e-3), ...)

`clipped_grad_sum` is `clipping.clipped_grad_sum` on the model's parameters as a pure state: it
splits the model once (`nnx.split(model, wrt, ...)`) and, inside the per-example vmap, merges a
fresh copy from arrays (`nnx.merge` of pure states), so the loss may call the model freely,
including layers that update their own variables (an `nnx.Dropout`'s RNG count): those updates
land on the copy, never on the caller's model, and raise no `TraceContextError`.

Per-example dropout: every `nnx.RngStream` the model holds (e.g. `nnx.Dropout(rate, rngs=rngs)`)
is advanced once per call on the caller's model (so each step draws new masks; under `nnx.jit`
the advanced count is written back), and each example's copy is reseeded with its own key split
from it: every example gets its own dropout mask, as a Linen loss given one key per example.
Dropout keys are not the mechanism's secret; they need not be secret.

Layers that mix the examples of a batch are refused (`reject_batch_norm`): `nnx.BatchNorm`, or any
module holding an `nnx.BatchStat`. Running the per-example loss under vmap with BatchNorm would
normalise each example by its own statistics and never update the running ones: silently not
the model the user trained without DP.

Privacy: as `clipping.clipped_grad_sum`: ‖grad_sum(D) − grad_sum(D ± one example)‖₂ ≤
rule.sensitivity over the `wrt` parameters together; padded rows (mask 0) and examples whose
gradient is not finite add exactly zero. This needs loss_fn(model, example) to read one example
only (the model's non-parameter state is shared by all examples and not updated from them).
`DPOptimizer`'s noise key lives in its `opt_state` (`noise.NoiseState`): fresh OS entropy by
default, it must stay as private as the data (a checkpoint of the optimizer holds it).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from flax import nnx

from dpjax.privacy import clipping, noise
from dpjax.privacy.clipping import BatchNormInDPModelError

PyTree = Any
NnxLossFn = Callable[[nnx.Module, PyTree], jax.Array]  # loss_fn(model, one example) -> scalar
METHODS = ("vmap", "ghost")


class NnxGhostUnsupportedError(ValueError):
  """Ghost clipping was asked for an NNX model; dpjax's ghost clipping reads Linen layers only."""


def reject_batch_norm(model: nnx.Module) -> None:
  """Raises `BatchNormInDPModelError`, naming the layer, if `model` holds an `nnx.BatchStat`
  (nnx.BatchNorm's running mean and variance, or a custom layer's batch statistics)."""
  nodes = {tuple(path): node for path, node in nnx.iter_graph(model)}  # children come first
  for path, node in nodes.items():
    if isinstance(node, nnx.BatchStat):
      owner = nodes.get(path[:-1])
      kind = type(owner).__name__ if isinstance(owner, nnx.Module) else "a module"
      raise BatchNormInDPModelError(
          f"The NNX model has batch statistics: {kind} at {_joined(path[:-1]) or '(root)'} "
          f"holds nnx.BatchStat {_joined(path)}. BatchNorm normalises each example "
          "with statistics of the whole batch, so one example's gradient depends on the others "
          "and per-example clipping no longer bounds its influence (under vmap it would also "
          "normalise each example by itself and never update the running statistics). Use "
          "nnx.GroupNorm or nnx.LayerNorm instead.")


def _joined(path: tuple) -> str:
  return "/".join(map(str, path))


def _rng_streams(model: nnx.Module) -> dict[tuple, nnx.RngStream]:
  """{path: RngStream} of the streams the model holds, in `iter_graph` order (shared streams
  once)."""
  return {tuple(path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.RngStream)}


def _example_keys(model: nnx.Module, n: int) -> dict[str, jax.Array]:
  """{stream path: raw keys [n, 2]}: each stream of the caller's model advanced once (its count
  incremented in place) and its key split into one per example."""
  return {_joined(path): jax.random.key_data(jax.random.split(stream(), n))
          for path, stream in _rng_streams(model).items()}


def _reseeded(model: nnx.Module, keys: dict[str, jax.Array]) -> nnx.Module:
  """`model` (a copy merged inside the trace) with each stream's key set to its example's key and
  its count to 0."""
  for path, stream in _rng_streams(model).items():
    stream.key[...] = jax.random.wrap_key_data(keys[_joined(path)])
    stream.count[...] = 0
  return model


def _check_method(method: str, model: nnx.Module) -> None:
  if method == "ghost":
    layers = sorted({type(node).__name__ for _, node in nnx.iter_graph(model)
                     if isinstance(node, nnx.Module) and node is not model})
    raise NnxGhostUnsupportedError(
        "method='ghost' is not available for NNX models: dpjax's ghost clipping "
        "(dpjax.privacy.ghost) intercepts Linen layers (flax.linen Dense, Conv, Embed, LayerNorm, "
        f"GroupNorm) and knows none of this model's NNX layers ({', '.join(layers) or 'none'}). "
        "Use method='vmap' (the same clipped sum, with per-example gradients), or write the "
        "model with flax.linen and use dpjax.privacy.ghost.clipped_grad_sum.")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def clipped_grad_sum(loss_fn: NnxLossFn, model: nnx.Module, examples: PyTree, mask: jax.Array,
                     rule: clipping.ClipRule, *, microbatch_size: int | None = None,
                     method: str = "vmap", wrt: Any = nnx.Param) -> clipping.ClippedSum:
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
    method: 'vmap'; 'ghost' raises `NnxGhostUnsupportedError` (see there).
    wrt: an nnx filter of the variables to differentiate (default nnx.Param); the others are
      held fixed.

  Returns:
    `clipping.ClippedSum` whose grad_sum is an nnx.State of the `wrt` variables (float32), as
    `nnx.grad` returns: `DPOptimizer.update(model, grad_sum)` takes it.

  Privacy: see the module docstring; the sensitivity is rule.sensitivity.
  """
  _check_method(method, model)
  reject_batch_norm(model)
  n = int(mask.shape[0])
  keys = _example_keys(model, n)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  pure_params, pure_rest = nnx.as_pure(params), nnx.as_pure(rest)

  def one_loss(p, packed):
    example, example_keys = packed
    return loss_fn(_reseeded(nnx.merge(graphdef, p, pure_rest), example_keys), example)

  found = clipping.clipped_grad_sum(one_loss, pure_params, (examples, keys), mask, rule,
                                    microbatch_size=microbatch_size)
  return found._replace(grad_sum=_as_variables(params, found.grad_sum))


def _as_variables(like: nnx.State, arrays: nnx.State) -> nnx.State:
  """An nnx.State of `like`'s variables (type and metadata) holding `arrays` (a pure state of the
  same structure)."""
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree_util.tree_map(lambda v, a: v.replace(a), like, arrays, is_leaf=is_var)


class DPOptimizer(nnx.Optimizer):
  """`nnx.Optimizer` of `noise.dp_optimizer(tx, ...)`: `update(model, grad_sum)` adds Gaussian
  noise of stddev noise_multiplier·sensitivity to the clipped sum (`clipped_grad_sum`), divides by
  expected_batch_size, applies `tx` and writes the model's `wrt` variables in place.

  Args:
    model: the nnx.Module (no nnx.BatchNorm: `reject_batch_norm`).
    tx: the base optax optimizer.
    noise_multiplier, sensitivity, expected_batch_size, seed: as `noise.dp_optimizer`; leave seed
      None (fresh OS entropy): an int makes the noise reproducible and insecure (tests only).
    wrt: the variables it updates (default nnx.Param), as for `clipped_grad_sum`.

  Privacy: each `update` is one Gaussian mechanism on its input sum (`noise.add_gaussian_noise`):
  call it once per step, with the sum of that step's clipped gradients. The noise key is in
  `opt_state` (`noise_state()`): a checkpoint of it must be kept as private as the data.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
               noise_multiplier: float, sensitivity: float, expected_batch_size: float,
               seed: Any = None, wrt: Any = nnx.Param):
    reject_batch_norm(model)
    super().__init__(model, noise.dp_optimizer(
        tx, noise_multiplier=noise_multiplier, sensitivity=sensitivity,
        expected_batch_size=expected_batch_size, seed=seed), wrt=wrt)

  def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs) -> optax.Updates:
    """One noisy step: grads is `clipped_grad_sum(...).grad_sum` (the clipped SUM, not a mean)."""
    reject_batch_norm(model)
    return super().update(model, grads, **kwargs)

  def noise_state(self) -> noise.NoiseState:
    """The noise transformation's state (secret key, count of noised steps)."""
    return noise.noise_state(nnx.as_pure(self.opt_state))
