"""The lookahead of the automatic switch: a few simulated DP steps on public data.

Where the curvature models (`dpjax.curvature`) predict a DP step's progress from a second-order
(SGD) or first-order (Adam) model, the lookahead runs it: from a copy of the current params it
takes K steps of the DP update that training would take after a switch at this step (clipped
per-example gradients, Gaussian noise of the σ the remaining budget implies, the base optimizer
freshly initialised, as after `mixing.reset_moments="all"`), on public examples the model has not
trained on, and reports how much the loss of other unseen public examples fell. The automatic
switch compares that with what the last public steps achieved on the same examples
(`mixing.AutoSwitch`, criterion "lookahead").

  noisy mean gradient = (1/b)·Σ_i clip(g_i) + (σ·S/B)·z,   z ~ N(0, I)

b: the simulated batch (public examples), B: the private steps' expected batch size, S: the clip
rule's sensitivity. (σS/B)·z is the noise of a real private step's mean gradient; the sampling
noise of b examples stands for that of B.

Privacy: reads public batches only (`PublicBatch`); the simulated noise is not the mechanism's
(it noises public data), so its key is a public stream of the config seed, and the switch step it
steers stays a function of public data.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from dpjax.curvature import ExampleLoss
from dpjax.data.public_batch import PublicBatch
from dpjax.privacy.clipping import ClipRule

PyTree = object


def make_shadow_step(example_loss: ExampleLoss, rule: ClipRule,
                     optimizer: optax.GradientTransformation) -> Callable:
  """step(params, opt_state, batch {image [b,H,W,C], label [b]}, key, noise_std) ->
  (params, opt_state): one simulated DP step, jitted. noise_std = σ·S/B per coordinate."""

  def step(params, opt_state, batch, key, noise_std):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, batch)  # leaves [b, ...]
    clipped = jax.vmap(lambda g: rule.clip(g)[0])(grads)
    leaves, treedef = jax.tree_util.tree_flatten(clipped)
    keys = jax.random.split(key, len(leaves))
    noisy = [jnp.mean(g, axis=0) + noise_std * jax.random.normal(k, g.shape[1:], g.dtype)
             for g, k in zip(leaves, keys)]
    updates, opt_state = optimizer.update(jax.tree_util.tree_unflatten(treedef, noisy), opt_state,
                                          params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def shadow_dp_params(shadow_step: Callable, optimizer: optax.GradientTransformation,
                     params: PyTree, batches: Iterable[PublicBatch], key: jax.Array,
                     noise_std: float) -> PyTree:
  """The params after one simulated DP step per batch of `batches`, from `params` and a fresh
  `optimizer` state (`make_shadow_step` made `shadow_step` with the same optimizer)."""
  state = optimizer.init(params)
  for i, batch in enumerate(batches):
    if not isinstance(batch, PublicBatch):
      raise TypeError(f"The lookahead trains on PublicBatch only, got {type(batch).__name__}.")
    params, state = shadow_step(params, state, batch.as_dict(), jax.random.fold_in(key, i),
                                jnp.float32(noise_std))
  return params
