"""Tests for dpjax.mixing: α schedules, their range, and the combination of gradients."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpjax import mixing


def test_switch_schedule_is_public_then_private():
  s = mixing.make_schedule("switch", switch_step=5)
  assert [s(t) for t in range(8)] == [1.0] * 5 + [0.0] * 3
  assert mixing.count_private_steps(s, 8) == 3
  assert mixing.first_private_step(s, 8) == 5


def test_linear_and_cosine_schedules():
  lin = mixing.make_schedule("linear", start=1.0, end=0.0, begin=2, until=6)
  assert [lin(t) for t in (0, 2, 4, 6, 9)] == [1.0, 1.0, 0.5, 0.0, 0.0]
  cos = mixing.make_schedule("cosine", start=1.0, end=0.0, until=10)
  assert cos(0) == 1.0 and cos(10) == pytest.approx(0.0) and cos(5) == pytest.approx(0.5)
  values = [cos(t) for t in range(11)]
  assert values == sorted(values, reverse=True)
  # Only α = 1 steps are free: a linear decay starting at 1 spends budget from its first step < 1.
  assert mixing.count_private_steps(lin, 10) == 7
  assert mixing.first_private_step(lin, 10) == 3


def test_constant_schedules_and_step_kinds():
  assert mixing.first_private_step(mixing.make_schedule("constant", alpha=0.0), 5) is None
  assert mixing.count_private_steps(mixing.make_schedule("constant", alpha=1.0), 5) == 0
  assert mixing.reads_public(0.3) and mixing.reads_private(0.3)
  assert not mixing.reads_private(1.0) and not mixing.reads_public(0.0)


@pytest.mark.parametrize("kind,kwargs", [
    ("constant", dict(alpha=1.5)), ("constant", dict(alpha=-0.1)),
    ("linear", dict(start=1.2, end=0.0, begin=0, until=3)),
    ("cosine", dict(start=1.0, end=-1.0, until=3)),
])
def test_alpha_outside_the_unit_interval_is_an_error(kind, kwargs):
  with pytest.raises(mixing.AlphaOutOfRangeError, match=r"outside \[0, 1\]"):
    mixing.make_schedule(kind, **kwargs)


def test_bad_schedule_arguments():
  with pytest.raises(ValueError, match="Unknown"):
    mixing.make_schedule("sawtooth")
  with pytest.raises(ValueError, match="until > begin"):
    mixing.make_schedule("linear", start=1.0, end=0.0, begin=3, until=3)


def test_mix_combines_and_skips_missing_sides():
  pub, priv = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(mixing.mix(0.25, pub, priv)["w"], [2.5, 5.0])
  np.testing.assert_allclose(mixing.mix(1.0, pub, None)["w"], [1.0, 2.0])
  np.testing.assert_allclose(mixing.mix(0.0, None, priv)["w"], [3.0, 6.0])
