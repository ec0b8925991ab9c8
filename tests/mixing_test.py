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


def test_sample_ratio_is_the_public_share_of_examples():
  s = mixing.make_schedule("sample_ratio", public_batch_size=256, private_batch_size=768)
  assert s(0) == s(100) == 0.25


def test_auto_switch_on_predicted_improvement():
  auto = mixing.AutoSwitch(criterion="improvement")
  assert not auto.observe(0, public_improvement=1.0, private_improvement=0.4)
  assert auto(0) == 1.0
  assert auto.observe(10, public_improvement=1.0, private_improvement=1.2)
  assert auto.switch_step == 10 and auto(9) == 1.0 and auto(10) == 0.0
  assert not auto.observe(20, public_improvement=1.0, private_improvement=5.0)  # decided once
  degenerate = mixing.AutoSwitch(criterion="improvement")
  assert not degenerate.observe(0, float("inf"), float("inf"))
  assert not degenerate.observe(0, float("nan"), 1.0)
  assert not degenerate.observe(0, 0.0, 0.0)


def test_auto_switch_on_plateau_and_at_the_latest_step():
  auto = mixing.AutoSwitch(criterion="plateau", patience=2, min_delta=0.01)
  losses = [1.0, 0.8, 0.795, 0.81]  # improves, improves, < min_delta, worse -> switch at check 3
  decisions = [auto.observe(10 * i, heldout_loss=l) for i, l in enumerate(losses)]
  assert decisions == [False, False, False, True] and auto.switch_step == 30
  forced = mixing.AutoSwitch(criterion="plateau", patience=100, max_switch_step=20)
  assert [forced.observe(s, heldout_loss=1.0 / (s + 1)) for s in (0, 10, 20)] == [False, False,
                                                                                   True]
  assert "max_switch_step" in forced.reason


def test_auto_switch_state_round_trip_and_bad_criterion():
  auto = mixing.AutoSwitch(criterion="either", patience=1)
  auto.observe(0, 1.0, 0.1, heldout_loss=2.0)
  again = mixing.AutoSwitch.from_state_dict(auto.state_dict())
  assert again == auto
  with pytest.raises(ValueError, match="criterion"):
    mixing.AutoSwitch(criterion="vibes")


def test_auto_switch_on_efficiency_compares_dp_efficiency_with_public_generalisation():
  auto = mixing.AutoSwitch(criterion="efficiency")
  # (held-out loss, public training loss, DP efficiency) at checks 0, 10, 20, 30.
  checks = [(2.0, 2.0, 0.9),   # first check: no generalisation yet, whatever r is
            (1.5, 1.5, 0.5),   # g = 0.5/0.5 = 1 > 0.5: public steps still generalise fully
            (1.4, 1.1, 0.4),   # g = 0.1/0.4 = 0.25 < 0.4: switch
            (1.3, 0.9, 0.1)]
  decisions = [auto.observe(10 * i, heldout_loss=h, public_train_loss=t, dp_efficiency=r)
               for i, (h, t, r) in enumerate(checks)]
  assert decisions == [False, False, True, False] and auto.switch_step == 20
  assert "efficiency 0.4 >= public generalisation 0.25" in auto.reason
  stalled = mixing.AutoSwitch(criterion="efficiency")  # training loss no longer falls: g = 0
  assert not stalled.observe(0, heldout_loss=1.0, public_train_loss=0.5, dp_efficiency=0.01)
  assert stalled.observe(10, heldout_loss=1.1, public_train_loss=0.6, dp_efficiency=0.01)
  no_evidence = mixing.AutoSwitch(criterion="efficiency")
  for step in (0, 10, 20):
    assert not no_evidence.observe(step, heldout_loss=1.0 - step / 100,
                                   public_train_loss=1.0 - step / 100,
                                   dp_efficiency=float("nan"))
  # Restored from a checkpoint, it remembers the last check's losses.
  auto = mixing.AutoSwitch(criterion="efficiency")
  auto.observe(0, heldout_loss=2.0, public_train_loss=2.0, dp_efficiency=0.3)
  again = mixing.AutoSwitch.from_state_dict(auto.state_dict())
  assert again == auto and again.observe(10, heldout_loss=1.9, public_train_loss=1.0,
                                         dp_efficiency=0.3)


