"""Jitted step functions: public gradient, private microbatch accumulation, noise + mix + update.

One training step is, on device:
  g_pub  = public_grad(params, public_batch)                       if α > 0
  acc    = Σ over private microbatches of accumulate(acc, ...)     if α < 1 (fixed shape: compiles once)
  params, opt_state, noisy_clip_fraction = apply(params, opt_state, g_pub, acc.grad_sum, α,
                                                 acc.stats.num_clipped)
Under a mesh layout acc holds per-device partial sums; `apply` adds them up (once per step) and
adds the Gaussian noise once to the clipped sum, divides by the expected batch size, mixes
with g_pub and runs the optimizer; with a `noise.ClipCountRelease` it also releases the noisy
count of clipped examples (else noisy_clip_fraction is None). Each function is compiled once per
shape (apply once per kind of step: public-only, private-only or mixed).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import finetune, mixing, parallel
from dpjax.data import views as views_lib
from dpjax.privacy import clip_stats, clipping, ghost, noise

PyTree = Any


class OptState(NamedTuple):
  """noise: the `NoiseState` of the Gaussian mechanism; base: the optax optimizer's state."""
  noise: Any
  base: Any


class Applied(NamedTuple):
  """What `make_apply`'s step returns. noisy_clip_fraction: the step's released clip count over
  the expected batch size (None unless released)."""
  params: Any
  opt_state: OptState
  noisy_clip_fraction: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_example_loss(model: nn.Module, dtype: str = "float32", remat: bool = False,
                      views: views_lib.Views | None = None) -> Callable[[PyTree, dict], jax.Array]:
  """loss(params, example) for ONE example {image [H, W, C], label []}, computed in `dtype`.

  With `views` (augmentation multiplicity, `dpjax.data.views`) the example also holds its id []
  and the step [] (int32), and its loss is the mean of its views.count views' losses (so its
  gradient is the mean of theirs, clipped as one example's gradient); without, the image as it
  is."""
  compute_dtype = jnp.dtype(dtype)

  def loss(params, example):
    cast = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
    if views is None:
      logits = model.apply({"params": cast}, example["image"][None].astype(compute_dtype))
      return cross_entropy(logits, example["label"][None])[0]
    images = views.of_example(example["image"], example["id"], example["step"])
    logits = model.apply({"params": cast}, images.astype(compute_dtype))
    return jnp.mean(cross_entropy(logits, jnp.broadcast_to(example["label"], (views.count,))))

  return jax.checkpoint(loss) if remat else loss


def make_batch_losses(model: nn.Module, dtype: str = "float32", remat: bool = False,
                      views: views_lib.Views | None = None) -> Callable[..., Any]:
  """losses(params, batch) -> [m] per-example losses of a batch {image [m, H, W, C], label [m]},
  computed in `dtype` (the batched form that ghost clipping needs); losses(params, batch,
  ghost_variables) -> (losses, mutated variables), the form `dpjax.privacy.ghost` calls.

  With `views` the batch also holds id [m] and step [m], the model runs on the m·K views
  (`Views.of_batch`: example-major, the order ghost clipping's views=K argument assumes) and each
  example's loss is the mean of its K views' losses, as `make_example_loss`'s."""
  compute_dtype = jnp.dtype(dtype)

  def losses(params, batch, ghost_variables=None):
    cast = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
    images, labels = batch["image"], batch["label"]
    if views is not None:
      images = views.of_batch(images, batch["id"], batch["step"])
      labels = jnp.repeat(labels, views.count)
    per_example = (lambda found: found if views is None
                   else jnp.mean(found.reshape(-1, views.count), axis=1))
    images = images.astype(compute_dtype)
    if ghost_variables is None:
      return per_example(cross_entropy(ghost.apply_model(model, cast, images), labels))
    logits, mutated = ghost.apply_model(model, cast, images, ghost_variables)
    return per_example(cross_entropy(logits, labels)), mutated

  return jax.checkpoint(losses) if remat else losses


