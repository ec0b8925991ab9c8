"""Ghost clipping of a per-example loss that applies a Linen model: the ghost path of
`dpjax.privacy.grad.clipped_grad` (per_example_method='ghost').

`grad.clipped_grad` takes the loss of ONE example, e.g. `loss(params, x, y)` calling
`model.apply({'params': params}, x)`. Here that loss runs under vmap, one example at a time, with
Linen's method interceptor on (`nn.intercept_methods`): every call of a supported layer (exact
type in `layers.SUPPORTED`: nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm,
nn.GroupNorm) whose params are the differentiated arguments' own arrays (the same objects: no
cast or copy on the way to `model.apply`) is recorded: its input aᵢ kept, a zero probe added to
its output, whose gradient is the example's output gradient gᵢ. The layer's terms
(`layer_terms`) give its params' per-example gradients in factored form, and the clipped sum is
Linen ghost's (`clipped_sum.clipped_terms_sum`: norm bounds with rounding, one matmul per kernel).
The loss needs no `ghost.apply_model` plumbing, and no batched forward pass is formed: examples
stay apart by construction, as on the vmap path.

A layer's params are covered only if, on an abstract pass over one example, (1) the layer holds
exactly the params ghost computes and no other variables, (2) it is called once, with its input
alone, and not inside a transform within the loss (nn.scan, nn.remat, jax.checkpoint, lax.map:
such calls are traced apart, so they are not recorded), and (3) its params are read nowhere else:
during that pass the layer is computed from a separate copy of its params, and a loss that still
reads the originals (weight decay in the loss, `nn.Embed.attend`: tied weights) leaves the layer
to the fallback. Every other differentiated leaf gets per-example gradients by vmap(grad)
restricted to those leaves (`plan` names them).

Privacy: as `ghost.clipped_grad_sum`: each example's contribution has norm ≤ rule.sensitivity
(its factor from an upper bound on its norm, rounding included); padded rows and examples whose
terms are not finite add exactly zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import tracers

from dpjax import pytrees
from dpjax.privacy import clipping
from dpjax.privacy.ghost.clipped_sum import clipped_terms_sum
from dpjax.privacy.ghost.collect import LeafTerm
from dpjax.privacy.ghost.layer_terms import layer_terms
from dpjax.privacy.ghost.layers import SUPPORTED, GhostUnsupportedError, Layer, layer_param_names
from dpjax.privacy.ghost.terms import Summed, merge_views

PyTree = Any
Path = tuple[str, ...]
# loss(params, example) -> scalar, or (scalar, aux) with has_aux: ONE example, no batch axis.
ExampleLoss = Callable[[PyTree, PyTree], Any]


@dataclasses.dataclass(frozen=True)
class Covered:
  """A supported layer call: the layer unbound (its attributes only), its param names (sorted)
  and the leaf path of each in the differentiated arguments (`pytrees.leaf_paths`)."""
  twin: nn.Module
  names: tuple[str, ...]
  leaves: tuple[Path, ...]


def _leaf_ids(params: PyTree) -> dict[int, Path]:
  """{id(leaf): its path}: a layer's params are recognised as the arguments' own arrays."""
  return {id(leaf): path for path, leaf in zip(pytrees.leaf_paths(params),
                                               jax.tree_util.tree_leaves(params))}


class Recorder:
  """The interceptor of one example's loss. Planning (layers=None): finds the supported layer
  calls and computes each from `inside` ({leaf path: array}), a copy of its params. Otherwise
  records the `layers` ({key: Covered}) only, each output plus `probes[key]`. A layer's key is
  its leaves' paths."""

  def __init__(self, params: PyTree, inside: dict | None = None, probes: dict | None = None,
               layers: dict | None = None):
    self.leaf_of, self.inside, self.probes, self.layers = _leaf_ids(params), inside, probes, layers
    self.trace = tracers.current_trace()  # calls traced inside a transform differ from it
    self.found: dict = {}
    self.calls: dict = {}
    self.other_args: set = set()
    self.inputs: dict = {}
    self.outputs: dict = {}

  def covered(self, module: nn.Module) -> Covered | None:
    """The call's `Covered`, if it is a supported layer holding only the arguments' own params."""
    if type(module) not in SUPPORTED or set(module.variables) != {"params"}:
      return None
    own, names = module.variables["params"], layer_param_names(module)
    if names is None or set(own) != names:
      return None
    names = tuple(sorted(names))
    leaves = tuple(self.leaf_of.get(id(own[name])) for name in names)
    if any(leaf is None or leaf[-1] != name for leaf, name in zip(leaves, names)):
      return None
    return Covered(module.clone(parent=None), names, leaves)

  def __call__(self, next_fun, args, kwargs, context):
    layer = None
    if context.method_name == "__call__" and tracers.current_trace() == self.trace:
      layer = self.covered(context.module)
    if layer is None or (self.layers is not None and layer.leaves not in self.layers):
      return next_fun(*args, **kwargs)
    key = layer.leaves
    self.found.setdefault(key, layer)
    self.calls[key] = self.calls.get(key, 0) + 1
    if len(args) != 1 or kwargs:
      self.other_args.add(key)
      return next_fun(*args, **kwargs)
    if self.inside is None:
      out = next_fun(*args)
    else:
      own = {name: self.inside[leaf] for name, leaf in zip(layer.names, layer.leaves)}
      out = layer.twin.apply({"params": own}, args[0])
    self.inputs[key], self.outputs[key] = args[0], out
    return out if self.probes is None else out + self.probes[key]