def test_efficiency_over_several_checks_ignores_one_check_without_a_held_out_fall():
  """The failure seen on CIFAR (issue 26): the held-out loss rises once between two checks while it
  falls over longer spans. Over one check g = 0 and any positive efficiency switches; over three
  checks g stays large and it does not; it switches once the longer fall shrinks."""
  # (held-out loss, public training loss) at checks 0..5; DP efficiency 0.2 throughout.
  losses = [(2.0, 2.0), (1.6, 1.6), (1.65, 1.3), (1.3, 1.1), (1.28, 0.7), (1.29, 0.3)]
  one, three = (mixing.AutoSwitch(criterion="efficiency", generalisation_checks=w) for w in (1, 3))
  for auto in (one, three):
    for i, (h, t) in enumerate(losses):
      if auto.observe(10 * i, heldout_loss=h, public_train_loss=t, dp_efficiency=0.2):
        break
  assert one.switch_step == 20 and "public generalisation 0" in one.reason
  # Three checks back: no decision at 10 and 20; at 30, (2.0 - 1.3)/(2.0 - 1.1) = 0.78; at 40,
  # (1.6 - 1.28)/(1.6 - 0.7) = 0.36; at 50, (1.65 - 1.29)/(1.3 - 0.3) = 0.36: all above 0.2.
  assert three.switch_step is None
  assert three.observe(60, heldout_loss=1.27, public_train_loss=0.2, dp_efficiency=0.2)
  assert "public generalisation 0.0333" in three.reason  # (1.3 - 1.27)/(1.1 - 0.2)
  with pytest.raises(ValueError, match="generalisation_checks"):
    mixing.AutoSwitch(criterion="efficiency", generalisation_checks=0)
  # Its window survives a checkpoint; a checkpoint written before the window (last_losses) loads.
  again = mixing.AutoSwitch.from_state_dict(three.state_dict())
  assert again == three and len(again.loss_history) == 3
  old = dict(one.state_dict(), last_losses=(1.0, 0.5))
  del old["loss_history"], old["generalisation_checks"]
  assert mixing.AutoSwitch.from_state_dict(old).loss_history == ((1.0, 0.5),)


def test_auto_switch_on_lookahead_compares_simulated_dp_steps_with_the_public_steps_fall():
  auto = mixing.AutoSwitch(criterion="lookahead", lookahead_steps=5)
  # (step, held-out loss, its fall after 5 simulated DP steps)
  checks = [(0, 2.0, 0.5),     # first check: no public fall yet, whatever the lookahead
            (10, 1.0, 0.3),    # public: 1.0 per 10 steps = 0.5 per 5 > 0.3
            (20, 0.8, 0.1),    # 0.1 per 5 steps >= 0.1: switch
            (30, 0.7, 0.9)]
  decisions = [auto.observe(s, heldout_loss=h, lookahead_fall=f) for s, h, f in checks]
  assert decisions == [False, False, True, False] and auto.switch_step == 20
  assert "5 simulated DP steps lower the held-out public loss by 0.1 >= 0.1" in auto.reason
  # A simulated fall <= 0 never switches, even when the public steps make the loss rise.
  rising = mixing.AutoSwitch(criterion="lookahead")
  for step, loss in ((0, 1.0), (10, 1.2), (20, 1.4)):
    assert not rising.observe(step, heldout_loss=loss, lookahead_fall=0.0)
  assert rising.observe(30, heldout_loss=1.5, lookahead_fall=1e-3)
  # Restored from a checkpoint, it remembers the last check's step and loss.
  auto = mixing.AutoSwitch(criterion="lookahead", lookahead_steps=5)
  auto.observe(0, heldout_loss=2.0, lookahead_fall=0.1)
  again = mixing.AutoSwitch.from_state_dict(auto.state_dict())
  assert again == auto and again.observe(20, heldout_loss=1.9, lookahead_fall=0.03)