def view_fields(rows: int, step: int = 0) -> dict[str, np.ndarray]:
  """{id: 0, 1, ... [rows], step: `step` [rows]} (int32), the per-row fields a loss with views
  reads, for batches made up for a check or a memory estimate (no data: public values)."""
  return dict(id=np.arange(rows, dtype=np.int32), step=np.full(rows, step, np.int32))


def check_ghost_batch_losses(batch_losses: Callable, params: PyTree, image_shape: tuple,
                             num_classes: int, preprocess: Callable,
                             trainable: PyTree | None = None,
                             rows: int = 4, views: int = 1) -> None:
  """`ghost.check_examples_independent` on a synthetic batch: `rows` random uint8 images of
  image_shape (seed 0) through `preprocess`, as the private data goes, labels 0, 1, ...
  (mod num_classes), ids 0, 1, ... and step 0 (`view_fields`). No private data steers the check.
  views: the K of batch_losses' augmentation multiplicity (1: none). Raises
  ghost.ExamplesMixedError for a model whose batched forward pass mixes examples (or views of
  different examples)."""
  ghost.check_examples_independent(
      batch_losses, params, synthetic_batch(image_shape, num_classes, preprocess, rows),
      trainable=trainable, views=views)


def synthetic_batch(image_shape: tuple, num_classes: int, preprocess: Callable,
                    rows: int = 4) -> dict:
  """`rows` random uint8 images of image_shape (seed 0) through `preprocess`, labels 0, 1, ...
  (mod num_classes), ids 0, 1, ... and step 0: a batch shaped like the private data's, made from
  none of it."""
  images = np.random.default_rng(0).integers(0, 256, (rows, *image_shape), dtype=np.uint8)
  return dict(image=preprocess(images), label=np.arange(rows, dtype=np.int32) % num_classes,
              **view_fields(rows))


def make_public_grad(example_loss: Callable, layout: parallel.Layout | None = None) -> Callable:
  """jit (params, batch) -> (mean gradient over the batch, mean loss). Non-private.

  With a layout, the batch rows are split over the mesh and the gradient comes back in the params'
  layout (same formulation as the private sum, `parallel.sharded_gradient_sum`).
  """
  def public_grad(params, batch):
    rows = jax.tree_util.tree_leaves(batch)[0].shape[0]  # the whole batch's, under a layout too

    def mean_part(params, batch):  # this batch's (or this device's) share of the mean loss
      return jnp.sum(jax.vmap(example_loss, in_axes=(None, 0))(params, batch)) / rows

    # Its gradient, with no per-example gradients held. The 1/rows enters the backward pass's
    # seed instead of dividing each leaf afterwards (a kernel per leaf: 104 for the CIFAR ViT).
    def local_part(params, batch):
      loss, grads = jax.value_and_grad(mean_part)(params, batch)
      return grads, loss

    if layout is None:
      return local_part(params, batch)
    return parallel.sharded_gradient_sum(
        local_part, layout.mesh, layout.params,
        lambda l: jax.lax.psum(l, parallel.MESH_AXES))(params, batch)

  if layout is None:
    return jax.jit(public_grad)
  return jax.jit(public_grad, in_shardings=(layout.sharding(layout.params), layout.batch),
                 out_shardings=(layout.sharding(layout.params), layout.replicated))


def grad_dtype(compute_dtype: str) -> Any:
  """Per-example gradients are taken in the compute dtype (bf16 halves their memory traffic);
  norms, clipping, sums and noise stay float32 (`clipping.clipped_grad_sum`)."""
  return None if compute_dtype == "float32" else jnp.dtype(compute_dtype)