def recorded(loss: ExampleLoss, params: PyTree, example: PyTree, recorder: Recorder) -> Any:
  with nn.intercept_methods(recorder):
    return loss(params, example)


def plan(loss: ExampleLoss, params: PyTree, example: PyTree) -> tuple[dict, list[Path]]:
  """({key: Covered} of the layer calls ghost covers, [leaf paths left to the fallback]), from an
  abstract pass of loss(params, example) on one example (no example axis)."""
  paths, leaves = pytrees.leaf_paths(params), jax.tree_util.tree_leaves(params)
  treedef = jax.tree_util.tree_structure(params)
  recorders = []

  def probe(inside, outside, example):
    outside = jax.tree_util.tree_unflatten(treedef, outside)
    recorders.append(Recorder(outside, inside=dict(zip(paths, inside))))
    return recorded(loss, outside, example, recorders[-1])

  jaxpr = jax.make_jaxpr(probe)(leaves, leaves, example).jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  read = {path for path, var in zip(paths, jaxpr.invars[len(leaves):2 * len(leaves)])
          if id(var) in used}
  recorder = recorders[0]
  covered = {key: layer for key, layer in recorder.found.items()
             if recorder.calls[key] == 1 and key not in recorder.other_args
             and not read & set(key) and readable(layer.twin, recorder.inputs[key])}
  done = {leaf for key in covered for leaf in key}
  return covered, [path for path in paths if path not in done]


def as_example_rows(twin: nn.Module, x: jax.Array, g: jax.Array
                    ) -> tuple[jax.Array, jax.Array, int]:
  """(x, g, rows): a layer's inputs x [m, ...] and output gradients g [m, ...] as the twin reads
  them, with `rows` rows per example (example-major, merged by `terms.merge_views`). A conv's
  leading axes within one example (a batch axis, or none: one row) and a GroupNorm's first axis
  are rows, as those layers treat them as examples; a dense, embedding or LayerNorm term reads
  all leading axes as positions, so an example is one row."""
  m = x.shape[0]
  if isinstance(twin, nn.Conv):
    spatial = len(twin.kernel_size) + 1  # H, W, C
    if x.ndim == spatial + 1:  # an unbatched call
      x, g = x[:, None], g[:, None]
    rows = math.prod(x.shape[1:x.ndim - spatial])
    return (x.reshape((m * rows,) + x.shape[x.ndim - spatial:]),
            g.reshape((m * rows,) + g.shape[g.ndim - spatial:]), rows)
  if isinstance(twin, nn.GroupNorm):
    rows = x.shape[1]
    return x.reshape((m * rows,) + x.shape[2:]), g.reshape((m * rows,) + g.shape[2:]), rows
  return x, g, 1


def readable(twin: nn.Module, x: jax.Array) -> bool:
  """Whether `as_example_rows` reads this per-example input (no example axis) as the layer does:
  a conv's input has its spatial and feature axes, a GroupNorm's a batch axis too."""
  if isinstance(twin, nn.Conv):
    return x.ndim >= len(twin.kernel_size) + 1
  if isinstance(twin, nn.GroupNorm):
    return x.ndim >= 2
  return True


