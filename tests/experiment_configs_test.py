"""The studies' configs: every variant parses, and every variant of one continual pre-training
study runs the same compute (steps × batch), as the comparisons of issue 26 assume; the CIFAR
contrastive study's (issue 29) every method and batch."""

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


@pytest.mark.parametrize("batch", [128, 512])
def test_contrastive_cifar_methods_parse_and_train_the_same_epochs(batch):
  """Every method of the CIFAR contrastive study parses at both batch sizes: cifar10_jpeg all
  private, the probe on cifar10_jpeg only (held-out test images), Logit-DP's pair path without
  Jacobians in bfloat16, EPOCHS passes over the 50,000 images."""
  study = _experiment("contrastive_cifar")
  specs = {m: config_lib.parse(study.get_config(f"{m},{batch}"))
           for m in ("logit_dp", "naive", "nonprivate", "random_init")}
  steps = round(study.EPOCHS * 50_000 / batch)
  for method, spec in specs.items():
    assert spec.contrastive.method == method and spec.contrastive.pair_method == "ghost"
    assert (spec.data.name, spec.data.public_fraction, spec.contrastive.probe.datasets) == (
        "cifar10_jpeg", 0.0, "cifar10_jpeg")
    assert (spec.dp.expected_batch_size, spec.schedule.total_steps) == (batch, steps)
    assert (spec.dp.delta, spec.dp.accountant, spec.perf.dtype) == (1e-5, "pld", "bfloat16")
    assert spec.model.name == "resnet18"
  assert specs["logit_dp"].perf.row_chunk == study.BATCHES[batch]["row_chunk"]["logit_dp"]
  assert config_lib.parse(study.get_config("naive")).dp.expected_batch_size == 128
  with pytest.raises(ValueError, match="BATCH in"):
    study.get_config("logit_dp,256")


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
