"""DP contrastive (InfoNCE) learning: Logit-DP and the per-row DP-SGD baseline.

Kong, Muñoz Medina, Ribero & Syed, "Differentially Private Optimization for Non-Decomposable
Objective Functions" (arXiv 2310.03104).

Setting. A batch holds n examples; example k contributes two augmented views, x_k and x'_k. An
encoder maps a view to an embedding e ∈ R^d; ê = e / max(‖e‖, eps), so ‖ê‖ ≤ 1 and every
similarity s_ij = ⟨ê_i, ê'_j⟩ lies in [−1, 1]. With a fixed temperature τ the loss is the sum

    L = Σ_i ℓ_i,   ℓ_i = −s_ii/τ + log Σ_j exp(s_ij/τ)

over the batch's real examples (padding rows weigh 0 and padding columns are left out of every
softmax). One example enters row k *and* column k of s, so it moves every ℓ_i: clipping ∇ℓ_i per
row (`naive_grad_sum`) bounds a row, not an example, and the sensitivity grows with n.

Logit-DP (`logit_dp_grad_sum`) clips the per-pair similarity gradients g_ij = ∇_w s_ij to norm B
and recombines them with the loss's derivatives c_ij = ∂L/∂s_ij = (p_ij − [i = j])/τ, where p_ij
is row i's softmax:

    ḡ = Σ_ij c_ij · min(1, B/‖g_ij‖) · g_ij.

It never forms the n² parameter-sized g_ij at once. With J_v the embedding Jacobian of view v
(d × p), a_ij = ∂s_ij/∂e_i and b_ij = ∂s_ij/∂e'_j, g_ij = J_iᵀ a_ij + J'_jᵀ b_ij: the pair norms
are computed a block of `row_chunk` rows at a time (memory row_chunk · n · p), and the clipped sum
is ḡ = Σ_i J_iᵀ α_i + Σ_j J'_jᵀ β_j with α_i = Σ_j w_ij a_ij, β_j = Σ_i w_ij b_ij. Cost: the
Jacobians (a backward pass of batch 2n·d) plus 2n²·d·p flops for the pair norms.

Sensitivity (`logit_dp_sensitivity`), add/remove adjacency, the larger batch holding n examples.
Adding example k adds row k, whose terms weigh Σ_j |c_kj| = 2(1 − p_kk)/τ ≤ 2/τ; in every other
row i it adds column k (weight p_ik/τ) and rescales the row's other probabilities by (1 − p_ik),
which moves Σ_{j≠k} |c_ij| by exactly p_ik/τ. Each clipped g_ij has norm ≤ B and p_ik ≤ π_n =
e^{2/τ}/(e^{2/τ} + n − 1) because logits lie in [−1/τ, 1/τ], so

    ‖ḡ(D) − ḡ(D⁻)‖ ≤ (2B/τ) · (1 + (n − 1) π_n) ≤ (2B/τ) · (1 + e^{2/τ}),

bounded in n. Replacing one example (row k and column k both change) gives (2B/τ)(2 + (n−1)π_n).

pair_method="ghost" forms the pair norms and the clipped sum without Jacobians, layer by layer
(`dpjax.contrastive_ghost`), and naive's rows by one backward pass each. This module is ~430
lines: the loss, the sensitivities and both methods' sums share the pair geometry.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpjax import contrastive_ghost

PyTree = Any
# embed_fn(params, views [b, ...]) -> embeddings [b, d]; each row must depend on its own view only
# (no BatchNorm: dpjax.models refuses it).
EmbedFn = Callable[[PyTree, jax.Array], jax.Array]

ADJACENCIES = ("add_remove", "replace_one")
PAIR_METHODS = ("jacobian", "ghost")  # how pair gradients are formed (`logit_dp_grad_sum`)
_MASKED_LOGIT = -1e9  # exp underflows to exactly 0 next to any real logit in [−1/τ, 1/τ]


# ------------------------------------------------------------------------------------------------
# The loss
def normalize(embeddings: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Rows e ↦ e / max(‖e‖, eps): every row has norm ≤ 1 (exactly 1 unless ‖e‖ < eps)."""
  norms = jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
  return embeddings / jnp.maximum(norms, eps)


