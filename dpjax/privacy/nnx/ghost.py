"""Ghost clipping for NNX models: the factored terms of `dpjax.privacy.ghost`, read from NNX layer
calls.

The per-example loss runs under vmap, one example per copy of the model (`model.Split`), and
every call of a supported layer (exact type: nnx.Linear, nnx.Conv, nnx.Embed, nnx.LayerNorm,
nnx.GroupNorm) is recorded on the copy: its input aᵢ kept, a zero probe added to its output, whose
gradient is the example's output gradient gᵢ. Each such layer has a Linen twin (`linen_twin`:
nn.Dense, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm with the same settings, computing the
same function of the same params), and the twin's terms (`ghost.layer_terms`) give the
per-example gradients of the layer's params in factored form; the clipped sum is then Linen
ghost's (`ghost.clipped_sum.clipped_terms_sum`: norm bounds with rounding, one matmul per
kernel). A layer's leading axes within one example (a loss that calls the model on x[None], a
conv's or GroupNorm's batch axis) are that example's rows, merged into one term
(`terms.merge_views`: exact).

A layer's params are covered only if, on an abstract pass, (1) its type and settings have a twin,
(2) it is called once per example, with its input alone (no mask, no other argument), and (3) its
params are read nowhere else: outside the layer's own call the copy holds them as a separate
input, and a loss whose computation reads that input (weight decay written in the loss, a tied
embedding's `attend`, a weight shared with another layer) leaves the layer to the fallback.
Every other trainable leaf gets per-example gradients by vmap(grad) restricted to those leaves
(fallback="vmap"; `ghost_plan` says which) or raises NnxGhostUnsupportedError (fallback="error").
Running each example on its own copy keeps examples apart by construction (BatchNorm is refused
before: `model.reject_batch_norm`).

Privacy: as `dpjax.privacy.ghost.clipped_grad_sum`: each example's contribution has norm ≤
rule.sensitivity (its factor from an upper bound on its norm, rounding included); padded rows
and examples whose terms are not finite add exactly zero.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from dpjax import pytrees
from dpjax.privacy import clipping
from dpjax.privacy.ghost.clipped_sum import clipped_terms_sum
from dpjax.privacy.ghost.collect import LeafTerm
from dpjax.privacy.ghost.example_calls import as_example_rows, readable
from dpjax.privacy.ghost.layer_terms import layer_terms
from dpjax.privacy.ghost.layers import Layer, layer_param_names
from dpjax.privacy.ghost.terms import Summed, merge_views
from dpjax.privacy.nnx.model import Split, joined, placeholder_keys

PyTree = Any
SUPPORTED = (nnx.Linear, nnx.Conv, nnx.Embed, nnx.LayerNorm, nnx.GroupNorm)


class NnxGhostUnsupportedError(ValueError):
  """Ghost clipping cannot compute the per-example norms of some of an NNX model's params."""


def _default(cls: type, name: str) -> Any:
  return inspect.signature(cls.__init__).parameters[name].default


def _plain(layer: nnx.Module, names: tuple[str, ...]) -> bool:
  """Whether the layer's function-valued settings (dot_general, promote_dtype, ...) are NNX's
  defaults: the twin computes the default ones."""
  return all(getattr(layer, name) is _default(type(layer), name) for name in names)


