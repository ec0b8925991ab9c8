"""Ghost clipping: per-example gradient norms without per-example gradients (Li et al. 2022).

One microbatch of m examples costs two batched backward passes instead of m per-example ones:
  1. a forward pass through the model in which every supported layer's output gets a zero
     "probe" added; the gradient of Σᵢ ℓᵢ w.r.t. the probes is each example's output gradient gᵢ
     (rows do not interact: no BatchNorm), and each layer's input aᵢ is recorded. Each example's
     squared gradient norm is then summed layer by layer from (aᵢ, gᵢ):
       Dense / DenseGeneral / Conv (via its patches) kernel, with T positions (tokens, pixels):
         ‖Σₜ aₜ gₜᵀ‖² = Σₜ,ₛ (aₜ·aₛ)(gₜ·gₛ)   ("ghost norm", O(T²(d+p)))   or, when cheaper,
         the per-example gradient itself (O(T·d·p)): the mixed rule of fastDP, chosen per layer;
       biases ‖Σₜ gₜ‖²; LayerNorm / GroupNorm scale ‖Σₜ gₜ ⊙ x̂ₜ‖² and bias ‖Σₜ gₜ‖².
  2. the gradient of Σᵢ maskᵢ·wᵢ·ℓᵢ with wᵢ = the clip rule's factor for ‖∇ℓᵢ‖ (held constant):
     exactly Σᵢ clip(∇ℓᵢ), one batched backward pass.

Parameters no supported layer owns (a ViT's class token and position embedding, custom layers
such as weight-standardised convs, a layer called twice per example) fall back to per-example
gradients by `vmap(grad)` restricted to those parameters (fallback="vmap"), or raise
`GhostUnsupportedError` (fallback="error"). They are never silently left out of the norm: every
trainable leaf is accounted for by exactly one layer record or by the fallback (checked at trace
time), and supported layers are matched by exact type, so a subclass with extra behaviour is
treated as unsupported.

Privacy: the same per-example factors as the vmap path (flat, automatic and normalized clip
rules), computed from norms equal to the vmap ones up to float32 rounding (tests/ghost_test.py);
the sum's sensitivity is rule.sensitivity. Per-layer (group) clipping is not supported here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.privacy import clipping

PyTree = Any
BatchLosses = Callable[[PyTree, PyTree], jax.Array]  # (params, batch [m, ...]) -> losses [m]
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.LayerNorm, nn.GroupNorm)


class GhostUnsupportedError(ValueError):
  """Ghost clipping cannot compute the per-example norm of some parameters."""


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A supported layer call, as seen at trace time."""
  module: nn.Module  # an unbound clone (its attributes only)
  path: tuple[str, ...]
  param_names: frozenset


def _layer_param_names(module: nn.Module) -> set[str] | None:
  """The param names ghost computes for `module`, or None if this configuration is unsupported."""
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
  if isinstance(module, nn.LayerNorm) and (_axes(module.reduction_axes) != (-1,)
                                           or _axes(module.feature_axes) != (-1,)):
    return None
  if isinstance(module, nn.GroupNorm) and module.reduction_axes is not None:
    return None
  return ({"scale"} if module.use_scale else set()) | ({"bias"} if module.use_bias else set())


def _axes(axes) -> tuple[int, ...]:
  return (axes,) if isinstance(axes, int) else tuple(axes)