def similarities(emb_a: jax.Array, emb_b: jax.Array) -> jax.Array:
  """Cosine similarities s [n, n], s_ij = ⟨ê_i, ê'_j⟩ ∈ [−1, 1], of embeddings [n, d] each."""
  return normalize(emb_a) @ normalize(emb_b).T


def info_nce_rows(sims: jax.Array, mask: jax.Array, temperature: float) -> jax.Array:
  """Per-row InfoNCE losses ℓ_i [n] of similarities [n, n]; padding (mask False) rows are 0 and
  padding columns are in no softmax. Row i's positive is column i."""
  logits = jnp.where(mask[None, :], sims / temperature, _MASKED_LOGIT)
  rows = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  return jnp.where(mask, rows, 0.0)


def info_nce_loss(sims: jax.Array, mask: jax.Array, temperature: float) -> jax.Array:
  """L = Σ_i ℓ_i over the real rows (a sum, not a mean)."""
  return jnp.sum(info_nce_rows(sims, mask, temperature))


def batch_loss(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array, views_b: jax.Array,
               mask: jax.Array, temperature: float) -> jax.Array:
  """L(params) for views [n, ...] each and mask [n]."""
  return info_nce_loss(similarities(embed_fn(params, views_a), embed_fn(params, views_b)),
                       mask, temperature)


# ------------------------------------------------------------------------------------------------
# Sensitivities
def _check_positive(name: str, value: float) -> None:
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be finite and > 0, got {value!r}.")


def _check_adjacency(adjacency: str) -> None:
  if adjacency not in ADJACENCIES:
    raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}.")


def column_weight_bound(batch_size: int | None, temperature: float) -> float:
  """(n − 1)·π_n: the most the other rows' softmax weights on one column can add up to.

  π_n = e^{2/τ}/(e^{2/τ} + n − 1) bounds p_ik for i ≠ k; batch_size=None gives the supremum over
  n, e^{2/τ} (raises for temperatures so small that it overflows).
  """
  _check_positive("temperature", temperature)
  if batch_size is None:
    if 2.0 / temperature > 700:
      raise ValueError(f"temperature {temperature} is too small for a batch-size-free bound "
                       "(e^(2/τ) overflows); pass the largest batch size instead.")
    return math.exp(2.0 / temperature)
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
  others = batch_size - 1
  return others / (1.0 + others * math.exp(-2.0 / temperature))


def logit_dp_sensitivity(pair_clip_norm: float, temperature: float,
                         batch_size: int | None = None, adjacency: str = "add_remove") -> float:
  """L2 sensitivity of `logit_dp_grad_sum`'s clipped sum (see the module docstring).

  Args:
    pair_clip_norm: B, the bound on each clipped pair gradient.
    temperature: τ > 0.
    batch_size: the largest number of real examples a batch can hold (under add/remove, the
      larger of the two batches), or None for the bound over every batch size.
    adjacency: "add_remove" → (2B/τ)(1 + (n−1)π_n); "replace_one" → (2B/τ)(2 + (n−1)π_n).

  The result grows with n but never beyond (2B/τ)(1 + e^{2/τ}) (add/remove).
  """
  _check_positive("pair_clip_norm", pair_clip_norm)
  _check_positive("temperature", temperature)
  _check_adjacency(adjacency)
  own_row = 1.0 if adjacency == "add_remove" else 2.0
  return 2.0 * pair_clip_norm / temperature * (own_row + column_weight_bound(batch_size,
                                                                             temperature))


def naive_sensitivity(row_clip_norm: float, batch_size: int,
                      adjacency: str = "add_remove") -> float:
  """L2 sensitivity of `naive_grad_sum` (each row's gradient ∇ℓ_i clipped to C, then summed).

  One example is in every row's softmax, so it can move every clipped row by up to 2C: adding it
  gives C + 2C(n − 1) = (2n − 1)C, replacing it 2nC, with n the largest batch. It grows with n.
  """
  _check_positive("row_clip_norm", row_clip_norm)
  _check_adjacency(adjacency)
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  return (2 * batch_size - (1 if adjacency == "add_remove" else 0)) * row_clip_norm


