"""Rounding bounds of ghost clipping: how far a computed per-example norm, and what a weighted
sum adds for an example, may be from the exact values of the arrays ghost holds.

Each param leaf's term gives a `NormBound` (its computed squared norms and bounds on their
rounding and on the rounding of its weighted sum, relative to the example's per-position terms),
from which every example's factor is computed (`clipped_sum.example_weights`; the package
docstring's "Precision and the clip bound").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class NormBound(NamedTuple):
  """One param leaf's per-example squared norms and the bounds on their rounding, each [m]
  (float32; `per_example_terms`' terms give one each, `Term.norm_bound`).

  ∇ᵢ is the per-example gradient in real arithmetic of the arrays ghost holds (a kernel's
  Σₜ aᵢₜgᵢₜᵀ, from the layer's inputs and output gradients as computed, in their dtype):
    sq: ‖∇ᵢ‖² as computed: what the statistics report.
    sq_error: ≥ |sq − ‖∇ᵢ‖²|, the float32 rounding in computing sq where it is relative to the
      example's per-position terms (for a kernel, Σₜ‖aₜ‖‖gₜ‖), which cancellation between
      positions can make arbitrarily larger than ‖∇ᵢ‖. Rounding relative to ‖∇ᵢ‖ itself (a sum
      of squares) is left out, as the vmap path leaves it out: it moves a contribution by a
      factor 1 + O(k·2⁻²⁴) on both paths.
    slack: ≥ ‖cᵢ/wᵢ − ∇ᵢ‖ for every weight wᵢ > 0, cᵢ being what `weighted_sum(w, real)` adds for
      example i alone: the scaled factor wᵢ·x rounded to its dtype, and the float32 accumulation
      over the example's own positions (the accumulation across examples is the rounding of the
      released sum, as of any sum).
  Hence ‖cᵢ‖ ≤ wᵢ·`upper()` (`clipped_grad_sum` computes wᵢ from it).
  """
  sq: jax.Array
  sq_error: jax.Array
  slack: jax.Array

  def upper(self) -> jax.Array:
    """√(sq + sq_error) + slack ≥ ‖cᵢ‖/wᵢ [m]. Non-finite where any of the example's arrays is
    (the slack is a multiple of Σₜ‖aₜ‖‖gₜ‖, or sq is the sum of squares of the gradients)."""
    return jnp.sqrt(self.sq + self.sq_error) + self.slack


# A float32 sum of k products (a dot product of length k), in any order of
# summation, is within γₖ·Σ|products| of its exact value (Higham, Accuracy and Stability of
# Numerical Algorithms, §3.1), with γₖ = kε/(1 − kε). ε = 2⁻²³ is twice float32's unit roundoff,
# which also covers accumulators that truncate instead of rounding.

EPS32 = float(jnp.finfo(jnp.float32).eps)


def gamma(k: int) -> float:
  """γₖ for float32 (see above); inf where kε ≥ 1 (no bound: the example is then dropped)."""
  k_eps = k * EPS32
  return k_eps / (1.0 - k_eps) if k_eps < 1.0 else math.inf


def inflation(*ks: int) -> float:
  """Π 1/(1 − γₖ) ≥ 1: turns a computed sum of k non-negative terms (or a norm computed from a
  sum of k squares) into an upper bound of the exact one; inf where some γₖ ≥ 1."""
  factor = 1.0
  for k in ks:
    factor = factor / (1.0 - gamma(k)) if gamma(k) < 1.0 else math.inf
  return factor


def _sum_twice(x: jax.Array) -> jax.Array:
  """Σ over the last two axes [..., T, S] -> [...], as a sum over S then one over T: its error is
  within γ_S + γ_T (γ_{S+T}) of Σ|x| rather than γ_{ST}; the barrier keeps XLA from merging the two
  sums into one of unknown order."""
  return jnp.sum(jax.lax.optimization_barrier(jnp.sum(x, axis=-1)), axis=-1)


def magnitude(a: jax.Array, g: jax.Array) -> jax.Array:
  """Sᵢ ≥ Σₜ‖aᵢₜ‖‖gᵢₜ‖ [m] (float32) for a [m, T, d], g [m, T, p]: the size of a kernel term's
  per-position parts, which the rounding in its weighted sum is relative to."""
  norms = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))
  widen = inflation(a.shape[-1] + 2, g.shape[-1] + 2, a.shape[1] + 2)
  return widen * jnp.sum(norms(a) * norms(g), axis=1)


def rounding_slack(a: jax.Array, g: jax.Array) -> jax.Array:
  """(ε + γ_T)·Sᵢ [m] (`magnitude`; ε the eps of g's dtype): a bound per unit wᵢ on how far
  `outer_sum` moves example i's part Σₜ aₜgₜᵀ. Rounding wᵢ·x to g's dtype moves each position's
  term by at most (ε/2)·wᵢ‖aₜ‖‖gₜ‖; accumulating the example's T positions in float32 adds at
  most γ_T(1 + ε/2)·wᵢSᵢ, and the other half of ε covers the (1 + ε/2)."""
  return (float(jnp.finfo(g.dtype).eps) + gamma(a.shape[1])) * magnitude(a, g)


def gram_norm_bound(gram_a: jax.Array, gram_g: jax.Array, gamma_a, gamma_g,
                    scaled_eps: float) -> NormBound:
  """`NormBound` [..., m] of ∇ = Σₜ aₜgₜᵀ from the Grams [..., m, T, T] of a and g (float32).

  gamma_a, gamma_g: bounds γ_d, γ_p (`gamma` of the feature widths d and p: the Grams' dot
    products) with |Âₜₛ − Aₜₛ| ≤ γ_d‖aₜ‖‖aₛ‖ and |Ĝₜₛ − Gₜₛ| ≤ γ_p‖gₜ‖‖gₛ‖; floats, or arrays
    broadcastable to [..., m] (one per layer of a stack). 0.0 for an exact Gram.
  scaled_eps: the eps of the dtype the weighted sum rounds wᵢ·(scaled factor) to.

  sq = Σₜ,ₛ ÂₜₛĜₜₛ (clamped at 0; `_sum_twice`) against ‖∇‖² = Σₜ,ₛ AₜₛGₜₛ:
    |sq − ‖∇‖²| ≤ γ_{2T}·Σ|ÂĜ| + Σ|Â − A||Ĝ| + Σ|A||Ĝ − G|
               ≤ M·(γ_{2T}·Σ|ÂĜ| + γ_d·Σ âₜâₛ|Ĝₜₛ| + γ_p·Σ |Âₜₛ|ĝₜĝₛ + γ_dγ_p·Ŝ²) = sq_error,
  where âₜ = √Âₜₜ (so ‖aₜ‖ ≤ âₜ/√(1 − γ_d)), ĝₜ likewise, Ŝ = Σₜ âₜĝₜ, and
  M = 1/((1 − γ_d)(1 − γ_p)(1 − γ_{2T+12})) also covers the rounding in computing the bound (its
  square roots, products and sums). slack = (scaled_eps + γ_T)·M·Ŝ, as `rounding_slack`.
  """
  t = gram_a.shape[-1]
  gamma_a = jnp.asarray(gamma_a, jnp.float32)
  gamma_g = jnp.asarray(gamma_g, jnp.float32)
  widen = jnp.where((gamma_a < 1.0) & (gamma_g < 1.0),
                    inflation(2 * t + 12) / ((1.0 - gamma_a) * (1.0 - gamma_g)), jnp.inf)
  a_norms = jnp.sqrt(jnp.diagonal(gram_a, axis1=-2, axis2=-1))  # âₜ [..., m, T]
  g_norms = jnp.sqrt(jnp.diagonal(gram_g, axis1=-2, axis2=-1))
  outer = lambda v: v[..., :, None] * v[..., None, :]
  product = gram_a * gram_g
  sq = jnp.maximum(_sum_twice(product), 0.0)
  terms = (gamma(2 * t) * jnp.abs(product)
           + gamma_a[..., None, None] * outer(a_norms) * jnp.abs(gram_g)
           + gamma_g[..., None, None] * jnp.abs(gram_a) * outer(g_norms))
  s = jnp.sum(a_norms * g_norms, axis=-1)
  sq_error = widen * (_sum_twice(terms) + gamma_a * gamma_g * jnp.square(s))
  return NormBound(sq, sq_error, widen * (scaled_eps + gamma(t)) * s)


def summed_bound(h: jax.Array) -> NormBound:
  """`NormBound` of instantiated per-example gradients h [..., m, k] (float32) that the weighted
  sum reads as they are: sq = Σ h², no sq_error (relative to ‖hᵢ‖: left out, as on the vmap
  path), and slack ε₃₂·‖hᵢ‖ for rounding wᵢ·h to float32 (half of it would do)."""
  sq = jnp.sum(jnp.square(h), axis=-1)
  return NormBound(sq, jnp.zeros_like(sq), EPS32 * inflation(h.shape[-1]) * jnp.sqrt(sq))


def instantiated_bound(h: jax.Array, a: jax.Array, g: jax.Array) -> NormBound:
  """`NormBound` of a kernel term from its instantiated gradients h = Σₜ aₜgₜᵀ [m, d, p] as
  computed (`per_example_outer`): entrywise within γ_T·Σₜ|aₜⱼ||gₜₖ| of ∇, so within γ_T·Sᵢ in
  norm (`magnitude`), a linear error that joins `rounding_slack` in the slack."""
  sq = jnp.sum(jnp.square(h), axis=(1, 2))
  slack = rounding_slack(a, g) + gamma(a.shape[1]) * magnitude(a, g)
  return NormBound(sq, jnp.zeros_like(sq), slack)

