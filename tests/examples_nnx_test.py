"""Runs examples/nnx_mnist (Flax's NNX MNIST tutorial made private) for a few steps on MNIST: it
trains above a stated test accuracy floor, reports ε equal to the accountant's for the steps that
ran, and reports no metric of the private training batches."""

import pathlib
import re

import pytest

from tests.conftest import require_data
from tests.examples_test import (EXAMPLES, _load, absl_info, assert_accountants_epsilon,
                                 logged_by)

NNX_STEPS = 12
# Test accuracy after NNX_STEPS private steps of 32 expected examples at adamw's learning rate
# 0.005 (the tutorial's; ε = 3 for those steps), measured over 12 runs with fresh noise: 44.0% to
# 66.6% (chance: 10%).
NNX_FLOOR = 0.30


def test_nnx_mnist_trains_and_reports_the_accountants_epsilon(dataset_cache, tmp_path, caplog):
  require_data()
  train_py = EXAMPLES / "nnx_mnist" / "train.py"
  train = _load(train_py, "nnx_mnist_train")
  with absl_info(caplog):  # one microbatch of 64 rows (a batch of 32 expected): one compile
    _, test_metrics, private = train.train_and_evaluate(
        str(tmp_path), train_steps=NNX_STEPS, eval_every=NNX_STEPS, microbatch_size=64)
  logged = logged_by(caplog, train_py)
  (accuracy, epsilon), = re.findall(r"test_accuracy: ([\d.]+), epsilon: ([\d.]+)", logged)
  assert float(accuracy) / 100 == pytest.approx(float(test_metrics["accuracy"]), abs=1e-4)
  assert float(accuracy) / 100 > NNX_FLOOR
  # No metric of the private training batches is reported, in the log or in TensorBoard (its
  # event files hold the scalars' tags as plain strings).
  assert "train_" not in logged
  events = b"".join(p.read_bytes() for p in pathlib.Path(tmp_path).rglob("*") if p.is_file())
  assert b"test_accuracy" in events and b"epsilon" in events and b"train_" not in events
  assert private.delta == train.delta
  assert_accountants_epsilon(private, NNX_STEPS, epsilon, train.epsilon)
