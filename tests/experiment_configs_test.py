"""The continual pre-training studies' configs: every variant parses, and every variant of one
study runs the same compute (steps × batch), as the comparisons of issue 26 assume."""

import importlib.util
import pathlib

import pytest

from dpjax import config as config_lib

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _experiment(name):
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("regime", ["A", "B", "C"])
@pytest.mark.parametrize("model", ["wrn", "vit"])
def test_bu2024_cifar_variants_parse_and_run_the_same_compute(regime, model):
  study = _experiment("bu2024_cifar")
  specs = {v: config_lib.parse(study.get_config(f"{v},{regime},{model}")) for v in study.VARIANTS}
  assert {(s.schedule.total_steps, s.schedule.public_batch_size, s.dp.expected_batch_size)
          for s in specs.values()} == {(400, 1024, 1024)}
  data = specs["dp"].data
  assert data.name == "cifar10_jpeg" and data.public_fraction == study.REGIMES[regime][
      "public_fraction"]
  assert tuple(data.public_classes) == study.REGIMES[regime]["public_classes"]
  assert specs["nonprivate"].data.public_fraction == 1.0
  assert specs["clip_only"].dp.noise_multiplier == 0.0
  assert specs["dp"].mixing.reset_moments == "all"


def test_bu2024_cifar_refuses_unknown_parts():
  with pytest.raises(ValueError, match="regime"):
    _experiment("bu2024_cifar").get_config("dp,D")


def test_the_main_job_defaults_to_public_data_from_five_classes():
  continual = _experiment("continual")
  default = config_lib.parse(continual.get_config(None))
  assert default.data.name == "fashion_mnist" and tuple(default.data.public_classes) == (
      0, 1, 2, 3, 4)
  assert default.mixing.schedule.switch_step == continual.PUBLIC_STEPS
  regime_a = config_lib.parse(continual.get_config("dp,fashion_mnist"))
  assert tuple(regime_a.data.public_classes) == ()
  for variant in continual.VARIANTS:
    spec = config_lib.parse(continual.get_config(f"{variant},fashion_mnist_5classes"))
    assert spec.schedule.total_steps == continual.PUBLIC_STEPS + continual.PRIVATE_STEPS
