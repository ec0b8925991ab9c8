"""On-device augmentations: SimCLR-style views (`augment`: random resized crop, flip, brightness,
contrast, noise) and the standard CIFAR ones (`crop_flip`: random crop of the padded image,
horizontal flip).

Everything here is pure JAX and jit-able, e.g. `jax.jit(functools.partial(augment, ...))`: the
keyword arguments are Python numbers, checked eagerly; only `flip` and whether `noise_std > 0`
change the compiled program. Each example is augmented on its own under `vmap`, with randomness
drawn only from `jax.random.fold_in(key, example_id)`. (`dpjax.data.views` draws K views of each
example from the config seed, the step and the example's id, for augmentation multiplicity.)

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


def _check_batch(images: jax.Array, example_ids: jax.Array) -> None:
  if jnp.ndim(images) != 4:
    raise ValueError(f"images must be [n, H, W, C], got shape {jnp.shape(images)}.")
  if jnp.shape(example_ids) != jnp.shape(images)[:1]:
    raise ValueError(f"example_ids must have shape [{jnp.shape(images)[0]}] (one id per image), "
                     f"got {jnp.shape(example_ids)}.")
  if not jnp.issubdtype(jnp.result_type(example_ids), jnp.integer):
    raise ValueError(f"example_ids must be integers, got {jnp.result_type(example_ids)}.")


def _check(images: jax.Array, example_ids: jax.Array, crop_scale: tuple[float, float],
           crop_ratio: tuple[float, float], brightness: float, contrast: float,
           noise_std: float) -> None:
  _check_batch(images, example_ids)
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError(f"images must be floating point in [0, 1], got {jnp.result_type(images)}; "
                     "convert uint8 images with dpjax.data.to_float first.")
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


# How `crop_flip` fills the border it crops from: jnp.pad's mode for each name.
PAD_MODES = {"symmetric": "symmetric", "reflect": "reflect", "zeros": "constant"}


def crop_flip_one(key: jax.Array, image: jax.Array, padding: int = 4, pad_mode: str = "symmetric",
                  flip: bool = True) -> jax.Array:
  """One view of one image [H, W, C], from `key` only: the image padded by `padding` pixels on
  each side, an H x W window of it at a uniform position ((2·padding + 1)² of them), mirrored
  left-right with probability 1/2 (if `flip`). Data movement only: the view's values are the
  image's (or the zeros' of pad_mode "zeros"), in its dtype. Arguments as in `crop_flip`."""
  h, w, c = image.shape
  if not isinstance(padding, int) or padding < 0:
    raise ValueError(f"padding must be an integer >= 0 (pixels on each side), got {padding!r}.")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {sorted(PAD_MODES)}, got {pad_mode!r}.")
  if pad_mode == "reflect" and padding >= min(h, w):
    raise ValueError(f"pad_mode 'reflect' needs padding < the image's sides {h} x {w}, got "
                     f"{padding}; use 'symmetric' or 'zeros'.")
  # One draw: the window's top and left offsets, then the flip bit.
  top, left, mirror = jax.random.randint(key, (3,), 0, jnp.array([2 * padding + 1] * 2 + [2]))
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                   mode=PAD_MODES[pad_mode])
  view = jax.lax.dynamic_slice(padded, (top, left, 0), (h, w, c))
  return jnp.where(mirror == 1, view[:, ::-1], view) if flip else view


def crop_flip(key: jax.Array, images: jax.Array, example_ids: jax.Array, *, padding: int = 4,
              pad_mode: str = "symmetric", flip: bool = True) -> jax.Array:
  """One random view of each image, the standard CIFAR augmentation: random crop of the image
  padded by `padding` pixels on each side (4 for 32 x 32 CIFAR) and a horizontal flip with
  probability 1/2.

  pad_mode: "symmetric" (the default) mirrors the border pixels including the edge row (numpy's
    "symmetric": a b c | c b a), as De et al. 2022's jax_privacy pipeline pads (`padding_input`);
    "reflect" mirrors without repeating the edge (a b c | b a); "zeros" pads with 0, as
    torchvision's RandomCrop(32, padding=4) does on [0, 1] images (on standardised images 0 is
    the dataset's mean colour, not black).

  Args:
    key: PRNG key (typed or raw).
    images: [n, H, W, C], any dtype (preprocessed floats, standardised or not, or uint8).
    example_ids: int [n], ids that identify the examples (e.g. dataset indices).

  Returns:
    [n, H, W, C] in the dtype of `images`.

  Privacy: example i's view is drawn from `jax.random.fold_in(key, example_ids[i])` and
  `images[i]` only (see the module docstring).
  """
  _check_batch(images, example_ids)
  one = functools.partial(crop_flip_one, padding=padding, pad_mode=pad_mode, flip=flip)
  return jax.vmap(lambda example_id, image: one(jax.random.fold_in(key, example_id), image))(
      jnp.asarray(example_ids), jnp.asarray(images))