def _intercepting(batch_losses: BatchLosses, on_layer: Callable) -> BatchLosses:
  """batch_losses with on_layer(layer, inputs, outputs) -> outputs called at each supported
  layer call (exact type match)."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or type(module) not in SUPPORTED:
      return next_fun(*args, **kwargs)
    outputs = next_fun(*args, **kwargs)
    names = _layer_param_names(module)
    own = frozenset(module.variables.get("params", {}))
    layer = _Layer(module.clone(parent=None), tuple(module.path),
                   own if names is not None and own == names else frozenset())
    return on_layer(layer, args[0], outputs)

  def losses(params, batch):
    with nn.intercept_methods(interceptor):
      return batch_losses(params, batch)
  return losses


def _trace_layers(batch_losses: BatchLosses, params: PyTree, batch: PyTree):
  """[(layer, output ShapeDtypeStruct)] in call order, from an abstract forward pass."""
  seen = []

  def record(layer, inputs, outputs):
    seen.append((layer, jax.ShapeDtypeStruct(outputs.shape, outputs.dtype)))
    return outputs
  jax.eval_shape(_intercepting(batch_losses, record), params, batch)
  return seen


# ------------------------------------------------------------------------------------------------
# Per-example squared norms of one layer's parameter gradients from (inputs, output grads).


def _rows(x: jax.Array, features: int) -> jax.Array:
  """[m, ..., features] -> [m, T, features] in float32."""
  return x.reshape(x.shape[0], -1, features).astype(jnp.float32)


def _kernel_sq_norms(a: jax.Array, g: jax.Array) -> jax.Array:
  """‖Σₜ aₜ gₜᵀ‖² per example for a [m, T, d], g [m, T, p]: ghost or instantiated, by cost."""
  _, t, d = a.shape
  p = g.shape[-1]
  if t * t * (d + p) <= t * d * p:  # the ghost norm is cheaper
    gram_a = jnp.einsum("mtd,msd->mts", a, a)
    gram_g = jnp.einsum("mtp,msp->mts", g, g)
    return jnp.sum(gram_a * gram_g, axis=(1, 2))
  per_example = jnp.einsum("mtd,mtp->mdp", a, g)
  return jnp.sum(jnp.square(per_example), axis=(1, 2))


def _bias_sq_norms(g: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(jnp.sum(g, axis=1)), axis=-1)


def _conv_patches(module: nn.Conv, x: jax.Array) -> jax.Array:
  """The 2-D conv's input patches [m, H', W', C·kh·kw] (same windows as its outputs)."""
  pair = lambda v: (v or 1,) * 2 if isinstance(v or 1, int) else tuple(v)
  padding = module.padding
  if isinstance(padding, str):
    padding = padding.upper()
  elif isinstance(padding, int):
    padding = [(padding, padding)] * 2
  else:
    padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  return jax.lax.conv_general_dilated_patches(
      x.astype(jnp.float32), tuple(module.kernel_size), pair(module.strides), padding,
      lhs_dilation=pair(module.input_dilation), rhs_dilation=pair(module.kernel_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _normalized(module: nn.Module, x: jax.Array) -> jax.Array:
  """x̂: the norm layer's output with scale 1 and bias 0."""
  plain = module.clone(use_scale=False, use_bias=False, parent=None)
  return plain.apply({}, x).astype(jnp.float32)


def _layer_sq_norms(layer: _Layer, x: jax.Array, g: jax.Array, trainable: dict) -> jax.Array:
  """Σ over the layer's trainable params of their per-example squared gradient norms, [m]."""
  module, total = layer.module, jnp.zeros(g.shape[0], jnp.float32)
  g = g.astype(jnp.float32)
  if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
    features = g.shape[-1]
    gf = _rows(g, features)
    if trainable.get("scale"):
      total += jnp.sum(jnp.square(jnp.sum(gf * _rows(_normalized(module, x), features), 1)), -1)
    if trainable.get("bias"):
      total += _bias_sq_norms(gf)
    return total
  if isinstance(module, nn.Conv):
    a = _conv_patches(module, x)
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    gf = _rows(g, g.shape[-1])
  else:
    axes = _axes(module.axis) if isinstance(module, nn.DenseGeneral) else (-1,)
    contracted = len(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim - contracted, x.ndim)):
      raise GhostUnsupportedError(f"{'/'.join(layer.path)}: DenseGeneral over non-trailing axes.")
    d = math.prod(x.shape[x.ndim - contracted:])
    out_features = math.prod(g.shape[x.ndim - contracted:])
    a, gf = _rows(x, d), _rows(g, out_features)
  if trainable.get("kernel"):
    total += _kernel_sq_norms(a, gf)
  if trainable.get("bias"):
    total += _bias_sq_norms(gf)
  return total


# ------------------------------------------------------------------------------------------------


def _leaf_paths(tree: PyTree) -> list[tuple[str, ...]]:
  return [clipping.path_to_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _coverage(layers, params, trainable) -> tuple[list[int], PyTree]:
  """(indices of the layer calls whose norms ghost computes, bool pytree of the trainable leaves
  left to the fallback). A module called more than once per example goes to the fallback."""
  calls: dict[tuple[str, ...], int] = {}
  for layer, _ in layers:
    calls[layer.path] = calls.get(layer.path, 0) + 1
  used = [i for i, (layer, _) in enumerate(layers)
          if layer.param_names and calls[layer.path] == 1]
  covered = {layers[i][0].path + (name,) for i in used for name in layers[i][0].param_names}
  flags = jax.tree_util.tree_leaves(trainable) if trainable is not None else None
  paths = _leaf_paths(params)
  left = [(flags is None or bool(flags[k])) and path not in covered
          for k, path in enumerate(paths)]
  return used, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), left)


