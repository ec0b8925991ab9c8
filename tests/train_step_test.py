"""Tests for dpjax.train.step: one noise draw per step, moment resets (sharded: parallel_test)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import config as config_lib
from dpjax.privacy import clipping, noise
from dpjax.train import state as state_lib, step as step_lib
from tests import toy_models


def test_apply_noises_private_steps_once_and_public_steps_never():
  params = {"w": jnp.zeros(4)}
  tx = noise.add_gaussian_noise(1.0, 1.0, 8.0, seed=0)
  opt = optax.sgd(1.0)
  apply = step_lib.make_apply(tx, opt)
  state = step_lib.OptState(tx.init(params), opt.init(params))
  grads = {"w": jnp.ones(4)}
  p1, s1, _ = apply(params, state, grads, None, 1.0)  # public-only
  assert int(s1.noise.count) == 0
  np.testing.assert_allclose(p1["w"], -1.0)
  p2, s2, _ = apply(params, s1, None, grads, 0.0)  # private-only
  assert int(s2.noise.count) == 1
  p3, s3, _ = apply(params, s2, grads, grads, 0.5)  # mixed
  assert int(s3.noise.count) == 2
  assert not np.allclose(p2["w"], p3["w"])


@pytest.mark.parametrize("which", ["first", "moments", "all", "none"])
def test_reset_moments(which):
  params = {"w": jnp.ones(3)}
  for opt in [optax.adam(optax.cosine_decay_schedule(0.1, 10)),
              optax.sgd(0.1, momentum=0.9)]:
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones(3)}, state, params)
    reset = step_lib.reset_moments(state, which)
    leaves = {name: getattr(s, name) for s in jax.tree_util.tree_leaves(
        reset, is_leaf=lambda x: hasattr(x, "_fields")) if hasattr(s, "_fields")
        for name in s._fields}
    first = leaves.get("mu", leaves.get("trace"))
    assert (not np.any(first["w"])) == (which != "none")
    if "nu" in leaves:
      assert (not np.any(leaves["nu"]["w"])) == (which in ("moments", "all"))
      adam, schedule = reset
      assert int(adam.count) == (0 if which in ("moments", "all") else 1)
      assert int(schedule.count) == (0 if which == "all" else 1)  # the lr schedule restarts


def test_reset_all_restarts_the_configured_warm_up():
  """With the config's optimizer (Adam, cosine with a warm-up), the update after a reset "all" is
  a fresh optimizer's first update: the warm-up starts again; after "moments" it does not."""
  config = config_lib.default_config()
  config.optimizer.update(name="adam", learning_rate=0.1)
  config.schedule.update(lr_schedule="cosine", warmup_steps=4, total_steps=20)
  opt = state_lib.create_optimizer(config)
  params, grads = {"w": jnp.ones(3)}, {"w": jnp.array([1.0, -2.0, 0.5])}

  def two_updates(state):  # the warm-up's first learning rate is 0: compare the second too
    first, state = opt.update(grads, state, params)
    return [first["w"], opt.update(grads, state, params)[0]["w"]]
  fresh = two_updates(opt.init(params))
  assert np.all(np.abs(fresh[1]) > 0)
  state = opt.init(params)
  for _ in range(6):
    _, state = opt.update(grads, state, params)
  np.testing.assert_array_equal(two_updates(step_lib.reset_moments(state, "all")), fresh)
  continued = two_updates(step_lib.reset_moments(state, "moments"))
  assert np.all(np.abs(continued[0]) > np.abs(fresh[1]) + 1e-3)  # the lr is past the warm-up


