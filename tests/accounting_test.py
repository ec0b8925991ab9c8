"""Tests for dpjax.privacy.accounting: published ε values, calibration, ledger and budget guard."""


import dp_accounting
import pytest

from dpjax.privacy import accounting

DELTA = 1e-5


@pytest.mark.parametrize("name,q,sigma,steps,published", [
    # TF-Privacy MNIST tutorial: batch 256, σ = 1.1, 60 epochs.
    ("tf_privacy_mnist", 256 / 60000, 1.1, 60 * 60000 // 256, 3.01),
    # Opacus MNIST example: batch 240, σ = 1.1, 60 epochs.
    ("opacus_mnist", 240 / 60000, 1.1, 60 * 60000 // 240, 2.91),
    # Tramèr & Boneh Fashion-MNIST CNN: batch 2048, σ = 2.15, 40 epochs of floor(60000/2048) steps.
    ("tramer_boneh_fmnist", 2048 / 60000, 2.15, 40 * (60000 // 2048), 3.00),
])
def test_reproduces_published_epsilons_with_the_classic_conversion(name, q, sigma, steps,
                                                                   published):
  assert accounting.epsilon(sigma, q, steps, DELTA, "rdp_classic") == pytest.approx(
      published, abs=0.005), name


def test_pld_is_tighter_than_rdp_which_is_tighter_than_classic():
  q, sigma, steps = 256 / 60000, 1.1, 14062
  pld = accounting.epsilon(sigma, q, steps, DELTA, "pld")
  rdp = accounting.epsilon(sigma, q, steps, DELTA, "rdp")
  classic = accounting.epsilon(sigma, q, steps, DELTA, "rdp_classic")
  assert pld < rdp < classic


def test_ledger_counts_only_private_steps():
  ledger = accounting.PrivacyLedger()
  ledger.record_public(100)
  assert ledger.epsilon(DELTA) == 0.0
  ledger.record_private(0.01, 1.2, 50)
  ledger.record_public(10)
  ledger.record_private(0.01, 1.2, 30)
  assert ledger.private_steps == 80 and ledger.public_steps == 110
  assert len(ledger.entries) == 1  # same (q, σ) merged
  for acc in accounting.ACCOUNTANTS:
    assert ledger.epsilon(DELTA, acc) == pytest.approx(accounting.epsilon(1.2, 0.01, 80, DELTA, acc))
  # The whole event, public NoOps included, gives the same ε as the private steps alone.
  assert accounting.epsilon_of_event(ledger.dp_event(), DELTA, "rdp") == pytest.approx(
      accounting.epsilon(1.2, 0.01, 80, DELTA, "rdp"))


def test_ledger_with_changing_rates_composes_through_dp_accounting():
  ledger = accounting.PrivacyLedger()
  ledger.record_private(0.01, 1.0, 40)
  ledger.record_private(0.02, 1.5, 60)
  direct = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
  direct.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 40))
  direct.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.5)), 60))
  assert ledger.epsilon(DELTA, "rdp") == pytest.approx(direct.get_epsilon(DELTA))


def test_ledger_json_round_trip():
  ledger = accounting.PrivacyLedger()
  ledger.record_private(0.01, 1.0, 3)
  ledger.record_public(2)
  again = accounting.PrivacyLedger.from_json(ledger.to_json())
  assert again == ledger and again.epsilon(DELTA, "rdp") == ledger.epsilon(DELTA, "rdp")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_budget_guard_stops_exactly_before_the_budget_is_exceeded(accountant):
  q, sigma = 0.05, 1.0
  budget = accounting.PrivacyBudget(2.0, DELTA, accountant)
  ledger = accounting.PrivacyLedger()
  ledger.record_public(5)
  taken = 0
  with pytest.raises(accounting.BudgetExceededError, match="budget"):
    while True:
      budget.check(ledger, q, sigma)
      ledger.record_private(q, sigma)
      taken += 1
  assert accounting.epsilon(sigma, q, taken, DELTA, accountant) <= 2.0
  assert accounting.epsilon(sigma, q, taken + 1, DELTA, accountant) > 2.0


