"""Per-example gradients and clip rules: the sensitivity half of a DP-SGD step.

Everything here runs on device under `jax.jit`. The entry point is `clipped_grad_sum`, which
computes per-example gradients with `jax.vmap(jax.grad(loss_fn))` one fixed-size microbatch at a
time (a `lax.scan`, so memory is bounded by the microbatch, not the batch), clips each example's
gradient with a `ClipRule` and returns the *sum* of clipped gradients, the rule's sensitivity and
clipping statistics.

Privacy: for every rule, adding or removing one example changes the returned sum by at most
`rule.sensitivity` in L2 norm (over all trainable parameters together). Padded examples (mask 0)
and examples whose gradient is not finite contribute exactly zero. Frozen parameters (outside
`trainable`) get no per-example gradient and a zero sum.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[..., jax.Array]  # loss_fn(params, example, *args) -> scalar


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


class ClippedSum(NamedTuple):
  """Output of `clipped_grad_sum`.

  grad_sum: pytree like params, Σ_i mask_i·clip(g_i), float32 (zeros on frozen leaves).
  sensitivity: the L2 bound on one example's contribution to `grad_sum`.
  stats: `ClipStats` of the batch.
  """
  grad_sum: PyTree
  sensitivity: float
  stats: ClipStats


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over all leaves of `tree`, computed in float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _check_positive(name: str, value: float) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


class ClipRule:
  """Maps one example's gradient to a contribution of L2 norm <= `sensitivity`."""

  sensitivity: float

  def clip(self, grad: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
    """Returns (clipped gradient, pre-clip global norm, clip flag: 1.0 if the norm exceeds the
    clip norm, else 0.0; see `ClipStats`)."""
    norm = global_norm(grad)
    factor, was_clipped = self.factor(norm)
    return _scale(grad, factor), norm, was_clipped

  def factor(self, norm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scale factor, clip flag) for a gradient of global L2 norm `norm`; rules that
    scale the whole gradient by one factor define it (ghost clipping uses it; for `GroupClip`
    it uses `group_factor`)."""
    raise NotImplementedError(
        f"{type(self).__name__} does not scale the whole gradient by one factor.")


@dataclasses.dataclass(frozen=True)
class FlatClip(ClipRule):
  """Abadi et al.: g · min(1, C/‖g‖) over all parameters together. Sensitivity C."""
  clip_norm: float

  def __post_init__(self):
    _check_positive("clip_norm", self.clip_norm)

  @property
  def sensitivity(self) -> float:
    return float(self.clip_norm)

  def factor(self, norm):
    # Written as C / max(‖g‖, C) so that a zero gradient gives factor 1 with no division by 0.
    factor = self.clip_norm / jnp.maximum(norm, self.clip_norm)
    return factor, (norm > self.clip_norm).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class AutomaticClip(ClipRule):
  """Bu et al. (AUTO-S): g · R/(‖g‖ + γ). Every output has norm < R; sensitivity R.

  It clips no example outright; its clip flag marks ‖g‖ > R, as `NormalizedClip`'s does."""
  clip_norm: float = 1.0
  stability: float = 0.01

  def __post_init__(self):
    _check_positive("clip_norm", self.clip_norm)
    _check_positive("stability (gamma)", self.stability)

  @property
  def sensitivity(self) -> float:
    return float(self.clip_norm)

  def factor(self, norm):
    factor = self.clip_norm / (norm + self.stability)
    return factor, (norm > self.clip_norm).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class NormalizedClip(ClipRule):
  """g · R/‖g‖ (every non-zero gradient gets norm exactly R; zero stays zero). Sensitivity R."""
  clip_norm: float = 1.0

  def __post_init__(self):
    _check_positive("clip_norm", self.clip_norm)

  @property
  def sensitivity(self) -> float:
    return float(self.clip_norm)

  def factor(self, norm):
    factor = jnp.where(norm > 0, self.clip_norm / jnp.where(norm > 0, norm, 1.0), 0.0)
    return factor, (norm > self.clip_norm).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class GroupClip(ClipRule):
  """Per-layer / group-wise clipping: each group g of leaves is clipped to its own norm C_g.

  group_of: maps a leaf's key path (a tuple of strings) to its group name.
  clip_norms: group name -> C_g. Every group that `group_of` produces must be listed.
  Sensitivity sqrt(Σ_g C_g²), since the groups' contributions are orthogonal blocks.
  """
  clip_norms: Mapping[str, float]
  group_of: Callable[[tuple[str, ...]], str]

  def __post_init__(self):
    if not self.clip_norms:
      raise ValueError("GroupClip needs at least one group clip norm.")
    for name, c in self.clip_norms.items():
      _check_positive(f"clip norm of group {name!r}", c)

  @property
  def sensitivity(self) -> float:
    return math.sqrt(sum(c * c for c in self.clip_norms.values()))

  def clip(self, grad):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(grad)
    groups = [self._group(path) for path, _ in paths_leaves]
    clipped, norms_sq, any_clipped = [None] * len(groups), {}, jnp.float32(0.0)
    for name in dict.fromkeys(groups):
      members = [i for i, g in enumerate(groups) if g == name]
      block = [paths_leaves[i][1] for i in members]
      norm = global_norm(block)
      factor, was_clipped = self.group_factor(name, norm)
      for i, leaf in zip(members, block):
        clipped[i] = leaf.astype(jnp.float32) * factor  # float32: see _scale
      norms_sq[name] = norm * norm
      any_clipped = jnp.maximum(any_clipped, was_clipped)
    total_norm = jnp.sqrt(sum(norms_sq.values()))
    return jax.tree_util.tree_unflatten(treedef, clipped), total_norm, any_clipped

  def group_factor(self, name: str, norm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scale factor, 1.0 if scaled down) of group `name` for a block of L2 norm `norm`."""
    c = self.clip_norms[name]
    return c / jnp.maximum(norm, c), (norm > c).astype(jnp.float32)

  def _group(self, path) -> str:
    return self.group_named(path_to_names(path))

  def group_named(self, names: tuple[str, ...]) -> str:
    """The group of the leaf at `names` (its key path as strings); ValueError if it has no C_g."""
    name = self.group_of(names)
    if name not in self.clip_norms:
      raise ValueError(
          f"Parameter {'/'.join(names)} falls in group {name!r}, which has no clip "
          f"norm; known groups: {sorted(self.clip_norms)}. Add it to clip_norms.")
    return name


def path_to_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A jax key path as a tuple of plain strings, e.g. ('params', 'Dense_0', 'kernel')."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def layer_of(path: tuple[str, ...]) -> str:
  """Default grouping for per-layer clipping: a leaf's parent module path (weight + bias)."""
  return "/".join(path[:-1]) or path[0]


def per_layer_clip(params: PyTree, clip_norm: float,
                   group_of: Callable[[tuple[str, ...]], str] = layer_of) -> GroupClip:
  """Layer-wise clipping as in fastDP: each of the L groups gets C/√L, so the sensitivity is C."""
  _check_positive("clip_norm", clip_norm)
  paths = [path_to_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  names = list(dict.fromkeys(group_of(p) for p in paths))
  per_group = clip_norm / math.sqrt(len(names))
  return GroupClip(clip_norms={n: per_group for n in names}, group_of=group_of)


def make_clip_rule(kind: str, clip_norm: float, params: PyTree | None = None,
                   stability: float = 0.01) -> ClipRule:
  """Builds a clip rule by name: 'flat', 'per_layer', 'automatic' or 'normalized'."""
  if kind == "flat":
    return FlatClip(clip_norm)
  if kind == "automatic":
    return AutomaticClip(clip_norm, stability)
  if kind == "normalized":
    return NormalizedClip(clip_norm)
  if kind == "per_layer":
    if params is None:
      raise ValueError("per_layer clipping needs the (trainable) params to find the layers.")
    return per_layer_clip(params, clip_norm)
  raise ValueError(
      f"Unknown clip rule {kind!r}; choose one of 'flat', 'per_layer', 'automatic', 'normalized'.")


def _scale(tree: PyTree, factor: jax.Array) -> PyTree:
  """tree · factor in float32: a factor rounded to bfloat16 could push ‖g·factor‖ above C."""
  return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) * factor.astype(jnp.float32),
                                tree)