def _value(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  return out if has_aux else (out, None)


def leaf_terms(loss: ExampleLoss, params: PyTree, batch: PyTree, covered: dict, left: list,
               has_aux: bool) -> tuple[dict[Path, LeafTerm], Any]:
  """({leaf path: LeafTerm}, each row's aux or None) of one microbatch (leaves [m, ...]): the
  covered layers' terms from one vmapped forward and backward pass to the probes, per-example
  gradients (`Summed` [m, size]) for the `left` leaves."""
  one = jax.tree_util.tree_map(lambda x: x[0], batch)

  def outputs(example):
    recorder = Recorder(params, layers=covered)
    recorded(loss, params, example, recorder)
    return recorder.outputs

  def example(probes, row):
    recorder = Recorder(params, probes=probes, layers=covered)
    value, aux = _value(recorded(loss, params, row, recorder), has_aux)
    return value, (recorder.inputs, aux)

  m = jax.tree_util.tree_leaves(batch)[0].shape[0]
  probes = {key: jnp.zeros((m,) + s.shape, s.dtype)
            for key, s in jax.eval_shape(outputs, one).items()}
  grads, (inputs, aux) = jax.vmap(jax.grad(example, has_aux=True))(probes, batch)
  leaf_of = dict(zip(pytrees.leaf_paths(params), jax.tree_util.tree_leaves(params)))
  terms = {}
  for key, layer in covered.items():
    x, g, rows = as_example_rows(layer.twin, inputs[key], grads[key])
    found = layer_terms(Layer(layer.twin, (), layer.names, {}), x, g,
                        {name: True for name in layer.names},
                        {name: leaf_of[leaf] for name, leaf in zip(layer.names, layer.leaves)})
    terms.update({leaf: LeafTerm(layer.twin, merge_views(found[name], rows), False)
                  for name, leaf in zip(layer.names, layer.leaves)})
  if left:
    def fallback(row):
      def loss_of(values):
        full = jax.tree_util.tree_map_with_path(
            lambda path, x: values.get(pytrees.path_to_names(path), x), params)
        return _value(loss(full, row), has_aux)[0]
      return jax.grad(loss_of)({path: leaf_of[path] for path in left})
    for path, g in jax.vmap(fallback)(batch).items():
      terms[path] = LeafTerm(None, Summed(g.reshape(m, -1).astype(jnp.float32)), False)
  return terms, aux


def no_layer_error(left: list[Path]) -> GhostUnsupportedError:
  return GhostUnsupportedError(
      f"per_example_method='ghost' found no Linen layer it can read in loss_fn: all of "
      f"{['/'.join(p) for p in left]} would fall back to per-example gradients. Ghost clipping "
      f"reads calls of {', '.join(t.__name__ for t in SUPPORTED)} (exact types) made by "
      "`model.apply({'params': params}, ...)` inside loss_fn, with the differentiated params "
      "passed unchanged (no cast, copy or tree_map on the way), once per example and outside "
      "nn.scan / nn.remat / jax.checkpoint. For a Flax NNX model use "
      "dpjax.privacy.nnx.clipped_grad_sum(loss_fn, model, batch, mask, rule, method='ghost'); "
      "for any other loss use per_example_method='vmap'.")


def clipped_grad_sum(loss: ExampleLoss, params: PyTree, examples: PyTree, mask: jax.Array,
                     rule: clipping.ClipRule, *, microbatch_size: int | None = None,
                     has_aux: bool = False) -> clipping.ClippedSum | tuple:
  """Σᵢ maskᵢ·clip(∇ℓᵢ) by ghost clipping of the Linen layers loss(params, example) calls; the
  result of `clipping.clipped_grad_sum(loss, params, examples, mask, rule, ...)` up to the
  rounding bounds of `ghost.clipped_grad_sum` (float32, the same `ClippedSum` and, with has_aux,
  each row's aux [n, ...]). examples: leaves [n, ...]; mask [n]; n a multiple of microbatch_size.

  Raises GhostUnsupportedError if no layer call is covered (see the module docstring): then ghost
  would only add a pass to the vmap path.
  """
  clipping.reject_batch_stats(params)
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)
  covered, left = plan(loss, params, jax.tree_util.tree_map(lambda x: x[0], examples))
  if not covered:
    raise no_layer_error(left)
  groups = dict(zip(pytrees.leaf_paths(params), jax.tree_util.tree_leaves(rule.groups(params))))

  def clip_chunk(chunk):
    batch, chunk_mask = chunk
    terms, aux = leaf_terms(loss, params, batch, covered, left, has_aux)
    summed, stats = clipped_terms_sum(terms, rule, groups, params, chunk_mask)
    return (summed, stats, aux) if has_aux else (summed, stats)

  frozen = jax.tree_util.tree_map(lambda _: None, params)
  return clipping.sum_over_microbatches(clip_chunk, examples, mask, m, frozen, rule, has_aux)
