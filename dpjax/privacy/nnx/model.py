"""What dpjax reads from an NNX model: layers that mix examples (refused), its RNG streams (one
key per example), and its state split into pure arrays (merged back inside a trace)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax import pytrees
from dpjax.privacy.clipping import BatchNormInDPModelError

PyTree = Any


def joined(path: tuple) -> str:
  """A graph path as 'a/0/b'."""
  return "/".join(map(str, path))


WHY_NOT_BATCH_NORM = (
    "BatchNorm normalises each example with statistics of the whole batch, so one example's "
    "gradient depends on the others and per-example clipping no longer bounds its influence "
    "(under vmap it would also normalise each example by itself and never update the running "
    "statistics). Use nnx.GroupNorm or nnx.LayerNorm instead.")


def reject_batch_norm(model: nnx.Module) -> None:
  """Raises `BatchNormInDPModelError`, naming the layer, if `model` holds an `nnx.BatchStat`
  (nnx.BatchNorm's running mean and variance, or a custom layer's batch statistics)."""
  nodes = {tuple(path): node for path, node in nnx.iter_graph(model)}  # children come first
  for path, node in nodes.items():
    if isinstance(node, nnx.BatchStat):
      owner = nodes.get(path[:-1])
      kind = type(owner).__name__ if isinstance(owner, nnx.Module) else "a module"
      raise BatchNormInDPModelError(
          f"The NNX model has batch statistics: {kind} at {joined(path[:-1]) or '(root)'} "
          f"holds nnx.BatchStat {joined(path)}. {WHY_NOT_BATCH_NORM}")


def reject_batch_stats_in(tree: PyTree) -> None:
  """Raises `BatchNormInDPModelError` if an `nnx.Module` reachable in the pytree `tree` (an
  argument of a per-example loss) holds an nnx.BatchStat (`reject_batch_norm`), or a leaf of it is
  an nnx.BatchStat variable (a state from `nnx.split` / `nnx.state`). A pure state
  (`nnx.as_pure`: bare arrays) carries no variable types and is not recognised."""
  is_node = lambda x: isinstance(x, (nnx.Module, nnx.Variable))
  for path, node in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_node):
    if isinstance(node, nnx.Module):
      reject_batch_norm(node)
    elif isinstance(node, nnx.BatchStat):
      raise BatchNormInDPModelError(
          f"An argument holds NNX batch statistics: nnx.BatchStat at "
          f"{jax.tree_util.keystr(path) or '(root)'}, from an nnx.BatchNorm (or a layer "
          f"with batch statistics). {WHY_NOT_BATCH_NORM}")


def rng_streams(model: nnx.Module) -> dict[tuple, nnx.RngStream]:
  """{path: RngStream} of the streams the model holds, in `iter_graph` order (shared streams
  once)."""
  return {tuple(path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.RngStream)}


def example_keys(model: nnx.Module, n: int) -> dict[str, jax.Array]:
  """{stream path: raw keys [n, 2]}: each stream of the caller's model advanced once (its count
  incremented in place) and its key split into one per example."""
  return {joined(path): jax.random.key_data(jax.random.split(stream(), n))
          for path, stream in rng_streams(model).items()}


def placeholder_keys(model: nnx.Module) -> dict[str, jax.Array]:
  """{stream path: a raw key [2]} of zeros, for abstract passes over one example."""
  return {joined(path): jnp.zeros((2,), jnp.uint32) for path in rng_streams(model)}


def reseeded(model: nnx.Module, keys: dict[str, jax.Array]) -> nnx.Module:
  """`model` (a copy merged inside the trace) with each stream's key set to its example's key
  (`example_keys`, one row) and its count to 0."""
  for path, stream in rng_streams(model).items():
    stream.key[...] = jax.random.wrap_key_data(keys[joined(path)])
    stream.count[...] = 0
  return model


class Split:
  """A model split once for per-example work: `copy(params, keys)` merges, inside the caller's
  trace, a fresh model from pure arrays, whose RNG streams hold one example's keys.

  graphdef, params (the `wrt` variables, nnx.State of Variables), pure_params (the same as
  arrays), pure_rest (the other state as arrays: shared by all examples, not updated)."""

  def __init__(self, model: nnx.Module, wrt: Any):
    self.graphdef, self.params, rest = nnx.split(model, wrt, ...)
    self.pure_params, self.pure_rest = nnx.as_pure(self.params), nnx.as_pure(rest)

  def copy(self, params: PyTree, keys: dict[str, jax.Array]) -> nnx.Module:
    return reseeded(nnx.merge(self.graphdef, params, self.pure_rest), keys)

  def leaf_arrays(self) -> dict[tuple[str, ...], jax.Array]:
    """{leaf path (`pytrees.leaf_paths`): array} of the `wrt` variables."""
    return dict(zip(pytrees.leaf_paths(self.pure_params),
                    jax.tree_util.tree_leaves(self.pure_params)))

  def as_variables(self, arrays: PyTree) -> nnx.State:
    """An nnx.State of the `wrt` variables (their types and metadata) holding `arrays` (a pure
    state of the same structure), as `nnx.grad` returns."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    return jax.tree_util.tree_map(lambda v, a: v.replace(a), self.params, arrays, is_leaf=is_var)
