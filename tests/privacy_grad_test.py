"""Tests of dpjax.privacy.grad: the jax.grad-shaped clipped gradient against a per-example loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpjax.privacy import clipping, grad
from tests import toy_models


class Embedding(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(3)(jnp.tanh(nn.Embed(11, 4)(tokens)).mean(axis=1))


class BatchNormed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
    return nn.Dense(3)(nn.BatchNorm(use_running_average=False)(x))


def _inputs(name, n, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  labels = jax.random.randint(k2, (n,), 0, 3)
  if name == "embedding":
    return jax.random.randint(k1, (n, 5), 0, 11), labels
  return 3.0 * jax.random.normal(k1, (n,) + toy_models.IMAGE_SHAPE), labels


MODELS = {"conv": toy_models.Conv(), "attention": toy_models.Attention(), "embedding": Embedding()}


def _setup(name, n=6, seed=0):
  model = MODELS[name]
  x, y = _inputs(name, n, seed)
  params = model.init(jax.random.PRNGKey(seed + 1), x[:1])["params"]

  def batch_loss(params, x, y):  # a loss written for batches: the mean over its rows
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def one_loss(params, x, y):  # ONE example, no batch axis
    return batch_loss(params, x[None], y[None])

  return params, x, y, batch_loss, one_loss


def _loop(one_loss, rule, params, x, y, mask):
  """Σ over real rows of rule.clip(jax.grad(loss on one example)): the obvious reference."""
  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  for i in range(len(mask)):
    if mask[i]:
      clipped, _, _ = rule.clip(jax.grad(one_loss)(params, x[i], y[i]))
      total = jax.tree_util.tree_map(jnp.add, total, clipped)
  return total


def _assert_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("example_axis", ["drop", "keep"])
def test_matches_per_example_loop_with_padding_and_microbatches(name, example_axis):
  params, x, y, batch_loss, one_loss = _setup(name)
  rule = clipping.FlatClip(0.3)  # below most norms: the factors matter
  mask = np.array([1, 1, 0, 1, 1, 0], np.float32)
  f = grad.clipped_grad(one_loss if example_axis == "drop" else batch_loss, rule,
                        batch_argnums=(1, 2), microbatch_size=2, example_axis=example_axis)
  out = jax.jit(lambda p, x, y, m: f(p, x, y, mask=m))(params, x, y, mask)
  _assert_close(out.grad, _loop(one_loss, rule, params, x, y, mask))
  assert out.sensitivity == 0.3
  assert int(out.stats.num_clipped) >= 1  # the rule did clip: the test compares scaled gradients


def test_argnums_tuple_clips_all_differentiated_arguments_together():
  def loss(w, x, b):
    return jnp.tanh(x @ w + b).sum()
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  w, x, b = (jax.random.normal(k1, (3, 2)), 2 * jax.random.normal(k2, (4, 3)),
             jax.random.normal(k3, (2,)))
  rule = clipping.FlatClip(0.5)
  both = grad.clipped_grad(loss, rule, argnums=(0, 2))(w, x, b)
  assert isinstance(both.grad, tuple) and len(both.grad) == 2
  ref = _loop(lambda p, xi, _: loss(p[0], xi, p[1]), rule, (w, b), x, np.zeros(4), np.ones(4))
  _assert_close(both.grad, ref)
  only_w = grad.clipped_grad(loss, rule, argnums=0)(w, x, b)
  ref_w = _loop(lambda p, xi, _: loss(p, xi, b), rule, w, x, np.zeros(4), np.ones(4))
  _assert_close(only_w.grad, ref_w)  # an int argnums: the pytree itself, as jax.grad


@pytest.mark.parametrize("microbatch_size", [3, None])
def test_has_aux_returns_each_examples_aux(microbatch_size):
  params, x, y, batch_loss, _ = _setup("conv")
  model = MODELS["conv"]

  def loss_aux(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits[:, 0]

  rule = clipping.AutomaticClip(0.5)
  mask = np.array([1, 1, 1, 0, 1, 1], np.float32)
  f = grad.clipped_grad(loss_aux, rule, batch_argnums=(1, 2), has_aux=True,
                        microbatch_size=microbatch_size, example_axis="keep")
  out = jax.jit(lambda p, x, y, m: f(p, x, y, mask=m))(params, x, y, mask)
  logits = model.apply({"params": params}, x)
  np.testing.assert_allclose(out.aux, logits[:, :1], rtol=1e-5, atol=1e-6)  # [n, 1]: padding too
  _assert_close(out.grad, _loop(lambda p, xi, yi: batch_loss(p, xi[None], yi[None]), rule,
                                params, x, y, mask))


def test_keys_are_folded_with_each_examples_row():
  def loss(w, x, key):  # dropout on the input: each example needs its own mask
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    return jnp.dot(w, jnp.where(keep, x, 0.0))
  w, x = jnp.ones(16), jnp.ones((4, 16))  # identical rows: only the keys tell them apart
  key = jax.random.PRNGKey(3)
  rule = clipping.FlatClip(100.0)
  f = grad.clipped_grad(loss, rule, key_argnums=(2,), has_aux=False, microbatch_size=2)
  out = jax.jit(f)(w, x, key)
  per_row = [jax.grad(loss)(w, x[i], jax.random.fold_in(key, i)) for i in range(4)]
  np.testing.assert_allclose(out.grad, sum(per_row), rtol=1e-6)
  assert len({tuple(np.asarray(g)) for g in per_row}) == 4  # four different dropout masks


def test_sensitivity_per_adjacency_is_attained():
  # loss w·x: the gradient is x, so two examples in opposite directions beyond C clip to ±C.
  loss = lambda w, x: jnp.dot(w, x)
  w, c = jnp.zeros(3), 1.5
  rule = clipping.FlatClip(c)
  base = jnp.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
  replaced = base.at[1].set(jnp.array([-5.0, 0.0, 0.0]))
  add_remove = grad.clipped_grad(loss, rule)
  replace_one = grad.clipped_grad(loss, rule, adjacency="replace_one")
  assert add_remove.sensitivity == c and replace_one.sensitivity == 2 * c
  removed = add_remove(w, base, mask=jnp.array([1.0, 0.0])).grad
  assert np.linalg.norm(add_remove(w, base).grad - removed) == pytest.approx(c)
  moved = np.linalg.norm(replace_one(w, base).grad - replace_one(w, replaced).grad)
  assert moved == pytest.approx(replace_one.sensitivity)
  group = clipping.GroupClip({"a": 3.0, "b": 4.0}, lambda path: "a")
  assert grad.clipped_grad(loss, group, adjacency="replace_one").sensitivity == 10.0


def test_check_independent_accepts_per_example_loss_and_refuses_batchnorm():
  params, x, y, batch_loss, _ = _setup("conv")
  grad.clipped_grad(batch_loss, clipping.FlatClip(1.0), batch_argnums=(1, 2),
                    example_axis="keep").check_independent(params, x, y)
  model = BatchNormed()
  variables = model.init(jax.random.PRNGKey(0), x)

  def mixing_loss(params, x, y):  # batch statistics, recomputed from the batch it is given
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  f = grad.clipped_grad(mixing_loss, clipping.FlatClip(1.0), batch_argnums=(1, 2),
                        example_axis="keep")
  with pytest.raises(grad.ExamplesMixError, match="mixes examples"):
    f.check_independent(variables["params"], x, y)
  stats_loss = lambda params, x, y, stats: mixing_loss(params, x, y)
  with pytest.raises(clipping.BatchNormInDPModelError, match="batch_stats"):  # in any argument
    grad.clipped_grad(stats_loss, clipping.FlatClip(1.0), batch_argnums=(1, 2))(
        variables["params"], x, y, {"batch_stats": variables["batch_stats"]})
  with pytest.raises(ValueError, match="example_axis='keep'"):
    grad.clipped_grad(batch_loss, clipping.FlatClip(1.0)).check_independent(params, x, y)


def test_clear_errors():
  loss = lambda w, x, y: jnp.dot(w, x) * y
  w, x, y = jnp.ones(3), jnp.ones((4, 3)), jnp.ones(4)
  f = grad.clipped_grad(loss, clipping.FlatClip(1.0), batch_argnums=(1, 2))
  with pytest.raises(ValueError, match=r"leading sizes differ \(argument 1: 4, argument 2: 5\)"):
    f(w, x, jnp.ones(5))
  with pytest.raises(ValueError, match=r"mask has shape \(3,\), but the batch has 4 rows"):
    f(w, x, y, mask=jnp.ones(3))
  with pytest.raises(ValueError, match="not a positive multiple of microbatch_size = 3.*pad"):
    grad.clipped_grad(loss, clipping.FlatClip(1.0), batch_argnums=(1, 2), microbatch_size=3)(
        w, x, y)
  with pytest.raises(ValueError, match="must not overlap"):
    grad.clipped_grad(loss, clipping.FlatClip(1.0), argnums=1)
  with pytest.raises(ValueError, match="scalar"):
    f(w, x, 1.0)
  with pytest.raises(ValueError, match=r"loss_fn returned shape \(3,\) for one example"):
    grad.clipped_grad(lambda w, x: w * x, clipping.FlatClip(1.0))(w, x)
  per_row = grad.clipped_grad(lambda w, x: x @ w, clipping.FlatClip(1.0), example_axis="keep")
  np.testing.assert_allclose(per_row(w, x).grad, 4 * x[0] / np.sqrt(3))  # [1] losses accepted
  per_row.check_independent(w, x)  # and summed on the whole batch
  with pytest.raises(TypeError, match="traced value.*outside the jitted step"):
    jax.jit(lambda c: clipping.FlatClip(c).factor(jnp.ones(())))(1.0)
