"""Each supported layer's terms: its params' per-example gradients from its inputs and output
gradients, as factored terms (`terms`), and their weighted sums back in the params' shapes.

  Dense / DenseGeneral / Conv (via its patches, `patches`) kernel: `Outer` of the inputs (or
    patches) and output gradients over the T positions (tokens, pixels); bias: `Summed` Σₜ gₜ;
  Embed table: `Lookup` of the rows `jnp.take` reads;
  LayerNorm / GroupNorm scale Σₜ gₜ ⊙ x̂ₜ and bias Σₜ gₜ: `Summed`;
  a module that defines `ghost_grads`: what it returns (per-example gradients, or a `Term`).
Element masks (sparse fine-tuning) instantiate a term (`masked`): they break its factored form;
masks of whole output rows (`rows=True`: SPARTA's and its baselines') keep it.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.privacy.ghost.layers import GhostUnsupportedError, Layer, axes_of
from dpjax.privacy.ghost.patches import channels_first, module_patches
from dpjax.privacy.ghost.terms import Lookup, Outer, Summed, Term, as_rows, is_term


def lookup_term(module: nn.Embed, indices: jax.Array, g: jax.Array) -> Lookup:
  """The embedding's term, with the rows `jnp.take` reads: negative indices wrap, out-of-range
  ones read no row (no gradient), and a one-row table is broadcast whatever the index."""
  rows = module.num_embeddings
  idx = indices.reshape(indices.shape[0], -1)
  idx = jnp.zeros_like(idx) if rows == 1 else jnp.where(idx < 0, idx + rows, idx)
  g = as_rows(g, g.shape[-1])
  g = jnp.where(((idx >= 0) & (idx < rows))[:, :, None], g, jnp.zeros((), g.dtype))
  return Lookup(idx, g, rows)


def normalized(module: nn.Module, x: jax.Array) -> jax.Array:
  """x̂: the norm layer's output with scale 1 and bias 0."""
  plain = module.clone(use_scale=False, use_bias=False, parent=None)
  return plain.apply({}, x).astype(jnp.float32)


def layer_terms(layer: Layer, x: jax.Array, g: jax.Array, trainable: dict,
                params: dict) -> dict:
  """{param name: its per-example gradient as a factored term} for the layer's trainable params
  (`params`: the layer's own, one slice of a scanned stack)."""
  module, terms = layer.module, {}
  if "ghost_grads" in vars(type(module)):  # called bound to its params
    grads = module.apply({"params": params}, x, g, method=type(module).ghost_grads)
    wanted = [name for name in layer.param_names if trainable.get(name)]
    missing = [name for name in wanted if name not in grads]
    if missing:
      raise GhostUnsupportedError(
          f"{type(module).__name__}.ghost_grads ({'/'.join(layer.path)}) returned nothing for "
          f"{missing}: it must return per-example gradients [m, *shape] or a `ghost.Term` for "
          "every param of the module.")
    as_term = lambda grad: (grad if is_term(grad) else
                            Summed(grad.reshape(g.shape[0], -1).astype(jnp.float32)))
    return {name: as_term(grads[name]) for name in wanted}
  if isinstance(module, nn.Embed):
    return {"embedding": lookup_term(module, x, g)} if trainable.get("embedding") else {}
  if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
    gf = as_rows(g, g.shape[-1]).astype(jnp.float32)
    if trainable.get("scale"):
      terms["scale"] = Summed(jnp.sum(gf * as_rows(normalized(module, x), g.shape[-1]), 1))
    if trainable.get("bias"):
      terms["bias"] = Summed(jnp.sum(gf, 1))
    return terms
  if isinstance(module, nn.Conv):
    a = module_patches(module, x.astype(g.dtype))
    a, gf = as_rows(a, a.shape[-1]), as_rows(g, g.shape[-1])
    scale_inputs = False  # patches are gathered from the input (slices, a transpose)
  else:
    axes = axes_of(module.axis) if isinstance(module, nn.DenseGeneral) else (-1,)
    contracted = len(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim - contracted, x.ndim)):
      raise GhostUnsupportedError(f"{'/'.join(layer.path)}: DenseGeneral over non-trailing axes.")
    d = math.prod(x.shape[x.ndim - contracted:])
    out_features = math.prod(g.shape[x.ndim - contracted:])
    a, gf = as_rows(x.astype(g.dtype), d), as_rows(g, out_features)
    # Features over several axes (attention heads) come out of, or go into, per-head matmuls
    # whose layout XLA keeps head-major: scaling that factor would add a transpose.
    scale_inputs = contracted == 1 or g.ndim - (x.ndim - contracted) > 1
  if trainable.get("kernel"):
    terms["kernel"] = Outer(a, gf, scale_inputs)
  if trainable.get("bias"):
    terms["bias"] = Summed(jnp.sum(gf.astype(jnp.float32), 1))
  return terms


def masked(module: nn.Module | None, name: str, term: Term, mask: jax.Array,
           rows: bool = False) -> Term:
  """The term of M ⊙ ∇ᵢ for the element mask M [*shape] (one slice of a scanned stack).

  rows=False: the per-example gradients instantiated [m, size] (float32, `Term.instantiate`)
  times M, flattened in the order `as_param` reads: an element mask breaks a kernel's
  outer-product form, so its norm cannot be a ghost norm.
  rows=True: M is taken to be a mask of whole output rows, its first row along the last axis
  repeated over the others (`finetune.is_row_mask`), and a term with `mask_rows` masks itself:
  a kernel stays factored (its output gradients masked), unless its norm instantiates its
  per-example gradients anyway (many positions), when they are instantiated once and kept.
  Privacy does not rest on that: the norm and the weighted sum are of the same masked term
  whatever M is; an M that is not a row mask only changes which gradient is clipped (that of
  its first row's mask).
  """
  if rows and hasattr(term, "mask_rows"):
    return term.mask_rows(mask.reshape(-1, mask.shape[-1])[0] if mask.ndim else mask[None])
  h = term.instantiate()
  if isinstance(module, nn.Conv) and name == "kernel" and channels_first(module):
    mask = mask.transpose(2, 0, 1, 3)  # (kh, kw, C, O) -> the patches' (C, kh, kw, O)
  return Summed(h.reshape(h.shape[0], -1) * mask.reshape(1, -1).astype(jnp.float32))


def as_param(module: nn.Module, name: str, flat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A weighted sum of a layer's terms, in its param's shape (see `channels_first` for the order
  of conv patches)."""
  if isinstance(module, nn.Conv) and name == "kernel" and channels_first(module):
    kh, kw, c, o = shape
    return flat.reshape(c, kh, kw, o).transpose(1, 2, 0, 3)
  return flat.reshape(shape)
