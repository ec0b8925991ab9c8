"""Ghost clipping's clipped sum: each example's weights from the clip rule and its norm bounds,
then Σᵢ wᵢ∇ᵢ per leaf as weighted sums of the leaves' terms (one matmul per kernel).

Every example's factor wᵢ is computed, for every rule, from an upper bound Uᵢ on the norm of what
the sums add for the example per unit wᵢ, all rounding included (`NormBound.upper`): every rule's
factor has factor(U)·U ≤ C (`clipping.ClipRule`), whether it scales down (flat) or up (automatic,
normalized), so the contribution stays within C. From the norm alone, the factors of rules that
scale up scaled the rounding up too (contributions of 1.43·C in float32, tests/ghost_test.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dpjax import pytrees
from dpjax.privacy import clip_stats, clipping
from dpjax.privacy.ghost.collect import LeafTerm, leaf_terms
from dpjax.privacy.ghost.layer_terms import as_param, masked
from dpjax.privacy.ghost.layers import BatchLosses
from dpjax.privacy.ghost.norms import sq_norms_of_terms
from dpjax.privacy.ghost.rounding import NormBound
from dpjax.privacy.ghost.terms import Summed, einsum, unshared

PyTree = Any


def example_weights(rule: clipping.ClipRule, groups: dict[tuple[str, ...], str],
                    bounds: dict[tuple[str, ...], NormBound], real: jax.Array) -> tuple:
  """(weights {leaf path: wᵢ [m]}, kept [m], norms [m], clipped [m]) from the leaves' clip groups
  (`ClipRule.groups`) and `NormBound`s.

  Per clip group, wᵢ = factor(Uᵢ) (`ClipRule.factors`) with Uᵢ = √Σ_leaves upper² ≥ ‖cᵢ‖/wᵢ (the
  leaves are orthogonal blocks), so the group's contribution has norm ≤ factor(Uᵢ)·Uᵢ ≤ its bound
  C: every rule's factor satisfies factor(x)·x ≤ C for all x ≥ 0 (flat: min(1, C/x)·x, automatic:
  Cx/(x + γ), normalized: C, per group likewise), whether it scales down or up. An upper bound,
  not a lower one: a rule's factor(x)·x bounds x only, and for rules that scale up (factor > 1)
  the rounding of the scaled factor grows with it, so the factor must see it. kept: the real rows
  whose bounds are all finite; a row with an inf or NaN anywhere in its terms gets weight 0 and is
  zeroed in the weighted sums, so it adds exactly 0 (and counts as clipped). norms: the computed
  ‖∇ᵢ‖ (the statistics); clipped: the rule's clip flag at that norm, or 1.0 where dropped.
  """
  members: dict[str, list] = {}  # clip group -> [(leaf path, NormBound), ...]
  for path, bound in bounds.items():
    members.setdefault(groups[path], []).append((path, bound))
  norms = {name: jnp.sqrt(sum(bound.sq for _, bound in group))
           for name, group in members.items()}
  uppers = {name: jnp.sqrt(sum(jnp.square(bound.upper()) for _, bound in group))
            for name, group in members.items()}
  factors, _ = rule.factors(uppers)
  _, clipped = rule.factors(norms)
  finite = functools.reduce(jnp.logical_and, (jnp.isfinite(u) for u in uppers.values()),
                            jnp.ones(real.shape, bool))
  kept = real & finite
  weights = {path: jnp.where(kept, factors[name], 0.0)
             for name, group in members.items() for path, _ in group}
  dropped = jnp.where(finite, 0.0, 1.0)
  total = jnp.sqrt(sum((jnp.square(norm) for norm in norms.values()),
                       jnp.zeros(real.shape, jnp.float32)))
  return weights, kept, total, jnp.maximum(clipped, dropped)


def _row_sums(terms: dict[tuple[str, ...], LeafTerm], weights: dict, real: jax.Array) -> dict:
  """{leaf path: Σᵢ wᵢ·hᵢ [width], float32} over the real rows, for the `Summed` terms outside
  nn.scan (biases, norms' scales), stacked by shape: one matrix-vector product per shape instead
  of one per leaf (`norms.sq_norms_of_terms` batches their norms likewise)."""
  by_shape: dict[tuple, list] = {}
  for path, (_, term, stacked) in terms.items():
    if not stacked and isinstance(term, Summed):
      by_shape.setdefault(term.h.shape, []).append(path)
  found = {}
  for paths in by_shape.values():
    w, r = unshared(jnp.stack([weights[path] for path in paths]), real)
    h = jnp.stack([terms[path].term.h for path in paths])
    sums = einsum("lm,lmk->lk", w, jnp.where(r[None, :, None], h, 0.0))
    found.update({path: sums[k] for k, path in enumerate(paths)})
  return found


def _summed_param(found: LeafTerm, name: str, weights: jax.Array, real: jax.Array,
                  shape: tuple[int, ...]) -> jax.Array:
  """Σᵢ wᵢ·∇ᵢ of one param leaf [*shape] from its `LeafTerm`; a stacked term is summed slice by
  slice along its scanned axis (shape[0])."""
  module, term, stacked = found
  if not stacked:
    return as_param(module, name, term.weighted_sum(weights, real), shape)
  one = lambda t: as_param(module, name, t.weighted_sum(weights, real), shape[1:])
  return jax.vmap(one)(term)


def clipped_grad_sum(batch_losses: BatchLosses, params: PyTree, examples: PyTree,
                     mask: jax.Array, rule: clipping.ClipRule, *,
                     microbatch_size: int | None = None, trainable: PyTree | None = None,
                     fallback: str = "vmap", element_mask: PyTree | None = None,
                     row_masks: bool = False, views: int = 1) -> clipping.ClippedSum:
  """Σᵢ maskᵢ·clip(∇ℓᵢ) by ghost clipping with book-keeping; the result of
  `clipping.clipped_grad_sum` (float32) up to the rounding bounds below, without per-example
  gradients or a second backward pass.

  batch_losses(params, batch) -> [m] per-example losses; examples: leaves [n, ...]; mask [n];
  rule: any `clipping.ClipRule`: one factor per example and clip group (`ClipRule.groups`: one
    group for flat, automatic and normalized clipping, a group per layer for per-layer clipping;
    a scanned stack is one leaf, so in one group), from the group's ghost norm bound.
  element_mask: optional pytree like params (0/1): each per-example gradient is M ⊙ ∇ℓᵢ before
    clipping, as `clipping.clipped_grad_sum` of a loss of `finetune.masked_params` (sparse
    fine-tuning). The masked leaves' per-example gradients are instantiated
    (`layer_terms.masked`), unless row_masks.
  row_masks: every leaf of element_mask masks whole output rows (it depends on the last axis
    only, as `dpjax.finetune.top_rows` makes; `finetune.is_row_mask`): the masked kernels keep
    their factored form (where their norm instantiates the gradients anyway, those are kept),
    at about the cost of unmasked ghost clipping. The contribution bound holds either way
    (`layer_terms.masked`).
  views: K ≥ 1, augmentation multiplicity: batch_losses runs the model on K views of each
    example, example-major, and returns each example's mean loss over them (`dpjax.train.step.
    make_batch_losses` with a `dpjax.data.views.Views`). Each example's per-example gradient is
    then the mean of its views' gradients, its terms merged over the views (`terms.merge_views`),
    so its norm, and the clip, are those of the mean gradient, computed exactly (not bounded
    from the views' norms): the contribution stays ≤ rule.sensitivity whatever K is.

  Privacy: the batched forward pass must not mix examples (`check_examples_independent`). Then
  each example's contribution has norm ≤ rule.sensitivity for every rule, in any precision: its
  factor is computed from an upper bound on the norm of what the weighted sums add for it,
  rounding included (`example_weights`, `NormBound`), not from its computed norm. An example
  whose terms hold an inf or NaN (an inf or NaN input, an overflow) adds exactly zero, as padded
  rows (mask 0) do. The statistics report the computed norms; a non-finite one counts as clipped
  and adds 0 to the norm sum and max.
  """
  clipping.reject_batch_stats(params)
  if fallback not in ("vmap", "error"):
    raise ValueError(f"fallback must be 'vmap' or 'error', got {fallback!r}.")
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)
  train_p, frozen_p = pytrees.partition(params, trainable)
  groups = dict(zip(pytrees.leaf_paths(train_p), jax.tree_util.tree_leaves(rule.groups(train_p))))
  masks = ({} if element_mask is None else
           dict(zip(pytrees.leaf_paths(element_mask), jax.tree_util.tree_leaves(element_mask))))

  def clip_chunk(chunk):
    batch, chunk_mask = chunk
    terms = leaf_terms(batch_losses, params, batch, trainable, fallback, views)
    for path, (module, term, stacked) in terms.items():
      if path in masks:
        mask_term = functools.partial(masked, module, path[-1], rows=row_masks)
        terms[path] = LeafTerm(
            module, (jax.vmap(mask_term) if stacked else mask_term)(term, masks[path]), stacked)
    return clipped_terms_sum(terms, rule, groups, train_p, chunk_mask)

  return clipping.sum_over_microbatches(clip_chunk, examples, mask, m, frozen_p, rule)


def clipped_terms_sum(terms: dict[tuple[str, ...], LeafTerm], rule: clipping.ClipRule,
                      groups: dict[tuple[str, ...], str], train_p: PyTree, chunk_mask: jax.Array
                      ) -> tuple[PyTree, clip_stats.ClipStats]:
  """(Σᵢ wᵢ∇ᵢ like train_p, float32; `ClipStats`) of one microbatch from every trainable leaf's
  term (`collect.leaf_terms`, or any collector of `LeafTerm`s for those leaves): the weights from
  the rule and the terms' norm bounds (`example_weights`), then each leaf's weighted sum.
  groups: {leaf path: clip group} (`ClipRule.groups`); chunk_mask [m]: 1 for real rows."""
  weights, kept, norms, clipped = example_weights(rule, groups, sq_norms_of_terms(terms),
                                                  chunk_mask > 0)
  summed = weighted_terms_sum(terms, weights, kept, train_p)
  return summed, clip_stats.microbatch_stats(norms, clipped, chunk_mask > 0)


def weighted_terms_sum(terms: dict[tuple[str, ...], LeafTerm], weights: dict, kept: jax.Array,
                       train_p: PyTree) -> PyTree:
  """Σᵢ wᵢ∇ᵢ like train_p (float32) over the rows where `kept`, from every leaf's term and its
  weights {leaf path: wᵢ [m]}: one weighted sum per leaf (`Term.weighted_sum`), the `Summed`
  terms' stacked by shape (`_row_sums`)."""
  rows = _row_sums(terms, weights, kept)

  def summed_param(key_path, x):
    path = pytrees.path_to_names(key_path)
    if path in rows:
      return as_param(terms[path].module, path[-1], rows[path], x.shape)
    return _summed_param(terms[path], path[-1], weights[path], kept, x.shape)
  return jax.tree_util.tree_map_with_path(summed_param, train_p)
