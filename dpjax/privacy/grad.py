"""A clipped gradient shaped like `jax.grad`: the sensitivity half of DP-SGD for any JAX loss.

`clipped_grad(loss_fn, rule, argnums=..., has_aux=..., batch_argnums=...)` returns a function
with loss_fn's call signature (plus a `mask` keyword) that computes, for a batch, the sum over
its real rows of each example's gradient clipped by `rule`, w.r.t. the arguments `argnums` names,
and the sensitivity of that sum. It is `clipping.clipped_grad_sum` (vmap per microbatch, a
`lax.scan` over microbatches) with the argument plumbing of `jax.grad`; use it inside your own
jitted step and feed `.grad` to `noise.dp_optimizer` with `.sensitivity`. With
per_example_method='ghost' the Linen layers the loss calls are ghost-clipped instead
(`ghost.example_calls`: the same sum up to float32 rounding, without their per-example
gradients); the other params keep the vmap path.

Privacy: the unit of privacy is one row of the batch arguments (the same row of each). Each
example's gradient is computed from its own rows only (`jax.vmap` evaluates the loss on one
example at a time), so no row can move another example's gradient; arguments outside
`batch_argnums` are shared by every example and are NOT protected (never pass private data
there). Adding or removing one example changes `.grad` by at most `rule.sensitivity` in L2 norm
over all of `argnums` together; replacing one example, by at most 2·`rule.sensitivity`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.privacy import clip_stats, clipping
from dpjax.privacy.ghost import example_calls

PyTree = Any
ADJACENCIES = ("add_remove", "replace_one")
EXAMPLE_AXES = ("drop", "keep")
PER_EXAMPLE_METHODS = ("vmap", "ghost")


class ExamplesMixError(clipping.BatchNormInDPModelError):
  """A loss whose value on a batch is not the sum (or mean) of its values on single examples."""


class ClippedGrad(NamedTuple):
  """What a `clipped_grad` function returns.

  grad: Σ_i mask_i·clip(g_i) in float32, shaped like the `argnums` argument(s): one pytree for an
    int argnums, a tuple of them for a tuple (as `jax.grad`).
  sensitivity: the L2 bound on one example's change of `grad` under the function's adjacency.
  stats: the batch's `clip_stats.ClipStats`. PRIVATE (computed from the examples, un-noised):
    release the clip count only through `noise.ClipCountRelease`, never log these.
  aux: None without has_aux; else each example's aux, leaves [n, ...] (padding rows included, in
    the batch's order). PRIVATE: computed from one example without noise, it may be used on the
    device, but must not leave it (log, print, return from the step) unless noised and accounted.
  """
  grad: PyTree
  sensitivity: float
  stats: clip_stats.ClipStats
  aux: PyTree = None


def _as_tuple(nums: int | Sequence[int], name: str) -> tuple[int, ...]:
  out = (nums,) if isinstance(nums, int) else tuple(nums)
  if not all(isinstance(i, int) and i >= 0 for i in out):
    raise ValueError(f"{name} must be non-negative ints (positional argument indices), got "
                     f"{nums!r}.")
  return out


@dataclasses.dataclass(frozen=True)
class ClippedGradFn:
  """The function `clipped_grad` returns; see there. Its fields are public facts: the privacy
  setup (`dpjax.private`) reads `microbatch_size` from here and gives it to its sampler."""
  loss_fn: Callable
  rule: clipping.ClipRule
  argnums: int | tuple[int, ...] = 0
  has_aux: bool = False
  batch_argnums: tuple[int, ...] = (1,)
  key_argnums: tuple[int, ...] = ()
  microbatch_size: int | None = None
  adjacency: str = "add_remove"
  example_axis: str = "drop"
  per_example_method: str = "vmap"

  def __post_init__(self):
    diff = _as_tuple(self.argnums, "argnums")
    batch = _as_tuple(self.batch_argnums, "batch_argnums")
    keys = _as_tuple(self.key_argnums, "key_argnums")
    object.__setattr__(self, "batch_argnums", batch)
    object.__setattr__(self, "key_argnums", keys)
    if not batch:
      raise ValueError("batch_argnums is empty: name the positional argument(s) that hold the "
                       "batch (leading axis = examples), e.g. batch_argnums=(1,).")
    for a, b in ((diff, batch), (diff, keys), (batch, keys)):
      if set(a) & set(b):
        raise ValueError(f"argnums {diff}, batch_argnums {batch} and key_argnums {keys} must not "
                         f"overlap (argument {sorted(set(a) & set(b))} is in two of them).")
    if self.adjacency not in ADJACENCIES:
      raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {self.adjacency!r}.")
    if self.example_axis not in EXAMPLE_AXES:
      raise ValueError(f"example_axis must be one of {EXAMPLE_AXES} ('drop': the loss sees one "
                       f"example without a batch axis; 'keep': a batch of one), got "
                       f"{self.example_axis!r}.")
    if self.per_example_method not in PER_EXAMPLE_METHODS:
      raise ValueError(f"per_example_method must be one of {PER_EXAMPLE_METHODS} ('vmap': "
                       "per-example gradients; 'ghost': ghost clipping of the Linen layers the "
                       f"loss calls), got {self.per_example_method!r}.")
    if self.microbatch_size is not None and not (
        isinstance(self.microbatch_size, int) and self.microbatch_size > 0):
      raise ValueError(f"microbatch_size must be a positive int or None, got "
                       f"{self.microbatch_size!r}.")
    if not isinstance(self.rule, clipping.ClipRule):
      raise TypeError(f"rule must be a clipping.ClipRule (e.g. FlatClip(1.0)), got {self.rule!r}.")

  @property
  def sensitivity(self) -> float:
    """add_remove: rule.sensitivity S. replace_one: 2·S. Every ClipRule bounds each example's
    contribution by S, so a replacement moves the sum by ‖c' − c‖ ≤ 2S (triangle inequality), and
    2S is tight for each built-in rule: FlatClip, NormalizedClip and GroupClip reach norm S
    (every group at its C_g) in opposite directions; AutomaticClip's R·‖g‖/(‖g‖ + γ) tends to R."""
    scale = 2.0 if self.adjacency == "replace_one" else 1.0
    return scale * self.rule.sensitivity

  def __call__(self, *args, mask: jax.Array | None = None, **kwargs) -> ClippedGrad:
    diff = _as_tuple(self.argnums, "argnums")
    _check_indices(args, diff + self.batch_argnums + self.key_argnums)
    clipping.reject_batch_stats((args, kwargs))  # Linen or NNX BatchNorm state in any argument
    batch = tuple(args[i] for i in self.batch_argnums)
    n = _batch_size(batch, self.batch_argnums)
    mask = jnp.ones((n,), jnp.float32) if mask is None else mask
    if tuple(jnp.shape(mask)) != (n,):
      raise ValueError(f"mask has shape {tuple(jnp.shape(mask))}, but the batch has {n} rows: "
                       f"the mask needs one entry per row, shape ({n},) (1 real, 0 padding).")
    m = n if self.microbatch_size is None else self.microbatch_size
    if n == 0 or n % m:
      raise ValueError(
          f"The batch has {n} rows, not a positive multiple of microbatch_size = {m}. Pad it with "
          f"masked rows to a whole number of microbatches (sampling.pad_to_microbatches(indices, "
          f"{m}, 1), or PoissonSampler.batch with the same microbatch_size), or change "
          "microbatch_size.")
    rows = (batch, jnp.arange(n))
    by = (example_calls.clipped_grad_sum if self.per_example_method == "ghost"
          else clipping.clipped_grad_sum)
    summed = by(self._loss_of_one(args, kwargs), self._params(args), rows, mask, self.rule,
                microbatch_size=m, has_aux=self.has_aux)
    summed, aux = summed if self.has_aux else (summed, None)
    return ClippedGrad(summed.grad_sum, self.sensitivity, summed.stats, aux)

  def _params(self, args: tuple) -> PyTree:
    """The differentiated argument (an int argnums) or the tuple of them: the tree the clip
    rule's groups see, so `clipping.per_layer_clip(params, C)` names the same paths."""
    if isinstance(self.argnums, int):
      return args[self.argnums]
    return tuple(args[i] for i in self.argnums)

  def ghost_plan(self, *args, **kwargs) -> tuple[list[str], list[str]]:
    """([the layer calls ghost clipping covers, each named by its params' common path], [the
    differentiated leaves left to per-example gradients by vmap]) for these arguments (a batch
    of any size; only shapes are read): what per_example_method='ghost' does with them
    (`ghost.example_calls.plan`). Paths are joined by '/' and, for a tuple argnums, start with
    the argument's position in it."""
    batch = tuple(args[i] for i in self.batch_argnums)
    one = (jax.tree_util.tree_map(lambda x: x[0], batch), jnp.zeros((), jnp.int32))
    covered, left = example_calls.plan(self._loss_of_one(args, kwargs), self._params(args), one)
    return (sorted("/".join(os.path.commonprefix([leaf[:-1] for leaf in key]))
                   for key in covered), ["/".join(path) for path in left])

  def _call_one(self, params, example, args, kwargs):
    """loss_fn's output on one example: its rows (a batch of one with example_axis='keep') and,
    for each key argument, the key folded with the example's row index."""
    rows, index = example
    params = (params,) if isinstance(self.argnums, int) else params
    if self.example_axis == "keep":
      rows = jax.tree_util.tree_map(lambda x: x[None], rows)
    full = list(args)
    for i, p in zip(_as_tuple(self.argnums, "argnums"), params):
      full[i] = p
    for i, r in zip(self.batch_argnums, rows):
      full[i] = r
    for i in self.key_argnums:
      full[i] = jax.random.fold_in(args[i], index)
    return self.loss_fn(*full, **kwargs)

  def _loss_of_one(self, args, kwargs, with_aux=None):
    """loss(params, example) for clipped_grad_sum: (loss, aux) when with_aux (default has_aux)."""
    with_aux = self.has_aux if with_aux is None else with_aux
    def loss(params, example):
      out = self._call_one(params, example, args, kwargs)
      value = _scalar(out[0] if self.has_aux else out, self.example_axis)
      return (value, out[1]) if with_aux else value
    return loss

  def check_independent(self, *args, mask=None, rtol: float = 1e-4, **kwargs) -> None:
    """Debug check, on the host (not under jit): raises `ExamplesMixError` if loss_fn on the
    batch's real rows is neither the sum nor the mean of its single-example values, i.e. its
    gradient w.r.t. argnums differs from the sum (or mean) of the per-example gradients by more
    than rtol (relative L2). That is what a layer mixing examples does (BatchNorm's batch
    statistics, attention across the batch): under vmap it silently sees one example, so training
    differs from the model you meant, and the loss is not per-example. Needs example_axis='keep'
    (the loss must accept a whole batch) and a deterministic loss (dropout off: the batch call
    cannot get each example's key). Costs one unclipped gradient per example and one of the batch.
    """
    if self.example_axis != "keep":
      raise ValueError("check_independent evaluates the loss on the whole batch, so it needs a "
                       "loss that takes a batch: example_axis='keep'.")
    keep = np.ones(_batch_size(tuple(args[i] for i in self.batch_argnums), self.batch_argnums),
                   bool) if mask is None else np.asarray(mask) > 0
    diff = _as_tuple(self.argnums, "argnums")
    full = list(args)
    for i in self.batch_argnums:
      full[i] = jax.tree_util.tree_map(lambda x: np.asarray(x)[keep], args[i])
    batch = tuple(full[i] for i in self.batch_argnums)
    params = self._params(args)
    rows = (batch, jnp.arange(int(keep.sum())))
    per_example = jax.vmap(jax.grad(self._loss_of_one(full, kwargs, with_aux=False)),
                           in_axes=(None, 0))(params, rows)
    total = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), per_example)

    def batch_loss(p):
      for i, x in zip(diff, (p,) if isinstance(self.argnums, int) else p):
        full[i] = x
      out = self.loss_fn(*full, **kwargs)
      return jnp.sum(out[0] if self.has_aux else out)  # a vector of per-row losses: their sum
    whole = jax.grad(batch_loss)(params)
    k = int(keep.sum())
    errors = [_relative(whole, total), _relative(whole, jax.tree_util.tree_map(lambda g: g / k,
                                                                               total))]
    if min(errors) > rtol:
      raise ExamplesMixError(
          f"The loss mixes examples: its gradient on the batch of {k} real rows differs from the "
          f"sum of its single-example gradients by {errors[0]:.3g} and from their mean by "
          f"{errors[1]:.3g} (relative L2; allowed {rtol:g}). A layer computes across the batch "
          "(BatchNorm, batch statistics, attention or pooling over the batch axis): under the "
          "per-example gradient it sees one example at a time, so it does not train the model "
          "you meant. Replace BatchNorm with GroupNorm or LayerNorm; keep every other operation "
          "within an example.")


