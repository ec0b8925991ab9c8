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

import abc
import dataclasses
import math
import numbers
import sys
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dpjax import pytrees
from dpjax.privacy import clip_stats

PyTree = Any
LossFn = Callable[..., jax.Array]  # loss_fn(params, example, *args) -> scalar


class ClippedSum(NamedTuple):
  """Output of `clipped_grad_sum`.

  grad_sum: pytree like params, Σ_i mask_i·clip(g_i), float32 (zeros on frozen leaves).
  sensitivity: the L2 bound on one example's contribution to `grad_sum`.
  stats: `ClipStats` of the batch (`dpjax.privacy.clip_stats`).
  """
  grad_sum: PyTree
  sensitivity: float
  stats: clip_stats.ClipStats


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over all leaves of `tree`, computed in float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _check_positive(name: str, value: float) -> None:
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} is a traced value ({value!r}): the clip rule was built inside a jitted (or "
        f"vmapped, scanned) function from one of its arguments. A clip rule is static: its "
        f"sensitivity is a Python float that the noise (dp_optimizer) and the accountant read on "
        f"the host, so its norms cannot be traced. Build the rule once, outside the jitted step, "
        f"and close over it (or mark the norm static: jax.jit(..., static_argnames=...)).")
  if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


ONE_GROUP = "all"  # the one clip group of a rule that scales the whole gradient by one factor