def test_plateau_with_a_relative_threshold_needs_falls_of_that_share_of_the_best_loss():
  # Held-out losses falling by 10%, 5.6%, 1.2%, 1.2% of the best so far; patience 2.
  losses = [1.0, 0.9, 0.85, 0.84, 0.83, 0.5]
  relative = mixing.AutoSwitch(criterion="plateau", patience=2, min_rel_delta=0.05)
  decisions = [relative.observe(20 * i, heldout_loss=h) for i, h in enumerate(losses)]
  assert decisions == [False, False, False, False, True, False] and relative.switch_step == 80
  absolute = mixing.AutoSwitch(criterion="plateau", patience=2)  # any fall counts: no switch
  assert not any(absolute.observe(20 * i, heldout_loss=h) for i, h in enumerate(losses))


def test_plateau_on_accuracy_waits_while_the_held_out_accuracy_rises_and_the_loss_does_not():
  """An overfitting public phase (as regime A's on cifar10_jpeg): the held-out loss rises after
  its best while the held-out accuracy still rises. The loss plateau switches after `patience`
  checks; the accuracy plateau (error = 1 − accuracy) waits until the accuracy stalls."""
  checks = [(1.0, 0.50), (0.8, 0.60), (0.9, 0.62), (1.0, 0.64), (1.1, 0.66),  # loss up, acc up
            (1.2, 0.66), (1.3, 0.65), (1.4, 0.66)]                           # acc stalls
  on_loss = mixing.AutoSwitch(criterion="plateau", patience=3)
  on_accuracy = mixing.AutoSwitch(criterion="plateau", patience=3, plateau_metric="accuracy")
  for i, (loss, accuracy) in enumerate(checks):
    for auto in (on_loss, on_accuracy):
      auto.observe(20 * i, heldout_loss=loss, heldout_accuracy=accuracy)
  assert on_loss.switch_step == 80 and "public loss" in on_loss.reason
  assert on_accuracy.switch_step == 140 and on_accuracy.reason == (
      "held-out public error has not improved for 3 checks")
  assert on_accuracy.best_loss == pytest.approx(1 - 0.66)
  # Without an accuracy (an older run's checks) the accuracy plateau has no evidence.
  blind = mixing.AutoSwitch(criterion="plateau", patience=1, plateau_metric="accuracy")
  assert not any(blind.observe(20 * i, heldout_loss=l) for i, (l, _) in enumerate(checks))
  # Its state survives a checkpoint; a checkpoint from before the field reads as "loss".
  again = mixing.AutoSwitch.from_state_dict(on_accuracy.state_dict())
  assert again == on_accuracy
  old = {k: v for k, v in mixing.AutoSwitch(criterion="plateau").state_dict().items()
         if k != "plateau_metric"}
  assert mixing.AutoSwitch.from_state_dict(old).plateau_metric == "loss"
  with pytest.raises(ValueError, match="plateau_metric must be one of loss, accuracy"):
    mixing.AutoSwitch(criterion="plateau", plateau_metric="error")


def test_the_switch_is_asked_every_check_every_steps_from_the_minimum_and_at_the_cap():
  checks = lambda **kw: [s for s in range(30) if mixing.is_check_step(s, 4, **kw)]
  assert checks(min_switch_step=0, max_switch_step=None) == [0, 4, 8, 12, 16, 20, 24, 28]
  assert checks(min_switch_step=8, max_switch_step=10) == [8, 10, 12, 16, 20, 24, 28]
  assert checks(min_switch_step=12, max_switch_step=6) == [6, 12, 16, 20, 24, 28]  # the cap wins