def _scalar(value: jax.Array, example_axis: str) -> jax.Array:
  """The loss of one example as a scalar; with example_axis='keep' a [1] loss (one value per row
  of the batch of one, as optax's losses return) is accepted too."""
  shape = jnp.shape(value)
  if shape == () or (example_axis == "keep" and shape == (1,)):
    return jnp.reshape(value, ())
  raise ValueError(f"loss_fn returned shape {shape} for one example; it must return a scalar "
                   + ("or one value for the batch of one, shape (1,)." if example_axis == "keep"
                      else "(with example_axis='drop' it sees one example without a batch axis: "
                      "reduce over any other axis, or use example_axis='keep')."))


def _relative(a: PyTree, b: PyTree) -> float:
  diff = jax.tree_util.tree_map(jnp.subtract, a, b)
  return float(clipping.global_norm(diff) / jnp.maximum(clipping.global_norm(b), 1e-30))


def _check_indices(args: tuple, indices: tuple[int, ...]) -> None:
  if indices and max(indices) >= len(args):
    raise ValueError(f"The call has {len(args)} positional arguments, but argnums / batch_argnums "
                     f"/ key_argnums name argument {max(indices)} (0-based).")


def _batch_size(batch: tuple, batch_argnums: tuple[int, ...]) -> int:
  """The common leading size of every leaf of the batch arguments; ValueError naming the
  argument and leaf that differ."""
  sizes = {}
  for argnum, arg in zip(batch_argnums, batch):
    for path, leaf in jax.tree_util.tree_leaves_with_path(arg):
      where = f"argument {argnum}{jax.tree_util.keystr(path)}"
      if jnp.ndim(leaf) == 0:
        raise ValueError(f"Batch {where} is a scalar: every leaf of a batch argument needs a "
                         "leading example axis. Move it out of batch_argnums if it is shared.")
      sizes[where] = int(jnp.shape(leaf)[0])
  if not sizes:
    raise ValueError(f"The batch arguments {batch_argnums} hold no arrays.")
  if len(set(sizes.values())) > 1:
    listed = ", ".join(f"{w}: {s}" for w, s in sizes.items())
    raise ValueError(f"The batch arguments' leading sizes differ ({listed}): each leaf's first "
                     "axis must index the same examples. Check which argument is not batched, or "
                     "take it out of batch_argnums if every example shares it.")
  return next(iter(sizes.values()))