def linen_twin(layer: nnx.Module) -> nn.Module | None:
  """The Linen layer computing the same function of the same params as `layer` (exact type in
  SUPPORTED, default function settings), or None."""
  kind = type(layer)
  if getattr(layer, "axis_name", None) is not None:  # statistics across devices: not per example
    return None
  if kind is nnx.Linear and _plain(layer, ("dot_general", "promote_dtype")):
    return nn.Dense(layer.out_features, use_bias=layer.use_bias, dtype=layer.dtype)
  if kind is nnx.Conv and _plain(layer, ("conv_general_dilated", "promote_dtype")):
    return nn.Conv(layer.out_features, tuple(layer.kernel_size), strides=layer.strides,
                   padding=layer.padding, input_dilation=layer.input_dilation,
                   kernel_dilation=layer.kernel_dilation,
                   feature_group_count=layer.feature_group_count, use_bias=layer.use_bias,
                   mask=layer.mask, dtype=layer.dtype)
  # Linen broadcasts a one-row table whatever the index; NNX's jnp.take does not.
  if kind is nnx.Embed and layer.num_embeddings > 1 and _plain(layer, ("promote_dtype",)):
    return nn.Embed(layer.num_embeddings, layer.features, dtype=layer.dtype)
  if kind is nnx.LayerNorm and _plain(layer, ("promote_dtype",)):
    return nn.LayerNorm(epsilon=layer.epsilon, use_bias=layer.use_bias, use_scale=layer.use_scale,
                        reduction_axes=layer.reduction_axes, feature_axes=layer.feature_axes,
                        use_fast_variance=layer.use_fast_variance, dtype=layer.dtype)
  if kind is nnx.GroupNorm and _plain(layer, ("promote_dtype",)):
    return nn.GroupNorm(num_groups=layer.num_groups, epsilon=layer.epsilon,
                        use_bias=layer.use_bias, use_scale=layer.use_scale,
                        reduction_axes=layer.reduction_axes,
                        use_fast_variance=layer.use_fast_variance, dtype=layer.dtype)
  return None


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A supported layer of the model: its graph path, its twin, its params' leaf paths."""
  path: tuple[str, ...]
  twin: nn.Module
  names: tuple[str, ...]


def candidates(model: nnx.Module, leaf_paths: list[tuple[str, ...]]) -> dict:
  """{layer path: Candidate} of the supported layers whose params are all state leaves (a param
  shared with another node lives at one path only: such a layer is not a candidate)."""
  leaves, found = set(leaf_paths), {}
  for path, node in nnx.iter_graph(model):
    if type(node) not in SUPPORTED:
      continue
    twin = linen_twin(node)
    names = layer_param_names(twin) if twin is not None else None
    path = tuple(map(str, path))
    if names and all(path + (name,) in leaves for name in names):
      found[path] = Candidate(path, twin, tuple(sorted(names)))
  return found


class Recorder:
  """Records the calls of the covered layers of one model copy (one example).

  During a layer's call its params hold `inside` values ({leaf path: array}; None: as merged), and
  its output gets `probes[path]` added (when given)."""

  def __init__(self, layers: dict, inside: dict | None, probes: dict | None):
    self.layers, self.inside, self.probes = layers, inside, probes
    self.calls: dict = {path: 0 for path in layers}
    self.other_args: set = set()
    self.inputs: dict = {}
    self.outputs: dict = {}

  def call(self, path, module, original: Callable, x, args, kwargs):
    self.calls[path] += 1
    if args or kwargs:
      self.other_args.add(path)
    if self.inside is None:
      out = original(module, x, *args, **kwargs)
    else:
      variables = {name: getattr(module, name) for name in self.layers[path].names}
      outside = {name: var[...] for name, var in variables.items()}
      for name, var in variables.items():
        var[...] = self.inside[path + (name,)]
      out = original(module, x, *args, **kwargs)
      for name, var in variables.items():
        var[...] = outside[name]
    self.inputs[path], self.outputs[path] = x, out
    if self.probes is not None and path in self.probes:
      out = out + self.probes[path]
    return out


_ACTIVE: dict[int, tuple[Recorder, tuple]] = {}  # id(layer copy) -> (its recorder, its path)
_PROBED: dict[type, type] = {}


def _probed_class(cls: type) -> type:
  """A subclass of `cls` whose __call__ goes through its copy's Recorder."""
  if cls not in _PROBED:
    def __call__(self, x, *args, **kwargs):
      if id(self) not in _ACTIVE:  # a copy made inside the loss (an nnx transform's): its call
        return cls.__call__(self, x, *args, **kwargs)  # is not recorded, its params fall back
      recorder, path = _ACTIVE[id(self)]
      return recorder.call(path, self, cls.__call__, x, args, kwargs)
    _PROBED[cls] = type(f"Probed{cls.__name__}", (cls,), {"__call__": __call__})
  return _PROBED[cls]


