"""Tests for dpjax.privacy.noise: the noise's standard deviation, freshness and reproducibility."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


@pytest.mark.parametrize("split,sizes", [(None, [400 + 10]),
                                         ({"backbone": True, "head": True, "bias": False},
                                          [10, 400])])
def test_noise_is_drawn_for_trainable_leaves_only(split, sizes):
  """Fine-tuning a head: the draw covers the trainable params, not the frozen backbone's."""
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