# ------------------------------------------------------------------------------------------------
# Embedding Jacobians and the pair geometry
@dataclasses.dataclass(frozen=True)
class PairTerms:
  """What both DP gradients are built from, for views [n, ...] each.

  jac_a, jac_b: pytrees like params with leaves [n, d, *leaf], ∂e_v/∂w of each view.
  a, b: [n, n, d], a_ij = ∂s_ij/∂e_i and b_ij = ∂s_ij/∂e'_j.
  coef: [n, n], c_ij = ∂L/∂s_ij (0 in padding rows and columns).
  loss: L, the summed loss.
  """
  jac_a: PyTree
  jac_b: PyTree
  a: jax.Array
  b: jax.Array
  coef: jax.Array
  loss: jax.Array


jax.tree_util.register_dataclass(
    PairTerms, data_fields=["jac_a", "jac_b", "a", "b", "coef", "loss"], meta_fields=[])


def embedding_jacobians(embed_fn: EmbedFn, params: PyTree, views: jax.Array,
                        chunk: int | None = None) -> tuple[jax.Array, PyTree]:
  """(embeddings [n, d], Jacobians: leaves [n, d, *leaf]) of every view, `chunk` views at a time
  (None: all at once)."""
  def one(x):
    def f(p):
      e = embed_fn(p, x[None])[0]
      return e, e
    jac, e = jax.jacrev(f, has_aux=True)(params)
    return e, jac

  if chunk is None or chunk >= views.shape[0]:
    return jax.vmap(one)(views)
  return jax.lax.map(one, views, batch_size=chunk)


def pair_geometry(emb_a: jax.Array, emb_b: jax.Array, mask: jax.Array, temperature: float
                  ) -> contrastive_ghost.PairGeometry:
  """The similarity derivatives a, b [n, n, d] and the loss derivatives c [n, n] (with the loss)
  of embeddings [n, d] each: what turns embedding Jacobians (or a backward pass per pair) into
  the pair gradients g_ij = J_iᵀ a_ij + J'_jᵀ b_ij."""
  unit_a, vjp_a = jax.vjp(normalize, emb_a)
  unit_b, vjp_b = jax.vjp(normalize, emb_b)
  # normalize acts row by row, so a cotangent with every row equal to ê'_j gives all a_{·j} at once.
  a = jax.vmap(lambda u: vjp_a(jnp.broadcast_to(u, unit_a.shape))[0], out_axes=1)(unit_b)
  b = jax.vmap(lambda u: vjp_b(jnp.broadcast_to(u, unit_b.shape))[0])(unit_a)
  sims = unit_a @ unit_b.T
  loss, coef = jax.value_and_grad(info_nce_loss)(sims, mask, temperature)
  return contrastive_ghost.PairGeometry(a, b, coef, loss)


def pair_terms(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array, views_b: jax.Array,
               mask: jax.Array, temperature: float, jacobian_chunk: int | None = None
               ) -> PairTerms:
  """Embeddings' Jacobians, the similarity derivatives a, b and the loss derivatives c."""
  emb_a, jac_a = embedding_jacobians(embed_fn, params, views_a, jacobian_chunk)
  emb_b, jac_b = embedding_jacobians(embed_fn, params, views_b, jacobian_chunk)
  geometry = pair_geometry(emb_a, emb_b, mask, temperature)
  return PairTerms(jac_a, jac_b, geometry.a, geometry.b, geometry.coef, geometry.loss)


def _contract(weights: jax.Array, jac: PyTree, spec: str) -> PyTree:
  """Σ over views and embedding dims of weights × Jacobians; spec names the weights' axes."""
  return jax.tree_util.tree_map(lambda j: jnp.einsum(f"{spec},{spec}...->...", weights, j), jac)


def _from_views(terms: PairTerms, alpha: jax.Array, beta: jax.Array) -> PyTree:
  """Σ_i J_iᵀ α_i + Σ_j J'_jᵀ β_j for α, β [n, d]: one contraction per leaf."""
  return jax.tree_util.tree_map(jnp.add, _contract(alpha, terms.jac_a, "vd"),
                                _contract(beta, terms.jac_b, "vd"))