def recorded_loss(loss_fn: Callable, copy: nnx.Module, example: PyTree,
                  recorder: Recorder) -> jax.Array:
  """loss_fn(copy, example) with the recorder's layers recorded (their class swapped on the
  copy, which lives only inside this trace)."""
  nodes = {tuple(map(str, path)): node for path, node in nnx.iter_graph(copy)}
  try:
    for path in recorder.layers:
      node = nodes[path]
      object.__setattr__(node, "__class__", _probed_class(type(node)))
      _ACTIVE[id(node)] = (recorder, path)
    return loss_fn(copy, example)
  finally:
    for path in recorder.layers:
      _ACTIVE.pop(id(nodes[path]), None)


def ghost_plan(loss_fn: Callable, model: nnx.Module, examples: PyTree, wrt: Any = nnx.Param
               ) -> tuple[dict, list[tuple[str, ...]]]:
  """({layer path: Candidate} whose params ghost clipping covers, [paths of the `wrt` leaves left
  to the fallback]): what `clipped_grad_sum(..., method='ghost')` does for this loss, model and
  batch (examples: leaves [n, ...]; only shapes are read, the model is not changed)."""
  one = jax.tree_util.tree_map(lambda x: x[0], examples)
  return plan(loss_fn, Split(model, wrt), one, placeholder_keys(model))


def plan(loss_fn: Callable, split: Split, example: PyTree, keys: dict
         ) -> tuple[dict, list[tuple[str, ...]]]:
  """({layer path: Candidate} covered by ghost terms, [leaf paths left to the fallback]), from
  an abstract pass on one example (`example`, `keys`: one row, no example axis)."""
  paths = pytrees.leaf_paths(split.pure_params)
  layers = candidates(nnx.merge(split.graphdef, split.pure_params, split.pure_rest), paths)
  owned = sorted(path + (n,) for path, layer in layers.items() for n in layer.names)
  leaf_of = split.leaf_arrays()
  recorders = []

  def probe(inside, outside):
    params = _with_leaves(split.pure_params, {**leaf_of, **outside})
    recorder = Recorder(layers, inside, None)
    recorders.append(recorder)
    return recorded_loss(loss_fn, split.copy(params, keys), example, recorder)

  owned_values = {p: leaf_of[p] for p in owned}
  jaxpr = jax.make_jaxpr(probe)(owned_values, owned_values).jaxpr
  outside_vars = jaxpr.invars[len(owned):]
  read = set()
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  for path, var in zip(owned, outside_vars):  # dict pytrees flatten in sorted key order
    if id(var) in used:
      read.add(path[:-1])
  recorder = recorders[0]
  covered = {path: layer for path, layer in layers.items()
             if recorder.calls[path] == 1 and path not in recorder.other_args
             and path not in read and readable(layer.twin, recorder.inputs[path])}
  done = {path + (n,) for path, layer in covered.items() for n in layer.names}
  left = [p for p in paths if p not in done]
  return covered, left


