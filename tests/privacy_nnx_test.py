"""Tests for dpjax.privacy.nnx: an NNX model's clipped sums and noisy updates equal those of the
same Linen network; padding, microbatching, per-example dropout, BatchNorm refused, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpjax.models import dp_checks
from dpjax.privacy import clipping, ghost, noise
from dpjax.privacy import nnx as dp_nnx
from tests import toy_models


class LinenNet(nn.Module):
  """Conv + GroupNorm + Dense + LayerNorm + Dense (Linen names Conv_0, GroupNorm_0, ...)."""
  @nn.compact
  def __call__(self, x):
    x = nn.GroupNorm(num_groups=2, epsilon=1e-5)(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.Dense(8)(jnp.tanh(x).reshape((x.shape[0], -1)))
    return nn.Dense(3)(jnp.tanh(nn.LayerNorm(epsilon=1e-5)(x)))


class NnxNet(nnx.Module):
  """LinenNet in NNX, its layers named as Linen names them (same state paths)."""
  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0, batch_norm: bool = False):
    self.Conv_0 = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
    self.GroupNorm_0 = nnx.GroupNorm(4, num_groups=2, epsilon=1e-5, rngs=rngs)
    self.Dense_0 = nnx.Linear(64, 8, rngs=rngs)
    self.LayerNorm_0 = nnx.LayerNorm(8, epsilon=1e-5, rngs=rngs)
    self.Dense_1 = nnx.Linear(8, 3, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.bn = nnx.BatchNorm(4, rngs=rngs) if batch_norm else None

  def __call__(self, x):
    x = self.GroupNorm_0(self.Conv_0(x))
    if self.bn is not None:
      x = self.bn(x)
    x = self.Dense_0(jnp.tanh(x).reshape((x.shape[0], -1)))
    if self.drop is not None:
      x = self.drop(x)
    return self.Dense_1(jnp.tanh(self.LayerNorm_0(x)))


def nnx_loss(model, example):
  """The per-example loss of one example {image [8, 8, 1], label []}."""
  logits = model(example["image"][None])
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"][None])[0]


LINEN = LinenNet()
LINEN_PARAMS = toy_models.init(LINEN, seed=1)


def nnx_copy_of_linen(**kwargs) -> NnxNet:
  """An NnxNet holding LINEN_PARAMS."""
  model = NnxNet(nnx.Rngs(0, dropout=7), **kwargs)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, dict(LINEN_PARAMS)))
  nnx.update(model, state)
  return model


def pure(state) -> dict:
  return nnx.to_pure_dict(state)


def assert_close_tree(got, want, rtol=1e-6):
  """Every leaf within rtol of the largest entry of its counterpart."""
  jax.tree_util.tree_map(
      lambda g, w: np.testing.assert_allclose(
          np.asarray(g), np.asarray(w), rtol=0, atol=rtol * float(np.max(np.abs(w)))),
      got, want)


RULES = {"flat": clipping.FlatClip(0.5),
         "per_layer": clipping.per_layer_clip(LINEN_PARAMS, 0.5),
         "automatic": clipping.AutomaticClip(0.5)}


def linen_clipped_sum(method, params, batch, mask, rule, **kwargs):
  if method == "ghost":
    return ghost.clipped_grad_sum(toy_models.batch_losses(LINEN), params, batch, mask, rule,
                                  **kwargs)
  return clipping.clipped_grad_sum(toy_models.per_example_loss(LINEN), params, batch, mask, rule,
                                   **kwargs)


@pytest.mark.parametrize("method", dp_nnx.METHODS)
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_nnx_clipped_sum_equals_linen(rule_name, method):
  rule = RULES[rule_name]
  batch = toy_models.batch(8, seed=2, scale=3.0)
  mask = jnp.array([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)
  want = linen_clipped_sum(method, LINEN_PARAMS, batch, mask, rule, microbatch_size=4)
  model = nnx_copy_of_linen()
  got = dp_nnx.clipped_grad_sum(nnx_loss, model, batch, mask, rule, microbatch_size=4,
                                method=method)
  if method == "ghost":  # every layer of the net is ghost's, none falls back
    covered, left = dp_nnx.ghost_plan(nnx_loss, model, batch)
    assert sorted(covered) == [("Conv_0",), ("Dense_0",), ("Dense_1",), ("GroupNorm_0",),
                               ("LayerNorm_0",)] and left == []
  assert isinstance(got.grad_sum, nnx.State)
  assert got.sensitivity == want.sensitivity
  assert float(want.stats.num_clipped) > 0  # the clip acts
  assert_close_tree(pure(got.grad_sum), dict(want.grad_sum))
  np.testing.assert_allclose(got.stats.norm_sum, want.stats.norm_sum, rtol=1e-6)


def test_clipped_sum_equals_a_loop_of_nnx_grad():
  """The obviously-correct reference: nnx.grad of each real example, clipped, added."""
  model, rule = nnx_copy_of_linen(), clipping.FlatClip(0.5)
  batch = toy_models.batch(4, seed=3, scale=3.0)
  mask = jnp.array([1, 0, 1, 1], jnp.float32)
  total = None
  for i in np.flatnonzero(mask):
    grad = nnx.grad(nnx_loss)(model, jax.tree_util.tree_map(lambda x: x[i], batch))
    clipped = jax.tree_util.tree_map(
        lambda g: g * min(1.0, 0.5 / float(clipping.global_norm(pure(grad)))), pure(grad))
    total = clipped if total is None else jax.tree_util.tree_map(jnp.add, total, clipped)
  got = dp_nnx.clipped_grad_sum(nnx_loss, model, batch, mask, rule)
  assert_close_tree(pure(got.grad_sum), total)


@pytest.mark.parametrize("method", dp_nnx.METHODS)
def test_padding_adds_nothing_and_microbatching_keeps_the_sum(method):
  model, rule = nnx_copy_of_linen(), clipping.FlatClip(0.5)
  batch = toy_models.batch(6, seed=4, scale=3.0)
  real = toy_models.batch(4, seed=4, scale=3.0)
  padded = jax.tree_util.tree_map(lambda x, r: x.at[:4].set(r), batch, real)
  padded["image"] = padded["image"].at[4:].set(1e6)  # padding rows of garbage
  mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  want = dp_nnx.clipped_grad_sum(nnx_loss, model, real, jnp.ones(4), rule, method=method)
  whole = dp_nnx.clipped_grad_sum(nnx_loss, model, padded, mask, rule, method=method)
  micro = dp_nnx.clipped_grad_sum(nnx_loss, model, padded, mask, rule, microbatch_size=2,
                                  method=method)
  assert_close_tree(pure(whole.grad_sum), pure(want.grad_sum))
  assert_close_tree(pure(micro.grad_sum), pure(want.grad_sum))
  assert float(micro.stats.num_examples) == 4


@pytest.mark.parametrize("method", dp_nnx.METHODS)
def test_same_noisy_update_as_linen(method):
  rule = RULES["flat"]
  batch = toy_models.batch(8, seed=5, scale=3.0)
  mask = jnp.ones(8).at[6:].set(0)
  model = nnx_copy_of_linen()
  settings = dict(noise_multiplier=1.3, sensitivity=rule.sensitivity, expected_batch_size=6.0,
                  seed=11)
  optimizer = dp_nnx.DPOptimizer(model, optax.adam(0.1), **settings)
  linen_tx = noise.dp_optimizer(optax.adam(0.1), **settings)
  linen_params, linen_state = LINEN_PARAMS, linen_tx.init(LINEN_PARAMS)
  for _ in range(2):  # the second step checks that the noise key moves on alike
    got = dp_nnx.clipped_grad_sum(nnx_loss, model, batch, mask, rule, method=method)
    optimizer.update(model, got.grad_sum)
    want = linen_clipped_sum(method, linen_params, batch, mask, rule)
    updates, linen_state = linen_tx.update(want.grad_sum, linen_state, linen_params)
    linen_params = optax.apply_updates(linen_params, updates)
    assert_close_tree(pure(nnx.state(model, nnx.Param)), dict(linen_params))
  assert int(optimizer.noise_state().count) == 2
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), dict(linen_params),
                                 dict(LINEN_PARAMS))
  assert min(jax.tree_util.tree_leaves(moved)) > 0


def test_each_example_gets_its_own_dropout_mask_and_each_call_new_ones():
  model = nnx_copy_of_linen(dropout=0.5)
  model.train()
  one = toy_models.batch(1, seed=6)
  twins = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), one)
  rule = clipping.FlatClip(1e6)  # no clipping: the norms are the gradients'
  first = dp_nnx.clipped_grad_sum(nnx_loss, model, twins, jnp.ones(2), rule)
  # Identical examples with one shared mask would have equal norms: max = sum / 2.
  assert float(first.stats.norm_max) > 0.51 * float(first.stats.norm_sum)
  assert int(model.drop.rngs.count[...]) == 1  # advanced once per call, on the caller's model
  second = dp_nnx.clipped_grad_sum(nnx_loss, model, twins, jnp.ones(2), rule)
  assert float(second.stats.norm_sum) != float(first.stats.norm_sum)
  model.eval()
  still = [dp_nnx.clipped_grad_sum(nnx_loss, model, twins, jnp.ones(2), rule) for _ in range(2)]
  assert float(still[0].stats.norm_max) == pytest.approx(float(still[0].stats.norm_sum) / 2)
  assert_close_tree(pure(still[0].grad_sum), pure(still[1].grad_sum))


def test_batch_norm_is_refused_in_both_entry_points():
  model = NnxNet(nnx.Rngs(0), batch_norm=True)
  batch = toy_models.batch(2)
  with pytest.raises(clipping.BatchNormInDPModelError, match=r"BatchNorm at bn .*GroupNorm"):
    dp_nnx.clipped_grad_sum(nnx_loss, model, batch, jnp.ones(2), clipping.FlatClip(1.0))
  with pytest.raises(clipping.BatchNormInDPModelError, match=r"BatchNorm at bn .*LayerNorm"):
    dp_nnx.DPOptimizer(model, optax.sgd(0.1), noise_multiplier=1.0, sensitivity=1.0,
                       expected_batch_size=2.0)
  clean = NnxNet(nnx.Rngs(0))
  optimizer = dp_nnx.DPOptimizer(clean, optax.sgd(0.1), noise_multiplier=1.0, sensitivity=1.0,
                                 expected_batch_size=2.0)
  grads = dp_nnx.clipped_grad_sum(nnx_loss, clean, batch, jnp.ones(2), clipping.FlatClip(1.0))
  with pytest.raises(clipping.BatchNormInDPModelError, match=r"BatchNorm at bn"):
    optimizer.update(model, grads.grad_sum)
  with pytest.raises(clipping.BatchNormInDPModelError, match=r"BatchNorm at bn"):
    dp_checks.assert_dp_compatible(model)  # the models' check knows NNX too
  dp_checks.assert_dp_compatible(clean)


def test_batch_and_mask_must_have_the_same_rows():
  model, batch, rule = NnxNet(nnx.Rngs(0)), toy_models.batch(4), clipping.FlatClip(1.0)
  with pytest.raises(ValueError,
                     match=r"examples/image has shape \(4, 8, 8, 1\), but the mask has 3"):
    dp_nnx.clipped_grad_sum(nnx_loss, model, batch, jnp.ones(3), rule)
  with pytest.raises(ValueError, match="mask must be a vector"):
    dp_nnx.clipped_grad_sum(nnx_loss, model, batch, jnp.ones((4, 1)), rule)


class Tokens(nnx.Module):
  """Embed + Linear + LayerNorm on tokens [T] (one example, no batch axis), with a Linear called
  twice and an output tied to the embedding (`attend`): those two fall back to vmap."""
  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
    self.embed = nnx.Embed(11, 6, rngs=rngs)
    self.mix = nnx.Linear(6, 6, rngs=rngs)
    self.twice = nnx.Linear(6, 6, rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, tokens):
    h = self.drop(jnp.tanh(self.mix(self.embed(tokens))))
    h = self.norm(self.twice(jnp.tanh(self.twice(h))))
    return self.embed.attend(h.mean(axis=0))


def token_loss(model, example):
  return optax.softmax_cross_entropy_with_integer_labels(model(example["tokens"]),
                                                         example["label"])


def token_batch(n, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return dict(tokens=jax.random.randint(k1, (n, 5), 0, 11),
              label=jax.random.randint(k2, (n,), 0, 11))


def test_ghost_equals_vmap_with_embeddings_fallbacks_and_dropout():
  batch, mask = token_batch(6, seed=8), jnp.array([1, 1, 0, 1, 1, 1], jnp.float32)
  covered, left = dp_nnx.ghost_plan(token_loss, Tokens(nnx.Rngs(0)), batch)
  assert sorted(covered) == [("mix",), ("norm",)]
  assert left == [("embed", "embedding"), ("twice", "bias"), ("twice", "kernel")]
  rule = clipping.per_layer_clip(pure(nnx.state(Tokens(nnx.Rngs(0)), nnx.Param)), 0.3)
  # Two models with the same streams: the same per-example dropout masks on both paths.
  sums = {method: dp_nnx.clipped_grad_sum(token_loss, Tokens(nnx.Rngs(0, dropout=3), 0.3),
                                          batch, mask, rule, method=method, microbatch_size=3)
          for method in dp_nnx.METHODS}
  assert float(sums["vmap"].stats.num_clipped) > 0
  assert_close_tree(pure(sums["ghost"].grad_sum), pure(sums["vmap"].grad_sum), rtol=1e-5)


def test_ghost_covers_only_layers_whose_params_nothing_else_reads():
  """Weight decay written in the loss reads Dense_1's kernel outside its call: Dense_1 falls
  back (its per-example gradient holds the decay's term), and the sums still agree."""
  decayed = lambda model, example: (nnx_loss(model, example)
                                    + 0.1 * jnp.sum(jnp.square(model.Dense_1.kernel[...])))
  model, batch = nnx_copy_of_linen(), toy_models.batch(4, seed=9, scale=3.0)
  covered, left = dp_nnx.ghost_plan(decayed, model, batch)
  assert ("Dense_1",) not in covered and ("Dense_0",) in covered
  assert left == [("Dense_1", "bias"), ("Dense_1", "kernel")]
  rule = clipping.FlatClip(0.5)
  sums = [dp_nnx.clipped_grad_sum(decayed, model, batch, jnp.ones(4), rule, method=method)
          for method in dp_nnx.METHODS]
  assert_close_tree(pure(sums[0].grad_sum), pure(sums[1].grad_sum), rtol=1e-5)
  with pytest.raises(dp_nnx.NnxGhostUnsupportedError, match=r"Dense_1/bias.*fallback='vmap'"):
    dp_nnx.clipped_grad_sum(decayed, model, batch, jnp.ones(4), rule, method="ghost",
                            fallback="error")
  with pytest.raises(ValueError, match="method must be one of"):
    dp_nnx.clipped_grad_sum(nnx_loss, model, batch, jnp.ones(4), rule, method="loop")


class Rows(nnx.Module):
  """Layers called with several rows per example (a conv and a GroupNorm on [2, 4, 8, 1]) and a
  conv called on an unbatched input [8, 8, 1]."""
  def __init__(self, rngs: nnx.Rngs):
    self.halves = nnx.Conv(1, 4, (2, 2), rngs=rngs)
    self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
    self.whole = nnx.Conv(1, 4, (3, 3), strides=2, padding="VALID", rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, image):
    halves = jnp.tanh(self.norm(self.halves(image.reshape(2, 4, 8, 1)))).mean(axis=(0, 1, 2))
    whole = jnp.tanh(self.whole(image)).mean(axis=(0, 1))
    return self.out(jnp.concatenate([halves, whole]))


def test_ghost_reads_rows_within_an_example_as_the_layers_do():
  rows_loss = lambda model, example: optax.softmax_cross_entropy_with_integer_labels(
      model(example["image"]), example["label"])
  model, batch = Rows(nnx.Rngs(0)), toy_models.batch(4, seed=10, scale=3.0)
  assert dp_nnx.ghost_plan(rows_loss, model, batch)[1] == []
  rule = clipping.FlatClip(0.2)
  sums = [dp_nnx.clipped_grad_sum(rows_loss, model, batch, jnp.ones(4), rule, method=method)
          for method in dp_nnx.METHODS]
  assert float(sums[0].stats.num_clipped) > 0
  assert_close_tree(pure(sums[1].grad_sum), pure(sums[0].grad_sum), rtol=1e-5)


class Mlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(2, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(jnp.tanh(self.hidden(x))))


def mlp_loss(model, example):
  logits = model(example["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])


def mean_loss(model, data):
  return float(jnp.mean(jax.vmap(lambda ex: mlp_loss(model, ex))(data)))


@pytest.mark.parametrize("jit,method", [("nnx.jit", "vmap"), ("jax.jit", "ghost")])
def test_dp_training_lowers_the_loss(jit, method):
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  data = dict(x=x, y=(x[:, 0] + x[:, 1] > 0).astype(jnp.int32))
  model = Mlp(nnx.Rngs(0, dropout=1))
  rule = clipping.FlatClip(1.0)
  optimizer = dp_nnx.DPOptimizer(model, optax.adam(0.05), noise_multiplier=0.5,
                                 sensitivity=rule.sensitivity, expected_batch_size=32.0, seed=0)

  def step(model, optimizer, batch, mask):
    grads = dp_nnx.clipped_grad_sum(mlp_loss, model, batch, mask, rule, microbatch_size=16,
                                    method=method)
    optimizer.update(model, grads.grad_sum)

  if jit == "nnx.jit":
    train_step = nnx.jit(step)
  else:
    graphdef, state = nnx.split((model, optimizer))

    @jax.jit
    def pure_step(state, batch, mask):
      model, optimizer = nnx.merge(graphdef, state)
      step(model, optimizer, batch, mask)
      return nnx.state((model, optimizer))

    def train_step(model, optimizer, batch, mask):
      nnx.update((model, optimizer), pure_step(nnx.state((model, optimizer)), batch, mask))

  model.eval()
  before = mean_loss(model, data)
  model.train()
  for i in range(15):
    rows = jnp.arange(32) + (i % 2) * 32
    train_step(model, optimizer, jax.tree_util.tree_map(lambda a: a[rows], data), jnp.ones(32))
  model.eval()
  assert int(optimizer.noise_state().count) == 15
  assert mean_loss(model, data) < 0.7 * before