class BatchNormInDPModelError(ValueError):
  """A model whose loss for one example depends on other examples (e.g. through BatchNorm)."""


def reject_batch_stats(params: PyTree) -> None:
  """Raises `BatchNormInDPModelError` if the pytree holds BatchNorm statistics ('batch_stats')."""
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    if "batch_stats" in path_to_names(path):
      raise BatchNormInDPModelError(
          f"The model has BatchNorm statistics ({'/'.join(path_to_names(path))}). BatchNorm "
          "normalises each example with statistics of the whole batch, so one example's gradient "
          "depends on the others and per-example clipping no longer bounds its influence: the DP "
          "guarantee would be false. Use GroupNorm or LayerNorm instead.")


# ------------------------------------------------------------------------------------------------
# Trainable subsets.


def partition(params: PyTree, trainable: PyTree | None) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) pytrees of the same structure, with None holes.

  trainable: None (all trainable), or a pytree of bools with the structure of params.
  """
  if trainable is None:
    return params, jax.tree_util.tree_map(lambda _: None, params)
  pick = lambda keep: jax.tree_util.tree_map(lambda p, t: p if t == keep else None,
                                             params, trainable)
  return pick(True), pick(False)


def merge(trainable_part: PyTree, frozen_part: PyTree) -> PyTree:
  """Inverse of `partition`."""
  return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trainable_part, frozen_part,
                                is_leaf=lambda x: x is None)


def trainable_mask(params: PyTree, is_trainable: Callable[[tuple[str, ...]], bool]) -> PyTree:
  """A pytree of bools from a predicate on each leaf's key path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: bool(is_trainable(path_to_names(p))),
                                          params)


