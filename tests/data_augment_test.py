"""Tests for dpjax.data.augment: shapes, the identity setting, each op, per-example isolation
(SimCLR views and the CIFAR crop and flip)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.data import augment as aug

OFF = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip": False, "brightness": 0.0,
       "contrast": 0.0, "noise_std": 0.0}


def _images(n=16, shape=(28, 28, 1), seed=0):
  return np.random.default_rng(seed).uniform(size=(n,) + shape).astype(np.float32)


def _ids(n, start=100):
  return np.arange(start, start + n, dtype=np.int32)


def test_shape_dtype_and_range():
  x = _images()
  y = aug.augment(jax.random.key(0), x, _ids(16), noise_std=0.1)
  assert y.shape == x.shape and y.dtype == np.float32
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_deterministic_in_the_key_and_changed_by_it():
  x = _images()
  a = aug.augment(jax.random.key(3), x, _ids(16))
  b = aug.augment(jax.random.key(3), x, _ids(16))
  c = aug.augment(jax.random.key(4), x, _ids(16))
  np.testing.assert_array_equal(a, b)
  assert np.all(np.abs(np.asarray(a) - np.asarray(c)).max(axis=(1, 2, 3)) > 1e-3)


def test_two_views_differ_for_every_example_and_are_reproducible():
  x = _images()
  va, vb = aug.two_views(jax.random.key(1), x, _ids(16))
  va2, vb2 = aug.two_views(jax.random.key(1), x, _ids(16))
  assert va.shape == vb.shape == x.shape
  np.testing.assert_array_equal(va, va2)
  np.testing.assert_array_equal(vb, vb2)
  assert np.all(np.abs(np.asarray(va) - np.asarray(vb)).max(axis=(1, 2, 3)) > 1e-3)


@pytest.mark.parametrize("shape", [(28, 28, 1), (20, 32, 3)])
def test_identity_when_everything_is_off(shape):
  x = _images(16, shape)
  y = aug.augment(jax.random.key(0), x, _ids(16), **OFF)
  np.testing.assert_allclose(y, x, atol=1e-6, rtol=0)


def test_view_depends_only_on_key_id_and_image():
  """The privacy property: other examples and positions never change an example's view. The
  reference is a loop that augments each example alone in a batch of one."""
  key, n = jax.random.key(7), 16
  x, ids = _images(n), _ids(n)
  kwargs = {"noise_std": 0.05}
  batched = np.asarray(aug.augment(key, x, ids, **kwargs))
  for i in range(n):
    alone = aug.augment(key, x[i:i + 1], ids[i:i + 1], **kwargs)
    np.testing.assert_allclose(batched[i], alone[0], atol=1e-5, rtol=0)
  perm = np.random.default_rng(1).permutation(n)
  permuted = np.asarray(aug.augment(key, x[perm], ids[perm], **kwargs))
  np.testing.assert_allclose(permuted, batched[perm], atol=1e-5, rtol=0)
  others = x.copy()
  others[1:] = _images(n - 1, seed=5)
  changed = np.asarray(aug.augment(key, others, ids, **kwargs))
  np.testing.assert_allclose(changed[0], batched[0], atol=1e-5, rtol=0)
  assert np.abs(changed[1:] - batched[1:]).max() > 1e-3


def test_same_image_with_different_ids_gets_different_views():
  x = np.repeat(_images(1), 16, axis=0)
  y = np.asarray(aug.augment(jax.random.key(0), x, _ids(16)))
  assert all(np.abs(y[i] - y[j]).max() > 1e-3 for i in range(16) for j in range(i))


def test_jit_matches_eager():
  x = _images()
  fn = functools.partial(aug.augment, crop_scale=(0.5, 1.0), brightness=0.2, noise_std=0.02)
  np.testing.assert_allclose(jax.jit(fn)(jax.random.key(2), x, _ids(16)),
                             fn(jax.random.key(2), x, _ids(16)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("area,ratio,slope", [(0.25, 1.0, 0.5), (0.25, 4.0, 1.0),
                                              (0.25, 0.25, 0.25)])
def test_crop_geometry_on_a_horizontal_ramp(area, ratio, slope):
  """On f(y, x) = x / 27 a crop of width fraction w resized back is a ramp of slope w / 27 per
  pixel (in columns 2..25, which always sample between input pixel centres), starting at a left
  offset (in input pixels) within [0, 28 (1 - w)]."""
  n = 64
  ramp = np.broadcast_to(np.arange(28, dtype=np.float32)[None, None, :, None] / 27,
                         (n, 28, 28, 1))
  kwargs = dict(OFF, crop_scale=(area, area), crop_ratio=(ratio, ratio))
  y = np.asarray(aug.augment(jax.random.key(0), ramp, _ids(n), **kwargs))
  np.testing.assert_allclose(np.diff(y[:, :, 2:26], axis=2), slope / 27, atol=1e-5)
  left = 27 * y[:, 0, 2, 0] - (2.5 * slope - 0.5)   # column 2 samples input x = 2.5 w + left - 0.5
  assert left.min() >= -1e-4 and left.max() <= 28 * (1 - slope) + 1e-4
  if slope < 1:
    assert left.max() - left.min() > 0.5 * 28 * (1 - slope)   # positions do vary


def test_flip_gives_the_image_or_its_mirror_and_both_occur():
  """64 examples: all-flipped or none-flipped has probability 2^-63."""
  x = _images(64)
  y = np.asarray(aug.augment(jax.random.key(0), x, _ids(64), **dict(OFF, flip=True)))
  same = np.all(np.abs(y - x) < 1e-6, axis=(1, 2, 3))
  mirrored = np.all(np.abs(y - x[:, :, ::-1]) < 1e-6, axis=(1, 2, 3))
  assert np.all(same | mirrored) and same.any() and mirrored.any()


def test_brightness_adds_a_bounded_constant_and_contrast_keeps_the_mean():
  """Images in [0.4, 0.6] never clip under brightness 0.3 or contrast 0.5."""
  x = 0.4 + 0.2 * _images(64)
  y = np.asarray(aug.augment(jax.random.key(0), x, _ids(64), **dict(OFF, brightness=0.3)))
  delta = (y - x).reshape(64, -1)
  np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1], delta.shape), atol=1e-6)
  assert np.all(np.abs(delta[:, 0]) <= 0.3) and delta[:, 0].std() > 0.05
  y = np.asarray(aug.augment(jax.random.key(0), x, _ids(64), **dict(OFF, contrast=0.5)))
  np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1e-5)
  factor = y.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
  assert np.all((factor >= 0.5 - 1e-4) & (factor <= 1.5 + 1e-4)) and factor.std() > 0.1


def test_noise_has_the_requested_std():
  """Pixels in [0.4, 0.6] with std 0.01 noise never clip (10 sd). The sample std of 50176 draws
  has relative sd 0.32%, so the 2% band fails a correct implementation with probability < 1e-9;
  the mean and a bell-shaped tail (P(|z| > 2) = 4.6%) are checked too."""
  x = 0.4 + 0.2 * _images(64)
  y = np.asarray(aug.augment(jax.random.key(0), x, _ids(64), **dict(OFF, noise_std=0.01)))
  z = (y - x).ravel() / 0.01
  assert abs(z.std() - 1) < 0.02 and abs(z.mean()) < 6 / np.sqrt(z.size)
  assert abs(np.mean(np.abs(z) > 2) - 0.0455) < 0.006


@pytest.mark.parametrize("kwargs,match", [
    ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
    ({"crop_scale": (0.5, 1.2)}, "crop_scale"),
    ({"crop_scale": (0.8, 0.5)}, "crop_scale"),
    ({"crop_ratio": (2.0, 1.0)}, "crop_ratio"),
    ({"brightness": -0.1}, "brightness"),
    ({"contrast": -0.1}, "contrast"),
    ({"noise_std": -1.0}, "noise_std"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    aug.augment(jax.random.key(0), _images(2), _ids(2), **kwargs)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="images"):
    aug.augment(jax.random.key(0), _images(2)[..., 0], _ids(2))
  with pytest.raises(ValueError, match="example_ids"):
    aug.augment(jax.random.key(0), _images(2), _ids(3))
  with pytest.raises(ValueError, match="floating"):
    aug.augment(jax.random.key(0), (_images(2) * 255).astype(np.uint8), _ids(2))


# --- crop_flip: the standard CIFAR augmentation (random crop of the padded image, flip) --------

NUMPY_PAD = {"symmetric": "symmetric", "reflect": "reflect", "zeros": "constant"}


def _placements(view, image, padding, pad_mode):
  """Every (top, left, mirrored) whose window of np.pad(image) equals `view` exactly."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                  mode=NUMPY_PAD[pad_mode])
  return [(top, left, mirrored) for top in range(2 * padding + 1)
          for left in range(2 * padding + 1) for mirrored in (False, True)
          if np.array_equal(view, (lambda x: x[:, ::-1] if mirrored else x)(
              padded[top:top + h, left:left + w]))]


