"""Per-example norms of the leaves' terms, with their rounding bounds (`NormBound`), reduced in
stacks: one kernel per Gram or row shape rather than one or two per leaf (Gram stacks capped at
`MAX_GRAMS_PER_STACK` distinct Grams)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dpjax.privacy.ghost.collect import LeafTerm, leaf_terms
from dpjax.privacy.ghost.layers import BatchLosses
from dpjax.privacy.ghost.rounding import NormBound, gamma, gram_norm_bound, summed_bound
from dpjax.privacy.ghost.terms import Outer, Summed, Term, ghost_norm_is_cheaper, gram

PyTree = Any


def term_norm_bound(term: Term, stacked: bool) -> NormBound:
  """`Term.norm_bound`, summed over the scanned axis of a stacked term: the slices are orthogonal
  blocks of the param, and by Minkowski's inequality √Σₖ(√(sqₖ + errₖ) + slackₖ)² is at most
  √(Σₖ sqₖ + Σₖ errₖ) + Σₖ slackₖ, so the sums bound the stack's contribution."""
  if not stacked:
    return term.norm_bound()
  return NormBound(*(jnp.sum(x, axis=0) for x in jax.vmap(lambda t: t.norm_bound())(term)))


def sq_norms_of_terms(terms: dict[tuple[str, ...], LeafTerm]) -> dict[tuple[str, ...], NormBound]:
  """{leaf path: `NormBound` [m]} for `leaf_terms`' terms.

  The leaves' reductions to [m] are batched. The Gram products of the kernels whose ghost norm
  is used (outside nn.scan) are stacked by Gram shape and output-gradient dtype, the rows of the
  `Summed` terms (biases, norms' scales) by shape, and each stack is reduced at once: XLA fuses
  the stack into the reduction, one kernel per shape instead of one or two per leaf (on an H200 a
  CIFAR-sized ViT's step launched ~140 of them; `benchmarks/results/archive/README.md`). The Grams
  themselves stay one matmul per distinct array (q, k and v share their input's): stacking the
  layers' inputs to batch those matmuls copies the inputs and was slower. The norms are the same.
  A Gram stack holds at most `MAX_GRAMS_PER_STACK` distinct Grams: XLA's GPU fusion passes cap a
  fusion at 96 operands and outputs together (`MaxOperandsAndOutputsPerFusion`), so a ViT-B/16's
  single stack of 72 products (120 Grams) was not fused but copied (a 2.9 GB concatenation and a
  slower reduction, ~3.5 ms of a 59 ms step on an H200), where the CIFAR ViT's 60 were fused.
  """
  found, kernels, rows, grams = {}, {}, {}, {}

  def gram_of(x):  # by identity: an input that several layers read gets one Gram
    if id(x) not in grams:
      grams[id(x)] = gram(x)
    return grams[id(x)]

  for path, (_, term, stacked) in terms.items():
    if stacked:
      found[path] = term_norm_bound(term, stacked)
    elif isinstance(term, Summed):
      rows.setdefault(term.h.shape, []).append((path, term.h))
    elif (isinstance(term, Outer)
          and ghost_norm_is_cheaper(*term.a.shape[1:], term.g.shape[-1])):
      kernels.setdefault((term.a.shape[:2], term.g.dtype), []).append(
          (path, gram_of(term.a), gram_of(term.g), term.a.shape[-1], term.g.shape[-1]))
    else:
      found[path] = term.norm_bound()
  for (_, g_dtype), members in kernels.items():
    for chunk in within_gram_cap(members):
      widths = lambda k: jnp.asarray([[gamma(member[k])] for member in chunk], jnp.float32)
      bound = gram_norm_bound(jnp.stack([a for _, a, _, _, _ in chunk]),
                              jnp.stack([g for _, _, g, _, _ in chunk]), widths(3), widths(4),
                              float(jnp.finfo(g_dtype).eps))
      found.update({member[0]: NormBound(*(x[k] for x in bound))
                    for k, member in enumerate(chunk)})
  for members in rows.values():
    bound = summed_bound(jnp.stack([h for _, h in members]))
    found.update({path: NormBound(*(x[k] for x in bound)) for k, (path, _) in enumerate(members)})
  return {path: found[path] for path in terms}


MAX_GRAMS_PER_STACK = 48  # half XLA GPU's 96 operands + outputs per fusion: room for the rest


def within_gram_cap(members: list) -> list[list]:
  """[(path, gram_a, gram_g, ...), ...] split, in order, into runs that read at most
  `MAX_GRAMS_PER_STACK` distinct Gram arrays each (a Gram several layers share counts once)."""
  chunks, distinct = [[]], set()
  for member in members:
    new = {id(member[1]), id(member[2])} - distinct
    if chunks[-1] and len(distinct) + len(new) > MAX_GRAMS_PER_STACK:
      chunks.append([])
      distinct, new = set(), {id(member[1]), id(member[2])}
    chunks[-1].append(member)
    distinct |= new
  return chunks



def ghost_sq_norms(batch_losses: BatchLosses, params: PyTree, batch: PyTree,
                   trainable: PyTree | None = None, fallback: str = "vmap",
                   views: int = 1) -> jax.Array:
  """Per-example squared L2 norms [m] of ∇ℓᵢ w.r.t. the trainable params, without per-example
  gradients of the supported layers.

  batch_losses(params, batch) -> [m] per-example losses of a batch; examples must not interact
  (`check_examples_independent`). views: K views per example in the model's batch (`leaf_terms`).
  """
  terms = leaf_terms(batch_losses, params, batch, trainable, fallback, views)
  return sum(bound.sq for bound in sq_norms_of_terms(terms).values())
