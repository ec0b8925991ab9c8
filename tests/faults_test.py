"""Faults a run survives: preemption (SIGTERM) then resume, non-finite steps, resumed metrics,
the progress bar, and main's exit status."""

import collections
import json
import os
import signal
import types

import jax
import numpy as np
import pytest

from dpjax import config as config_lib, main as main_lib
from dpjax.privacy import accounting
from dpjax.train import checkpoint, faults, hooks, loop, metrics
from tests.conftest import require_data
from tests.e2e_test import _final_params, small_config


@pytest.fixture
def _data(dataset_cache):
  require_data()


def _signal_at(monkeypatch, step_to_signal, signum=signal.SIGTERM):
  original = loop.Trainer.one_step

  def one_step(self, step):
    original(self, step)
    if step == step_to_signal:
      os.kill(os.getpid(), signum)  # delivered now: the guard's handler sets its flag

  monkeypatch.setattr(loop.Trainer, "one_step", one_step)
  return original


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resuming_equals_an_uninterrupted_run(
    _data, tmp_path, monkeypatch, signum):
  dp = dict(insecure_reproducible_seed=3)
  straight = loop.train_and_evaluate(small_config(dp=dp), str(tmp_path / "a"),
                                     show_progress=False)
  c = small_config(dp=dp, log_every_steps=4)
  original = _signal_at(monkeypatch, 12, signum)
  before = signal.getsignal(signum)  # the default, or what the test process set (xdist: SIG_IGN)
  stopped = loop.train_and_evaluate(c, str(tmp_path / "b"), show_progress=False)
  assert stopped["stopped"] == "preempted" and stopped["steps"] == 13
  assert stopped["signal"] == signal.Signals(signum).name
  assert checkpoint.Checkpointer(str(tmp_path / "b")).latest_step() == 13  # not every 1000
  assert not (tmp_path / "b" / "results.json").exists()
  # The handler is gone after the run: the one before it is back.
  assert signal.getsignal(signum) == before
  monkeypatch.setattr(loop.Trainer, "one_step", original)
  resumed = loop.train_and_evaluate(c, str(tmp_path / "b"), show_progress=False)
  assert resumed["stopped"] == "completed"
  assert resumed["privacy"] == straight["privacy"]
  for x, y in zip(jax.tree_util.tree_leaves(_final_params(tmp_path / "a")),
                  jax.tree_util.tree_leaves(_final_params(tmp_path / "b"))):
    np.testing.assert_array_equal(x, y)
  records = metrics.read_metrics(str(tmp_path / "b"))
  counts = collections.Counter((r["step"], r["kind"]) for r in records)
  assert max(counts.values()) == 1, counts  # no record written twice
  assert [r["step"] for r in records if r["kind"] == "train"] == [4, 8, 12, 16, 20]


def test_resuming_after_a_crash_writes_no_duplicate_records(_data, tmp_path, monkeypatch):
  from tests.e2e_test import crash_then_resume
  c = small_config(checkpoint=dict(every_steps=4), log_every_steps=2)
  crash_then_resume(c, str(tmp_path), crash_step=13, monkeypatch=monkeypatch)
  records = metrics.read_metrics(str(tmp_path))
  keys = [(r["step"], r["kind"]) for r in records]
  assert len(keys) == len(set(keys)), keys
  assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 21, 2))
  assert [r["step"] for r in records if r["kind"] == "perf"] == [0, 12]


def test_a_non_finite_step_stops_the_run_before_its_state_is_saved(_data, tmp_path,
                                                                  monkeypatch):
  original = loop.Trainer.one_step

  def poisoned(self, step):
    if step == 13:  # a private step (10 public, then private): its update is NaN
      self.state = self.state.replace(params=jax.tree_util.tree_map(
          lambda p: p * np.float32(np.nan), self.state.params))
    return original(self, step)

  monkeypatch.setattr(loop.Trainer, "one_step", poisoned)
  c = small_config(checkpoint=dict(every_steps=4), log_every_steps=100)
  with pytest.raises(faults.NonFiniteError,
                     match="after step 16 are not finite.*finite after step 12"):
    loop.train_and_evaluate(c, str(tmp_path), show_progress=False)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() == 12  # the step-16 checkpoint was never written
  record = ckpt.read_record()
  ledger = accounting.PrivacyLedger.from_json(record["ledger"])
  assert (ledger.public_steps, ledger.private_steps) == (10, 2)  # nothing of step 13 on
  params = ckpt.read(12)[0]["params"]
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  assert not (tmp_path / "results.json").exists()
  # Checked every log_every_steps steps too, without a checkpoint due.
  c = small_config(log_every_steps=5)
  with pytest.raises(faults.NonFiniteError, match="after step 15 are not finite"):
    loop.train_and_evaluate(c, str(tmp_path / "b"), show_progress=False)