@pytest.mark.parametrize("pad_mode", ["symmetric", "reflect", "zeros"])
def test_each_crop_flip_view_is_one_window_of_the_padded_image(pad_mode):
  """Against numpy's pad (the reference of each mode): every view is exactly an H x W window of
  the padded image, mirrored or not, and windows at every top and left offset occur (400 views,
  9 offsets each way: one is missed with probability < 9·(8/9)^400 < 1e-19). A mirrored window
  can equal another unmirrored one (mirror padding is symmetric), so a view may have several
  placements."""
  n, padding = 400, 4
  x = _images(n, (9, 7, 2))
  y = np.asarray(aug.crop_flip(jax.random.key(0), x, _ids(n), padding=padding, pad_mode=pad_mode))
  assert y.shape == x.shape and y.dtype == x.dtype
  found = [_placements(y[i], x[i], padding, pad_mode) for i in range(n)]
  assert all(found)
  for axis in (0, 1):
    assert {place[axis] for f in found for place in f} == set(range(2 * padding + 1))


def test_crop_flip_mirrors_about_half_the_views():
  """1000 views: the mirrored count is Binomial(1000, 1/2); outside [430, 570] with probability
  < 1e-5. Padding 0 leaves one window: the image or its mirror."""
  n = 1000
  x = _images(n, (6, 5, 1))
  y = np.asarray(aug.crop_flip(jax.random.key(1), x, _ids(n), padding=0))
  same = np.all(y == x, axis=(1, 2, 3))
  mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same != mirrored)
  assert 430 <= mirrored.sum() <= 570