def ghost_sq_norms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
                   trainable: PyTree | None = None, fallback: str = "vmap") -> jax.Array:
  """Per-example squared L2 norms [m] of ∇ℓᵢ w.r.t. the trainable params, without per-example
  gradients of the supported layers.

  batch_losses(params, batch) -> [m] per-example losses of a batch; examples must not interact.
  """
  layers = _trace_layers(batch_losses, params, batch)
  used, left = _coverage(layers, params, trainable)
  if fallback == "error" and any(jax.tree_util.tree_leaves(left)):
    names = ["/".join(p) for p, keep in zip(_leaf_paths(params), jax.tree_util.tree_leaves(left))
             if keep]
    raise GhostUnsupportedError(
        f"Ghost clipping cannot compute per-example norms for {names}: no supported layer "
        f"({', '.join(t.__name__ for t in SUPPORTED)}) owns them alone. Use fallback='vmap' "
        "(per-example gradients for these parameters only) or perf.per_example_method='vmap'.")
  # Zeros built from the batch, so that under shard_map they vary across devices as the batch
  # does: the gradient w.r.t. a device-invariant probe would be summed over the devices.
  anchor = jnp.zeros_like(jax.tree_util.tree_leaves(batch)[0], jnp.float32).ravel()[:1].sum()
  probes = [jnp.zeros(shape.shape, jnp.float32) + anchor for _, shape in layers]
  trainable_flags = (jax.tree_util.tree_map(lambda _: True, params) if trainable is None
                     else trainable)

  def summed_loss(probes):
    inputs, k = [], iter(range(len(probes)))

    def add_probe(layer, x, y):
      i = next(k, None)
      if i is None or layer.path != layers[i][0].path:
        raise GhostUnsupportedError(
            "The loss called its layers differently from the traced forward pass (is the model "
            "wrapped in jax.checkpoint / remat?). Ghost clipping needs the plain batched loss.")
      inputs.append(x)
      return y + probes[i].astype(y.dtype)
    return jnp.sum(_intercepting(batch_losses, add_probe)(params, batch)), inputs

  output_grads, inputs = jax.grad(summed_loss, has_aux=True)(probes)
  if len(inputs) != len(layers):
    raise GhostUnsupportedError(
        f"The loss called {len(inputs)} supported layers but its traced forward pass called "
        f"{len(layers)} (is the model wrapped in jax.checkpoint / remat?). Ghost clipping needs "
        "the plain batched loss.")
  total = jnp.zeros(jax.tree_util.tree_leaves(batch)[0].shape[0], jnp.float32)
  for i in used:
    layer = layers[i][0]
    flags = _subtree(trainable_flags, layer.path)
    total += _layer_sq_norms(layer, inputs[i], output_grads[i],
                             {name: bool(flags[name]) for name in layer.param_names})
  if any(jax.tree_util.tree_leaves(left)):
    total += _fallback_sq_norms(batch_losses, params, batch, left)
  return total


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
  for name in path:
    tree = tree[name]
  return tree


def _fallback_sq_norms(batch_losses, params, batch, left) -> jax.Array:
  """Per-example squared norms of the gradients w.r.t. the `left` leaves, by vmap(grad)."""
  mine, rest = clipping.partition(params, left)

  def one(example):
    single = jax.tree_util.tree_map(lambda x: x[None], example)
    grad = jax.grad(lambda p: batch_losses(clipping.merge(p, rest), single)[0])(mine)
    return clipping.global_norm(grad) ** 2
  return jax.vmap(one)(batch)


def clipped_grad_sum(batch_losses: BatchLosses, params: PyTree, examples: PyTree,
                     mask: jax.Array, rule: clipping.ClipRule, *,
                     microbatch_size: int | None = None, trainable: PyTree | None = None,
                     fallback: str = "vmap") -> clipping.ClippedSum:
  """Σᵢ maskᵢ·clip(∇ℓᵢ) by ghost clipping; the same result as `clipping.clipped_grad_sum`.

  batch_losses(params, batch) -> [m] per-example losses; examples: leaves [n, ...]; mask [n];
  rule: a rule with a per-example factor (flat, automatic, normalized). See the module docstring.
  """
  clipping.reject_batch_stats(params)
  try:
    rule.factor(jnp.float32(1.0))
  except NotImplementedError as e:
    raise GhostUnsupportedError(
        f"Ghost clipping needs a clip rule that scales the whole gradient ({e}) — flat, "
        "automatic or normalized; use perf.per_example_method='vmap' for per-layer clipping.")
  if fallback not in ("vmap", "error"):
    raise ValueError(f"fallback must be 'vmap' or 'error', got {fallback!r}.")
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)
  train_p, frozen_p = clipping.partition(params, trainable)

  def clip_chunk(chunk):
    batch, chunk_mask = chunk
    norms = jnp.sqrt(ghost_sq_norms(batch_losses, params, batch, trainable, fallback))
    factors, was_clipped = rule.factor(norms)
    real = chunk_mask > 0
    weights = jax.lax.stop_gradient(jnp.where(real, factors, 0.0))

    def weighted(t):
      losses = batch_losses(clipping.merge(t, frozen_p), batch)
      return jnp.sum(jnp.where(real, weights * losses.astype(jnp.float32), 0.0))
    summed = jax.grad(weighted)(train_p)
    summed = jax.tree_util.tree_map(
        lambda g: None if g is None else g.astype(jnp.float32), summed,
        is_leaf=lambda x: x is None)
    return summed, clipping.microbatch_stats(norms, was_clipped, real)

  return clipping.sum_over_microbatches(clip_chunk, examples, mask, m, frozen_p, rule)
