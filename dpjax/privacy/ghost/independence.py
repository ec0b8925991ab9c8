"""A check that a batched forward and backward pass keeps examples apart, which ghost clipping's
bound on each example's contribution assumes (the vmap path runs each example alone)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dpjax.privacy.ghost.layers import BatchLosses, GhostUnsupportedError
from dpjax.privacy.ghost.norms import ghost_sq_norms

PyTree = Any


class ExamplesMixedError(GhostUnsupportedError):
  """The batched forward pass mixes examples, so ghost's per-example norms are not per-example."""


def check_examples_independent(batch_losses: BatchLosses, params: PyTree, batch: PyTree, *,
                               trainable: PyTree | None = None, fallback: str = "vmap",
                               rtol: float = 1e-3, views: int = 1) -> None:
  """Raises `ExamplesMixedError` if changing one example of `batch` changes another's loss or
  ghost norm.

  Ghost clipping takes every example's norm and clipped gradient from one batched forward and
  backward pass; its bound on one example's contribution holds only if example i's loss, layer
  inputs and output gradients depend on example i alone. BatchNorm in training mode, a
  batch-mean subtraction or attention across the batch axis break that silently (and
  `clipping.reject_batch_stats` sees only BatchNorm's statistics). The vmap path is immune: it
  differentiates a loss of each example alone. The check replaces the first example, then the
  last, by another example of the batch and by large random noise (floating leaves; other
  leaves, such as labels, are taken from that other example), and requires the other examples'
  losses and ghost squared norms (`ghost_sq_norms`) to stay within rtol of their size plus four
  times how much two evaluations of `batch` itself differ (non-deterministic reductions on an
  accelerator). A model that keeps examples apart gives the untouched rows bit for bit.

  Args:
    batch_losses: batch_losses(params, batch) -> [n] losses, as `clipped_grad_sum` takes it.
    params: the params (a fresh init is fine: the check reads the model's structure).
    batch: leaves [n ≥ 2, ...] of distinct, non-degenerate examples; synthetic data serves (the
      trainer passes random images, so that no private data steers the check).
    trainable, fallback, views: as for `clipped_grad_sum`. With views > 1 the check also
      refuses a batch_losses whose views are not example-major (as `clipped_grad_sum` reads
      them): one example's change then moves rows that ghost assigns to other examples.
  """
  n = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
  if n < 2:
    raise ValueError(f"check_examples_independent needs a batch of at least 2 examples, got {n}.")
  evaluate = jax.jit(lambda p, b: (batch_losses(p, b),
                                   ghost_sq_norms(batch_losses, p, b, trainable, fallback,
                                                  views)))
  as_numpy = lambda values: [np.asarray(x, np.float64) for x in values]
  base, again = as_numpy(evaluate(params, batch)), as_numpy(evaluate(params, batch))
  if not all(np.all(np.isfinite(x)) for x in base):
    raise ValueError("check_examples_independent needs finite losses and norms on its batch.")
  for index, other in ((0, 1), (n - 1, n - 2)):
    for what, changed in (("another example", _with_example(batch, index, other, None)),
                          ("random noise", _with_example(batch, index, other, index))):
      for name, got, want, repeat in zip(("losses", "gradient norms"),
                                         as_numpy(evaluate(params, changed)), base, again):
        rows = np.arange(n) != index
        tolerance = (4 * np.max(np.abs(repeat - want))
                     + rtol * (np.abs(want[rows]) + np.mean(np.abs(want))))
        moved = np.abs(got[rows] - want[rows])
        if not np.all(moved <= tolerance):  # NaN included
          raise ExamplesMixedError(
              f"The model mixes the examples of a batch: replacing example {index} by {what} "
              f"changed the {name} of other examples (by up to {np.nanmax(moved):.3g}, or to a "
              "non-finite value), e.g. through batch statistics (BatchNorm in training mode, a "
              "batch-mean subtraction). Ghost clipping computes every example's norm and "
              "clipped gradient from one batched pass, so its bound on one example's "
              "contribution, hence the DP guarantee, does not hold for this model. Use "
              "perf.per_example_method='vmap' (each example's gradient from that example "
              "alone), or a model that treats examples independently (GroupNorm, LayerNorm).")


def _with_example(batch: PyTree, index: int, other: int, noise_seed: int | None) -> PyTree:
  """The batch (as NumPy) with row `index` replaced by row `other`, or, with a noise_seed, its
  floating leaves by random normal values of scale 4·max|leaf| + 1 (its other leaves by row
  `other`)."""
  rng = np.random.default_rng(noise_seed)

  def replace(leaf):
    leaf = np.array(leaf)
    row = leaf[other]
    if noise_seed is not None and np.issubdtype(leaf.dtype, np.floating):
      scale = 4.0 * float(np.max(np.abs(leaf.astype(np.float32)))) + 1.0
      row = (scale * rng.standard_normal(leaf.shape[1:])).astype(leaf.dtype)
    leaf[index] = row
    return leaf
  return jax.tree_util.tree_map(replace, batch)
