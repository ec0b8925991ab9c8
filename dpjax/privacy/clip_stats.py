"""Clipping statistics: how many examples a clip rule scaled down, and their pre-clip norms.

Sums over the real (unpadded) examples of a batch, so that microbatches and devices can add them
up (`add_stats`); both per-example paths (`dpjax.privacy.clipping`, `dpjax.privacy.ghost`) form
them with `microbatch_stats`. They depend on private data: only `num_clipped`, whose sensitivity
is 1, may be released, with noise (`dpjax.privacy.noise.ClipCountRelease`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ClipStats(NamedTuple):
  """Clipping statistics over the real (unpadded) examples of a batch.

  Sums, not means, so that microbatches and devices can add them up; `summarize` turns them into
  means. These statistics depend on private data: they are for monitoring and must not be released
  or used to steer training without privatising them.

  num_clipped counts the real examples whose pre-clip norm exceeds the clip norm: those that flat
  and per-layer clipping scale down (per-layer: any group above its C_g), and for automatic and
  normalized clipping, which rescale every example, those above R (the ones flat clipping at R
  would scale down). Each example adds a 0/1 flag that depends on it alone (padding adds 0), so
  adding or removing one example changes num_clipped by at most 1: its sensitivity is 1, and
  `dpjax.privacy.noise.ClipCountRelease` releases it with Gaussian noise.
  An example with a non-finite gradient norm (dropped from the clipped sum) counts as clipped
  (its flag is 1) and adds 0 to norm_sum and norm_max.
  """
  num_examples: jax.Array   # number of real examples
  num_clipped: jax.Array    # examples with pre-clip norm > the clip norm (see above)
  norm_sum: jax.Array       # sum of pre-clip global L2 norms
  norm_max: jax.Array       # max pre-clip global L2 norm


def summarize(stats: ClipStats) -> dict[str, jax.Array]:
  """Fraction clipped, mean and max pre-clip norm, from summed `ClipStats`."""
  n = jnp.maximum(stats.num_examples, 1)
  return dict(clip_fraction=stats.num_clipped / n, mean_grad_norm=stats.norm_sum / n,
              max_grad_norm=stats.norm_max)


def microbatch_stats(norms: jax.Array, was_clipped: jax.Array, real: jax.Array) -> ClipStats:
  """`ClipStats` of one microbatch from per-example norms [m], clip flags [m] and real rows [m].
  A real example whose norm is inf or NaN (dropped from the sum) counts as clipped and adds 0 to
  the norm sum and max, which stay finite."""
  finite = jnp.isfinite(norms)
  real_norms = jnp.where(real & finite, norms, 0.0)
  return ClipStats(num_examples=jnp.sum(real.astype(jnp.float32)),
                   num_clipped=jnp.sum(jnp.where(real, jnp.where(finite, was_clipped, 1.0), 0.0)),
                   norm_sum=jnp.sum(real_norms), norm_max=jnp.max(real_norms, initial=0.0))


def zero_stats() -> ClipStats:
  """Statistics of an empty batch."""
  z = jnp.float32(0.0)
  return ClipStats(z, z, z, z)


def add_stats(a: ClipStats, b: ClipStats) -> ClipStats:
  """Combines the statistics of two disjoint parts of a batch."""
  return ClipStats(a.num_examples + b.num_examples, a.num_clipped + b.num_clipped,
                   a.norm_sum + b.norm_sum, jnp.maximum(a.norm_max, b.norm_max))