def make_accumulate(example_loss: Callable, rule: clipping.ClipRule,
                    trainable: PyTree | None = None, layout: parallel.Layout | None = None,
                    grad_dtype: Any = None, batch_losses: Callable | None = None,
                    masked: bool = False, row_masks: bool = False, views: int = 1
                    ) -> Callable:
  """jit (acc, params, element_mask, microbatch, mask, first) -> acc + the microbatch's
  `ClippedSum`.

  acc is a `ClippedSum`. first (a bool scalar): True for a step's first microbatch, whose result
  is the microbatch's sum alone: acc's values are not read, so acc may be the previous step's
  final sum (`reuse_sum`), and no zero sum needs to be made each step (`make_zero_sum` makes the
  very first one; its dispatch cost ~1 ms of host time per step on a host-bound small model).
  The sum's sensitivity is rule.sensitivity whatever the number of microbatches (each example is
  in one microbatch).
  With a layout the microbatch is split over the mesh's devices and each device clips its own
  examples (`parallel.sharded_gradient_sum`); acc.grad_sum then holds per-device partial sums
  [devices, *shape], added across devices once per step by `make_apply` (not once per
  microbatch: one all-reduce per step). acc is donated: do not reuse the acc passed in.
  grad_dtype: see `clipping.clipped_grad_sum`.
  batch_losses: if given (`make_batch_losses`), per-example norms come from ghost clipping
    (`dpjax.privacy.ghost`) instead of vmap(grad); the clipped sum is the same.
  masked: if True, element_mask is a 0/1 pytree like params and each per-example gradient is
    element_mask ⊙ ∇ℓᵢ before clipping (`dpjax.finetune.masked_params`; ghost: `element_mask`);
    if False, element_mask must be None (an empty pytree: nothing to dispatch).
  row_masks: the element masks mask whole output rows (`finetune.is_row_mask`, as every mask of
    dpjax's sparse fine-tuning does): ghost clipping keeps the masked kernels factored
    (`ghost.clipped_grad_sum`'s row_masks) instead of instantiating their per-example gradients.
  views: K, the views per example of the losses' augmentation multiplicity (`make_batch_losses`
    with a `Views`; 1: none): ghost clipping folds each example's K views into one per-example
    gradient (their mean, as example_loss's gradient is). The vmap path needs nothing: the
    example loss averages its views itself.
  """
  def local_sum(inputs, microbatch, mask):
    (params, element_mask), loss = inputs, example_loss
    if masked:
      loss = lambda p, example: example_loss(finetune.masked_params(p, element_mask), example)
    if batch_losses is not None:
      part = ghost.clipped_grad_sum(batch_losses, params, microbatch, mask, rule,
                                    trainable=trainable, element_mask=element_mask,
                                    row_masks=row_masks, views=views)
    else:
      part = clipping.clipped_grad_sum(loss, params, microbatch, mask, rule,
                                       trainable=trainable, grad_dtype=grad_dtype)
    return part.grad_sum, part.stats

  def reduce_stats(stats):
    return clip_stats.ClipStats(*jax.lax.psum(stats[:3], parallel.MESH_AXES),
                                jax.lax.pmax(stats.norm_max, parallel.MESH_AXES))

  input_specs = None if layout is None else (layout.params, layout.params if masked else None)
  clipped_sum = local_sum if layout is None else parallel.sharded_gradient_sum(
      local_sum, layout.mesh, input_specs, reduce_stats, partial=True)

  def accumulate(acc, params, element_mask, microbatch, mask, first):
    if (element_mask is not None) != masked:  # at trace time: no cost per step
      raise ValueError(f"This accumulate step was made with masked={masked}: pass "
                       f"{'the element mask' if masked else 'None'} as its element_mask.")
    grad_sum, stats = clipped_sum((params, element_mask), microbatch, mask)
    # A select, not a product: whatever acc holds (NaN included) never reaches a first sum.
    added = lambda old, new: jnp.where(first, new, old + new)
    since_first = lambda summed, new: jnp.where(first, new, summed)
    return clipping.ClippedSum(
        jax.tree_util.tree_map(added, acc.grad_sum, grad_sum), jnp.float32(rule.sensitivity),
        clip_stats.ClipStats(*map(since_first, clip_stats.add_stats(acc.stats, stats), stats)))

  if layout is None:
    return jax.jit(accumulate, donate_argnums=0)
  acc_sharding = _partial_sum_sharding(layout)
  return jax.jit(accumulate, in_shardings=(acc_sharding, *layout.sharding(input_specs),
                                           layout.batch, layout.batch, layout.replicated),
                 out_shardings=acc_sharding, donate_argnums=0)


