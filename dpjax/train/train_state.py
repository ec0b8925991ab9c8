"""The device state of a training run, as one pytree, and its checkpoint layout."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np
import optax

from dpjax import parallel
from dpjax.privacy import noise, randomness
from dpjax.train import step as step_lib


@flax.struct.dataclass
class TrainState:
  """params; opt_state: `step.OptState` (noise: the Gaussian mechanism's state, whose key is
  secret; base: the optax optimizer's state). The step and the run's mechanism secret live beside
  it in the checkpoint (`checkpoint_tree`)."""
  params: Any
  opt_state: step_lib.OptState


def initial_state(optimizer: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh,
                  secret: np.ndarray) -> TrainState:
  """The state at step 0, laid out on the mesh (replicated, or split over 'fsdp'); the noise key
  comes from the run's mechanism `secret` (`dpjax.privacy.randomness`)."""
  opt_state = step_lib.OptState(noise.init_noise_state(randomness.noise_key(secret)),
                                optimizer.init(params))
  return TrainState(parallel.place(params, mesh), parallel.place(opt_state, mesh))


def checkpoint_tree(state: TrainState, step: int, secret: np.ndarray,
                    mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The pytree a checkpoint holds. `secret` (uint32 [4]) seeds the mechanism: the checkpoint is
  its only copy, so a resumed run draws the noise and batches an uninterrupted one would."""
  return dict(params=state.params, opt_state=state.opt_state,
              step=parallel.replicate(np.int32(step), mesh),
              secret=parallel.replicate(np.asarray(secret, np.uint32), mesh))


def from_checkpoint_tree(tree: dict[str, Any]) -> tuple[TrainState, int, np.ndarray]:
  """(state, step, secret) of a restored `checkpoint_tree`."""
  secret = randomness.check_secret(np.asarray(parallel.to_host(tree["secret"])))
  return TrainState(tree["params"], tree["opt_state"]), int(tree["step"]), secret
