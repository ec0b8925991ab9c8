"""How the trainer computes per-example clipped gradients: `perf.per_example_method`.

  "vmap"   per-example gradients (jax.vmap of jax.grad), clipped and summed;
  "ghost"  ghost clipping (`dpjax.privacy.ghost`): per-example norms from the layers' inputs and
           output gradients, no per-example gradient held, a per-leaf vmap fallback for
           parameters of layers it cannot read;
  "auto"   ghost if the model keeps examples apart in its batched forward pass (the check ghost
           clipping's sensitivity needs), else vmap; the run says which, and which parameters
           fell back to per-example gradients.

Both methods give the same clipped sum up to float rounding and the same privacy event; the
choice changes speed and memory only. The checks run on a synthetic batch (`step.synthetic_batch`):
no private data steers the choice.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from dpjax import pytrees
from dpjax.privacy import ghost
from dpjax.privacy.ghost import layers as ghost_layers
from dpjax.train import step as step_lib

METHODS = ("vmap", "ghost", "auto")


def choose(requested: str, batch_losses: Callable, params: Any, image_shape: tuple,
           num_classes: int, preprocess: Callable, trainable: Any = None,
           views: int = 1) -> tuple[str, str]:
  """(the method to use, "vmap" or "ghost"; a sentence saying why, for the run's log).

  requested "ghost" raises ghost.ExamplesMixedError for a model that mixes examples (as before);
  "auto" falls back to vmap for it. batch_losses: `step.make_batch_losses` of the model (the
  batched form ghost reads); views: augmentation multiplicity K.
  """
  if requested not in METHODS:
    raise ValueError(f"perf.per_example_method must be one of {METHODS}, got {requested!r}.")
  if requested == "vmap":
    return "vmap", "per-example gradients by vmap (perf.per_example_method='vmap')"
  try:
    step_lib.check_ghost_batch_losses(batch_losses, params, image_shape, num_classes, preprocess,
                                      trainable, views=views)
  except ghost.GhostUnsupportedError as e:
    if requested == "ghost":
      raise
    return "vmap", f"per-example gradients by vmap: ghost clipping cannot take this model ({e})"
  left = fallback_leaves(batch_losses, params,
                         step_lib.synthetic_batch(image_shape, num_classes, preprocess), trainable)
  return "ghost", "ghost clipping" + (
      f"; per-example gradients (vmap) for the {len(left)} parameters no supported layer owns "
      f"alone: {', '.join(left)}" if left else "; every trainable parameter on the ghost path")


def fallback_leaves(batch_losses: Callable, params: Any, batch: dict,
                    trainable: Any = None) -> list[str]:
  """The trainable parameters ('Dense_0/kernel', ...) ghost clipping leaves to per-example
  gradients (`ghost.layers.coverage`), from an abstract forward pass of `batch`."""
  found, _, calls = ghost_layers.layer_calls(batch_losses, params, batch)
  _, left = ghost_layers.coverage(found, calls, params, trainable)
  return ["/".join(path) for path, keep in zip(pytrees.leaf_paths(params),
                                               jax.tree_util.tree_leaves(left)) if keep]