# ------------------------------------------------------------------------------------------------
# Per-example gradients, microbatched.


def per_example_grads(loss_fn: LossFn, trainable_params: PyTree, frozen_params: PyTree,
                      examples: PyTree, *args) -> PyTree:
  """Per-example gradients w.r.t. the trainable params: leaves [n, *param.shape].

  loss_fn(params, example, *args) sees one example (no batch axis) and the merged params.
  """
  def one(example):
    return jax.grad(lambda t: loss_fn(merge(t, frozen_params), example, *args))(trainable_params)
  return jax.vmap(one)(examples)


def clipped_grad_sum(loss_fn: LossFn, params: PyTree, examples: PyTree, mask: jax.Array,
                     rule: ClipRule, *args, microbatch_size: int | None = None,
                     trainable: PyTree | None = None, grad_dtype: Any = None) -> ClippedSum:
  """Sum of clipped per-example gradients over a padded batch.

  Args:
    loss_fn: loss_fn(params, example, *args) -> scalar, for ONE example (no batch axis). It must
      not depend on other examples (no BatchNorm): that is what makes the sum's sensitivity hold.
    params: the full parameter pytree.
    examples: pytree whose leaves have a leading example axis [n, ...].
    mask: [n] array, 1 for real examples and 0 for padding.
    rule: the `ClipRule`.
    *args: extra arguments passed to loss_fn unchanged (e.g. a PRNG key for dropout), shared by all
      examples.
    microbatch_size: examples per vmap call; n must be a multiple. None means n.
    trainable: optional pytree of bools like params; False leaves get no gradient (zeros).
    grad_dtype: dtype of the per-example gradients (e.g. jnp.bfloat16: half the memory traffic of
      the [microbatch, *params] buffer); None keeps the params' dtype. Norms, clipping and the sum
      are computed in float32 whatever it is.

  Returns:
    `ClippedSum` with grad_sum in float32 and the structure of params.

  Privacy: ‖grad_sum(D) − grad_sum(D ± one example)‖₂ ≤ rule.sensitivity; padded rows add 0,
  and so does an example whose gradient holds an inf or NaN (an inf or NaN input, an overflow):
  its presence is not visible in the sum (it counts as clipped in the statistics).
  """
  reject_batch_stats(params)
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)
  train_p, frozen_p = partition(params, trainable)
  if grad_dtype is not None:  # differentiate w.r.t. the cast params: gradients in grad_dtype
    train_p = jax.tree_util.tree_map(lambda p: p.astype(grad_dtype), train_p)
  clip_chunk = lambda chunk: _clip_microbatch(loss_fn, train_p, frozen_p, chunk[0], chunk[1],
                                              rule, args)
  return sum_over_microbatches(clip_chunk, examples, mask, m, frozen_p, rule)


