"""Tests for dpjax.privacy.noise: the noise's distribution and tail, freshness, reproducibility."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

from dpjax.privacy import noise

SIGMA, SENSITIVITY, BATCH = 1.3, 0.7, 64.0


def _noise_of(transform, updates, state):
  """Runs one update; returns the noise it added (undoing the division by the batch size)."""
  out, state = jax.jit(transform.update)(updates, state)
  added = jax.tree_util.tree_map(lambda o, u: np.asarray(o, np.float64) * BATCH - np.asarray(u),
                                 out, updates)
  return np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(added)]), state


def _updates():
  return {"a": jnp.full((300, 400), 2.0), "b": {"c": jnp.arange(5000.0)}}


def test_standard_deviation_is_sigma_times_sensitivity():
  """n = 125000 draws; the sample variance has relative sd sqrt(2/n) = 0.4%. A 6-sd band (±2.4%)
  fails a correct implementation with probability about 2e-9; a factor-√2 error (noise twice per
  step) or a missing sensitivity factor lies far outside it."""
  t = noise.add_gaussian_noise(SIGMA, SENSITIVITY, BATCH, seed=0)
  z, _ = _noise_of(t, _updates(), t.init(_updates()))
  var, n = np.var(z), z.size
  expected = (SIGMA * SENSITIVITY) ** 2
  assert abs(var / expected - 1) < 6 * np.sqrt(2 / n)
  assert abs(np.mean(z)) < 6 * SIGMA * SENSITIVITY / np.sqrt(n)


def test_noise_is_fresh_each_step_and_reproducible_from_the_seed():
  t = noise.add_gaussian_noise(SIGMA, SENSITIVITY, BATCH, seed=5)
  u = _updates()
  s0 = t.init(u)
  z1, s1 = _noise_of(t, u, s0)
  z2, s2 = _noise_of(t, u, s1)
  assert int(s1.count) == 1 and int(s2.count) == 2  # one draw per update call
  assert abs(np.corrcoef(z1, z2)[0, 1]) < 0.02  # n = 125000: 0.02 is 7 sd of a null correlation
  z1_again, _ = _noise_of(t, u, t.init(u))
  np.testing.assert_array_equal(z1, z1_again)
  other = noise.add_gaussian_noise(SIGMA, SENSITIVITY, BATCH, seed=6)
  assert not np.allclose(z1, _noise_of(other, u, other.init(u))[0])


def test_leaves_get_independent_noise():
  t = noise.add_gaussian_noise(1.0, 1.0, BATCH, seed=0)
  u = {"x": jnp.zeros(20000), "y": jnp.zeros(20000)}
  out, _ = t.update(u, t.init(u))
  assert abs(np.corrcoef(out["x"], out["y"])[0, 1]) < 0.04  # 5.7 sd of a null correlation


def test_one_draw_for_whole_leaves_and_one_per_shape_of_split_leaves():
  """Each draw is a random-number kernel for XLA to compile: one per leaf made a ViT-B DP step
  compile 45 s longer. Leaves not split over devices share one flat draw; split ones share one
  draw per shape (rows of [count, *shape])."""
  tree = {f"block{i}": jnp.zeros((4, 3)) for i in range(10)} | {"bias": jnp.zeros(5)}

  def draws(split):
    return str(jax.make_jaxpr(lambda key: noise.gaussian_noise_like(key, tree, 1.0, split))(
        jax.random.PRNGKey(0))).count("random_bits")
  assert draws(None) == 1
  assert draws(jax.tree_util.tree_map(lambda _: True, tree)) == 2
  assert draws({f"block{i}": i < 4 for i in range(10)} | {"bias": False}) == 2


@pytest.mark.parametrize("split", [False, True])
def test_drawn_together_leaves_are_independent_standard_normals(split):
  """Pieces of one flat draw (or rows of one shaped draw) are independent N(0, s²), not copies."""
  tree = {"a": jnp.zeros((300, 100)), "b": jnp.zeros((300, 100)), "c": jnp.zeros(7)}
  flags = jax.tree_util.tree_map(lambda _: split, tree)
  z = noise.gaussian_noise_like(jax.random.PRNGKey(3), tree, 2.0, flags)
  assert jax.tree_util.tree_map(jnp.shape, z) == jax.tree_util.tree_map(jnp.shape, tree)
  a, b = np.ravel(z["a"]), np.ravel(z["b"])
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.025  # n = 30000: 4.3 sd of a null correlation
  for x in (a, b):
    assert np.std(x) == pytest.approx(2.0, rel=0.03) and abs(np.mean(x)) < 0.05
  # No run of values shared between the leaves (a piece cut twice from the draw would share one).
  runs = lambda x: {w.tobytes() for w in np.lib.stride_tricks.sliding_window_view(x, 3)}
  assert not runs(a) & runs(b) and not runs(np.ravel(z["c"])) & (runs(a) | runs(b))


def test_noise_is_float32_for_low_precision_params():
  t = noise.add_gaussian_noise(1.0, 1e-3, 1.0, seed=0)
  u = {"w": jnp.zeros(100000, jnp.bfloat16)}
  out, _ = t.update(u, t.init(u))
  assert out["w"].dtype == jnp.bfloat16
  # bf16 noise would have std 1e-3 too; the check is that it was drawn and scaled correctly.
  assert np.std(np.asarray(out["w"], np.float32)) == pytest.approx(1e-3, rel=0.05)


def test_frozen_leaves_get_no_noise_and_no_update():
  params = {"frozen": jnp.ones(10), "train": jnp.ones(10)}
  trainable = {"frozen": False, "train": True}
  opt = noise.dp_optimizer(optax.adamw(0.1, weight_decay=0.1), noise_multiplier=1.0,
                           sensitivity=1.0, expected_batch_size=4.0, trainable=trainable)
  state = opt.init(params)
  grads = {"frozen": jnp.zeros(10), "train": jnp.zeros(10)}
  updates, state = opt.update(grads, state, params)
  assert not np.any(np.asarray(updates["frozen"]))
  assert np.all(np.asarray(updates["train"]) != 0)
  assert int(noise.noise_state(state).count) == 1


def _drawn_sizes(jaxpr) -> list[int]:
  """The sizes of the random_bits draws in a jaxpr, nested jaxprs (pjit, ...) included."""
  sizes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "random_bits":
      sizes.append(math.prod(eqn.outvars[0].aval.shape))
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        sizes += _drawn_sizes(inner)
  return sizes


@pytest.mark.parametrize("split,sizes", [(None, [4 * (400 + 10) // 2]),
                                         ({"backbone": True, "head": True, "bias": False},
                                          [4 * 10 // 2, 4 * 400])])
def test_noise_is_drawn_for_trainable_leaves_only(split, sizes):
  """Fine-tuning a head: the draw covers the trainable params, not the frozen backbone's. Four
  32-bit words make a pair of normals; the split head, alone with its shape, pairs each value
  with a discarded one."""
  updates = {"backbone": jnp.zeros((300, 40)), "head": jnp.zeros((40, 10)), "bias": jnp.zeros(10)}
  trainable = {"backbone": False, "head": True, "bias": True}
  t = noise.add_gaussian_noise(1.0, 1.0, 1.0, trainable=trainable, split=split)
  assert _drawn_sizes(jax.make_jaxpr(t.update)(updates, t.init(updates)).jaxpr) == sizes
  out, _ = t.update(updates, t.init(updates))
  assert not np.any(np.asarray(out["backbone"])) and np.all(np.asarray(out["head"]) != 0)


def test_flags_of_another_structure_are_refused_clearly():
  updates = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="split must be a pytree of bools with the structure"):
    noise.gaussian_noise_like(jax.random.PRNGKey(0), updates, 1.0, {"a": True})
  t = noise.add_gaussian_noise(1.0, 1.0, 1.0, trainable={"a": True})
  with pytest.raises(ValueError, match="trainable must be a pytree of bools with the structure"):
    t.update(updates, t.init(updates))


def test_dp_optimizer_composes_with_optax():
  params = {"w": jnp.ones(3)}
  opt = noise.dp_optimizer(optax.sgd(1.0), noise_multiplier=0.0, sensitivity=1.0,
                           expected_batch_size=2.0)
  updates, _ = opt.update({"w": jnp.array([2.0, 4.0, 6.0])}, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], [-1.0, -2.0, -3.0])  # -lr · sum / B


@pytest.mark.parametrize("kwargs,match", [
    (dict(noise_multiplier=-1.0, sensitivity=1.0, expected_batch_size=1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, sensitivity=0.0, expected_batch_size=1.0), "sensitivity"),
    (dict(noise_multiplier=1.0, sensitivity=1.0, expected_batch_size=0.0), "expected_batch_size"),
])
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    noise.add_gaussian_noise(**kwargs)


def test_normals_have_the_gaussian_distribution():
  """n = 1e7 + 1 draws (an odd count: the last pair's sine is dropped). Every check is a 6-sd
  band (false failure about 2e-9 each) except the KS test on 1e6 of them (p < 1e-6: 1e-6)."""
  n = 10_000_001
  tree = {"x": jax.ShapeDtypeStruct((n,), jnp.float32)}
  z = np.asarray(noise.gaussian_noise_like(jax.random.PRNGKey(7), tree, 1.0)["x"])
  assert z.shape == (n,) and z.dtype == np.float32 and np.all(np.isfinite(z))
  assert abs(np.mean(z, dtype=np.float64)) < 6 / np.sqrt(n)
  assert abs(np.var(z, dtype=np.float64) - 1) < 6 * np.sqrt(2 / n)
  for t in (3.0, 4.0, 4.5):
    p = special.erfc(t / np.sqrt(2))  # P(|Z| > t)
    assert abs(np.sum(np.abs(z) > t) - n * p) < 6 * np.sqrt(n * p * (1 - p)), t
  assert stats.kstest(z[::10], "norm").pvalue > 1e-6  # cosines and sines alike
  # A pair's cosine (element i) and sine (element m + i) are independent: uncorrelated, and so
  # are their squares (sd 1/sqrt(m) and 2/sqrt(m): var(z² - 1) = 2).
  m = (n + 1) // 2
  cos, sin = z[:m - 1].astype(np.float64), z[m:].astype(np.float64)
  assert abs(np.mean(cos * sin)) < 6 / np.sqrt(m)
  assert abs(np.mean((cos ** 2 - 1) * (sin ** 2 - 1))) < 6 * 2 / np.sqrt(m)


def _reference_pair(words) -> tuple[float, float]:
  """The pair `_box_muller` should make from 4 words, in float64: u = v or 1 - v, by word 0's
  top bit, with v = (k + 1/2)·2^-104 and k the other 103 radius bits."""
  w0, w1, w2, w3 = (int(w) for w in words)
  k = ((w0 & 0x7FFFFFFF) << 72) | (w1 << 40) | (w2 << 8) | (w3 & 0xFF)
  v = (k + 0.5) / 2 ** 104  # float64 keeps 53 of its bits: enough for a float32 radius
  radius = math.sqrt(-2 * (math.log(v) if w0 >> 31 == 0 else math.log1p(-v)))
  angle = math.pi * ((w3 >> 8) - (1 << 24 if w3 >> 31 else 0)) / 2 ** 23
  return radius * math.cos(angle), radius * math.sin(angle)


def _radius(words) -> float:
  z1, z2 = noise._box_muller(jnp.asarray(words, jnp.uint32))
  return math.hypot(float(z1), float(z2))


def test_radius_reaches_twelve_sigma_on_crafted_words():
  """The radius uniform has 104 bits: all zero gives u = 2^-105 and r = sqrt(210 ln 2) = 12.06,
  which `jax.random.normal` (ending at -5.42 and +5.22) never reaches. The other extreme,
  u = 1 - 2^-105, gives r = 2^-52, not 0 (nor a NaN). Crafted and random words (small ones
  included) against a float64 reference."""
  assert _radius([0, 0, 0, 0]) == pytest.approx(math.sqrt(210 * math.log(2)), rel=1e-6)
  assert _radius([0x80000000, 0, 0, 0]) == pytest.approx(2.0 ** -52, rel=1e-6)
  crafted = [[0, 0, 0, 0xFF], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0x40000000],
             [0, 0, 0, 0x80000000], [0, 0, 0, 0xC00000FF], [0, 0, 0x12345, 0x7FFFFFFF],
             [0xFFFFFFFF] * 4, [0x7FFFFFFF] * 4, [0x80000001, 0, 0, 0], [0x80000000, 0, 1, 0]]
  rng = np.random.default_rng(0)
  random = rng.integers(0, 2 ** 32, size=(1000, 4), dtype=np.uint32)
  random[:, :2] >>= rng.integers(0, 33, size=(1000, 2)).astype(np.uint32)  # small k too
  random[:500, 0] |= np.uint32(0x80000000)  # in the upper half: u near 1, small radii
  words = np.concatenate([np.array(crafted, np.uint32), random])
  z1, z2 = noise._box_muller(jnp.asarray(words.T))
  expected = np.array([_reference_pair(w) for w in words])
  # float32 rounding: a few units of 2^-24 relative to the radius, however small it is.
  tolerance = 1e-6 * np.hypot(expected[:, 0], expected[:, 1])
  assert np.all(np.abs(np.asarray(z1) - expected[:, 0]) < tolerance)
  assert np.all(np.abs(np.asarray(z2) - expected[:, 1]) < tolerance)


@pytest.mark.parametrize("zeros", [1, 2])
def test_radius_tail_is_exact_beyond_the_leading_zero_words(zeros):
  """Given its first `zeros` words are 0, u is uniform below 2^-32k and r² - 64k·ln 2 is
  2·Exp(1): the radius's tail beyond 6.66 (k = 1) or 9.42 (k = 2) standard deviations, checked
  by a KS test on 1e5 crafted pairs (false failure 1e-6), and the angle is uniform."""
  rng = np.random.default_rng(zeros)
  words = rng.integers(0, 2 ** 32, size=(4, 100_000), dtype=np.uint32)
  words[:zeros] = 0
  z1, z2 = (np.asarray(z, np.float64) for z in noise._box_muller(jnp.asarray(words)))
  excess = (z1 ** 2 + z2 ** 2 - 64 * zeros * math.log(2)) / 2
  assert stats.kstest(excess, "expon").pvalue > 1e-6
  assert stats.kstest(np.arctan2(z2, z1), "uniform", args=(-np.pi, 2 * np.pi)).pvalue > 1e-6


@pytest.mark.parametrize("split", [False, True])
def test_noise_reaches_the_deep_tail(split, monkeypatch):
  """With all-zero random words the draw's cosines are 12.06 standard deviations: the tail is
  drawn by the sampler `gaussian_noise_like` uses, flat or by shape."""
  monkeypatch.setattr(jax.random, "bits", lambda key, shape, dtype: jnp.zeros(shape, dtype))
  tree = {"a": jnp.zeros((3, 5)), "b": jnp.zeros((3, 5)), "c": jnp.zeros(7)}
  z = noise.gaussian_noise_like(jax.random.PRNGKey(0), tree, 2.0,
                                jax.tree_util.tree_map(lambda _: split, tree))
  largest = max(float(np.max(np.abs(x))) for x in jax.tree_util.tree_leaves(z))
  assert largest == pytest.approx(2.0 * math.sqrt(210 * math.log(2)), rel=1e-6)


def test_tail_delta_accounts_the_radius_beyond_the_largest():
  """The exact radius exceeds the sampler's largest, r_max, with probability exp(-r_max²/2): the
  per-pair constant; tail_delta is (1 + e^ε)·steps·values·that."""
  r_max = _radius([0, 0, 0, 0])
  assert math.exp(-r_max ** 2 / 2) == pytest.approx(noise.PAIR_TAIL_PROBABILITY, rel=1e-4)
  assert noise.PAIR_TAIL_PROBABILITY == 2.0 ** -105
  for values, steps, epsilon in [(1, 1, 0.0), (10_000, 2_000, 3.0), (86_000_000, 100_000, 10.0)]:
    assert noise.tail_delta(values, steps, epsilon) == pytest.approx(
        (1 + math.exp(epsilon)) * steps * values * 2.0 ** -105, rel=1e-12)
  assert noise.tail_delta(86_000_000, 100_000, 10.0) < 1e-12  # a ViT-B/16 run: 4.7e-15
  assert noise.tail_delta(86_000_000, 0, 10.0) == 0.0


@pytest.mark.parametrize("args", [(-1, 10, 1.0), (10, -1, 1.0), (10, 10, -1.0),
                                  (10, 10, math.inf), (1.5, 10, 1.0)])
def test_tail_delta_refuses_bad_input(args):
  with pytest.raises(ValueError, match="must be"):
    noise.tail_delta(*args)
