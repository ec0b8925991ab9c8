"""Tests of dpjax.private: the one-call private setup against the pieces it is built from."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import dpjax
from dpjax import private
from dpjax.privacy import accounting, calibration, clipping

N, B, DELTA = 1000, 50, 1e-5


def _loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ params, y)


def _setup(**kwargs):
  args = dict(num_examples=N, target_epsilon=2.0, delta=DELTA, expected_batch_size=B, steps=12,
              batch_argnums=(1, 2))
  return dpjax.make_private_with_epsilon(_loss, optax.sgd(0.1), **{**args, **kwargs})


def test_noise_multiplier_is_the_calibrated_one():
  for accountant in ("pld", "rdp"):
    setup = _setup(accountant=accountant)
    assert setup.noise_multiplier == calibration.calibrate_noise(2.0, DELTA, B / N, 12, accountant)
    assert setup.epsilon(setup.steps) <= 2.0
  assert _setup().grad_fn.sensitivity == 1.0 and _setup(clip=0.5).grad_fn.sensitivity == 0.5
  rule = clipping.AutomaticClip(2.0)
  assert _setup(clip=rule).grad_fn.rule is rule


def test_epsilon_after_k_recorded_steps_is_dp_accountings():
  setup = _setup()
  assert setup.epsilon() == 0.0
  batches = list(setup.batches(5))
  assert len(batches) == 5 and setup.ledger.private_steps == 5
  expected = accounting.epsilon(setup.noise_multiplier, B / N, 5, DELTA, "pld")
  assert setup.epsilon() == expected == setup.epsilon(5)
  assert 0 < expected < setup.epsilon(12) <= 2.0
  assert f"({expected:.3f}, 1e-05)-DP" in setup.statement()
  assert "5 of 12 planned private steps" in setup.statement()


def test_budget_refuses_a_step_beyond_the_plan():
  setup = _setup(steps=3)
  assert len(list(setup.batches())) == 3  # the planned steps
  with pytest.raises(accounting.BudgetExceededError):
    next(setup.batches(1))
  assert setup.ledger.private_steps == 3  # the refused step is not recorded


def test_epochs_convert_to_steps():
  # An epoch is N / B expected batches, rounded up: 2 · 1000 / 64 = 31.25 -> 32.
  assert _setup(steps=None, epochs=2, expected_batch_size=64).steps == 32
  assert _setup(steps=None, epochs=1, expected_batch_size=B).steps == 20  # no rounding up of 20.0
  assert private.steps_for_epochs(0.5, 1000, 50) == 10


def test_sampler_and_gradient_share_one_microbatch_size():
  setup = _setup()
  assert setup.sampler.microbatch_size is setup.grad_fn.microbatch_size
  assert setup.microbatch_size == private.choose_microbatch_size(N, B / N)
  assert setup.expected_padding <= private.AUTO_PADDING
  # The recipe (m = 64 at B = 128 of 60000) padded ~24%; the automatic choice stays <= 10%.
  assert private.expected_padding(60000, 128 / 60000, 64) > 0.2
  assert private.choose_microbatch_size(60000, 128 / 60000) == 16
  explicit = _setup(microbatch_size=7)
  assert explicit.sampler.microbatch_size is explicit.grad_fn.microbatch_size == 7
  for batch in explicit.batches(3):
    assert len(batch.indices) % 7 == 0 and len(batch.indices) >= 7


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="target_epsilon must be a finite number > 0"):
    _setup(target_epsilon=0.0)
  with pytest.raises(ValueError, match="not below 1/N"):
    _setup(delta=1e-3)
  with pytest.raises(ValueError, match=r"expected_batch_size = 2000 must be in \(0, 1000\]"):
    _setup(expected_batch_size=2000)
  with pytest.raises(ValueError, match="exactly one of epochs and steps"):
    _setup(epochs=1)
  with pytest.raises(ValueError, match="exactly one of epochs and steps"):
    _setup(steps=None)
  with pytest.raises(ValueError, match="Unknown accountant"):
    _setup(accountant="moments")


def test_recipe_trains_under_jit_and_reports_epsilon():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  train_x = np.asarray(jax.random.normal(k1, (256, 6)))
  train_y = np.asarray(train_x[:, 0] > 0, np.int32)
  model = nn.Dense(2)
  params = model.init(k2, train_x[:1])["params"]

  # The README's recipe with the one-call setup (the example of the report):
  def loss_fn(params, x, y):                      # a batch loss; it sees batches of one
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  private_setup = dpjax.make_private_with_epsilon(
      loss_fn, optax.sgd(2.0), num_examples=len(train_x), target_epsilon=3.0, delta=1e-5,
      expected_batch_size=32, epochs=1, clip=1.0, batch_argnums=(1, 2), example_axis="keep")

  @jax.jit
  def train_step(params, opt_state, x, y, mask):
    grads = private_setup.grad_fn(params, x, y, mask=mask).grad
    updates, opt_state = private_setup.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = private_setup.optimizer.init(params)
  for b in private_setup.batches():              # records each step; refuses past the budget
    params, opt_state = train_step(params, opt_state, train_x[b.indices], train_y[b.indices],
                                   b.mask)
  print(private_setup.statement())

  assert private_setup.ledger.private_steps == private_setup.steps == 8  # ⌈256 / 32⌉
  eps = accounting.epsilon(private_setup.noise_multiplier, 32 / 256, 8, 1e-5)
  assert private_setup.epsilon() == eps and 2.97 <= eps <= 3.0
  accuracy = np.mean(np.argmax(model.apply({"params": params}, train_x), -1) == train_y)
  # A linearly separable toy. The noise is fresh OS entropy, so this is statistical: 40 runs gave
  # accuracy 0.914-0.980 (mean 0.953, sd 0.018); 0.8 is 8 sd below, a false failure < 1e-9.
  assert accuracy > 0.8
