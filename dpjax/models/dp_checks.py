"""Checks that a model keeps the examples of a batch apart, as per-example DP gradients need.

DP-SGD bounds each example's influence by clipping its own gradient. If the model's output for one
example depends on the other examples of the batch (BatchNorm in training mode, batch-mean
subtraction), a "per-example" gradient also carries the other examples' data and the clipping bound,
hence the DP guarantee, no longer holds.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from dpjax.privacy.clipping import BatchNormInDPModelError
from dpjax.privacy.nnx import model as nnx_model

_USE_INSTEAD = (
    "Use GroupNorm or LayerNorm instead (they normalise each example on its own), as dpjax's "
    "models do.")




def _batch_norm_error(where: str) -> BatchNormInDPModelError:
  return BatchNormInDPModelError(
      f"BatchNorm found in the model ({where}). BatchNorm mixes the examples of a batch through "
      "the batch statistics, so per-example gradients are not per-example and the DP guarantee "
      f"breaks. {_USE_INSTEAD}")


def _submodules(value: Any) -> Iterator[nn.Module]:
  """Modules held in the dataclass fields of `value`, recursively (no init needed)."""
  if isinstance(value, nn.Module):
    yield value
    for field in dataclasses.fields(value):
      if field.name not in ("parent", "name"):
        yield from _submodules(getattr(value, field.name, None))
  elif isinstance(value, (list, tuple)):
    for item in value:
      yield from _submodules(item)
  elif isinstance(value, Mapping):
    for item in value.values():
      yield from _submodules(item)


def _modules_called_in_init(module: nn.Module, example_input: Any) -> tuple[list[nn.Module], Any]:
  """Every module whose method runs in an abstract `module.init`, and the abstract variables."""
  called = []

  def record_module(next_fun, args, kwargs, context):
    called.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record_module):
    variables = jax.eval_shape(module.init, jax.random.key(0), example_input)
  return called, variables


def assert_dp_compatible(
    module: nn.Module | nnx.Module,
    variables: Mapping[str, Any] | None = None,
    example_input: jax.Array | jax.ShapeDtypeStruct | None = None,
) -> None:
  """Raises BatchNormInDPModelError if the model contains BatchNorm.

  Checks, from cheapest to most thorough:
    1. `variables` (if given) has no "batch_stats" collection;
    2. no nn.BatchNorm is held in the module's fields (submodules passed as attributes);
    3. with `example_input` [batch, ...] (an array or a jax.ShapeDtypeStruct), an abstract
       `module.init` (jax.eval_shape, no compute) calls no nn.BatchNorm, in any submodule,
       whether defined in `setup` or inline in an `nn.compact` method, and creates no
       "batch_stats".
  Without example_input, BatchNorm created inline in a compact method is found only through the
  "batch_stats" of `variables`. Other ways of mixing examples are found by
  `assert_no_cross_example_dependence`. An NNX module (built, so its variables exist) is refused
  if it holds any nnx.BatchStat (`dpjax.privacy.nnx.reject_batch_norm`); the other arguments are
  then not needed.
  """
  if isinstance(module, nnx.Module):
    nnx_model.reject_batch_norm(module)
    return
  if variables is not None and "batch_stats" in variables:
    raise _batch_norm_error("its variables have a 'batch_stats' collection")
  for submodule in _submodules(module):
    if isinstance(submodule, nn.BatchNorm):
      raise _batch_norm_error(f"{type(submodule).__name__} held by {type(module).__name__}")
  if example_input is None:
    return
  called, abstract_variables = _modules_called_in_init(module, example_input)
  for submodule in called:
    if isinstance(submodule, nn.BatchNorm):
      raise _batch_norm_error(f"at {'/'.join(submodule.path) or type(submodule).__name__}")
  if "batch_stats" in abstract_variables:
    raise _batch_norm_error("its init creates a 'batch_stats' collection")


def assert_no_cross_example_dependence(
    apply_fn: Callable[[Any, jax.Array], Any],
    params: Any,
    example_batch: jax.Array,
) -> None:
  """Raises BatchNormInDPModelError if output[0] depends on the inputs of examples 1, 2, ...

  Pulls a random cotangent on example 0's outputs back to the whole input batch (one VJP): a model
  that keeps examples apart gives exactly zero gradient on examples 1.. (their cotangents are zero
  and nothing connects them to example 0), a model that mixes them gives a non-zero one.

  Args:
    apply_fn: (params, batch) -> outputs, a pytree whose leaves have a leading example axis;
      e.g. `model.apply`.
    params: what apply_fn takes first (e.g. the variables from `model.init`); use non-degenerate
      values such as a fresh init, since an all-zero layer hides every dependence.
    example_batch: float inputs [batch >= 2, ...].
  """
  if example_batch.shape[0] < 2:
    raise ValueError(f"example_batch needs at least 2 examples, got shape {example_batch.shape}.")
  if _max_abs_cross_example_gradient(apply_fn, params, example_batch) != 0:
    raise BatchNormInDPModelError(
        "The model mixes the examples of a batch: its output for example 0 depends on the inputs "
        "of other examples (e.g. BatchNorm in training mode or batch-mean subtraction), so "
        f"per-example gradients are not per-example and the DP guarantee breaks. {_USE_INSTEAD}")


def _max_abs_cross_example_gradient(
    apply_fn: Callable[[Any, jax.Array], Any], params: Any, example_batch: jax.Array
) -> float:
  """max |d<cotangent, outputs[0]> / d inputs[1:]| for a random cotangent (one compiled VJP)."""

  @jax.jit
  def pull_back_first_example(params, batch):
    def first_example_outputs(batch):
      return jax.tree.map(lambda leaf: leaf[0], apply_fn(params, batch))

    outputs, pullback = jax.vjp(first_example_outputs, batch)
    leaves, treedef = jax.tree.flatten(outputs)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    cotangent = jax.tree.unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])
    (input_gradient,) = pullback(cotangent)
    return jnp.max(jnp.abs(input_gradient[1:]))

  return float(pull_back_first_example(params, example_batch))
