"""Factored terms: a param leaf's per-example gradients, held as the factors they are made of.

Each term has the methods of `Term` (its norms with their rounding bounds, its weighted sum over
the examples, its instantiated per-example gradients):
  Outer(a [m, T, d], g [m, T, p]): ∇ᵢ = Σₜ aᵢₜ gᵢₜᵀ (a kernel; never instantiated per example),
  Summed(h [m, p]):                ∇ᵢ = hᵢ (biases, norm scales: small, instantiated in float32),
  Lookup(idx [m, T], g [m, T, d]): ∇ᵢ = Σₜ e_{idxᵢₜ} gᵢₜᵀ (an embedding table's rows).
A module's own `ghost_grads` may return any pytree with these methods (the WRN's
`StandardizedConvTerm`). Matmuls accumulate in float32 (`einsum`); the rounding bounds are in
`rounding`.

Augmentation multiplicity (K views per example, `merge_views`): a model run on the m·K views
gives terms of m·K rows, example-major; example i's gradient is the sum of its K rows' (the
losses average the views, so the output gradients carry the 1/K). A factored term merges them
exactly, by taking the K views' positions as one example's positions: Σₖ Σₜ aₖₜgₖₜᵀ is the
kernel term over K·T positions, so its Gram (ghost) norm is the norm of the mean gradient, not a
bound from the views' norms, and its rounding bounds are those of K·T positions.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from dpjax.privacy.ghost.rounding import (EPS32, NormBound, gamma, gram_norm_bound,
                                          instantiated_bound, summed_bound)


class Term(Protocol):
  """A param's per-example gradients in a factored form of a module's own (from its
  `ghost_grads`; a pytree: under nn.scan, ghost vmaps these methods over the scanned axis)."""

  def norm_bound(self) -> NormBound:
    """The squared norms [m] of exactly the per-example gradients whose weighted sum
    `weighted_sum` forms, with bounds on the rounding in them and in that sum (`NormBound`;
    `gram_norm_bound` and `rounding_slack` give a kernel's)."""

  def weighted_sum(self, weights: jax.Array, real: jax.Array) -> jax.Array:
    """Σᵢ wᵢ·∇ᵢ over the rows where `real`, float32, flattened in the param's order. Rows that
    are not real may hold non-finite values: zero them with `where` (0·inf is NaN), as
    `outer_sum` does."""

  def instantiate(self) -> jax.Array:
    """The per-example gradients [m, size], float32, flattened in the param's order."""

  # Optional: merge_views(self, views: int) -> Term, the term of [m·views] example-major rows
  # as m examples, each the sum of its views' rows (`merge_views`; without the method, the term
  # is instantiated and its views' rows added).
  # Optional: mask_rows(self, rows: jax.Array) -> Term, the term of M ⊙ ∇ᵢ for the element mask
  # M that is `rows` [q] along the param's last axis and constant along the others (a mask of
  # whole output rows: `layer_terms.masked`); without the method, the term is instantiated.


def is_term(value) -> bool:
  """Whether `value` has the methods of `Term` (else it is an array of per-example gradients)."""
  return all(hasattr(value, name) for name in ("norm_bound", "weighted_sum", "instantiate"))


def as_rows(x: jax.Array, features: int) -> jax.Array:
  """[m, ..., features] -> [m, T, features], dtype kept (matmuls accumulate in float32)."""
  return x.reshape(x.shape[0], -1, features)


def merge_positions(x: jax.Array, views: int) -> jax.Array:
  """[m·views, T, ...] -> [m, views·T, ...]: each example's views' positions as its own
  (rows example-major: view j of example i at row i·views + j)."""
  return x.reshape((x.shape[0] // views, views * x.shape[1]) + x.shape[2:])


def merge_views(term: Term, views: int) -> Term:
  """The term of m examples from `term`'s m·views rows, example-major (views of one example
  adjacent): example i's per-example gradient is the sum of its rows' gradients. Exact: a
  factored term merges its views' positions (`merge_positions`; the norm is that of the summed
  gradient), `Summed` adds its rows in float32; a module's term without a `merge_views` method
  is instantiated ([m·views, size], float32) and its rows added. views=1 returns `term`."""
  if views == 1:
    return term
  if hasattr(term, "merge_views"):
    return term.merge_views(views)
  return Summed(term.instantiate()).merge_views(views)


def row_mask_over(features: int, rows: jax.Array, dtype) -> jax.Array:
  """`rows` [q] (a mask along a param's last axis) repeated over `features` flattened output
  features whose innermost axis is that last axis: [features] in `dtype`."""
  q = rows.shape[-1]
  if features % q:
    raise ValueError(f"A row mask of {q} rows does not tile {features} output features.")
  return jnp.tile(rows, features // q).astype(dtype)


def einsum(spec: str, *operands: jax.Array) -> jax.Array:
  """einsum accumulating in float32; float32 operands at full precision (no TF32 rounding, which
  would let a clipped contribution exceed its bound)."""
  full = all(x.dtype == jnp.float32 for x in operands)
  return jnp.einsum(spec, *operands, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST if full else None)


def gram(x: jax.Array) -> jax.Array:
  """[m, T, k] -> the per-example Gram matrices [m, T, T] (xₜ·xₛ), float32."""
  return einsum("mtk,msk->mts", x, x)


def ghost_norm_is_cheaper(positions: int, d: int, p: int) -> bool:
  """fastDP's rule for a kernel's per-example norm over T positions (inputs of width d, outputs of
  width p): the ghost norm costs T²(d + p) per example, the instantiated gradient T·d·p."""
  return positions * positions * (d + p) <= positions * d * p


def per_example_outer(a: jax.Array, g: jax.Array) -> jax.Array:
  """Σₜ aᵢₜ gᵢₜᵀ [m, d, p], float32, for a [m, T, d], g [m, T, p]: instantiated kernel
  gradients (one batched matmul)."""
  return einsum("mtd,mtp->mdp", a, g)


def outer_sum(a: jax.Array, g: jax.Array, weights: jax.Array, real: jax.Array,
              scale_inputs: bool = False) -> jax.Array:
  """Σᵢ wᵢ Σₜ aᵢₜ gᵢₜᵀ [d, p] (float32 accumulation) over the rows where `real`, for
  a [m, T, d], g [m, T, p], weights [m]: one matmul, with the narrower factor scaled by wᵢ and
  rounded back to g's dtype (on a tie d = p, a if `scale_inputs`; `rounding_slack` bounds what
  that moves). Both factors' other rows are replaced by zeros (`where`): a row that is not real
  may hold inf or NaN (an example ghost dropped as non-finite), and 0·inf is NaN."""
  keep = lambda x: jnp.where(real[:, None, None], x, jnp.zeros((), x.dtype))
  scaled = lambda x: keep(weights[:, None, None] * x.astype(jnp.float32)).astype(g.dtype)
  d, p = a.shape[-1], g.shape[-1]
  if d < p or (d == p and scale_inputs):
    return einsum("mtd,mtp->dp", scaled(a), keep(g))
  return einsum("mtd,mtp->dp", keep(a), scaled(g))


def unshared(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays behind an optimization barrier, for a reduction that reads them: otherwise XLA
  merges it with every other layer's elementwise use of the weights into one multi-output
  fusion, which then runs at the reduction's pace (2.3 ms of a 64 ms ViT-B/16 step on an H200:
  `benchmarks/results/archive/README.md`)."""
  return jax.lax.optimization_barrier(arrays)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Outer:
  """A kernel's term. Its norm is the ghost norm (from the Grams of a and g) or that of the
  instantiated gradient, whichever is cheaper (`ghost_norm_is_cheaper`). Its weighted sum scales
  the narrower factor by wᵢ; on a tie, a if `scale_inputs`: the factor that needs no transpose
  (`layer_terms.layer_terms` decides)."""
  a: jax.Array
  g: jax.Array
  scale_inputs: bool = dataclasses.field(metadata=dict(static=True))

  def norm_bound(self) -> NormBound:
    if ghost_norm_is_cheaper(*self.a.shape[1:], self.g.shape[-1]):
      return gram_norm_bound(gram(self.a), gram(self.g), gamma(self.a.shape[-1]),
                             gamma(self.g.shape[-1]), float(jnp.finfo(self.g.dtype).eps))
    return instantiated_bound(per_example_outer(self.a, self.g), self.a, self.g)

  def weighted_sum(self, weights: jax.Array, real: jax.Array) -> jax.Array:
    """[d, p]: `outer_sum`."""
    return outer_sum(self.a, self.g, weights, real, self.scale_inputs)

  def instantiate(self) -> jax.Array:
    h = per_example_outer(self.a, self.g)
    return h.reshape(h.shape[0], -1)

  def merge_views(self, views: int) -> Outer:
    return Outer(merge_positions(self.a, views), merge_positions(self.g, views),
                 self.scale_inputs)

  def mask_rows(self, rows: jax.Array) -> Outer | Summed:
    """Masking whole output rows masks g's columns: M ⊙ Σₜ aₜgₜᵀ = Σₜ aₜ(gₜ ⊙ r)ᵀ (exact: r is
    0 or 1). Kept factored where the norm is a ghost norm; where the norm instantiates the
    gradients anyway (`ghost_norm_is_cheaper` false: many positions), they are instantiated once
    and kept, so the weighted sum is a matrix-vector product, not a second matmul."""
    masked = Outer(self.a, self.g * row_mask_over(self.g.shape[-1], rows, self.g.dtype),
                   self.scale_inputs)
    if ghost_norm_is_cheaper(*self.a.shape[1:], self.g.shape[-1]):
      return masked
    return Summed(masked.instantiate())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Summed:
  """Instantiated per-example gradients h [m, k] (float32)."""
  h: jax.Array

  def norm_bound(self) -> NormBound:
    return summed_bound(self.h)

  def weighted_sum(self, weights: jax.Array, real: jax.Array) -> jax.Array:
    """A matrix-vector product over the row axis."""
    weights, real = unshared(weights, real)
    return einsum("m,mk->k", weights, jnp.where(real[:, None], self.h, 0.0))

  def instantiate(self) -> jax.Array:
    return self.h

  def merge_views(self, views: int) -> Summed:
    return Summed(jnp.sum(self.h.reshape(-1, views, self.h.shape[-1]), axis=1))

  def mask_rows(self, rows: jax.Array) -> Summed:
    return Summed(self.h * row_mask_over(self.h.shape[-1], rows, self.h.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Lookup:
  """An embedding table's term: rows idx [m, T] (in range) looked up, output grads g [m, T, d]:
  ∇ᵢ = Σₜ e_{idxₜ} gₜᵀ, whose squared norm is Σₜ,ₛ [idxₜ = idxₛ] (gₜ·gₛ)."""
  idx: jax.Array
  g: jax.Array
  rows: int = dataclasses.field(metadata=dict(static=True))

  def norm_bound(self) -> NormBound:
    """The Gram of the one-hot rows is [idxₜ = idxₛ], exact."""
    same = (self.idx[:, :, None] == self.idx[:, None, :]).astype(jnp.float32)
    return gram_norm_bound(same, gram(self.g), 0.0, gamma(self.g.shape[-1]), EPS32)

  def weighted_sum(self, weights: jax.Array, real: jax.Array) -> jax.Array:
    """Each example's scaled output grads added into their rows (float32 scatter-add)."""
    g = jnp.where(real[:, None, None], self.g.astype(jnp.float32), 0.0) * weights[:, None, None]
    features = g.shape[-1]
    return jnp.zeros((self.rows, features), jnp.float32).at[self.idx.reshape(-1)].add(
        g.reshape(-1, features))

  def instantiate(self) -> jax.Array:
    h = jax.vmap(lambda idx, g: jnp.zeros((self.rows, g.shape[-1]), jnp.float32).at[idx].add(
        g.astype(jnp.float32)))(self.idx, self.g)
    return h.reshape(h.shape[0], -1)

  def merge_views(self, views: int) -> Lookup:
    return Lookup(merge_positions(self.idx, views), merge_positions(self.g, views), self.rows)

  def mask_rows(self, rows: jax.Array) -> Lookup:
    """The table's last axis is g's: M ⊙ ∇ = Σₜ e_{idxₜ}(gₜ ⊙ r)ᵀ."""
    return Lookup(self.idx, self.g * row_mask_over(self.g.shape[-1], rows, self.g.dtype),
                  self.rows)