class ClipRule(abc.ABC):
  """Maps one example's gradient to a contribution of L2 norm <= `sensitivity`.

  A rule splits the gradient's leaves into clip groups (`groups`: one group, ONE_GROUP, for rules
  that scale the whole gradient) and scales each group by a factor computed from that group's L2
  norm alone (`factors`). Both per-example paths use only `groups`, `factors` and `sensitivity`:
  the vmap path (`clip`) with the norms of the per-example gradients, ghost clipping
  (`dpjax.privacy.ghost.clipped_grad_sum`) with upper bounds on them.

  Guarantee, which every rule must keep: each group g has a bound C_g with Σ_g C_g² =
  sensitivity², and factor_g(x)·x ≤ C_g for every norm x ≥ 0, whether the factor scales down
  (flat, per-layer) or up (automatic, normalized: factors above 1). Hence a group scaled by
  factor_g(U), U ≥ its norm (any upper bound), has norm ≤ C_g, and the example's contribution,
  the groups being orthogonal blocks, has norm ≤ sensitivity.
  """

  @property
  @abc.abstractmethod
  def sensitivity(self) -> float:
    """The L2 bound on one example's contribution (add or remove one example)."""

  @abc.abstractmethod
  def groups(self, tree: PyTree) -> PyTree:
    """The clip group of each leaf of `tree` (params or gradients): a pytree like it whose leaves
    are group names (str), keys of what `factors` takes. Host-side: reads the structure only."""

  @abc.abstractmethod
  def factors(self, norms: Mapping[str, jax.Array]) -> tuple[dict[str, jax.Array], jax.Array]:
    """({group: scale factor}, clip flag) from {group: L2 norm} of every group (float32 arrays
    of one shape, e.g. [m], one entry per example). The clip flag is 1.0 where the example's
    norm exceeds the clip norm (any group above its bound: `ClipStats.num_clipped`), else 0.0."""

  def clip(self, grad: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
    """Returns (clipped gradient, pre-clip global norm, clip flag), each group scaled by its factor
    in float32 (a factor rounded to bfloat16 could push a group above its bound)."""
    leaves, treedef = jax.tree_util.tree_flatten(grad)
    names = jax.tree_util.tree_leaves(self.groups(grad))
    blocks: dict[str, list] = {}
    for name, leaf in zip(names, leaves):
      blocks.setdefault(name, []).append(leaf)
    norms = {name: global_norm(block) for name, block in blocks.items()}
    factors, was_clipped = self.factors(norms)
    clipped = [leaf.astype(jnp.float32) * factors[name].astype(jnp.float32)
               for name, leaf in zip(names, leaves)]
    total = (next(iter(norms.values())) if len(norms) == 1
             else jnp.sqrt(sum(norm * norm for norm in norms.values())))
    return jax.tree_util.tree_unflatten(treedef, clipped), total, was_clipped


class WholeGradientClip(ClipRule):
  """A rule that scales the whole gradient by one factor of its global norm (one group)."""

  def groups(self, tree):
    return jax.tree_util.tree_map(lambda _: ONE_GROUP, tree)

  def factors(self, norms):
    factor, was_clipped = self.factor(norms[ONE_GROUP])
    return {ONE_GROUP: factor}, was_clipped

  @abc.abstractmethod
  def factor(self, norm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scale factor, clip flag) for a gradient of global L2 norm `norm`; factor(x)·x ≤ the clip
    norm for every x ≥ 0 (`ClipRule`)."""


@dataclasses.dataclass(frozen=True)
class FlatClip(WholeGradientClip):
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
class AutomaticClip(WholeGradientClip):
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
class NormalizedClip(WholeGradientClip):
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
  """Per-layer / group-wise clipping: each group g of leaves is clipped to its own norm C_g,
  g · min(1, C_g/‖g‖).

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

  def groups(self, tree):
    """Each leaf's `group_of` its key path; ValueError for a group without a C_g."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: self._group_named(pytrees.path_to_names(path)), tree)

  def factors(self, norms):
    factors, was_clipped = {}, None
    for name, norm in norms.items():
      c = self.clip_norms[name]
      factors[name] = c / jnp.maximum(norm, c)
      flag = (norm > c).astype(jnp.float32)
      was_clipped = flag if was_clipped is None else jnp.maximum(was_clipped, flag)
    return factors, was_clipped

  def _group_named(self, names: tuple[str, ...]) -> str:
    name = self.group_of(names)
    if name not in self.clip_norms:
      raise ValueError(
          f"Parameter {'/'.join(names)} falls in group {name!r}, which has no clip "
          f"norm; known groups: {sorted(self.clip_norms)}. Add it to clip_norms.")
    return name


def layer_of(path: tuple[str, ...]) -> str:
  """Default grouping for per-layer clipping: a leaf's parent module path (weight + bias)."""
  return "/".join(path[:-1]) or path[0]


def per_layer_clip(params: PyTree, clip_norm: float,
                   group_of: Callable[[tuple[str, ...]], str] = layer_of) -> GroupClip:
  """Layer-wise clipping as in fastDP: each of the L groups gets C/√L, so the sensitivity is C."""
  _check_positive("clip_norm", clip_norm)
  names = list(dict.fromkeys(group_of(p) for p in pytrees.leaf_paths(params)))
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


class BatchNormInDPModelError(ValueError):
  """A model whose loss for one example depends on other examples (e.g. through BatchNorm)."""


def reject_batch_stats(params: PyTree) -> None:
  """Raises `BatchNormInDPModelError` if the pytree holds BatchNorm statistics: Linen's
  'batch_stats' collection, or an NNX BatchNorm / nnx.BatchStat (`nnx.model.reject_batch_stats_in`;
  looked for only once flax.nnx is imported, since no NNX object exists before)."""
  if "flax.nnx" in sys.modules:
    from dpjax.privacy.nnx.model import reject_batch_stats_in  # pylint: disable=g-import-not-at-top
    reject_batch_stats_in(params)
  for names in pytrees.leaf_paths(params):
    if "batch_stats" in names:
      raise BatchNormInDPModelError(
          f"The model has BatchNorm statistics ({'/'.join(names)}). BatchNorm "
          "normalises each example with statistics of the whole batch, so one example's gradient "
          "depends on the others and per-example clipping no longer bounds its influence: the DP "
          "guarantee would be false. Use GroupNorm or LayerNorm instead.")


# ------------------------------------------------------------------------------------------------
# Per-example gradients, microbatched.


def per_example_grads(loss_fn: LossFn, trainable_params: PyTree, frozen_params: PyTree,
                      examples: PyTree, *args, has_aux: bool = False) -> PyTree:
  """Per-example gradients w.r.t. the trainable params: leaves [n, *param.shape] (and, with
  has_aux, the per-example aux: (grads, aux), aux leaves [n, ...]).

  loss_fn(params, example, *args) sees one example (no batch axis) and the merged params.
  """
  def one(example):
    merged = lambda t: pytrees.merge(t, frozen_params)
    return jax.grad(lambda t: loss_fn(merged(t), example, *args), has_aux=has_aux)(
        trainable_params)
  return jax.vmap(one)(examples)


def clipped_grad_sum(loss_fn: LossFn, params: PyTree, examples: PyTree, mask: jax.Array,
                     rule: ClipRule, *args, microbatch_size: int | None = None,
                     trainable: PyTree | None = None, grad_dtype: Any = None,
                     has_aux: bool = False) -> ClippedSum | tuple[ClippedSum, PyTree]:
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
    has_aux: loss_fn returns (loss, aux); each example's aux comes back from the same pass.

  Returns:
    `ClippedSum` with grad_sum in float32 and the structure of params; with has_aux,
    (ClippedSum, aux), aux leaves [n, ...] in the batch's order, padding rows included. aux is
    computed from one example without noise: it must not leave the device un-noised.

  Privacy: ‖grad_sum(D) − grad_sum(D ± one example)‖₂ ≤ rule.sensitivity; padded rows add 0,
  and so does an example whose gradient holds an inf or NaN (an inf or NaN input, an overflow):
  its presence is not visible in the sum (it counts as clipped in the statistics).
  """
  reject_batch_stats(params)
  n = int(mask.shape[0])
  m = n if microbatch_size is None else int(microbatch_size)
  train_p, frozen_p = pytrees.partition(params, trainable)
  if grad_dtype is not None:  # differentiate w.r.t. the cast params: gradients in grad_dtype
    train_p = jax.tree_util.tree_map(lambda p: p.astype(grad_dtype), train_p)
  clip_chunk = lambda chunk: _clip_microbatch(loss_fn, train_p, frozen_p, chunk[0], chunk[1],
                                              rule, args, has_aux)
  return sum_over_microbatches(clip_chunk, examples, mask, m, frozen_p, rule, has_aux)


def sum_over_microbatches(clip_chunk: Callable, examples: PyTree, mask: jax.Array,
                          microbatch_size: int, frozen_p: PyTree, rule: ClipRule,
                          has_aux: bool = False) -> ClippedSum | tuple[ClippedSum, PyTree]:
  """Runs clip_chunk((examples, mask) of one microbatch) -> (clipped sum of the trainable
  leaves, `ClipStats`) over the microbatches with lax.scan; frozen leaves get float32 zeros.
  With has_aux, clip_chunk also returns the microbatch's per-example aux (leaves [m, ...]), and
  the result is (ClippedSum, aux of every row, leaves [n, ...])."""
  n, m = int(mask.shape[0]), microbatch_size
  if m <= 0 or n % m:
    raise ValueError(f"The batch of {n} examples does not split into microbatches of {m}: "
                     f"choose a microbatch size that divides the (padded) batch size.")
  chunks = jax.tree_util.tree_map(lambda x: x.reshape((n // m, m) + x.shape[1:]),
                                  (examples, mask))

  def accumulate(carry, chunk):
    part, part_stats, *aux = clip_chunk(chunk)
    total = jax.tree_util.tree_map(jnp.add, carry[0], part)
    return (total, clip_stats.add_stats(carry[1], part_stats)), (aux[0] if has_aux else None)

  # The first microbatch starts the carry (rather than zeros), so that under shard_map the carry
  # has the same device-varying type as what each microbatch adds.
  first = jax.tree_util.tree_map(lambda x: x[0], chunks)
  total, stats, *aux = clip_chunk(first)
  aux = jax.tree_util.tree_map(lambda x: x[None], aux[0]) if has_aux else None
  if n > m:  # one microbatch (the trainer's accumulate step) needs no scan: traced once, not twice
    rest = jax.tree_util.tree_map(lambda x: x[1:], chunks)
    (total, stats), rest_aux = jax.lax.scan(accumulate, (total, stats), rest)
    if has_aux:
      aux = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), aux, rest_aux)
  full = pytrees.merge(total, jax.tree_util.tree_map(
      lambda p: None if p is None else jnp.zeros(p.shape, jnp.float32), frozen_p,
      is_leaf=lambda x: x is None))
  summed = ClippedSum(full, rule.sensitivity, stats)
  if not has_aux:
    return summed
  return summed, jax.tree_util.tree_map(lambda x: x.reshape((n,) + x.shape[2:]), aux)


def _clip_microbatch(loss_fn, train_p, frozen_p, examples, mask, rule, args, has_aux=False):
  """(Σᵢ clip(gᵢ) over the real rows whose gradient is finite, `ClipStats`) of one microbatch,
  and with has_aux each row's aux.

  An example whose gradient holds an inf or NaN has a non-finite global norm (a square of inf is
  inf, NaN propagates): its factor is treated as 0 and its row replaced by zeros, so it adds
  exactly 0, as a padded row does. `where`, not a product with a mask: 0·inf is NaN."""
  grads = per_example_grads(loss_fn, train_p, frozen_p, examples, *args, has_aux=has_aux)
  grads, aux = grads if has_aux else (grads, None)
  clipped, norms, was_clipped = jax.vmap(rule.clip)(grads)
  kept = (mask > 0) & jnp.isfinite(norms)
  summed = jax.tree_util.tree_map(
      lambda g: jnp.sum(jnp.where(_expand(kept, g), g.astype(jnp.float32), 0.0), axis=0), clipped)
  stats = clip_stats.microbatch_stats(norms, was_clipped, mask > 0)
  return (summed, stats, aux) if has_aux else (summed, stats)


def _expand(mask: jax.Array, like: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))
