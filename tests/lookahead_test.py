"""Tests for dpjax.lookahead: the simulated DP steps of the automatic switch's lookahead."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax import data, lookahead
from dpjax.data import public_batch as public_batch_lib
from dpjax.privacy import clipping
from tests import toy_models


def _public_batches(n, count, seed=0):
  rng = np.random.default_rng(seed)
  dataset = data.Dataset(rng.integers(0, 256, (n,) + toy_models.IMAGE_SHAPE, np.uint8),
                         rng.integers(0, 3, n).astype(np.int32), 3, "toy", "train[public]")
  return [public_batch_lib.public_batch(dataset, rng.choice(n, n // 2, replace=False))
          for _ in range(count)]


def test_shadow_steps_are_clipped_mean_gradient_steps_plus_noise_of_the_given_std():
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  example_loss = toy_models.per_example_loss(model)
  rule = clipping.FlatClip(0.1)
  sgd = optax.sgd(1.0)
  batches = _public_batches(16, 2)
  step = lookahead.make_shadow_step(example_loss, rule, sgd)
  key = jax.random.PRNGKey(0)
  expected = params  # the same steps by a per-example Python loop, without noise
  for batch in batches:
    clipped = [rule.clip(jax.grad(example_loss)(expected, dict(image=x, label=y)))[0]
               for x, y in zip(batch.image, batch.label)]
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *clipped)
    expected = jax.tree_util.tree_map(lambda p, g: p - g, expected, mean)
  got = lookahead.shadow_dp_params(step, sgd, params, batches, key, 0.0)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # With noise: one step moves each coordinate by the clipped mean plus N(0, std²).
  std = 3.0
  noisy = lookahead.shadow_dp_params(step, sgd, params, batches[:1], key, std)
  clean = lookahead.shadow_dp_params(step, sgd, params, batches[:1], key, 0.0)
  diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(noisy),
                                                         jax.tree_util.tree_leaves(clean))])
  assert diff.size > 500 and abs(np.std(diff) / std - 1) < 0.15 and abs(np.mean(diff)) < 0.5


def test_the_lookahead_trains_on_public_batches_only():
  model = toy_models.MODELS["dense"]
  params = toy_models.init(model)
  sgd = optax.sgd(1.0)
  step = lookahead.make_shadow_step(toy_models.per_example_loss(model), clipping.FlatClip(1.0), sgd)
  batch = {"image": jnp.zeros((2, 8, 8, 1)), "label": jnp.zeros(2, jnp.int32)}
  with pytest.raises(TypeError, match="PublicBatch"):
    lookahead.shadow_dp_params(step, sgd, params, [batch], jax.random.PRNGKey(0), 1.0)
