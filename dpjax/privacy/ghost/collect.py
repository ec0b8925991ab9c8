"""One forward and one backward pass, to the layers' outputs only: every trainable leaf's
per-example gradients as a term (`LeafTerm`), from which ghost clipping takes both the norms and
the clipped sum (book-keeping: no second backward pass).

Leaves of supported layers get factored terms (`layer_terms`); leaves no supported layer owns
alone (custom layers without `ghost_grads`, a layer called twice per example or read by another
of its methods, a scan over more than one axis) get per-example gradients by `vmap(grad)`
restricted to those leaves (fallback="vmap"), or raise `GhostUnsupportedError` (fallback="error").
Every trainable leaf is accounted for by exactly one layer record or by the fallback.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax import pytrees
from dpjax.privacy.ghost.layer_terms import layer_terms
from dpjax.privacy.ghost.layers import (INPUTS, SUPPORTED, BatchLosses, GhostUnsupportedError,
                                        Layer, coverage, intercepting, layer_calls)
from dpjax.privacy.ghost.terms import Summed, Term, merge_views

PyTree = Any


class LeafTerm(NamedTuple):
  """A trainable leaf's term: its layer's module (an unbound clone; None for the fallback), its
  `Term`, and whether it is a scanned stack (each term array then carries the scanned axis in
  front)."""
  module: nn.Module | None
  term: Term
  stacked: bool


def leaf_terms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
               trainable: PyTree | None, fallback: str, views: int = 1
               ) -> dict[tuple[str, ...], LeafTerm]:
  """{leaf path: `LeafTerm`} for every trainable leaf: factored terms for the leaves of
  supported layers (one forward and one backward pass, to the layers' outputs only; under nn.scan
  each term array carries the scanned axis in front and `stacked` is True), and per-example
  gradients (`Summed` [m, size], by vmap(grad)) for the leaves left to the fallback.

  views: K ≥ 1, for a batch_losses that runs the model on K views of each of the batch's m
  examples (augmentation multiplicity, `dpjax.data.views`): every supported layer then sees
  m·K rows, example i's views at rows i·K ... i·K + K − 1, and its terms are merged into the m
  examples' terms (`terms.merge_views`: each example's gradient is the sum over its views of the
  gradient of its loss, the mean of theirs). A layer whose output has another number of rows
  than m·K raises GhostUnsupportedError."""
  if not isinstance(views, int) or views < 1:
    raise ValueError(f"views must be an integer >= 1 (views per example), got {views!r}.")
  layers, probe_shapes, calls = layer_calls(batch_losses, params, batch)
  rows = int(jax.tree_util.tree_leaves(batch)[0].shape[0]) * views
  used, left = coverage(layers, calls, params, trainable)
  if fallback == "error" and any(jax.tree_util.tree_leaves(left)):
    names = ["/".join(p) for p, keep in zip(pytrees.leaf_paths(params),
                                            jax.tree_util.tree_leaves(left)) if keep]
    raise GhostUnsupportedError(
        f"Ghost clipping cannot compute per-example norms for {names}: no supported layer "
        f"({', '.join(t.__name__ for t in SUPPORTED)}) owns them alone. Use fallback='vmap' "
        "(per-example gradients for these parameters only) or perf.per_example_method='vmap'.")
  probes = zero_probes(probe_shapes, batch)

  def summed_loss(probes):
    losses, mutated = intercepting(batch_losses, {})(params, batch, probes)
    return jnp.sum(losses), mutated[INPUTS]

  output_grads, inputs = jax.grad(summed_loss, has_aux=True)(probes)
  terms = layer_leaf_terms(layers, used, inputs, output_grads, params, trainable, rows, views)
  if any(jax.tree_util.tree_leaves(left)):
    per_example = _fallback_grads(batch_losses, params, batch, left)
    for path, grad in zip(pytrees.leaf_paths(per_example),
                          jax.tree_util.tree_leaves(per_example)):
      flat = grad.reshape(grad.shape[0], -1).astype(jnp.float32)
      terms[path] = LeafTerm(None, Summed(flat), False)
  return terms


def zero_probes(probe_shapes: dict, batch: PyTree) -> dict:
  """The probes {path...: {"probe": zeros}} of `layers.layer_calls`' shapes. Zeros built from the
  batch, so that under shard_map they vary across devices as the batch does: the gradient w.r.t.
  a device-invariant probe would be summed over the devices."""
  anchor = jnp.zeros_like(jax.tree_util.tree_leaves(batch)[0], jnp.float32).ravel()[:1].sum()
  probes = {}
  for path, shape in probe_shapes.items():
    pytrees.subtree(probes, path, create=True)["probe"] = (
        jnp.zeros(shape.shape, jnp.float32) + anchor).astype(shape.dtype)
  return probes


def layer_leaf_terms(layers: dict, used: dict, inputs: dict, output_grads: dict, params: PyTree,
                     trainable: PyTree | None, rows: int, views: int
                     ) -> dict[tuple[str, ...], LeafTerm]:
  """{leaf path: `LeafTerm`} of the `used` layers ({path: stack depth}, `layers.coverage`) from
  their sown inputs and their probes' gradients (trees as the forward pass gives them: under
  nn.scan each array carries the scanned axis in front), `rows` = m·views rows, example-major;
  each term merged over its example's views (`terms.merge_views`)."""
  trainable_flags = (jax.tree_util.tree_map(lambda _: True, params) if trainable is None
                     else trainable)
  terms = {}
  for path, depth in used.items():
    layer = layers[path]
    flags = pytrees.subtree(trainable_flags, path)
    flags = {name: bool(flags[name]) for name in layer.param_names}
    terms_of = lambda x, g, own: {
        name: merge_views(term, views)
        for name, term in layer_terms(layer, x, check_rows(layer, g, rows, views), flags,
                                      own).items()}
    found = (jax.vmap(terms_of) if depth else terms_of)(
        pytrees.subtree(inputs, path)["inputs"][0], pytrees.subtree(output_grads, path)["probe"],
        {name: pytrees.subtree(params, path)[name] for name in layer.shapes})
    terms.update({path + (name,): LeafTerm(layer.module, term, bool(depth))
                  for name, term in found.items()})
  return terms


