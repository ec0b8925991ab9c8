"""Runs the examples in examples/ for a few steps on MNIST: each trains above a stated test
accuracy floor and reports ε equal to the accountant's for the steps that ran."""

import contextlib
import importlib.util
import logging
import pathlib
import re

import pytest

from dpjax.privacy import accounting
from tests.conftest import require_data

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
LINEN_STEPS = 12
# Test accuracy after LINEN_STEPS private steps of 32 expected examples at learning rate 0.5 (ε =
# 3 for those steps), measured over 7 runs with fresh noise: 45.6% to 59.9% (chance: 10%).
LINEN_FLOOR = 0.30


def _load(path: pathlib.Path, name: str):
  """Imports a file of an example under a unique module name (every example has a train.py)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def absl_info(caplog):
  """Captures log records at INFO, absl's included. absl's logger has its own level (its verbosity
  flag, which other tests in this worker may have set): capture at INFO on it, not only on the
  root logger."""
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    yield


def logged_by(caplog, path: pathlib.Path) -> str:
  """The captured messages logged from the file `path`, one per line."""
  return "\n".join(r.getMessage() for r in caplog.records if pathlib.Path(r.pathname) == path)


def assert_accountants_epsilon(private, steps: int, logged_epsilon: str, target: float) -> None:
  """The private setup recorded `steps` steps and reports (and logged, with 3 decimals) the ε of
  dp_accounting for them at its σ, q and δ, within the target."""
  assert private.ledger.private_steps == steps
  expected = accounting.epsilon(private.noise_multiplier, private.sampler.sampling_rate, steps,
                                private.delta)
  assert private.epsilon() == pytest.approx(expected, rel=1e-9)
  assert float(logged_epsilon) == pytest.approx(expected, abs=5e-4)
  assert expected <= target


def test_linen_mnist_trains_and_reports_the_accountants_epsilon(dataset_cache, tmp_path, caplog):
  require_data()
  train = _load(EXAMPLES / "linen_mnist" / "train.py", "linen_mnist_train")
  config = _load(EXAMPLES / "linen_mnist" / "configs" / "default.py",
                 "linen_mnist_config").get_config()
  config.batch_size, config.microbatch_size = 32, 64  # one microbatch: one compile
  config.learning_rate = 0.5  # a few steps: larger than the full run's 0.1
  config.num_epochs, config.steps_per_epoch = 1, LINEN_STEPS
  with absl_info(caplog):
    _, private = train.train_and_evaluate(config, str(tmp_path))
  logged = logged_by(caplog, EXAMPLES / "linen_mnist" / "train.py")
  (accuracy, epsilon), = re.findall(r"test_accuracy: ([\d.]+), epsilon: ([\d.]+)", logged)
  assert float(accuracy) / 100 > LINEN_FLOOR
  assert "train_" not in logged  # no metric of the private training batches is reported
  assert private.delta == config.delta
  assert_accountants_epsilon(private, LINEN_STEPS, epsilon, config.epsilon)