def sum_over_microbatches(clip_chunk: Callable, examples: PyTree, mask: jax.Array,
                          microbatch_size: int, frozen_p: PyTree, rule: ClipRule) -> ClippedSum:
  """Runs clip_chunk((examples, mask) of one microbatch) -> (clipped sum of the trainable
  leaves, ClipStats) over the microbatches with lax.scan; frozen leaves get float32 zeros."""
  n, m = int(mask.shape[0]), microbatch_size
  if m <= 0 or n % m:
    raise ValueError(f"The batch of {n} examples does not split into microbatches of {m}: "
                     f"choose a microbatch size that divides the (padded) batch size.")
  chunks = jax.tree_util.tree_map(lambda x: x.reshape((n // m, m) + x.shape[1:]),
                                  (examples, mask))

  def accumulate(carry, chunk):
    part, part_stats = clip_chunk(chunk)
    total = jax.tree_util.tree_map(jnp.add, carry[0], part)
    return (total, add_stats(carry[1], part_stats)), None

  # The first microbatch starts the carry (rather than zeros), so that under shard_map the carry
  # has the same device-varying type as what each microbatch adds.
  first = jax.tree_util.tree_map(lambda x: x[0], chunks)
  total, stats = clip_chunk(first)
  if n > m:  # one microbatch (the trainer's accumulate step) needs no scan: traced once, not twice
    rest = jax.tree_util.tree_map(lambda x: x[1:], chunks)
    (total, stats), _ = jax.lax.scan(accumulate, (total, stats), rest)
  full = merge(total, jax.tree_util.tree_map(
      lambda p: None if p is None else jnp.zeros(p.shape, jnp.float32), frozen_p,
      is_leaf=lambda x: x is None))
  return ClippedSum(full, rule.sensitivity, stats)


def _clip_microbatch(loss_fn, train_p, frozen_p, examples, mask, rule, args):
  """(Σᵢ clip(gᵢ) over the real rows whose gradient is finite, ClipStats) of one microbatch.

  An example whose gradient holds an inf or NaN has a non-finite global norm (a square of inf is
  inf, NaN propagates): its factor is treated as 0 and its row replaced by zeros, so it adds
  exactly 0, as a padded row does. `where`, not a product with a mask: 0·inf is NaN."""
  grads = per_example_grads(loss_fn, train_p, frozen_p, examples, *args)
  clipped, norms, was_clipped = jax.vmap(rule.clip)(grads)
  kept = (mask > 0) & jnp.isfinite(norms)
  summed = jax.tree_util.tree_map(
      lambda g: jnp.sum(jnp.where(_expand(kept, g), g.astype(jnp.float32), 0.0), axis=0), clipped)
  return summed, microbatch_stats(norms, was_clipped, mask > 0)


def microbatch_stats(norms: jax.Array, was_clipped: jax.Array, real: jax.Array) -> ClipStats:
  """`ClipStats` of one microbatch from per-example norms [m], clip flags [m] and real rows [m].
  A real example whose norm is inf or NaN (dropped from the sum) counts as clipped and adds 0 to
  the norm sum and max, which stay finite."""
  finite = jnp.isfinite(norms)
  real_norms = jnp.where(real & finite, norms, 0.0)
  return ClipStats(num_examples=jnp.sum(real.astype(jnp.float32)),
                   num_clipped=jnp.sum(jnp.where(real, jnp.where(finite, was_clipped, 1.0), 0.0)),
                   norm_sum=jnp.sum(real_norms), norm_max=jnp.max(real_norms, initial=0.0))


def _expand(mask: jax.Array, like: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def zero_stats() -> ClipStats:
  """Statistics of an empty batch."""
  z = jnp.float32(0.0)
  return ClipStats(z, z, z, z)


def add_stats(a: ClipStats, b: ClipStats) -> ClipStats:
  """Combines the statistics of two disjoint parts of a batch."""
  return ClipStats(a.num_examples + b.num_examples, a.num_clipped + b.num_clipped,
                   a.norm_sum + b.norm_sum, jnp.maximum(a.norm_max, b.norm_max))

