"""Jitted step functions: public gradient, private microbatch accumulation, noise + mix + update.

One training step is, on device:
  g_pub  = public_grad(params, public_batch)                       if α > 0
  acc    = Σ over private microbatches of accumulate(acc, ...)     if α < 1 (fixed shape: compiles once)
  params, opt_state = apply(params, opt_state, g_pub, acc.grad_sum, α)
`apply` adds the Gaussian noise once to the clipped sum, divides by the expected batch size, mixes
with g_pub and runs the optimizer. Each function is compiled once per shape (apply once per kind of
step: public-only, private-only or mixed).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import mixing
from dpjax.privacy import clipping

PyTree = Any


class OptState(NamedTuple):
  """noise: the `NoiseState` of the Gaussian mechanism; base: the optax optimizer's state."""
  noise: Any
  base: Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_example_loss(model: nn.Module, dtype: str = "float32", remat: bool = False
                      ) -> Callable[[PyTree, dict], jax.Array]:
  """loss(params, example) for ONE example {image [H, W, C], label []}, computed in `dtype`."""
  compute_dtype = jnp.dtype(dtype)

  def loss(params, example):
    cast = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
    logits = model.apply({"params": cast}, example["image"][None].astype(compute_dtype))
    return cross_entropy(logits, example["label"][None])[0]

  return jax.checkpoint(loss) if remat else loss


def make_public_grad(example_loss: Callable) -> Callable:
  """jit (params, batch) -> (mean gradient over the batch, mean loss). Non-private."""
  def batch_loss(params, batch):
    return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0))(params, batch))

  @jax.jit
  def public_grad(params, batch):
    loss, grads = jax.value_and_grad(batch_loss)(params, batch)
    return grads, loss
  return public_grad


def make_accumulate(example_loss: Callable, rule: clipping.ClipRule,
                    trainable: PyTree | None = None, num_devices: int = 1) -> Callable:
  """jit (acc, params, microbatch, mask) -> acc + the microbatch's `ClippedSum`.

  acc is a `ClippedSum`; start from `zero_clipped_sum(params, rule)`. The sum's sensitivity is
  rule.sensitivity whatever the number of microbatches (each example is in one microbatch).
  With num_devices > 1 the microbatch is split over that many devices (`shard_map`); each device
  clips its own examples and the clipped sums are added with `psum`, so the result is the same sum.
  """
  def local_sum(params, microbatch, mask):
    part = clipping.clipped_grad_sum(example_loss, params, microbatch, mask, rule,
                                     trainable=trainable)
    return part.grad_sum, part.stats

  clipped_sum = local_sum if num_devices == 1 else _sharded(local_sum, num_devices)

  @jax.jit
  def accumulate(acc, params, microbatch, mask):
    grad_sum, stats = clipped_sum(params, microbatch, mask)
    return clipping.ClippedSum(jax.tree_util.tree_map(jnp.add, acc.grad_sum, grad_sum),
                               acc.sensitivity, clipping.add_stats(acc.stats, stats))
  return accumulate


def data_mesh(num_devices: int) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices, axis 'data' (Auto, so vmap(grad) works)."""
  if num_devices > jax.device_count():
    raise ValueError(f"perf.num_devices = {num_devices} but only {jax.device_count()} devices "
                     "are visible.")
  return jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))


def _sharded(local_sum: Callable, num_devices: int) -> Callable:
  """Runs local_sum on each device's slice of the microbatch and adds the results.

  Params enter replicated and are cast to device-varying before differentiation: without that,
  shard_map would sum the gradients of replicated params across devices implicitly, before
  clipping (see DESIGN.md, sharp edges).
  """
  P = jax.sharding.PartitionSpec

  def per_device(params, microbatch, mask):
    params = jax.tree_util.tree_map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
    grad_sum, stats = local_sum(params, microbatch, mask)
    total = jax.lax.psum(grad_sum, "data")
    return total, clipping.ClipStats(
        *jax.lax.psum(stats[:3], "data"), jax.lax.pmax(stats.norm_max, "data"))

  return jax.shard_map(per_device, mesh=data_mesh(num_devices),
                       in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()))


def zero_clipped_sum(params: PyTree, rule: clipping.ClipRule) -> clipping.ClippedSum:
  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return clipping.ClippedSum(zeros, rule.sensitivity, clipping.zero_stats())


def make_apply(noise_tx: optax.GradientTransformation | None,
               optimizer: optax.GradientTransformation) -> Callable:
  """jit (params, opt_state, public_grad|None, clipped_sum|None, alpha) -> (params, opt_state).

  The noise transformation runs exactly once when a clipped sum is given (a private step) and not
  at all otherwise.
  """
  @jax.jit
  def apply(params, opt_state, public_grad, clipped_sum, alpha):
    noise_state, private_grad = opt_state.noise, None
    if clipped_sum is not None:
      private_grad, noise_state = noise_tx.update(clipped_sum, opt_state.noise)
    grads = mixing.mix(alpha, public_grad, private_grad)
    updates, base_state = optimizer.update(grads, opt_state.base, params)
    return optax.apply_updates(params, updates), OptState(noise_state, base_state)
  return apply


def make_evaluate(model: nn.Module) -> Callable:
  """jit (params, batch, mask) -> (number correct, summed loss) over the real rows."""
  @jax.jit
  def evaluate(params, batch, mask):
    logits = model.apply({"params": params}, batch["image"])
    correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
    loss = jnp.where(mask, cross_entropy(logits, batch["label"]), 0.0)
    return jnp.sum(correct), jnp.sum(loss)
  return evaluate


def reset_moments(base_state: PyTree, which: str) -> PyTree:
  """Zeroes optimizer moments at the public→private switch (Bu et al.: resetting m works best).

  which: 'first' zeroes first moments (Adam's mu, momentum traces); 'all' also the second moments
  and step counts; 'none' leaves the state alone.
  """
  if which == "none":
    return base_state
  first_fields = ("mu", "trace")
  all_fields = first_fields + ("nu", "count")

  def reset(node):
    if hasattr(node, "_fields"):
      fields = first_fields if which == "first" else all_fields
      return node._replace(**{f: jax.tree_util.tree_map(jnp.zeros_like, getattr(node, f))
                              for f in node._fields if f in fields})
    return node
  return jax.tree_util.tree_map(reset, base_state, is_leaf=lambda x: hasattr(x, "_fields"))
