"""The privacy plan: built once, its phases explicit, its events the sampler's own, a switch a new
plan value; the ledger and the statement read it."""

import dataclasses
import json

import dp_accounting
import pytest

from dpjax import config as config_lib
from dpjax.privacy import accounting, sampling
from dpjax.train import plan as plan_lib, state as state_lib, statement as statement_lib


def _config(**mixing_values):
  c = config_lib.default_config()
  c.dp.update(noise_multiplier=1.0, accountant="rdp", expected_batch_size=100)
  c.schedule.total_steps = 10
  c.mixing.update(mixing_values)
  return c


def test_the_ledger_composes_the_samplers_own_events():
  sampler = sampling.PoissonSampler(1000, 0.1, 10, seed=1)
  ledger = accounting.PrivacyLedger()
  ledger.record_private(0.1, 1.3, 3, sampling=sampler.sampling.name)
  ledger.record_public(2)
  expected = dp_accounting.ComposedDpEvent([
      sampler.dp_event(1.3, 3),
      dp_accounting.SelfComposedDpEvent(dp_accounting.NoOpDpEvent(), 2)])
  assert ledger.dp_event() == expected
  assert sampler.dp_event(1.3, 3) == sampling.PoissonSampling(0.1).dp_event(1.3, 3)


def test_a_ledger_entry_of_an_unknown_sampling_is_refused_and_old_ledgers_read_as_poisson():
  with pytest.raises(ValueError, match="does not know"):
    accounting.PrivacyLedger().record_private(0.1, 1.0, sampling="shuffle_without_amplification")
  old = json.dumps(dict(entries=[dict(sampling_rate=0.1, noise_multiplier=1.0, steps=4)],
                        public_steps=1))
  ledger = accounting.PrivacyLedger.from_json(old)
  assert ledger.entries[0].sampling == "poisson"
  assert ledger.epsilon(1e-5, "rdp") == accounting.epsilon(1.0, 0.1, 4, 1e-5, "rdp")


@pytest.mark.parametrize("values, kinds", [
    (dict(schedule="switch", switch_step=4), [("public", 0, 4), ("private", 4, 10)]),
    (dict(schedule="constant", alpha=0.5), [("mixed", 0, 10)]),
    (dict(schedule="auto"), [("undecided", 0, 10)]),
])
def test_phases_follow_the_schedule(values, kinds):
  c = _config(**values)
  plan = plan_lib.plan_privacy(c, 1000, state_lib.alpha_schedule(c), 1.0)
  assert [(p.kind, p.start, p.stop) for p in plan.phases] == kinds
  assert plan.phase_at(kinds[-1][1]) == kinds[-1][0]
  with pytest.raises(ValueError, match="outside"):
    plan.phase_at(10)


def test_sparta_selection_is_a_phase_of_its_own():
  c = _config(schedule="switch", switch_step=0)
  c.finetune.sparse.update(method="sparta", warmup_steps=2, selection_steps=3)
  plan = plan_lib.plan_privacy(c, 1000, state_lib.alpha_schedule(c), 1.0)
  assert [(p.kind, p.start, p.stop) for p in plan.phases] == [
      ("private", 0, 2), ("selection", 2, 5), ("private", 5, 10)]
  assert plan.planned_private_steps == 10  # selection steps are private steps


def test_an_automatic_switch_makes_a_new_plan_value():
  c = _config(schedule="auto")
  c.dp.update(noise_multiplier=None, target_epsilon=2.0)
  auto = state_lib.alpha_schedule(c)
  before = plan_lib.plan_privacy(c, 1000, auto, 1.0)
  assert before.noise_multiplier is None and before.planned_private_steps == 0
  with pytest.raises(ValueError, match="not decided"):
    plan_lib.switched(before, c, auto)
  assert auto.observe(6, heldout_loss=None) is False
  auto.max_switch_step = 6
  assert auto.observe(6)
  after = plan_lib.switched(before, c, auto)
  assert (after.decided_at, after.planned_private_steps) == (6, 4)
  assert "max_switch_step" in after.reason
  assert before.noise_multiplier is None  # unchanged: plans are values
  with pytest.raises(dataclasses.FrozenInstanceError):
    after.noise_multiplier = 1.0
  ledger = accounting.PrivacyLedger()
  for _ in range(4):
    after.record_private(ledger)
  assert ledger.epsilon(after.delta, "rdp") <= 2.0
  with pytest.raises(AssertionError):
    before.record_private(ledger)


def test_the_statement_takes_sampling_and_adjacency_from_the_plan(monkeypatch):
  c = _config(schedule="switch", switch_step=0)
  plan = plan_lib.plan_privacy(c, 1000, state_lib.alpha_schedule(c), 1.0)
  ledger = accounting.PrivacyLedger()
  plan.record_private(ledger)
  monkeypatch.setattr(sampling.PoissonSampling, "description", "Poisson (test)")
  monkeypatch.setattr(sampling.PoissonSampling, "adjacency", "replace-one (test)")
  s = statement_lib.privacy_statement(plan, ledger, c)
  assert s["sampling"] == "Poisson (test)"
  assert "replace-one (test) adjacency" in s["unit_of_privacy"]
  assert "(Poisson (test) sampling" in statement_lib.format_statement(s)