@pytest.mark.parametrize("ghost", [False, True])
def test_a_first_microbatch_overwrites_acc_without_reading_it(ghost):
  """accumulate(..., first=True) is the microbatch's sum alone, whatever acc holds (the trainer
  passes the previous step's sum, `reuse_sum`; NaN here); first=False adds to acc."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  rule = clipping.FlatClip(0.5)
  accumulate = step_lib.make_accumulate(
      step_lib.make_example_loss(model), rule,
      batch_losses=step_lib.make_batch_losses(model) if ghost else None)
  zero_sum = step_lib.make_zero_sum(rule)
  batch, mask = toy_models.batch(8, seed=1, scale=3.0), jnp.arange(8) < 6
  def fresh():
    return accumulate(zero_sum(params), params, None, batch, mask, np.bool_(False))
  expected = jax.device_get(fresh())
  assert expected.stats.num_examples == 6 and expected.sensitivity == 0.5
  nan = lambda: jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), fresh())
  for spent in (nan(), step_lib.reuse_sum(nan())):  # accumulate donates acc: one each
    first = jax.device_get(accumulate(spent, params, None, batch, mask, np.bool_(True)))
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(expected)):
      np.testing.assert_array_equal(a, b)
  twice = jax.device_get(accumulate(fresh(), params, None, batch, mask, np.bool_(False)))
  assert twice.stats.num_examples == 12 and twice.stats.norm_max == expected.stats.norm_max
  for a, b in zip(jax.tree_util.tree_leaves(twice.grad_sum),
                  jax.tree_util.tree_leaves(expected.grad_sum)):
    np.testing.assert_allclose(a, 2 * b, rtol=1e-6)


def test_public_grad_is_the_mean_gradient_and_mean_loss():
  """make_public_grad: the gradient of the batch's mean loss (1/rows folded into the backward
  pass) and the mean loss, against per-example gradients averaged by hand."""
  model = toy_models.MODELS["conv"]
  params = toy_models.init(model)
  loss = step_lib.make_example_loss(model)
  batch = toy_models.batch(6, seed=2, scale=3.0)
  grads, mean_loss = step_lib.make_public_grad(loss)(params, batch)
  per_example = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, batch)
  np.testing.assert_allclose(mean_loss, np.mean(per_example[0]), rtol=1e-6)
  for got, each in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(per_example[1])):
    np.testing.assert_allclose(got, np.mean(each, axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("count", [0, 1, 2])
def test_a_step_sums_its_own_microbatches_and_an_empty_draw_sums_to_zero(count):
  """sum_microbatches starts from the previous step's sum (NaN here) without reading it; with no
  microbatch (an empty Poisson draw) the step's sum is zero, never the previous step's again."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  rule = clipping.FlatClip(0.5)
  accumulate = step_lib.make_accumulate(step_lib.make_example_loss(model), rule)
  zero_sum = step_lib.make_zero_sum(rule)
  batch, mask = toy_models.batch(8, seed=3, scale=3.0), jnp.arange(8) < 7
  nan_sum = lambda: jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), zero_sum(params))
  found = jax.device_get(step_lib.sum_microbatches(
      accumulate, zero_sum, nan_sum(), params, None, [(batch, mask)] * count))
  one = jax.device_get(accumulate(zero_sum(params), params, None, batch, mask, np.bool_(True)))
  assert found.stats.num_examples == 7 * count and found.sensitivity == 0.5
  for got, want in zip(jax.tree_util.tree_leaves(found.grad_sum),
                       jax.tree_util.tree_leaves(one.grad_sum)):
    np.testing.assert_allclose(got, count * want, rtol=1e-6)


def test_accumulate_takes_the_element_mask_it_was_made_for():
  """accumulate's element_mask is a mask exactly when it was made with masked=True (None
  otherwise: an empty pytree, nothing dispatched); an all-ones mask changes nothing."""
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  rule = clipping.FlatClip(0.5)
  loss = step_lib.make_example_loss(model)
  plain = step_lib.make_accumulate(loss, rule)
  masked = step_lib.make_accumulate(loss, rule, masked=True)
  zero_sum = step_lib.make_zero_sum(rule)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  batch, mask = toy_models.batch(8, seed=2, scale=3.0), jnp.arange(8) < 7
  with pytest.raises(ValueError, match="masked=False"):
    plain(zero_sum(params), params, ones, batch, mask, np.bool_(True))
  with pytest.raises(ValueError, match="masked=True"):
    masked(zero_sum(params), params, None, batch, mask, np.bool_(True))
  want = jax.device_get(plain(zero_sum(params), params, None, batch, mask, np.bool_(True)))
  got = jax.device_get(masked(zero_sum(params), params, ones, batch, mask, np.bool_(True)))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
