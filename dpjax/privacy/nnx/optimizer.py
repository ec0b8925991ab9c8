"""`DPOptimizer`: an `nnx.Optimizer` that noises the clipped sum (the Gaussian mechanism) before
the base optax optimizer, and refuses models with BatchNorm."""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from dpjax.privacy import noise
from dpjax.privacy.nnx.model import reject_batch_norm


class DPOptimizer(nnx.Optimizer):
  """`nnx.Optimizer` of `noise.dp_optimizer(tx, ...)`: `update(model, grad_sum)` adds Gaussian
  noise of stddev noise_multiplier·sensitivity to the clipped sum (`clipped_grad_sum`), divides by
  expected_batch_size, applies `tx` and writes the model's `wrt` variables in place.

  Args:
    model: the nnx.Module (no nnx.BatchNorm: `reject_batch_norm`).
    tx: the base optax optimizer.
    noise_multiplier, sensitivity, expected_batch_size, seed: as `noise.dp_optimizer`; leave seed
      None (fresh OS entropy): an int makes the noise reproducible and insecure (tests only).
    wrt: the variables it updates (default nnx.Param), as for `clipped_grad_sum`.

  Privacy: each `update` is one Gaussian mechanism on its input sum (`noise.add_gaussian_noise`):
  call it once per step, with the sum of that step's clipped gradients. The noise key is in
  `opt_state` (`noise_state()`): a checkpoint of it must be kept as private as the data.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
               noise_multiplier: float, sensitivity: float, expected_batch_size: float,
               seed: Any = None, wrt: Any = nnx.Param):
    reject_batch_norm(model)
    super().__init__(model, noise.dp_optimizer(
        tx, noise_multiplier=noise_multiplier, sensitivity=sensitivity,
        expected_batch_size=expected_batch_size, seed=seed), wrt=wrt)

  def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs) -> optax.Updates:
    """One noisy step: grads is `clipped_grad_sum(...).grad_sum` (the clipped SUM, not a mean)."""
    reject_batch_norm(model)
    return super().update(model, grads, **kwargs)

  def noise_state(self) -> noise.NoiseState:
    """The noise transformation's state (secret key, count of noised steps)."""
    return noise.noise_state(nnx.as_pure(self.opt_state))
