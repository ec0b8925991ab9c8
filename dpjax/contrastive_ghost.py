"""Logit-DP without embedding Jacobians: the pair gradients' norms and their clipped sum layer
by layer, from ghost clipping's factored terms (`dpjax.privacy.ghost`).

`dpjax.contrastive` holds every view's embedding Jacobian J_v (2n·d·p floats for n examples,
embedding width d, p parameters). Here nothing of size d·p exists. One forward pass over the 2n
views (a then b) runs under ghost's layer interception (`ghost.layers.intercepting`): every
supported layer's input x_v is sown and a zero probe is added to its output. For a cotangent c on
view v's embedding, the probe's gradient is the layer's output gradient δ_v(c) under c, and the
gradient of ⟨e_v, c⟩ w.r.t. the layer's kernel is Σₜ x_vₜ ⊗ δ_vₜ(c). So the pair gradient
g_ij = J_iᵀ a_ij + J'_jᵀ b_ij is, per kernel, Σₜ x_iₜ ⊗ δ_iₜ(a_ij) + Σₛ x'_jₛ ⊗ δ'_jₛ(b_ij):
ghost's factored term of an "example" (the pair) with two "views" (a_i under a_ij, b_j under
b_ij), whose positions are merged (`ghost.merge_views`, as for augmentation multiplicity).

The n² pairs are taken in n shifts k: shift k holds the n pairs (i, i + k mod n), so every view
appears in it once, under one cotangent: one batched backward pass of the 2n views (to the
probes only, no parameter gradients: `jax.vjp` of the forward pass, reused) gives all n pairs'
terms. Their norms come from ghost's `Term.norm_bound` (ghost norm from Grams, or the
instantiated kernel gradient where that is cheaper: fastDP's rule, `ghost_norm_is_cheaper`),
with ghost's rounding bounds. Each pair's factor is min(1, B/U_ij) with U_ij the upper bound
(`NormBound.upper`), its weight w_ij = c_ij · factor, and the clipped sum
Σ_ij w_ij g_ij = Σ_v Σₜ x_vₜ ⊗ V_vₜ with V_v = Σ_pairs of v w·δ_v(pair's cotangent): the weighted
output gradients are accumulated over the shifts (float32) and contracted with the inputs once at
the end (one weight-gradient matmul per layer, as in a backward pass).

Cost, per step, for A_v the per-view size of the supported layers' inputs and outputs (their
activations) and, per kernel layer l, T_l positions, widths d_l → p_l:
  memory: the forward pass's residuals (2n·A), the accumulated V (2n·A, float32), and per block
    of `shifts_per_block` shifts the probes' gradients and pair terms (shifts_per_block·2n·A, and
    per kernel shifts_per_block·n·min(4T_l², d_l·p_l) for the Grams or instantiated gradients),
    against the Jacobian path's 2n·d·p for the Jacobians plus row_chunk·n·p for pair gradients.
  FLOPs: n backward passes of 2n views to the probes (≈ n × a forward pass of 2n views), n² pair
    norms of Σ_l min(4T_l²(d_l + p_l), 2T_l·d_l·p_l), one weight-gradient contraction; the
    Jacobian path makes d backward passes of 2n views with per-view weight gradients and
    2n²·d·p for the pair norms. Ghost is the cheaper in FLOPs when n < d and the layers' T_l are
    small; a 32×32 conv layer's instantiated pair gradient (2T·d_l·p_l, T = 1024) costs more
    than the Jacobian path's 2d·p_l per pair when d < T, while its memory stays per block.

Leaves no supported layer owns alone (`ghost.layers.coverage`) fall back to the Jacobian path per
leaf (fallback="jacobian": the embedding Jacobians of those leaves only, 2n·d·(their size)) or
raise GhostUnsupportedError (fallback="error").

Privacy: every pair's contribution w_ij g_ij has norm ≤ |c_ij|·B in any precision of the model,
as ghost clipping's per-example contribution is ≤ C: the factor comes from an upper bound on the
norm of the pair gradient of the arrays held (x, δ), its float32 rounding relative to the pair's
per-position terms included (`ghost.gram_norm_bound`, `rounding_slack`); the accumulation over
pairs in V and the final contraction are the released sum's own rounding (float32). A pair whose
terms hold an inf or NaN gets weight 0 and is zeroed (`where`). Fallback leaves' pair gradients
are instantiated (`ghost.Summed`), their sum formed from the Jacobians as on the Jacobian path.
So `contrastive.logit_dp_sensitivity` holds unchanged. The forward pass must keep the views apart
(no BatchNorm), as the Jacobian path assumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpjax import pytrees
from dpjax.privacy import clipping
from dpjax.privacy.ghost.clipped_sum import example_weights, weighted_terms_sum
from dpjax.privacy.ghost.collect import LeafTerm, layer_leaf_terms, zero_probes
from dpjax.privacy.ghost.layers import (INPUTS, SUPPORTED, GhostUnsupportedError, coverage,
                                        intercepting, layer_calls)
from dpjax.privacy.ghost.norms import sq_norms_of_terms
from dpjax.privacy.ghost.terms import Summed

PyTree = Any
FALLBACKS = ("jacobian", "error")
# embed_fn(params, views) -> embeddings [b, d]; embed_fn(params, views, ghost_variables) ->
# (embeddings, mutated variables): the model applied with the ghost collections
# (`ghost.apply_model`).
GhostEmbedFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class PairGeometry:
  """a, b [n, n, d]: a_ij = ∂s_ij/∂e_i, b_ij = ∂s_ij/∂e'_j; coef [n, n]: c_ij = ∂L/∂s_ij; loss: L
  (`contrastive.pair_geometry`)."""
  a: jax.Array
  b: jax.Array
  coef: jax.Array
  loss: jax.Array


jax.tree_util.register_dataclass(PairGeometry, data_fields=["a", "b", "coef", "loss"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ClippedPairs:
  """grad_sum: Σ_ij w_ij g_ij like params (float32). sq_norms [n, n]: the computed ‖g_ij‖².
  weights [n, n]: w_ij = c_ij·factor_ij (0 for padding and dropped pairs). clipped [n, n]: 1 where
  a pair was clipped or dropped. geometry: the batch's `PairGeometry`. Private: not to be
  released."""
  grad_sum: PyTree
  sq_norms: jax.Array
  weights: jax.Array
  clipped: jax.Array
  geometry: PairGeometry


def _rows(tree: dict, leaf: str, used: dict, fn: Callable) -> dict:
  """{path...: {leaf: fn(array, depth)}} for the used layers' arrays in a probes or inputs tree
  (an inputs leaf is a tuple of sown values: the first is kept)."""
  out: dict = {}
  for path, depth in used.items():
    value = pytrees.subtree(tree, path)[leaf]
    value = value[0] if leaf == "inputs" else value
    pytrees.subtree(out, path, create=True)[leaf] = (fn(value, depth),) if leaf == "inputs" else (
        fn(value, depth))
  return out


def _per_row(weights: jax.Array, x: jax.Array, depth: int) -> jax.Array:
  """weights [rows] broadcast along axis `depth` (the rows axis) of x."""
  return weights.reshape((1,) * depth + (-1,) + (1,) * (x.ndim - depth - 1))


def _check_fallback(fallback: str, params: PyTree, left: PyTree) -> list:
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
  names = ["/".join(path) for path, keep in zip(pytrees.leaf_paths(params),
                                                jax.tree_util.tree_leaves(left)) if keep]
  if names and fallback == "error":
    raise GhostUnsupportedError(
        f"pair_method='ghost' cannot form the pair gradients of {names} layer by layer: no "
        f"supported layer ({', '.join(t.__name__ for t in SUPPORTED)}, or a module with "
        "ghost_grads) owns them alone, called once per view. Use fallback='jacobian' (their "
        "embedding Jacobians only) or pair_method='jacobian'.")
  return names


def clipped_pair_sum(embed_fn: GhostEmbedFn, params: PyTree, views_a: jax.Array,
                     views_b: jax.Array, mask: jax.Array, geometry_fn: Callable, *,
                     pair_clip_norm: float, shifts_per_block: int,
                     jacobians: Callable, fallback: str = "jacobian") -> ClippedPairs:
  """Logit-DP's clipped sum Σ_ij c_ij·min(1, B/U_ij)·g_ij without embedding Jacobians (module
  docstring: how, what it costs, its privacy).

  Args:
    embed_fn: see `GhostEmbedFn`; rows must not interact.
    views_a, views_b: [n, ...] each; mask: bool [n], False for padding rows.
    geometry_fn: (emb_a, emb_b) -> `PairGeometry` (`contrastive.pair_geometry` with the mask and
      temperature bound).
    pair_clip_norm: B > 0.
    shifts_per_block: shifts (n pairs each) formed at once; must divide n.
    jacobians: (embed_fn, params, views) -> (embeddings, Jacobians [2n, d, *leaf]), for the
      fallback leaves (`contrastive.embedding_jacobians`).
    fallback: "jacobian" or "error", for leaves no supported layer owns.

  Privacy: each pair's contribution has norm ≤ |c_ij|·B (module docstring), so the sum's
  sensitivity is `contrastive.logit_dp_sensitivity`.
  """
  n = int(views_a.shape[0])
  if n % shifts_per_block:
    raise ValueError(f"shifts_per_block = {shifts_per_block} must divide the batch ({n}).")
  views = jnp.concatenate([views_a, views_b])
  layers, probe_shapes, calls = layer_calls(embed_fn, params, views)
  used, left = coverage(layers, calls, params, None)
  fallback_names = _check_fallback(fallback, params, left)
  (emb, backward, mutated) = jax.vjp(
      lambda probes: intercepting(embed_fn, {})(params, views, probes),
      zero_probes(probe_shapes, views), has_aux=True)
  inputs = mutated[INPUTS]
  geometry = geometry_fn(emb[:n], emb[n:])
  jac = None
  if fallback_names:
    mine, rest = pytrees.partition(params, left)
    jac = jacobians(lambda p, v: embed_fn(pytrees.merge(p, rest), v), mine, views)[1]
  rule = clipping.FlatClip(pair_clip_norm)
  idx = jnp.arange(n)

  def one_shift(k):
    """The n pairs (i, i + k): their weighted output gradients [2n rows] and (norms, weights,
    kept, clipped) [n] each."""
    partner, back = (idx + k) % n, (idx - k) % n
    cot_a, cot_b = geometry.a[idx, partner], geometry.b[idx, partner]
    grads = backward(jnp.concatenate([cot_a, geometry.b[back, idx]]).astype(emb.dtype))[0]
    order = jnp.stack([idx, n + partner], axis=1).reshape(-1)  # pair i: views a_i, b_{i+k}
    by_pair = lambda x, depth: jnp.take(x, order, axis=depth)
    terms = layer_leaf_terms(layers, used, _rows(inputs, "inputs", used, by_pair),
                             _rows(grads, "probe", used, by_pair), params, None, 2 * n, 2)
    if jac is not None:
      pair_grad = lambda j: (jnp.einsum("id,id...->i...", cot_a, j[:n])
                             + jnp.einsum("id,id...->i...", cot_b, j[n:][partner]))
      for path, j in zip(pytrees.leaf_paths(jac), jax.tree_util.tree_leaves(jac)):
        terms[path] = LeafTerm(None, Summed(pair_grad(j).reshape(n, -1).astype(jnp.float32)),
                               False)
    weights, kept, norms, clipped = example_weights(
        rule, {path: clipping.ONE_GROUP for path in terms}, sq_norms_of_terms(terms),
        mask & mask[partner])
    w = geometry.coef[idx, partner] * next(iter(weights.values()))
    w_views, kept_views = (jnp.concatenate([w, w[back]]),
                           jnp.concatenate([kept, kept[back]]))
    scaled = lambda g, depth: jnp.where(_per_row(kept_views, g, depth),
                                        _per_row(w_views, g, depth) * g.astype(jnp.float32), 0.0)
    return _rows(grads, "probe", used, scaled), (norms, w, kept, clipped)

  def block(total, shifts):
    weighted, found = jax.vmap(one_shift)(shifts)
    return jax.tree_util.tree_map(lambda t, x: t + jnp.sum(x, 0), total, weighted), found

  start = jax.tree_util.tree_map(
      lambda x: jnp.zeros(x.shape, jnp.float32),
      jax.eval_shape(lambda: one_shift(jnp.int32(0))[0]))
  total, found = jax.lax.scan(block, start, idx.reshape(-1, shifts_per_block))
  # found: [n // block, block, n] by (shift k, row i) -> [n, n] by pair (i, i + k).
  by_pair = lambda x: x.reshape(n, n)[(idx[None, :] - idx[:, None]) % n, idx[:, None]]
  norms, weights, kept, clipped = (by_pair(x) for x in found)
  in_use = jnp.concatenate([jnp.any(kept, axis=1), jnp.any(kept, axis=0)])
  terms = layer_leaf_terms(layers, used, inputs, total, params, None, 2 * n, 1)
  covered, _ = pytrees.partition(params, jax.tree_util.tree_map(lambda x: not x, left))
  grad_sum = weighted_terms_sum(terms, {path: jnp.ones(2 * n) for path in terms}, in_use,
                                covered)
  if jac is not None:
    alpha = jnp.einsum("ij,ijd->id", weights, geometry.a)
    beta = jnp.einsum("ij,ijd->jd", weights, geometry.b)
    both = jnp.concatenate([alpha, beta])
    grad_sum = pytrees.merge(
        grad_sum, jax.tree_util.tree_map(lambda j: jnp.einsum("vd,vd...->...", both, j), jac))
  return ClippedPairs(grad_sum, jnp.square(norms), weights, clipped, geometry)
