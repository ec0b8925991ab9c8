"""On-device SimCLR-style augmentations: random resized crop, flip, brightness, contrast, noise.

Everything here is pure JAX and jit-able, e.g. `jax.jit(functools.partial(augment, ...))`: the
keyword arguments are Python numbers, checked eagerly; only `flip` and whether `noise_std > 0`
change the compiled program. Each example is augmented on its own under `vmap`, with randomness
drawn only from `jax.random.fold_in(key, example_id)`.

Privacy: the view of example i is a function of (key, example_ids[i], images[i]) alone; it does
not depend on the other examples in the batch, on the batch size or on i's position in it. So a
per-example loss on augmented views stays a per-example function, and adding or removing one
example leaves every other example's views unchanged; clipping per-example gradients bounds
sensitivity exactly as it does without augmentation. Ids must therefore identify examples (e.g.
their index in the dataset), not batch positions.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp


def _check(images: jax.Array, example_ids: jax.Array, crop_scale: tuple[float, float],
           crop_ratio: tuple[float, float], brightness: float, contrast: float,
           noise_std: float) -> None:
  if jnp.ndim(images) != 4:
    raise ValueError(f"images must be float [n, H, W, C], got shape {jnp.shape(images)}.")
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError(f"images must be floating point in [0, 1], got {jnp.result_type(images)}; "
                     "convert uint8 images with dpjax.data.to_float first.")
  if jnp.shape(example_ids) != jnp.shape(images)[:1]:
    raise ValueError(f"example_ids must have shape [{jnp.shape(images)[0]}] (one id per image), "
                     f"got {jnp.shape(example_ids)}.")
  if not jnp.issubdtype(jnp.result_type(example_ids), jnp.integer):
    raise ValueError(f"example_ids must be integers, got {jnp.result_type(example_ids)}.")
  lo, hi = crop_scale
  if not 0 < lo <= hi <= 1:
    raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1 (fractions of the "
                     f"image area), got {crop_scale!r}.")
  lo, hi = crop_ratio
  if not 0 < lo <= hi < math.inf:
    raise ValueError(f"crop_ratio must be (lo, hi) with 0 < lo <= hi, got {crop_ratio!r}.")
  for name, value in (("brightness", brightness), ("noise_std", noise_std)):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"{name} must be finite and >= 0 (0 turns it off), got {value!r}.")
  if not 0 <= contrast <= 1:
    raise ValueError(f"contrast must be in [0, 1] (the factor is uniform in [1-c, 1+c]; 0 turns "
                     f"it off), got {contrast!r}.")


def _resized_crop(image: jax.Array, area: jax.Array, log_ratio: jax.Array, top: jax.Array,
                  left: jax.Array) -> jax.Array:
  """A crop of `image` [H, W, C], bilinearly resized back to [H, W, C].

  The crop covers a fraction `area` of the image with aspect ratio exp(log_ratio) relative to the
  image's own; each side is capped at the image's (so at extreme ratios the area is smaller).
  `top` and `left` in [0, 1] place it among the positions that fit.
  """
  ratio = jnp.exp(log_ratio)
  height = jnp.minimum(jnp.sqrt(area / ratio), 1.0)   # fractions of H and W
  width = jnp.minimum(jnp.sqrt(area * ratio), 1.0)
  h, w, _ = image.shape
  # Output pixel-edge coordinate o samples input coordinate (o - translation) / scale.
  scale = jnp.stack([1.0 / height, 1.0 / width])
  translation = -jnp.stack([top * (1.0 - height) * h, left * (1.0 - width) * w]) * scale
  return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, translation,
                                       method="linear", antialias=False)


def _between(u: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Maps u in [0, 1) to [lo, hi)."""
  return lo + (hi - lo) * u