def test_finite_watch_checks_every_n_steps_and_on_demand():
  watch = faults.FiniteWatch(every=2)
  bad = {"w": np.array([1.0, np.nan], np.float32), "b": {"c": np.zeros(2, np.float32)}}
  watch.after_step(1, bad)  # not a checking step
  with pytest.raises(faults.NonFiniteError,
                     match=r"after step 2 .*1 of 2 leaves: w\); they were finite after step 0"):
    watch.after_step(2, bad)
  with pytest.raises(faults.NonFiniteError, match="every value is finite, but their sum of sq"):
    faults.FiniteWatch(every=1).check(1, {"w": np.full(4, 3e38, np.float32)})
  watch.after_step(4, {"w": np.ones(2, np.float32)})
  with pytest.raises(faults.NonFiniteError, match="after step 5 .* finite after step 4"):
    watch.check(5, bad)
  assert bool(faults.is_finite({"w": np.ones(3, np.float32)}))
  assert not bool(faults.is_finite({"w": np.array([1.0, np.inf], np.float32)}))
  assert not bool(faults.is_finite({"w": np.full(4, 3e38, np.float32)}))  # its square overflows


def test_preemption_guard_restores_handlers_and_a_second_signal_is_not_caught():
  before = signal.getsignal(signal.SIGTERM)
  with faults.PreemptionGuard() as guard:
    assert not guard.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested(1) and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before  # the next SIGTERM is not caught
  assert signal.getsignal(signal.SIGTERM) == before


def test_main_exits_with_ex_tempfail_when_preempted(monkeypatch, tmp_path):
  monkeypatch.setattr(loop, "train_and_evaluate",
                      lambda *a: dict(stopped="preempted", steps=3, signal="SIGTERM"))
  monkeypatch.setattr(main_lib, "_CONFIG",
                      types.SimpleNamespace(value=config_lib.default_config()))
  monkeypatch.setattr(main_lib, "_WORKDIR", types.SimpleNamespace(value=str(tmp_path)))
  monkeypatch.setattr(main_lib, "_PROGRESS", types.SimpleNamespace(value=False))
  monkeypatch.setattr(main_lib.parallel, "initialize_distributed", lambda **kw: None)
  with pytest.raises(SystemExit) as exit_info:
    main_lib.main([])
  assert exit_info.value.code == faults.EXIT_PREEMPTED == 75


def test_progress_bar_shows_no_placeholders_and_epsilon_at_every_private_step():
  shown = []
  bar = types.SimpleNamespace(enabled=True, update=lambda n, **kw: shown.append(kw))
  train_metrics, evaluation = hooks.TrainMetrics(10), hooks.Evaluation(10)
  extras = lambda: dict(loss=train_metrics.last_loss, acc=evaluation.last_accuracy)
  hook = hooks.ProgressBar(bar, extras, refresh_s=0.0)
  ledger = accounting.PrivacyLedger()
  run = types.SimpleNamespace(alpha=1.0, ledger=ledger, total=5,
                              epsilon=lambda: ledger.epsilon(1e-5, "rdp"))
  hook.after_step(run, 1)  # public step: nothing spent, no loss or accuracy yet
  assert shown[-1] == dict(alpha=1.0)
  epsilons = []
  for done in (2, 3):
    ledger.record_private(0.01, 1.0)
    run.alpha = 0.0
    hook.after_step(run, done)
    epsilons.append(shown[-1]["eps"])
  assert epsilons[0] < epsilons[1] == pytest.approx(ledger.epsilon(1e-5, "rdp"))
  train_metrics.last_loss, evaluation.last_accuracy = 0.5, 0.9
  hook.after_step(run, 4)
  assert set(shown[-1]) == {"alpha", "eps", "loss", "acc"}
  assert not any(isinstance(v, float) and np.isnan(v) for s in shown for v in s.values())
  assert json.dumps(shown)  # plain values


def test_a_hidden_progress_bar_computes_no_epsilon_and_a_shown_one_refreshes_it_rarely():
  """A PLD ε costs the host 0.2-0.5 s: a hidden bar never asks for it, a shown one at most once
  per refresh_s and at the last step."""
  asked = []
  ledger = accounting.PrivacyLedger()
  ledger.record_private(0.01, 1.0)
  run = types.SimpleNamespace(alpha=0.0, ledger=ledger, total=50,
                              epsilon=lambda: asked.append(1) or 1.0)
  hidden = metrics.Progress(50, 0, enabled=False)
  hooks.ProgressBar(hidden, dict).after_step(run, 1)
  assert not asked
  shown = []
  bar = types.SimpleNamespace(enabled=True, update=lambda n, **kw: shown.append(kw))
  hook = hooks.ProgressBar(bar, dict)  # the default refresh_s
  for done in range(1, 51):
    hook.after_step(run, done)
  assert len(asked) == 2 and all(s["eps"] == 1.0 for s in shown)  # the first step and the last