def _with_leaves(tree: PyTree, values: dict) -> PyTree:
  """`tree` with each leaf replaced by values[its path]."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: values[pytrees.path_to_names(path)], tree)


def leaf_terms(loss_fn: Callable, split: Split, batch: PyTree, keys: dict, covered: dict,
               left: list) -> dict[tuple[str, ...], LeafTerm]:
  """{leaf path: LeafTerm} of one microbatch [m]: the covered layers' twin terms (a vmapped
  forward and backward pass to the probes), per-example gradients (`Summed`) for `left`."""
  one = jax.tree_util.tree_map(lambda x: x[0], (batch, keys))
  shapes = jax.eval_shape(lambda b, k: _outputs(loss_fn, split, b, k, covered), *one)

  def example(probes, packed):
    recorder = Recorder(covered, None, probes)
    loss = recorded_loss(loss_fn, split.copy(split.pure_params, packed[1]), packed[0], recorder)
    return loss, recorder.inputs

  m = jax.tree_util.tree_leaves(batch)[0].shape[0]
  probes = {path: jnp.zeros((m,) + s.shape, s.dtype) for path, s in shapes.items()}
  grads, inputs = jax.vmap(jax.grad(example, has_aux=True))(probes, (batch, keys))
  leaf_of = split.leaf_arrays()
  terms = {}
  for path, layer in covered.items():
    x, g, rows = as_example_rows(layer.twin, inputs[path], grads[path])
    wanted = {n: True for n in layer.names}
    found = layer_terms(Layer(layer.twin, path, layer.names, {}), x, g, wanted,
                        {n: leaf_of[path + (n,)] for n in layer.names})
    terms.update({path + (n,): LeafTerm(layer.twin, merge_views(t, rows), False)
                  for n, t in found.items()})
  if left:
    terms.update(_fallback_terms(loss_fn, split, batch, keys, left))
  return terms


def _outputs(loss_fn, split, example, keys, covered) -> dict:
  """{layer path: its output} of one example (for the probes' shapes)."""
  recorder = Recorder(covered, None, None)
  recorded_loss(loss_fn, split.copy(split.pure_params, keys), example, recorder)
  return recorder.outputs


def _fallback_terms(loss_fn, split, batch, keys, left) -> dict:
  """{leaf path: LeafTerm(None, Summed [m, size])}: per-example gradients of the `left` leaves
  by vmap(grad), the other params held fixed."""
  leaf_of = split.leaf_arrays()
  mine = {p: leaf_of[p] for p in left}

  def one(example, example_keys):
    def loss(values):
      params = _with_leaves(split.pure_params, {**leaf_of, **values})
      return loss_fn(split.copy(params, example_keys), example)
    return jax.grad(loss)(mine)
  grads = jax.vmap(one)(batch, keys)
  return {p: LeafTerm(None, Summed(g.reshape(g.shape[0], -1).astype(jnp.float32)), False)
          for p, g in grads.items()}


def clipped_grad_sum(loss_fn: Callable, split: Split, examples: PyTree, keys: dict,
                     mask: jax.Array, rule: clipping.ClipRule, microbatch_size: int | None,
                     fallback: str) -> clipping.ClippedSum:
  """The ghost path of `dpjax.privacy.nnx.clipped_grad_sum` (see there and the module
  docstring); grad_sum is a pure state (arrays)."""
  if fallback not in ("vmap", "error"):
    raise ValueError(f"fallback must be 'vmap' or 'error', got {fallback!r}.")
  one = jax.tree_util.tree_map(lambda x: x[0], (examples, keys))
  covered, left = plan(loss_fn, split, *one)
  if left and fallback == "error":
    raise NnxGhostUnsupportedError(
        f"Ghost clipping cannot compute per-example norms for {[joined(p) for p in left]}: no "
        f"supported layer ({', '.join(t.__name__ for t in SUPPORTED)}, exact type, default "
        "dot_general/promote_dtype) owns them, called once per example with its input alone and "
        "its params read nowhere else. Use fallback='vmap' (per-example gradients for these "
        "parameters only) or method='vmap'.")
  train_p = split.pure_params
  groups = dict(zip(pytrees.leaf_paths(train_p), jax.tree_util.tree_leaves(rule.groups(train_p))))
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)

  def clip_chunk(chunk):
    (batch, batch_keys), chunk_mask = chunk
    terms = leaf_terms(loss_fn, split, batch, batch_keys, covered, left)
    return clipped_terms_sum(terms, rule, groups, train_p, chunk_mask)

  frozen = jax.tree_util.tree_map(lambda _: None, train_p)
  return clipping.sum_over_microbatches(clip_chunk, (examples, keys), mask, m, frozen, rule)
