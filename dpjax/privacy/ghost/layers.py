"""Which layer calls ghost clipping reads, and how: probes on their outputs, their inputs sown.

A forward pass under `nn.intercept_methods` adds a zero probe (a flax variable of collection
PROBES) to the output of every supported layer call (exact type, or a module class that defines
`ghost_grads`) and sows its input into collection INPUTS; the gradient of Σᵢ ℓᵢ w.r.t. the probes
is each example's output gradient. Being flax variables, both follow `nn.scan` (stacked along the
scanned axis) and `jax.checkpoint`. `coverage` decides which trainable leaves these layer records
account for; the others go to the fallback (`collect`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax import pytrees

PyTree = Any
# batch_losses(params, batch [m, ...]) -> losses [m]; batch_losses(params, batch, ghost_variables)
# -> (losses [m], mutated variables): the model applied to {"params": params, **ghost_variables}
# with mutable=COLLECTIONS (`apply_model` does that part).
BatchLosses = Callable[..., Any]
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm)
PROBES = "ghost_probes"  # zeros added to each supported layer's output: their gradient is gᵢ
INPUTS = "ghost_inputs"  # each supported layer's input aᵢ, sown
COLLECTIONS = (PROBES, INPUTS)


def apply_model(model: nn.Module, params: PyTree, inputs: Any,
                ghost_variables: dict | None = None) -> Any:
  """model.apply for a BatchLosses: outputs, or (outputs, mutated variables) when ghost clipping
  passes its `ghost_variables` (a module scanned with nn.scan must stack every collection along
  its axis: `variable_axes={True: 0}`, as dpjax's ViT does)."""
  if ghost_variables is None:
    return model.apply({"params": params}, inputs)
  return model.apply({"params": params, **ghost_variables}, inputs, mutable=list(COLLECTIONS))


class GhostUnsupportedError(ValueError):
  """Ghost clipping cannot compute the per-example norm of some parameters."""


@dataclasses.dataclass(frozen=True)
class Layer:
  """A supported layer call, as seen at trace time."""
  module: nn.Module  # an unbound clone (its attributes only)
  path: tuple[str, ...]
  # The params ghost computes, in the module's order: the order of a layer's terms, hence of
  # the sums over them (a set's order would vary with the process's string-hash seed).
  param_names: tuple[str, ...]
  shapes: dict  # {param name: its shape in one call} (under nn.scan: one slice of the stack)


def is_supported(module_type: type) -> bool:
  """A supported flax layer (exact type), or a module class that defines `ghost_grads` itself."""
  return module_type in SUPPORTED or "ghost_grads" in vars(module_type)


def layer_param_names(module: nn.Module) -> set[str] | None:
  """The param names ghost computes for `module`, or None if this configuration is unsupported."""
  if "ghost_grads" in vars(type(module)):
    return set(module.variables.get("params", {}))
  if isinstance(module, nn.Embed):
    return {"embedding"}
  if isinstance(module, nn.Conv):
    if (len(module.kernel_size) != 2 or module.feature_group_count != 1
        or module.mask is not None or (isinstance(module.padding, str)
                                       and module.padding.upper() not in ("SAME", "VALID"))):
      return None
    return {"kernel", "bias"} if module.use_bias else {"kernel"}
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    if isinstance(module, nn.DenseGeneral) and module.batch_dims:
      return None
    return {"kernel", "bias"} if module.use_bias else {"kernel"}
  if isinstance(module, nn.LayerNorm) and (axes_of(module.reduction_axes) != (-1,)
                                           or axes_of(module.feature_axes) != (-1,)):
    return None
  if isinstance(module, nn.GroupNorm) and module.reduction_axes is not None:
    return None
  return ({"scale"} if module.use_scale else set()) | ({"bias"} if module.use_bias else set())


def axes_of(axes) -> tuple[int, ...]:
  """A module's axes attribute (an int or a sequence) as a tuple."""
  return (axes,) if isinstance(axes, int) else tuple(axes)


def intercepting(batch_losses: BatchLosses, layers: dict) -> Callable:
  """(params, batch, probes) -> (losses [m], {path: (inputs, ...) per call}): batch_losses with
  every supported layer call (exact type match) recorded in `layers` (path -> Layer, first call),
  its input sown into COLLECTIONS' INPUTS and a probe (PROBES, zeros if absent) added to its
  output. Inside `nn.scan` both collections stack along the scanned axis."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not is_supported(type(module)):
      return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      if context.method_name != "setup" and not context.method_name.startswith("_"):
        # Another method reads the layer's params (nn.Embed.attend: tied weights): its gradient
        # is not in the call's factored term, so the layer's params go to the fallback.
        layers[tuple(module.path)] = Layer(module.clone(parent=None), tuple(module.path), (),
                                           {})
      return next_fun(*args, **kwargs)
    outputs = next_fun(*args, **kwargs)
    own = module.variables.get("params", {})
    if tuple(module.path) not in layers:
      names = layer_param_names(module)
      layers[tuple(module.path)] = Layer(
          module.clone(parent=None), tuple(module.path),
          tuple(own) if names is not None and set(own) == names else (),
          {name: tuple(jnp.shape(value)) for name, value in own.items()})
    module.sow(INPUTS, "inputs", args[0] if args else kwargs["inputs"])
    return module.perturb("probe", outputs, collection=PROBES)

  def losses(params, batch, probes):
    with nn.intercept_methods(interceptor):
      found = batch_losses(params, batch, {} if probes is None else {PROBES: probes})
    if layers and not (isinstance(found, tuple) and len(found) == 2 and INPUTS in found[1]):
      raise GhostUnsupportedError(
          "batch_losses(params, batch, ghost_variables) must apply the model to "
          "{'params': params, **ghost_variables} with mutable=ghost.COLLECTIONS and return "
          "(losses, mutated variables) (see `ghost.apply_model`); it returned no sown layer "
          "inputs.")
    return found[0], {name: found[1].get(name, {}) for name in COLLECTIONS}
  return losses


def layer_calls(batch_losses: BatchLosses, params: PyTree, batch: PyTree):
  """({path: Layer}, {path: probe ShapeDtypeStruct}, {path: number of calls}), from an abstract
  forward pass. Under nn.scan the probe shapes carry the scanned axis in front."""
  layers: dict = {}
  _, mutated = jax.eval_shape(intercepting(batch_losses, layers), params, batch, None)
  flat = lambda tree, leaf: {path[:-1]: value for path, value in _flat_paths(tree, leaf).items()}
  probes = flat(mutated[PROBES], "probe")
  calls = {path: len(value) for path, value in flat(mutated[INPUTS], "inputs").items()}
  return layers, probes, calls


def _flat_paths(tree: dict, leaf: str) -> dict:
  """{(module path..., leaf): value} of a nested variables dict, stopping at `leaf`."""
  found = {}
  for name, value in tree.items():
    if name == leaf:
      found[(leaf,)] = value
    elif isinstance(value, dict):
      found.update({(name,) + path: v for path, v in _flat_paths(value, leaf).items()})
  return found


def _stack_depth(layer: Layer, params: PyTree) -> int | None:
  """How many leading axes the layer's params carry beyond one call's shapes (0, or 1 under
  nn.scan), or None if they do not match."""
  leaves = pytrees.subtree(params, layer.path)
  extra = {len(jnp.shape(leaves[name])) - len(shape) for name, shape in layer.shapes.items()}
  if len(extra) != 1 or not extra <= {0, 1}:
    return None
  depth = extra.pop()
  if any(tuple(jnp.shape(leaves[name]))[depth:] != shape for name, shape in layer.shapes.items()):
    return None
  return depth


def coverage(layers: dict, calls: dict, params, trainable) -> tuple[dict, PyTree]:
  """({path: stack depth} of the layers whose norms ghost computes, bool pytree of the trainable
  leaves left to the fallback). A module called more than once per example goes to the fallback,
  as do params whose shapes ghost cannot read (a scan over more than one axis)."""
  used = {}
  for path, layer in layers.items():
    depth = _stack_depth(layer, params) if layer.param_names else None
    if depth is not None and calls.get(path) == 1:
      used[path] = depth
  covered = {path + (name,) for path in used for name in layers[path].param_names}
  flags = jax.tree_util.tree_leaves(trainable) if trainable is not None else None
  left = [(flags is None or bool(flags[k])) and path not in covered
          for k, path in enumerate(pytrees.leaf_paths(params))]
  return used, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), left)
