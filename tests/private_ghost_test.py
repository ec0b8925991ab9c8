"""Tests of per_example_method='ghost' in grad.clipped_grad and make_private_with_epsilon (the
ghost path of dpjax/privacy/ghost/example_calls.py) against the vmap path, and of the refusal of
NNX batch statistics reachable from clipped_grad's arguments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpjax
from dpjax.privacy import clipping, ghost, grad, noise

N, B = 256, 16
MASK = jnp.array([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)  # 2 padded rows of 8
X = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1))
Y = jnp.arange(8) % 3


class ConvNet(nn.Module):
  """Conv + GroupNorm + Dense + LayerNorm; takes one image [8, 8, 1] or a batch [b, 8, 8, 1]."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.GroupNorm(num_groups=2)(x)
    x = x.reshape(x.shape[:-3] + (-1,))
    return nn.Dense(3)(nn.LayerNorm()(jnp.tanh(nn.Dense(8)(x))))


MODEL = ConvNet()
PARAMS = MODEL.init(jax.random.PRNGKey(0), X[:1])["params"]


def _loss(params, x, y):  # one example, or a batch of one (example_axis='keep'): the mean
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _with_aux(params, x, y):
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), jnp.argmax(logits)


def _both(loss_fn, rule, **kwargs):
  args = dict(batch_argnums=(1, 2), microbatch_size=4, **kwargs)
  return [grad.clipped_grad(loss_fn, rule, per_example_method=method, **args)
          for method in ("vmap", "ghost")]


def _relative(a, b):
  diff = jax.tree_util.tree_map(jnp.subtract, a, b)
  return float(clipping.global_norm(diff) / clipping.global_norm(b))


RULES = {"flat": clipping.FlatClip(12.0), "per_layer": clipping.per_layer_clip(PARAMS, 12.0),
         "automatic": clipping.AutomaticClip(12.0)}  # C near the median norm (9 to 25)


@pytest.mark.parametrize("example_axis,loss_fn,rule", [
    ("drop", _loss, "flat"), ("keep", _with_aux, "flat"), ("keep", _loss, "per_layer"),
    ("keep", _loss, "automatic")])
def test_ghost_sum_equals_vmap_sum(example_axis, loss_fn, rule):
  """Dense + conv + norms, 2 padded rows, 2 microbatches of 4, some examples clipped and some not
  (per layer: the groups of `per_layer_clip(params)`, as the user's params name them; automatic:
  factors above 1 too); under jit, as a user's step calls it."""
  has_aux = loss_fn is _with_aux
  vmap_fn, ghost_fn = _both(loss_fn, RULES[rule], example_axis=example_axis, has_aux=has_aux)
  call = lambda f: jax.jit(lambda p, x, y, m: f(p, x, y, mask=m))(PARAMS, X, Y, MASK)
  want, got = call(vmap_fn), call(ghost_fn)
  if rule != "per_layer":  # (per layer, C/√5 per group: every example has a group clipped)
    assert 0 < int(want.stats.num_clipped) < 6  # the factors are not all 1, nor all C/‖g‖
  assert _relative(got.grad, want.grad) <= 1e-5
  assert got.stats.num_examples == want.stats.num_examples == 6
  assert got.stats.num_clipped == want.stats.num_clipped
  np.testing.assert_allclose(got.stats.norm_sum, want.stats.norm_sum, rtol=1e-5)
  assert got.sensitivity == want.sensitivity == RULES[rule].sensitivity
  if has_aux:
    np.testing.assert_array_equal(got.aux, want.aux)
  covered, left = ghost_fn.ghost_plan(PARAMS, X, Y)
  assert covered == ["Conv_0", "Dense_0", "Dense_1", "GroupNorm_0", "LayerNorm_0"]
  assert left == []  # every layer read by ghost, nothing by vmap