def _row_blocks(n: int, row_chunk: int) -> int:
  """The largest block size ≤ row_chunk that divides n."""
  size = max(1, min(row_chunk, n))
  while n % size:
    size -= 1
  return size


def _map_row_blocks(fn: Callable[..., jax.Array], row_chunk: int, *rows: PyTree) -> jax.Array:
  """fn over blocks of the leading (row) axis of every leaf of `rows`, one block at a time; the
  blocks' outputs concatenated along that axis."""
  n = jax.tree_util.tree_leaves(rows)[0].shape[0]
  size = _row_blocks(n, row_chunk)
  blocked = jax.tree_util.tree_map(lambda r: r.reshape((n // size, size) + r.shape[1:]), rows)
  out = jax.lax.map(lambda xs: fn(*xs), blocked)
  return out.reshape((n,) + out.shape[2:])


def _sq_norm_sum(tree: PyTree, batch_axes: int) -> jax.Array:
  """Σ over leaves and their parameter axes of x², keeping the first `batch_axes` axes."""
  return sum(jnp.sum(jnp.square(x), axis=tuple(range(batch_axes, x.ndim)))
             for x in jax.tree_util.tree_leaves(tree))


def pair_sq_norms(terms: PairTerms, row_chunk: int = 8) -> jax.Array:
  """‖g_ij‖² [n, n] for every pair, at most row_chunk·n pair gradients in memory at once."""
  def block(a, b, jac_a):
    pairs = jax.tree_util.tree_map(
        lambda ja, jb: (jnp.einsum("ijd,id...->ij...", a, ja)
                        + jnp.einsum("ijd,jd...->ij...", b, jb)), jac_a, terms.jac_b)
    return _sq_norm_sum(pairs, 2)

  return _map_row_blocks(block, row_chunk, terms.a, terms.b, terms.jac_a)


def row_sq_norms(terms: PairTerms, row_chunk: int = 8) -> jax.Array:
  """‖∇ℓ_i‖² [n] for every row: ∇ℓ_i = Σ_j c_ij g_ij = J_iᵀ u_i + Σ_j J'_jᵀ c_ij b_ij."""
  own = jnp.einsum("ij,ijd->id", terms.coef, terms.a)

  def block(u, cb, jac_a):
    rows = jax.tree_util.tree_map(
        lambda ja, jb: (jnp.einsum("id,id...->i...", u, ja)
                        + jnp.einsum("ijd,jd...->i...", cb, jb)), jac_a, terms.jac_b)
    return _sq_norm_sum(rows, 1)

  return _map_row_blocks(block, row_chunk, own, terms.coef[..., None] * terms.b, terms.jac_a)


def _clip_factors(sq_norms: jax.Array, clip_norm: float) -> jax.Array:
  """min(1, C/‖g‖), 1 where ‖g‖ = 0."""
  norms = jnp.sqrt(sq_norms)
  return jnp.minimum(1.0, clip_norm / jnp.where(norms > 0, norms, 1.0))


# ------------------------------------------------------------------------------------------------
# The clipped sums
@dataclasses.dataclass(frozen=True)
class ContrastiveSum:
  """grad_sum: pytree like params, the sum whose sensitivity the method states.
  loss: L on the batch (private: not to be released). clipped_fraction: the fraction of clipped
  pairs (Logit-DP) or rows (naive) among the real ones (private too)."""
  grad_sum: PyTree
  loss: jax.Array
  clipped_fraction: jax.Array


jax.tree_util.register_dataclass(
    ContrastiveSum, data_fields=["grad_sum", "loss", "clipped_fraction"], meta_fields=[])


def logit_dp_grad_sum(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array,
                      views_b: jax.Array, mask: jax.Array, *, temperature: float,
                      pair_clip_norm: float, row_chunk: int = 8,
                      jacobian_chunk: int | None = None,
                      pair_method: str = "jacobian") -> ContrastiveSum:
  """Logit-DP's clipped sum ḡ = Σ_ij c_ij · min(1, B/‖g_ij‖) · g_ij.

  Args:
    embed_fn: params, views [b, ...] -> embeddings [b, d], row by row; for pair_method="ghost"
      also (params, views, ghost_variables) -> (embeddings, mutated variables)
      (`contrastive_ghost.GhostEmbedFn`).
    views_a, views_b: the two views of each example, [n, ...] each (row k of both: example k).
    mask: bool [n], False for padding rows.
    temperature: τ; pair_clip_norm: B.
    row_chunk: "jacobian": pair gradients are formed row_chunk rows at a time (memory
      row_chunk·n·p); "ghost": the largest divisor of n ≤ row_chunk is the number of shifts (n
      pairs each) formed at once.
    jacobian_chunk: views per Jacobian block (None: all 2n at once; "ghost": its fallback leaves).
    pair_method: "jacobian" (the embedding Jacobians, 2n·d·p floats) or "ghost" (layer by
      layer, no Jacobians: `dpjax.contrastive_ghost`; the factor is min(1, B/U_ij) with U_ij an
      upper bound on ‖g_ij‖, rounding included; leaves of unsupported layers use their
      Jacobians).

  Privacy: adding or removing one example (both its views) changes grad_sum by at most
  `logit_dp_sensitivity(B, τ, n)` ≤ (2B/τ)(1 + e^{2/τ}) in L2 norm, whatever the data.
  """
  _check_positive("pair_clip_norm", pair_clip_norm)
  _check_pair_method(pair_method)
  real = mask[:, None] & mask[None, :]
  if pair_method == "ghost":
    found = ghost_pairs(embed_fn, params, views_a, views_b, mask, temperature=temperature,
                        pair_clip_norm=pair_clip_norm, row_chunk=row_chunk,
                        jacobian_chunk=jacobian_chunk)
    clipped = jnp.sum(jnp.where(real, found.clipped > 0, False)) / jnp.maximum(jnp.sum(real), 1)
    return ContrastiveSum(found.grad_sum, found.geometry.loss, clipped)
  terms = pair_terms(embed_fn, params, views_a, views_b, mask, temperature, jacobian_chunk)
  factors = _clip_factors(pair_sq_norms(terms, row_chunk), pair_clip_norm)
  weights = terms.coef * factors
  alpha = jnp.einsum("ij,ijd->id", weights, terms.a)
  beta = jnp.einsum("ij,ijd->jd", weights, terms.b)
  clipped = jnp.sum(jnp.where(real, factors < 1, False)) / jnp.maximum(jnp.sum(real), 1)
  return ContrastiveSum(_from_views(terms, alpha, beta), terms.loss, clipped)


def _check_pair_method(pair_method: str) -> None:
  if pair_method not in PAIR_METHODS:
    raise ValueError(f"pair_method must be one of {PAIR_METHODS}, got {pair_method!r}.")


def ghost_pairs(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array, views_b: jax.Array,
                mask: jax.Array, *, temperature: float, pair_clip_norm: float, row_chunk: int = 8,
                jacobian_chunk: int | None = None, fallback: str = "jacobian"
                ) -> contrastive_ghost.ClippedPairs:
  """`contrastive_ghost.clipped_pair_sum` for this loss: the clipped sum with each pair's
  computed squared norm, weight and clip flag [n, n] (private: for tests and statistics)."""
  return contrastive_ghost.clipped_pair_sum(
      embed_fn, params, views_a, views_b, mask,
      lambda emb_a, emb_b: pair_geometry(emb_a, emb_b, mask, temperature),
      pair_clip_norm=pair_clip_norm, shifts_per_block=_row_blocks(views_a.shape[0], row_chunk),
      jacobians=lambda fn, p, v: embedding_jacobians(fn, p, v, jacobian_chunk),
      fallback=fallback)


def naive_grad_sum(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array, views_b: jax.Array,
                   mask: jax.Array, *, temperature: float, row_clip_norm: float,
                   row_chunk: int = 8, jacobian_chunk: int | None = None,
                   pair_method: str = "jacobian") -> ContrastiveSum:
  """DP-SGD on the rows of the contrastive loss: Σ_i min(1, C/‖∇ℓ_i‖) · ∇ℓ_i.

  pair_method: "jacobian" (the embedding Jacobians, as `logit_dp_grad_sum`), or "ghost": no
  Jacobians; each row's gradient is one backward pass of the batch's 2n views with the row's
  cotangents (`_rows_by_backward`, row_chunk rows at a time: memory row_chunk·p). A row's gradient
  reads all 2n views, so a ghost norm over its 2n·T positions would never be the cheaper one.

  The baseline Logit-DP improves on. Privacy: adding or removing one example changes grad_sum by
  at most `naive_sensitivity(C, n)` = (2n − 1)C for batches of at most n real examples; the trainer
  must bound n (it releases a batch larger than its capacity as noise only).
  """
  _check_positive("row_clip_norm", row_clip_norm)
  _check_pair_method(pair_method)
  if pair_method == "ghost":
    return _rows_by_backward(embed_fn, params, views_a, views_b, mask, temperature,
                             row_clip_norm, row_chunk)
  terms = pair_terms(embed_fn, params, views_a, views_b, mask, temperature, jacobian_chunk)
  factors = _clip_factors(row_sq_norms(terms, row_chunk), row_clip_norm) * mask
  alpha = factors[:, None] * jnp.einsum("ij,ijd->id", terms.coef, terms.a)
  beta = jnp.einsum("i,ij,ijd->jd", factors, terms.coef, terms.b)
  clipped = jnp.sum(mask & (factors < 1)) / jnp.maximum(jnp.sum(mask), 1)
  return ContrastiveSum(_from_views(terms, alpha, beta), terms.loss, clipped)


def _rows_by_backward(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array, views_b: jax.Array,
                      mask: jax.Array, temperature: float, row_clip_norm: float, row_chunk: int
                      ) -> ContrastiveSum:
  """`naive_grad_sum` without Jacobians: ∇ℓ_i = J_iᵀ u_i + Σ_j J'_jᵀ c_ij b_ij is the pullback of
  the 2n embeddings at the cotangent holding u_i = Σ_j c_ij a_ij on view a_i and c_ij b_ij on view
  b_j; a block of rows' gradients [block, *params] is formed at once, clipped (norms and sum from
  the same float32 arrays) and added."""
  n = views_a.shape[0]
  emb, pullback = jax.vjp(lambda p: embed_fn(p, jnp.concatenate([views_a, views_b])), params)
  geometry = pair_geometry(emb[:n], emb[n:], mask, temperature)
  own = jnp.einsum("ij,ijd->id", geometry.coef, geometry.a)
  others = geometry.coef[..., None] * geometry.b

  def row(i):
    cot = jnp.concatenate([jnp.zeros_like(own).at[i].set(own[i]), others[i]])
    return jax.tree_util.tree_map(lambda g: g.astype(jnp.float32),
                                  pullback(cot.astype(emb.dtype))[0])

  def block(total, rows):
    grads = jax.vmap(row)(rows)
    factors = _clip_factors(_sq_norm_sum(grads, 1), row_clip_norm) * mask[rows]
    total = jax.tree_util.tree_map(lambda t, g: t + jnp.einsum("i,i...->...", factors, g),
                                   total, grads)
    return total, factors

  start = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, factors = jax.lax.scan(block, start,
                                jnp.arange(n).reshape(-1, _row_blocks(n, row_chunk)))
  clipped = jnp.sum(mask & (factors.reshape(n) < 1)) / jnp.maximum(jnp.sum(mask), 1)
  return ContrastiveSum(total, geometry.loss, clipped)


def nonprivate_grad_sum(embed_fn: EmbedFn, params: PyTree, views_a: jax.Array,
                        views_b: jax.Array, mask: jax.Array, *, temperature: float
                        ) -> ContrastiveSum:
  """∇L by one backward pass; no clipping, no privacy."""
  loss, grad = jax.value_and_grad(batch_loss, argnums=1)(embed_fn, params, views_a, views_b,
                                                         mask, temperature)
  return ContrastiveSum(grad, loss, jnp.zeros([]))