def test_budget_hint_never_changes_the_answer():
  budget = accounting.PrivacyBudget(2.0, DELTA, "rdp")
  ledger = accounting.PrivacyLedger()
  truth = budget.steps_allowed(ledger, 0.05, 1.0)
  for hint in [1, truth - 1, truth, truth + 1, 10 * truth]:
    fresh = accounting.PrivacyBudget(2.0, DELTA, "rdp")
    assert fresh.steps_allowed(ledger, 0.05, 1.0, hint=hint) == truth


def test_budget_already_spent_refuses_the_first_step():
  ledger = accounting.PrivacyLedger()
  ledger.record_private(0.5, 0.5, 100)
  with pytest.raises(accounting.BudgetExceededError):
    accounting.PrivacyBudget(1.0, DELTA, "rdp").check(ledger, 0.01, 1.0)


def test_bad_input():
  with pytest.raises(ValueError, match="sampling_rate"):
    accounting.epsilon(1.0, 1.5, 10, DELTA)
  with pytest.raises(ValueError, match="delta"):
    accounting.epsilon(1.0, 0.1, 10, 1.0)
  with pytest.raises(ValueError, match="1/N"):
    accounting.check_delta(1e-3, num_examples=60000)
  with pytest.raises(ValueError, match="Unknown accountant"):
    accounting.epsilon(1.0, 0.1, 10, DELTA, "prv_magic")


def _gaussian_steps(q, sigma, steps):
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _pld_epsilon(*events):
  accountant = dp_accounting.pld.PLDAccountant(
      value_discretization_interval=accounting.PLD_DISCRETIZATION)
  return accountant.compose(dp_accounting.ComposedDpEvent(list(events))).get_epsilon(DELTA)


def _chain():
  """Run a (20 steps), b started from a (30 steps), c started from b (10 steps)."""
  a = accounting.PrivacyLedger()
  a.record_private(0.01, 1.0, 20)
  b = accounting.PrivacyLedger(prior=a)
  b.record_public(5)
  b.record_private(0.02, 1.5, 30)
  c = accounting.PrivacyLedger(prior=b)
  c.record_private(0.01, 2.0, 10)
  return a, b, c


def test_a_prior_is_composed_transitively_and_counted_apart():
  a, b, c = _chain()
  assert (c.private_steps, c.total_private_steps) == (10, 60)
  assert c.epsilon(DELTA) == pytest.approx(_pld_epsilon(
      _gaussian_steps(0.01, 1.0, 20), _gaussian_steps(0.02, 1.5, 30),
      _gaussian_steps(0.01, 2.0, 10)), rel=1e-6)
  assert c.epsilon(DELTA) > b.epsilon(DELTA) > a.epsilon(DELTA)
  assert c.alone().epsilon(DELTA) == pytest.approx(accounting.epsilon(2.0, 0.01, 10, DELTA))
  # A prior without private steps composes to nothing.
  empty = accounting.PrivacyLedger()
  empty.record_public(7)
  d = accounting.PrivacyLedger(prior=empty)
  d.record_private(0.01, 2.0, 10)
  assert d.epsilon(DELTA) == pytest.approx(accounting.epsilon(2.0, 0.01, 10, DELTA), rel=1e-9)


def test_a_prior_survives_json_and_old_json_still_reads():
  c = _chain()[2]
  again = accounting.PrivacyLedger.from_json(c.to_json())
  assert again == c and again.prior.prior == c.prior.prior
  old = '{"entries": [{"noise_multiplier": 1.0, "sampling_rate": 0.01, "steps": 3}], ' \
        '"public_steps": 2}'
  assert accounting.PrivacyLedger.from_json(old) == accounting.PrivacyLedger(
      [accounting.LedgerEntry(0.01, 1.0, 3)], 2, None)