def reuse_sum(spent: clipping.ClippedSum) -> clipping.ClippedSum:
  """The acc for a step's first `make_accumulate` call (first=True) from the previous step's final
  acc: its grad_sum buffers, donated and overwritten unread, with host zeros for the sensitivity
  and statistics (not `spent`'s arrays: the caller may still hold those, for its metrics)."""
  zero = np.float32(0.0)
  return clipping.ClippedSum(spent.grad_sum, zero, clip_stats.ClipStats(zero, zero, zero, zero))


def sum_microbatches(accumulate: Callable, zero_sum: Callable, spent: clipping.ClippedSum | None,
                     params: PyTree, element_mask: PyTree | None, microbatches: Iterable[tuple]
                     ) -> clipping.ClippedSum:
  """A private step's `ClippedSum`: `accumulate` (`make_accumulate`) over the step's microbatches
  [(microbatch, mask), ...], the first with first=True, its acc the previous step's final sum
  `spent` (`reuse_sum`: overwritten unread, no zero sum made) or, for the first step,
  `zero_sum(params)`. element_mask: accumulate's (None unless it was made with masked=True).

  With no microbatch at all (an empty Poisson draw) the result is a fresh zero sum, never
  `spent`: a previous step's sum must not be released a second time.
  """
  acc = None
  for k, (microbatch, mask) in enumerate(microbatches):
    if k == 0:
      acc = zero_sum(params) if spent is None else reuse_sum(spent)
    acc = accumulate(acc, params, element_mask, microbatch, mask, np.bool_(k == 0))
  return zero_sum(params) if acc is None else acc


def _partial_sum_sharding(layout: parallel.Layout) -> clipping.ClippedSum:
  partial = jax.sharding.NamedSharding(layout.mesh, parallel.PARTIAL_SPEC)
  return clipping.ClippedSum(partial, layout.replicated, layout.replicated)


def make_total(layout: parallel.Layout | None = None) -> Callable:
  """jit acc -> acc with grad_sum the sum over devices, in the params' layout (no-op without one).

  For inspecting a step's clipped sum: `make_apply` and `make_score` take the partial sums and
  add them up themselves.
  """
  if layout is None:
    return lambda acc: acc

  def total(acc):
    return acc._replace(grad_sum=_total_of(acc.grad_sum, layout))
  params_sharding = layout.sharding(layout.params)
  return jax.jit(total, in_shardings=(_partial_sum_sharding(layout),),
                 out_shardings=clipping.ClippedSum(params_sharding, layout.replicated,
                                                   layout.replicated))


def _total_of(partial_sums: PyTree, layout: parallel.Layout) -> PyTree:
  """The sum over devices of `make_accumulate`'s partial sums, in the params' layout."""
  return parallel.reduce_partial_sums(partial_sums, layout.mesh, layout.params)


def zero_clipped_sum(params: PyTree, rule: clipping.ClipRule,
                     leading: tuple[int, ...] = ()) -> clipping.ClippedSum:
  """An empty `ClippedSum`: float32 zeros like params, each leaf with `leading` axes in front."""
  return clipping.ClippedSum(
      jax.tree_util.tree_map(lambda p: jnp.zeros(leading + p.shape, jnp.float32), params),
      jnp.float32(rule.sensitivity), clip_stats.zero_stats())


