"""End-to-end tests of the automatic public→private switch (Bu et al. 2024) on Fashion-MNIST."""

import dataclasses

import numpy as np
import pytest

from dpjax import data
from dpjax.train import checkpoint, loop, metrics, state as state_lib
from tests.conftest import require_data
from tests.e2e_test import crash_then_resume, small_config


@pytest.fixture(autouse=True)
def _data(dataset_cache):
  require_data()


def auto_config(criterion="either", **blocks):
  """criterion "plateau": the plateau on the held-out loss; "plateau_accuracy": on the held-out
  accuracy (plateau_metric, the default), with a min_delta no accuracy gain reaches: it fires at
  its third check (step 8), which it can only do if the checks hold the held-out accuracy."""
  c = small_config(mixing=dict(schedule="auto"), schedule=dict(total_steps=30), **blocks)
  c.mixing.auto.update(check_every=4, patience=2, criterion=criterion, max_switch_step=20,
                       plateau_metric="loss")
  if criterion == "plateau_accuracy":
    c.mixing.auto.update(criterion="plateau", plateau_metric="accuracy", min_delta=1.0)
  c.curvature.update(batch_size=32, num_probes=2)
  return c


def _with_scrambled_private_data(monkeypatch):
  original = state_lib.load_training_data

  def load(config):
    loaded = original(config)
    rng = np.random.default_rng(123)
    parts = loaded.parts
    private = dataclasses.replace(
        parts.private, images=rng.integers(0, 256, parts.private.images.shape, np.uint8),
        labels=rng.permutation(parts.private.labels))
    return dataclasses.replace(loaded, parts=data.PublicPrivate(parts.public, private))

  monkeypatch.setattr(state_lib, "load_training_data", load)


def _curvature_records(workdir):
  return [m for m in metrics.read_metrics(workdir) if m["kind"] in ("curvature", "switch")]


@pytest.mark.parametrize("criterion", ["either", "efficiency", "lookahead", "plateau_accuracy"])
def test_switch_depends_on_public_data_only_and_ends_at_the_target_epsilon(tmp_path, monkeypatch,
                                                                          criterion):
  blocks = dict(curvature=dict(every_steps=4))  # curvature records after the switch too
  first = loop.train_and_evaluate(auto_config(criterion, **blocks), str(tmp_path / "a"),
                                  show_progress=False)
  s = first["switch_step"]
  assert s is not None and 0 < s <= 20
  if criterion == "plateau_accuracy":
    assert s == 8 and "held-out public error" in first["privacy"]["plan_changes"][0]["reason"]
  p = first["privacy"]
  assert p["private_steps"] == 30 - s and p["public_steps"] == s
  assert 0.99 * 2.0 <= p["epsilon"] <= 2.0  # σ calibrated at the switch for the steps left
  _with_scrambled_private_data(monkeypatch)
  second = loop.train_and_evaluate(auto_config(criterion, **blocks), str(tmp_path / "b"),
                                   show_progress=False)
  assert second["switch_step"] == s
  # The records that decided the switch are equal; later ones read params that DP steps moved.
  decided = lambda workdir: [m for m in _curvature_records(workdir) if m["step"] <= s]
  assert decided(str(tmp_path / "a")) == decided(str(tmp_path / "b"))
  assert second["test_accuracy"] != first["test_accuracy"]  # the private data did change
  if criterion == "lookahead":  # the simulated DP steps run at the switch's checks only
    records = [m for m in _curvature_records(str(tmp_path / "a")) if m["kind"] == "curvature"]
    assert any(m["step"] > s for m in records)
    assert all(("lookahead_heldout_fall" in m) == (m["step"] <= s) for m in records)


def test_the_cap_switches_at_max_switch_step_between_two_checks(tmp_path):
  """max_switch_step 10 with checks every 4 steps: the switch comes at 10, not at the next check
  (12), so the cap bounds the public phase as documented."""
  config = auto_config("plateau")
  config.mixing.auto.update(patience=100, max_switch_step=10)
  result = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)
  assert result["switch_step"] == 10
  assert result["privacy"]["private_steps"] == 20 and result["privacy"]["public_steps"] == 10
  assert "reached max_switch_step 10" in result["privacy"]["plan_changes"][0]["reason"]
  checks = [m["step"] for m in _curvature_records(str(tmp_path)) if m["kind"] == "curvature"]
  assert checks == [0, 4, 8, 10]


def test_held_out_criteria_compute_no_curvature_at_their_checks(tmp_path):
  """The plateau reads the held-out losses only: its checks skip the curvature terms (per-example
  gradients, Hutchinson probes) unless curvature.every_steps asks for a record at that step."""
  config = auto_config("plateau", curvature=dict(every_steps=8))
  config.mixing.auto.update(patience=1, min_delta=10.0)  # switches at its second check
  result = loop.train_and_evaluate(config, str(tmp_path), show_progress=False)
  assert result["switch_step"] == 4
  records = {r["step"]: r for r in _curvature_records(tmp_path) if r["kind"] == "curvature"}
  assert "heldout_loss" in records[4] and "trace_h" not in records[4]  # a check only
  assert 0 <= records[4]["heldout_accuracy"] <= 1  # what plateau_metric="accuracy" watches
  assert "trace_h" in records[0] and "trace_h" in records[8]  # curvature record steps


@pytest.mark.parametrize("criterion,crash_offset", [("either", 4), ("efficiency", -1)])
def test_auto_switch_survives_a_restart(tmp_path, monkeypatch, criterion, crash_offset):
  """A crash after the switch, or one step before it: the resumed run switches at the same step
  and ends with the same controller state, the efficiency criterion's window of two checks
  (`generalisation_checks`) included."""
  c = auto_config(criterion, checkpoint=dict(every_steps=3))
  c.mixing.auto.generalisation_checks = 2
  c.dp.insecure_reproducible_seed = 0  # the same noise in both runs, which are compared
  straight = loop.train_and_evaluate(c, str(tmp_path / "a"), show_progress=False)
  resumed = crash_then_resume(c, str(tmp_path / "b"), straight["switch_step"] + crash_offset,
                              monkeypatch)
  # The controller's state at the end (frozen at the switch) is the straight run's: a window
  # lost at the restart would hold fewer checks.
  switch_state = lambda workdir: checkpoint.source_record(workdir)[1]["hooks"]["auto_switch"]
  assert switch_state(str(tmp_path / "b")) == switch_state(str(tmp_path / "a"))
  if criterion == "efficiency":
    assert len(switch_state(str(tmp_path / "a"))["loss_history"]) == 2
  assert resumed["switch_step"] == straight["switch_step"]
  assert resumed["privacy"] == straight["privacy"]
  assert resumed["test_accuracy"] == straight["test_accuracy"]