def test_budget_guard_counts_the_prior():
  q, sigma = 0.05, 1.0
  prior = _chain()[1]
  budget = accounting.PrivacyBudget(2.0, DELTA, "rdp")
  ledger = accounting.PrivacyLedger(prior=prior)
  taken = 0
  with pytest.raises(accounting.BudgetExceededError):
    while True:
      budget.check(ledger, q, sigma)
      ledger.record_private(q, sigma)
      taken += 1

  def with_prior(steps):
    direct = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
    direct.compose(dp_accounting.ComposedDpEvent([
        _gaussian_steps(0.01, 1.0, 20), _gaussian_steps(0.02, 1.5, 30),
        _gaussian_steps(q, sigma, steps)]))
    return direct.get_epsilon(DELTA)
  assert with_prior(taken) <= 2.0 < with_prior(taken + 1)
  assert taken < budget.steps_allowed(accounting.PrivacyLedger(), q, sigma)  # the prior cost some


def test_budget_guard_with_a_huge_target_asks_the_accountant_once_per_plan(monkeypatch):
  """A target that the whole plan stays far below: the guard checks the plan once, and never
  searches the (huge) number of steps the budget would allow."""
  budget = accounting.PrivacyBudget(1e6, 1e-5, "rdp")
  calls = []
  original = accounting.PrivacyLedger.epsilon
  monkeypatch.setattr(accounting.PrivacyLedger, "epsilon",
                      lambda self, *a: calls.append(1) or original(self, *a))
  ledger = accounting.PrivacyLedger()
  for _ in range(50):
    budget.check(ledger, 0.01, 0.5, hint=50)
    ledger.record_private(0.01, 0.5)
  assert len(calls) <= 2
  # Beyond its plan, the run gets the full search (and a small target still stops it).
  small = accounting.PrivacyBudget(1.0, 1e-5, "rdp")
  with pytest.raises(accounting.BudgetExceededError):
    small.check(ledger, 0.01, 0.5, hint=50)


def test_every_committed_cifar_run_states_the_epsilon_dp_accounting_gives_for_what_it_ran():
  """The issue-26 study's runs (experiments/results/bu2024_cifar): each DP run's stated ε is
  dp_accounting's PLD ε, computed here without dpjax, of the Poisson-subsampled Gaussian at its
  stated q = expected batch / private examples and σ for the private steps it ran, and is no more
  than its config's target; a run without noise states ε = ∞, one without private steps ε = 0.
  Catches a statement, or a
  calibration, that claims more privacy than what ran."""
  import glob
  import json
  import math
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / "experiments/results/bu2024_cifar/runs"
  folders = sorted(pathlib.Path(f).parent
                   for f in glob.glob(str(root / "*" / "*" / "results.json")))
  assert len(folders) >= 265
  stated = {}
  for folder in folders:
    run = json.loads((folder / "results.json").read_text())
    p = run["privacy"]
    if p.get("non_private") or p["private_steps"] == 0:  # no private step: nothing spent
      assert p["private_steps"] == 0 and p["epsilon"] == 0
      continue
    if p["noise_multiplier"] == 0:  # clipping only: no finite claim
      assert math.isinf(p["epsilon"])
      continue
    overrides = json.loads((folder / "variant.json").read_text())["overrides"]
    target = float(overrides.get("dp.target_epsilon", run.get("config", {}).get("dp", {}).get(
        "target_epsilon", 8.0)))  # 8: the experiment's default, for runs before the config
    assert p["sampling"] == "Poisson" and p["accountant"] == "pld"
    assert p["sampling_rate"] == pytest.approx(p["expected_batch_size"] /
                                               p["num_private_examples"], rel=1e-12)
    assert p["epsilon"] <= target * (1 + 1e-9), folder
    key = (p["sampling_rate"], p["noise_multiplier"], p["private_steps"], p["delta"])
    stated.setdefault(key, set()).add(p["epsilon"])
  for (q, sigma, steps, delta), epsilons in stated.items():  # ~45 distinct (q, σ, steps)
    pld = dp_accounting.pld.PLDAccountant(
        value_discretization_interval=accounting.PLD_DISCRETIZATION)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
    expected = pld.get_epsilon(delta)
    assert all(e == pytest.approx(expected, rel=1e-6) for e in epsilons), (q, sigma, steps)
