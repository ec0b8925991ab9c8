"""Augmentation multiplicity (De et al. 2022): K augmented views of each example, on the device.

The losses of `dpjax.train.step` take an example's views from a `Views`: its loss is the mean of
its K views' losses, so its gradient is the mean of the K view gradients, and that gradient is
clipped as the example's (vmap and ghost clipping alike). Clipping bounds the example's
contribution by C whatever K is: the sensitivity, the noise and the accounting do not change.
The cost is K forward and backward passes per example (K times the activations' memory of a
microbatch).

Randomness (public, from the config seed, never from the mechanism's secret): view j of the
example with id `id` at training step `step` is `augmentation(key, image)` with
  key = fold_in(fold_in(fold_in(stream_key(seed, "augmentation views"), step), id), j)
(`dpjax.privacy.randomness.stream_key`). A view is therefore a function of (seed, step, id, j,
image) alone: it does not depend on the other examples of the batch, on the batch size or on the
example's position, so a per-example loss over views stays a per-example function, and adding or
removing one example leaves every other example's views unchanged. Ids must identify examples
(their index in their part, public or private), not batch positions. A resumed run draws the same
views (they depend on the step, not on a state).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dpjax.data import augment
from dpjax.privacy import randomness

# name -> one view of one image [H, W, C] from a key; "none" takes no views (`make_views`).
AUGMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "crop_flip": augment.crop_flip_one,  # 4 pixels, symmetric (mirror) padding; flip
}
STREAM = "augmentation views"


@dataclasses.dataclass(frozen=True)
class Views:
  """`count` views of each example by the augmentation `augmentation`, keyed by the config
  seed `seed`, the step and the example's id (module docstring)."""
  augmentation: str
  count: int
  seed: int

  def __post_init__(self):
    if self.augmentation not in AUGMENTATIONS:
      raise ValueError(f"Unknown augmentation {self.augmentation!r}; known: "
                       f"{', '.join(AUGMENTATIONS)}.")
    if not isinstance(self.count, int) or self.count < 1:
      raise ValueError(f"Views needs count >= 1 views per example, got {self.count!r}.")

  def of_example(self, image: jax.Array, example_id: jax.Array, step: jax.Array) -> jax.Array:
    """The example's views [count, H, W, C] (image's dtype) from image [H, W, C], its id and
    the step (int scalars)."""
    key = jax.random.fold_in(jax.random.fold_in(
        randomness.stream_key(self.seed, STREAM), step), example_id)
    one = AUGMENTATIONS[self.augmentation]
    return jax.vmap(lambda j: one(jax.random.fold_in(key, j), image))(jnp.arange(self.count))

  def of_batch(self, images: jax.Array, example_ids: jax.Array, steps: jax.Array) -> jax.Array:
    """Views [m·count, H, W, C] of images [m, H, W, C] (ids and steps int [m]), example-major:
    rows i·count ... (i + 1)·count − 1 are example i's views, each `of_example`'s."""
    views = jax.vmap(self.of_example)(images, example_ids, steps)
    return views.reshape((-1,) + views.shape[2:])


def make_views(augmentation: str, count: int, seed: int) -> Views | None:
  """The `Views` of the config's data.augment and dp.augmult (K), or None for no augmentation
  ("none", K = 1: the losses read each example's image as it is). ValueError for K > 1 views
  without an augmentation: they would be K copies of one image."""
  if augmentation == "none":
    if count != 1:
      raise ValueError(f"{count} views per example need an augmentation (data.augment, e.g. "
                       "'crop_flip'): without one they are copies of the image.")
    return None
  return Views(augmentation, count, seed)