def check_rows(layer: Layer, output_grads: jax.Array, rows: int, views: int) -> jax.Array:
  """output_grads, after checking that the layer's output has `rows` (m·views) rows: ghost reads
  its leading axis as the batch's examples (or their views, example-major)."""
  if output_grads.shape[0] != rows:
    raise GhostUnsupportedError(
        f"{'/'.join(layer.path) or type(layer.module).__name__}: its output has "
        f"{output_grads.shape[0]} rows for a microbatch that should give {rows} ({views} "
        "view(s) per example). Ghost clipping reads a layer's leading axis as the examples, so "
        "the model must keep the batch axis first in every supported layer and run on "
        "batch_losses' views, example-major (`ghost.clipped_grad_sum`'s views argument).")
  return output_grads


def per_example_terms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
                      trainable: PyTree | None = None, fallback: str = "vmap", views: int = 1
                      ) -> dict[tuple[str, ...], Term]:
  """{leaf path: `Term`} for every trainable leaf: what ghost clipping computes norms and the
  clipped sum from, after its one forward and one backward pass (to the layers' outputs only).
  Leaves of supported layers get factored terms (layer inputs and output gradients, or a module's
  `ghost_grads` term); leaves left to the fallback get per-example gradients. Under nn.scan a
  term's arrays carry the scanned axis in front. views: as for `leaf_terms`. Data-dependent: not
  to be released."""
  return {path: found.term for path, found in
          leaf_terms(batch_losses, params, batch, trainable, fallback, views).items()}


def _fallback_grads(batch_losses, params, batch, left) -> PyTree:
  """Per-example gradients [m, *shape] w.r.t. the `left` leaves (None elsewhere), by vmap(grad)."""
  mine, rest = pytrees.partition(params, left)

  def one(example):
    single = jax.tree_util.tree_map(lambda x: x[None], example)
    return jax.grad(lambda p: batch_losses(pytrees.merge(p, rest), single)[0])(mine)
  return jax.vmap(one)(batch)