def clipped_grad(loss_fn: Callable, rule: clipping.ClipRule, *,
                 argnums: int | Sequence[int] = 0, has_aux: bool = False,
                 batch_argnums: int | Sequence[int] = (1,), key_argnums: int | Sequence[int] = (),
                 microbatch_size: int | None = None, adjacency: str = "add_remove",
                 example_axis: str = "drop", per_example_method: str = "vmap") -> ClippedGradFn:
  """The clipped per-example gradient sum of `loss_fn`, shaped like `jax.grad(loss_fn, argnums)`.

  Args:
    loss_fn: loss_fn(*args, **kwargs) -> scalar loss of ONE example, or (loss, aux) with has_aux.
      With example_axis='drop' (default) its batch arguments arrive as one example, without a batch
      axis; with 'keep', as a batch of one (leading axis 1): a loss written for batches works
      unchanged (a mean over that axis is the example's loss; a [1] vector of per-row losses is
      taken as the scalar).
    rule: the `clipping.ClipRule` (FlatClip(C), AutomaticClip, NormalizedClip, per_layer_clip...).
      Build it outside jit: a rule's norms are static (a traced norm raises TypeError).
    argnums: the positional argument(s) to differentiate: an int gives one gradient pytree, a
      tuple a tuple of them (clipped together: one example's norm is over all of them).
    has_aux: loss_fn returns (loss, aux); the result's `aux` holds each example's aux, leaves
      [n, ...], from the same forward pass as its gradient. PRIVATE (see `ClippedGrad`).
    batch_argnums: the positional argument(s) holding the batch: every leaf has the same leading
      size n (the rows; padding rows included). Other arguments (and kwargs) are shared by all
      examples and are not protected.
    key_argnums: positional PRNG-key arguments (dropout, stochastic depth): example i gets
      `jax.random.fold_in(key, i)` (i its row in the batch), so examples do not share one dropout
      mask. Pass a fresh key each step (split it): the fold is by row, not by example identity.
    microbatch_size: rows per vmap call (memory is bounded by it); n must be a multiple of it.
      None: the whole batch at once. The privacy setup (`dpjax.private`) gives its sampler this
      same value.
    adjacency: 'add_remove' (sensitivity S = rule.sensitivity, what Poisson sampling's accounting
      uses) or 'replace_one' (2·S, see `ClippedGradFn.sensitivity`).
    example_axis: 'drop' or 'keep', see loss_fn.
    per_example_method: 'vmap' (default: per-example gradients, any JAX loss) or 'ghost': ghost
      clipping of the Linen layers (nn.Dense, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm,
      nn.DenseGeneral) that loss_fn calls through `model.apply({'params': params}, ...)`, with
      the differentiated params passed unchanged: the same sum up to float32 rounding, without
      materialising their per-example gradients (`dpjax.privacy.ghost.example_calls`). Other
      params get per-example gradients by vmap (`f.ghost_plan(*args)` lists them); a loss with
      no such layer call raises `ghost.GhostUnsupportedError` (NNX models:
      `dpjax.privacy.nnx.clipped_grad_sum(..., method='ghost')`).

  Returns:
    f(*args, mask=None, **kwargs) -> `ClippedGrad` (grad, sensitivity, stats, aux). mask: [n],
    1 for real rows and 0 for padding (None: all real); padding rows and rows whose gradient is
    not finite add exactly 0. Usable inside jax.jit (build f outside it); each distinct n
    compiles once. `f.check_independent(*args)` is a debug check that the loss does not mix
    examples.

  Errors (ValueError): batch arguments of differing leading sizes, a mask that is not [n], n not
  a positive multiple of microbatch_size, overlapping or out-of-range argument indices.

  Privacy: ‖f(D).grad − f(D').grad‖₂ ≤ f.sensitivity for D, D' neighbours under `adjacency` (one
  row of the batch arguments added/removed, or replaced); the caller adds the noise
  (`noise.dp_optimizer(..., sensitivity=f.sensitivity)`) and accounts it.
  """
  return ClippedGradFn(loss_fn, rule, argnums if isinstance(argnums, int) else tuple(argnums),
                       has_aux, _as_tuple(batch_argnums, "batch_argnums"),
                       _as_tuple(key_argnums, "key_argnums"), microbatch_size, adjacency,
                       example_axis, per_example_method)
