"""Pytree helpers: leaves named by their key paths, and trees split by a bool mask (trainable and
frozen parts). Host-side or trace-time structure only: nothing here reads array values."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

PyTree = Any


def path_to_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path as a tuple of plain strings, e.g. ('params', 'Dense_0', 'kernel')."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def leaf_paths(tree: PyTree) -> list[tuple[str, ...]]:
  """The key path (`path_to_names`) of each leaf of `tree`, in `tree_leaves` order (None holes
  have no leaf)."""
  return [path_to_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def subtree(tree: dict, path: Sequence[str], create: bool = False) -> dict:
  """tree[path[0]][path[1]]...: a nested dict's node; create=True adds missing nodes."""
  for name in path:
    tree = tree.setdefault(name, {}) if create else tree[name]
  return tree


def trainable_mask(params: PyTree, is_trainable: Callable[[tuple[str, ...]], bool]) -> PyTree:
  """A pytree of bools like params from a predicate on each leaf's key path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(is_trainable(path_to_names(p))),
                                          params)


def partition(params: PyTree, trainable: PyTree | None) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) pytrees of the same structure, with None holes.

  trainable: None (all trainable), or a pytree of bools with the structure of params.
  """
  if trainable is None:
    return params, jax.tree_util.tree_map(lambda _: None, params)
  pick = lambda keep: jax.tree_util.tree_map(lambda p, t: p if t == keep else None,
                                             params, trainable)
  return pick(True), pick(False)


def merge(trainable_part: PyTree, frozen_part: PyTree) -> PyTree:
  """Inverse of `partition`."""
  return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trainable_part, frozen_part,
                                is_leaf=lambda x: x is None)