class Custom(nn.Module):
  """Layers ghost cannot read: a bare param, a layer in nn.remat, a layer called twice; and
  dropout (each example its own mask, the same in every pass)."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[:-3] + (-1,))
    x = jnp.tanh(nn.Dense(8, name="read")(x)) * self.param("scale", nn.initializers.ones, (8,))
    x = nn.Dropout(0.5, deterministic=False)(x)
    x = nn.remat(nn.Dense)(8, name="remat")(x)
    twice = nn.Dense(8, name="twice")
    return nn.Dense(3, name="decayed")(twice(jnp.tanh(twice(x))))


def test_ghost_falls_back_to_vmap_for_what_it_cannot_read():
  model = Custom()
  params = model.init(jax.random.PRNGKey(0), X[:1])["params"]

  def loss_fn(params, x, y, key):  # weight decay on one kernel: its layer's params read elsewhere
    logits = model.apply({"params": params}, x, rngs={"dropout": key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 1e-2 * jnp.sum(params["decayed"]["kernel"] ** 2)

  vmap_fn, ghost_fn = _both(loss_fn, clipping.FlatClip(0.5), example_axis="keep",
                            key_argnums=(3,))
  key = jax.random.PRNGKey(3)
  covered, left = ghost_fn.ghost_plan(params, X, Y, key)
  assert covered == ["read"]
  assert sorted(left) == ["decayed/bias", "decayed/kernel", "remat/bias", "remat/kernel",
                          "scale", "twice/bias", "twice/kernel"]
  want, got = vmap_fn(params, X, Y, key, mask=MASK), ghost_fn(params, X, Y, key, mask=MASK)
  assert _relative(got.grad, want.grad) <= 1e-5
  other = vmap_fn(params, X, Y, jax.random.PRNGKey(4), mask=MASK)
  assert _relative(other.grad, want.grad) > 1e-2  # the dropout masks matter


def _setup(method, **kwargs):
  return dpjax.make_private_with_epsilon(
      _loss, optax.sgd(0.5), num_examples=N, target_epsilon=4.0, delta=1e-5,
      expected_batch_size=B, steps=4, clip=1.0, batch_argnums=(1, 2), microbatch_size=4,
      accountant="rdp",
      per_example_method=method, **kwargs)


def test_setup_gives_the_same_noisy_update_on_both_paths():
  setups = {method: _setup(method) for method in ("vmap", "ghost")}
  assert setups["ghost"].grad_fn.per_example_method == "ghost"
  assert setups["ghost"].noise_multiplier == setups["vmap"].noise_multiplier
  assert setups["ghost"].sampler.microbatch_size == 4

  grads = {method: jax.jit(lambda p, x, y, m, f=setup.grad_fn: f(p, x, y, mask=m).grad)(
      PARAMS, X, Y, MASK) for method, setup in setups.items()}

  def update(method, seed):
    # The same noise in both, which are compared (an INSECURE explicit seed: tests only).
    setup = setups[method]
    state = jax.tree_util.tree_map(
        lambda s: noise.init_noise_state(seed) if isinstance(s, noise.NoiseState) else s,
        setup.optimizer.init(PARAMS), is_leaf=lambda s: isinstance(s, noise.NoiseState))
    return setup.optimizer.update(grads[method], state, PARAMS)[0]

  want, got = update("vmap", 7), update("ghost", 7)
  signal = 0.5 / B * clipping.global_norm(grads["vmap"])  # the update's clipped-sum part
  diff = jax.tree_util.tree_map(jnp.subtract, got, want)
  assert float(clipping.global_norm(diff)) <= 1e-5 * float(signal)
  assert _relative(update("ghost", 8), want) > 0.1  # the noise is there


def test_ghost_errors_say_what_to_do():
  with pytest.raises(ValueError, match="per_example_method must be one of"):
    grad.clipped_grad(_loss, clipping.FlatClip(1.0), per_example_method="jacobian")
  linear = lambda w, x, y: optax.softmax_cross_entropy_with_integer_labels(x.ravel() @ w, y)
  f = grad.clipped_grad(linear, clipping.FlatClip(1.0), batch_argnums=(1, 2),
                        per_example_method="ghost")
  with pytest.raises(ghost.GhostUnsupportedError, match="found no Linen layer") as error:
    f(jnp.zeros((64, 3)), X, Y)
  assert "per_example_method='vmap'" in str(error.value)
  # A cast on the way to model.apply: the layers hold other arrays than the arguments'.
  cast = lambda p, x, y: _loss(jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p), x, y)
  with pytest.raises(ghost.GhostUnsupportedError, match="no cast, copy or tree_map"):
    grad.clipped_grad(cast, clipping.FlatClip(1.0), batch_argnums=(1, 2),
                      per_example_method="ghost")(PARAMS, X, Y)
  # An NNX model: its layers are not Linen's; the error names the NNX entry point.
  model = nnx.Linear(64, 3, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  nnx_loss = lambda s, x, y: optax.softmax_cross_entropy_with_integer_labels(
      nnx.merge(graphdef, s)(x.ravel()), y)
  f = grad.clipped_grad(nnx_loss, clipping.FlatClip(1.0), batch_argnums=(1, 2),
                        per_example_method="ghost")
  with pytest.raises(ghost.GhostUnsupportedError, match=r"nnx\.clipped_grad_sum"):
    f(state, X, Y)


class NnxNet(nnx.Module):
  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(64, 4, rngs=rngs)
    self.norm = norm(4, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm(self.linear(x.reshape(x.shape[:-3] + (-1,)))))


def _nnx_parts(norm):
  graphdef, params, rest = nnx.split(NnxNet(norm, nnx.Rngs(0)), nnx.Param, ...)

  def loss_fn(params, x, y, rest):  # NNX's functional form: merged inside the loss
    logits = nnx.merge(graphdef, params, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss_fn, params, rest


def test_nnx_batch_stats_reachable_from_the_arguments_are_refused():
  group_norm = lambda n, rngs: nnx.GroupNorm(n, num_groups=2, rngs=rngs)
  loss_fn, params, rest = _nnx_parts(group_norm)
  f = grad.clipped_grad(loss_fn, clipping.FlatClip(1.0), batch_argnums=(1, 2),
                        example_axis="keep")
  assert np.isfinite(float(clipping.global_norm(f(params, X, Y, rest).grad)))  # no BatchStat

  loss_fn, params, rest = _nnx_parts(nnx.BatchNorm)
  private = dpjax.make_private_with_epsilon(
      loss_fn, optax.sgd(0.1), num_examples=N, target_epsilon=2.0, delta=1e-5,
      expected_batch_size=B, steps=4, batch_argnums=(1, 2), example_axis="keep",
      accountant="rdp")
  with pytest.raises(clipping.BatchNormInDPModelError, match="nnx.BatchStat") as error:
    private.grad_fn(params, X, Y, rest)  # the running statistics, split from the model
  assert "GroupNorm or nnx.LayerNorm" in str(error.value)
  assert "one example's gradient depends on the others" in str(error.value)
  model = NnxNet(nnx.BatchNorm, nnx.Rngs(0))
  with pytest.raises(clipping.BatchNormInDPModelError, match="BatchNorm at norm"):
    private.grad_fn(params, X, Y, model)  # the module itself in place of its state
  with pytest.raises(clipping.BatchNormInDPModelError, match="nnx.BatchStat"):
    clipping.clipped_grad_sum(lambda p, e: 0.0, {"norm": rest}, X, MASK, clipping.FlatClip(1.0))