def _augment_one(key: jax.Array, image: jax.Array, settings: jax.Array, flip: bool,
                 noise: bool) -> jax.Array:
  """One view of one image [H, W, C] (float32), from `key` only; `settings` as in `_augment`."""
  area_lo, area_hi, log_ratio_lo, log_ratio_hi, brightness, contrast, noise_std = settings
  # A single draw: area, log ratio, top, left, flip, brightness, contrast, spare, then pixels.
  u = jax.random.uniform(key, (8 + (image.size if noise else 0),), jnp.float32)
  image = _resized_crop(image, _between(u[0], area_lo, area_hi),
                        _between(u[1], log_ratio_lo, log_ratio_hi), u[2], u[3])
  if flip:
    image = jnp.where(u[4] < 0.5, image[:, ::-1], image)
  image = jnp.clip(image + _between(u[5], -brightness, brightness), 0.0, 1.0)
  mean = jnp.mean(image)
  image = jnp.clip(mean + (image - mean) * _between(u[6], 1 - contrast, 1 + contrast), 0.0, 1.0)
  if noise:  # N(0, 1) by inverse CDF from the same draw, as jax.random.normal does.
    v = jnp.maximum(2.0 * u[8:] - 1.0, jnp.nextafter(jnp.float32(-1), jnp.float32(0)))
    image = image + noise_std * (math.sqrt(2) * jax.scipy.special.erfinv(v)).reshape(image.shape)
  return jnp.clip(image, 0.0, 1.0)


def augment(key: jax.Array, images: jax.Array, example_ids: jax.Array, *,
            crop_scale: tuple[float, float] = (0.3, 1.0),
            crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
            brightness: float = 0.4, contrast: float = 0.4, noise_std: float = 0.0) -> jax.Array:
  """One random view of each image, SimCLR style.

  In order: random resized crop (area fraction uniform in `crop_scale`, aspect ratio log-uniform
  in `crop_ratio`, uniform position, bilinear resize back to H x W), horizontal flip with
  probability 1/2, brightness (add U[-brightness, brightness]), contrast (scale around the
  image's mean by U[1-contrast, 1+contrast]), Gaussian pixel noise of std `noise_std`; values are
  clipped to [0, 1] after each colour step and at the end. crop_scale=(1, 1), crop_ratio=(1, 1),
  flip=False and zero brightness, contrast and noise_std give back the images.

  Args:
    key: PRNG key (typed or raw).
    images: float [n, H, W, C] in [0, 1].
    example_ids: int [n], ids that identify the examples (e.g. dataset indices).
    crop_scale, crop_ratio, flip, brightness, contrast, noise_std: as above; Python numbers.

  Returns:
    float [n, H, W, C] in [0, 1], the dtype of `images`.

  Privacy: example i's view is drawn from `jax.random.fold_in(key, example_ids[i])` and
  `images[i]` only, so it never depends on the other examples in the batch or on i's position
  (see the module docstring).
  """
  crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
  crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
  _check(images, example_ids, crop_scale, crop_ratio, brightness, contrast, noise_std)
  settings = jnp.array([crop_scale[0], crop_scale[1], math.log(crop_ratio[0]),
                        math.log(crop_ratio[1]), brightness, contrast, noise_std], jnp.float32)
  return _augment(key, jnp.asarray(images), jnp.asarray(example_ids), settings, bool(flip),
                  noise_std > 0)


@functools.partial(jax.jit, static_argnames=("flip", "noise"))
def _augment(key: jax.Array, images: jax.Array, example_ids: jax.Array, settings: jax.Array,
             flip: bool, noise: bool) -> jax.Array:
  """`augment` after its checks; settings float32 [7]: the crop_scale bounds, the log crop_ratio
  bounds, brightness, contrast, noise_std. Compiles once per shape, flip and noise on/off."""

  def one(example_id, image):
    return _augment_one(jax.random.fold_in(key, example_id), image.astype(jnp.float32),
                        settings, flip, noise)

  return jax.vmap(one)(example_ids, images).astype(images.dtype)


def two_views(key: jax.Array, images: jax.Array, example_ids: jax.Array,
              **kwargs: Any) -> tuple[jax.Array, jax.Array]:
  """Two independent views (views_a, views_b) of each image, each shaped like `images`.

  `key` is split in two and `augment(k, images, example_ids, **kwargs)` is called with each half,
  so the privacy statement of `augment` holds for the pair.
  """
  key_a, key_b = jax.random.split(key)
  return (augment(key_a, images, example_ids, **kwargs),
          augment(key_b, images, example_ids, **kwargs))