def make_zero_sum(rule: clipping.ClipRule, layout: parallel.Layout | None = None) -> Callable:
  """jit params -> the empty `ClippedSum` that `make_accumulate(..., layout)` starts from.

  Under a layout its grad_sum holds per-device partial sums [devices, *shape]. Build it once:
  each built function compiles once.
  """
  if layout is None:
    return jax.jit(lambda params: zero_clipped_sum(params, rule))
  devices = (parallel.mesh_size(layout.mesh),)
  return jax.jit(lambda params: zero_clipped_sum(params, rule, devices),
                 in_shardings=(layout.sharding(layout.params),),
                 out_shardings=_partial_sum_sharding(layout))


def make_apply(noise_tx: optax.GradientTransformation | None,
               optimizer: optax.GradientTransformation,
               layout: parallel.Layout | None = None, donate: bool = False,
               clip_count: noise.ClipCountRelease | None = None) -> Callable:
  """jit (params, opt_state, public_grad|None, clipped_sum|None, alpha, num_clipped=None)
  -> `Applied` (params, opt_state, noisy_clip_fraction|None).

  clipped_sum: the step's `ClippedSum.grad_sum` as `make_accumulate` leaves it: under a layout,
  the per-device partial sums [devices, *shape], which apply adds up itself (one all-reduce, in
  the same executable: no separate `make_total` call, whose dispatch cost ~1.2 ms of host time per
  step on a small model, `benchmarks/results/archive/README.md`).
  The noise transformation runs exactly once when a clipped sum is given (a private step) and not
  at all otherwise. Under a layout it runs once for the global step: the key is replicated and
  the draw is laid out like the params, so no device adds noise of its own. donate=True reuses
  the buffers of the params and optimizer state passed in (do not use them afterwards).
  clip_count: with it, a private step also releases its count of clipped examples (num_clipped:
  the step's `ClipStats.num_clipped`, a device scalar) plus N(0, σ_c²), over the expected batch
  size (`noise.ClipCountRelease`), in the same executable, its noise from the step's noise key;
  account such steps with `calibration.effective_noise_multiplier`. Without clip_count, or on a
  public step, the third output is None and num_clipped is not read.
  """
  donated = (0, 1) if donate else ()
  def apply(params, opt_state, public_grad, clipped_sum, alpha, num_clipped=None):
    noise_state, private_grad, released = opt_state.noise, None, None
    if clipped_sum is not None:
      released = _released_clip_fraction(clip_count, num_clipped, opt_state.noise)
      private_grad, noise_state = noise_tx.update(clipped_sum, opt_state.noise)
    grads = mixing.mix(alpha, public_grad, private_grad)
    updates, base_state = optimizer.update(grads, opt_state.base, params)
    return Applied(optax.apply_updates(params, updates), OptState(noise_state, base_state),
                   released)

  if layout is None:
    return jax.jit(apply, donate_argnums=donated)
  params_sharding, opt_sharding = layout.sharding(layout.params), layout.sharding(layout.opt_state)
  partial_sharding = _partial_sum_sharding(layout).grad_sum
  compiled = {}  # one jit per kind of step: which of the two gradients are present

  def apply_partial(params, opt_state, public_grad, partial_sums, alpha, num_clipped):
    clipped_sum = None if partial_sums is None else _total_of(partial_sums, layout)
    return apply(params, opt_state, public_grad, clipped_sum, alpha, num_clipped)

  def apply_sharded(params, opt_state, public_grad, clipped_sum, alpha, num_clipped=None):
    kind = (public_grad is None, clipped_sum is None)
    if kind not in compiled:
      grad_shardings = (None if kind[0] else params_sharding,
                        None if kind[1] else partial_sharding)
      compiled[kind] = jax.jit(
          apply_partial, in_shardings=(params_sharding, opt_sharding) + grad_shardings
          + (layout.replicated, layout.replicated),
          out_shardings=Applied(params_sharding, opt_sharding, layout.replicated),
          donate_argnums=donated)
    return compiled[kind](params, opt_state, public_grad, clipped_sum, alpha, num_clipped)
  return apply_sharded