def test_crop_flip_is_the_identity_without_padding_and_flip():
  x = _images(8, (5, 6, 3))
  np.testing.assert_array_equal(
      aug.crop_flip(jax.random.key(0), x, _ids(8), padding=0, flip=False), x)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, jnp.bfloat16])
def test_crop_flip_keeps_the_dtype_and_moves_values_only(dtype):
  """Data movement only: the view's values are the image's (standardised or uint8 alike)."""
  x = (_images(16, (8, 8, 3)) * 200).astype(dtype)
  y = np.asarray(jax.jit(aug.crop_flip)(jax.random.key(0), x, _ids(16)))
  assert y.dtype == x.dtype
  for i in range(16):
    assert set(np.unique(y[i]).tolist()) <= set(np.unique(x[i]).tolist())


def test_crop_flip_view_depends_only_on_key_id_and_image():
  """The privacy property, as for `augment`: a view is the same alone, in another position or
  beside other examples."""
  key, n = jax.random.key(7), 16
  x, ids = _images(n, (8, 8, 3)), _ids(n)
  batched = np.asarray(aug.crop_flip(key, x, ids))
  for i in range(n):
    np.testing.assert_array_equal(batched[i], aug.crop_flip(key, x[i:i + 1], ids[i:i + 1])[0])
  perm = np.random.default_rng(1).permutation(n)
  np.testing.assert_array_equal(aug.crop_flip(key, x[perm], ids[perm]), batched[perm])
  others = x.copy()
  others[1:] = _images(n - 1, (8, 8, 3), seed=5)
  np.testing.assert_array_equal(aug.crop_flip(key, others, ids)[0], batched[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"padding": -1}, "padding"),
    ({"padding": 1.5}, "padding"),
    ({"pad_mode": "edge"}, "pad_mode"),
    ({"padding": 8, "pad_mode": "reflect"}, "reflect"),
])
def test_crop_flip_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    aug.crop_flip(jax.random.key(0), _images(2, (8, 8, 1)), _ids(2), **kwargs)


def test_crop_flip_bad_shapes_raise():
  with pytest.raises(ValueError, match="images"):
    aug.crop_flip(jax.random.key(0), _images(2)[..., 0], _ids(2))
  with pytest.raises(ValueError, match="example_ids"):
    aug.crop_flip(jax.random.key(0), _images(2), _ids(3))