def _released_clip_fraction(clip_count: noise.ClipCountRelease | None, num_clipped: Any,
                            noise_state: noise.NoiseState) -> jax.Array | None:
  """The step's noisy clip fraction, its noise from the step's noise state; None: no release."""
  if clip_count is None:
    return None
  if num_clipped is None:
    raise ValueError("A private step that releases its clip count needs the step's "
                     "ClipStats.num_clipped (the num_clipped argument).")
  return clip_count.noisy_fraction(num_clipped, noise_state)


def make_score(noise_tx: optax.GradientTransformation, layout: parallel.Layout | None = None,
               clip_count: noise.ClipCountRelease | None = None) -> Callable:
  """jit (opt_state, clipped grad sum, num_clipped=None) -> (opt_state, noisy_clip_fraction|None)
  for SPARTA's selection steps: the step's Gaussian release (noise drawn once, as in
  `make_apply`) is added, as |noisy gradient|, to the selection scores in the optimizer state's
  `finetune.MaskState`; params and moments are not touched. The clipped sum is `make_apply`'s:
  per-device partial sums under a layout. clip_count: as in `make_apply` (a selection step is a
  private step: it releases the count too, and is accounted alike)."""
  def score(opt_state, clipped_sum, num_clipped=None):
    released = _released_clip_fraction(clip_count, num_clipped, opt_state.noise)
    private_grad, noise_state = noise_tx.update(clipped_sum, opt_state.noise)
    state = finetune.find_mask_state(opt_state.base)
    state = state._replace(scores=finetune.accumulate_scores(state.scores, private_grad))
    return OptState(noise_state, finetune.replace_mask_state(opt_state.base, state)), released

  if layout is None:
    return jax.jit(score)
  opt_sharding = layout.sharding(layout.opt_state)
  sharded = jax.jit(
      lambda opt_state, partial_sums, num_clipped: score(
          opt_state, _total_of(partial_sums, layout), num_clipped),
      in_shardings=(opt_sharding, _partial_sum_sharding(layout).grad_sum, layout.replicated),
      out_shardings=(opt_sharding, layout.replicated))
  return lambda opt_state, partial_sums, num_clipped=None: sharded(opt_state, partial_sums,
                                                                   num_clipped)


def make_evaluate(model: nn.Module, layout: parallel.Layout | None = None) -> Callable:
  """jit (params, batch, mask) -> (number correct, summed loss) over the real rows.

  With a layout the batch rows are split over the mesh (the row count must divide over it).
  """
  def evaluate(params, batch, mask):
    logits = model.apply({"params": params}, batch["image"])
    correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
    loss = jnp.where(mask, cross_entropy(logits, batch["label"]), 0.0)
    return jnp.sum(correct), jnp.sum(loss)

  if layout is None:
    return jax.jit(evaluate)
  return jax.jit(evaluate, in_shardings=(layout.sharding(layout.params), layout.batch,
                                         layout.batch),
                 out_shardings=layout.replicated)


def reset_moments(base_state: PyTree, which: str) -> PyTree:
  """Zeroes optimizer moments at the public→private switch (Bu et al.: resetting m works best).

  which: 'first' zeroes first moments (Adam's mu, momentum traces); 'moments' also Adam's second
  moment nu and its bias-correction count (Adam restarts as if new, the learning-rate schedule
  goes on); 'all' zeroes every count too, so the learning-rate schedule restarts at the switch;
  'none' leaves the state alone.
  """
  if which == "none":
    return base_state
  first_fields = ("mu", "trace")

  def fields_of(node):
    if which == "first":
      return first_fields
    if which == "moments":
      return first_fields + (("nu", "count") if "nu" in node._fields else ())
    return first_fields + ("nu", "count")

  def reset(node):
    if hasattr(node, "_fields"):
      fields = fields_of(node)
      return node._replace(**{f: jax.tree_util.tree_map(jnp.zeros_like, getattr(node, f))
                              for f in node._fields if f in fields})
    return node
  return jax.tree_util.tree_map(reset, base_state, is_leaf=lambda x: hasattr(x, "_fields"))
