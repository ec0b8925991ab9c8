"""The GPU studies' configs: every variant parses, and every variant of one study runs the same
compute (steps × batch), as the comparisons of issues 26 and 29 assume; the fine-tuning study's
script and a shrunk run of its configs end to end; the CIFAR contrastive study's every method and
batch."""

import importlib.util
import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpjax import config as config_lib
from dpjax import mixing, sweeps
from dpjax.data import specs, testing
from dpjax.train import loop

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


# ------------------------------------------------------------------------------------------------
# DP fine-tuning at CIFAR scale (experiments/finetune_cifar.py, .sh, _table.py)


@pytest.mark.parametrize("regime", ["A", "B"])
@pytest.mark.parametrize("model", ["wrn", "vit"])
def test_finetune_cifar_parts_parse_and_fine_tune_the_same_private_steps(regime, model):
  study = _experiment("finetune_cifar")
  pretrain = config_lib.parse(study.get_config(f"pretrain,{regime},{model}"))
  assert pretrain.schedule.total_steps == study.PRETRAIN_STEPS
  assert pretrain.mixing.schedule.alpha == 1.0  # public steps only
  specs = {m: config_lib.parse(study.get_config(f"{m},{regime},{model}"))
           for m in study.METHODS[model]}
  assert set(study.METHODS[model]) >= {"all", "head", "bias", "last_blocks", "sparta",
                                       "magnitude", "random"}
  assert ({"attention", "mlp"} <= set(specs)) == (model == "vit")
  for method, spec in specs.items():
    assert (spec.schedule.total_steps, spec.dp.expected_batch_size, spec.dp.target_epsilon) == (
        study.FINETUNE_STEPS, 1024, 3.0)
    assert spec.mixing.schedule.switch_step == 0 and not spec.finetune.reset_head
    assert spec.data == pretrain.data and spec.model == pretrain.model  # same split and model
    sparse = spec.finetune.sparse.method
    assert (sparse, spec.finetune.selection) == (
        (method, "all") if method in study.SPARSE_METHODS else ("none", method))
  assert specs["last_blocks"].finetune.num_blocks == study.LAST_BLOCKS[model]
  rates = study.LEARNING_RATES[model]
  assert len(rates) == 3 and rates[1] == specs["all"].optimizer.learning_rate


def test_finetune_cifar_refuses_unknown_parts():
  study = _experiment("finetune_cifar")
  with pytest.raises(ValueError, match="needs a model with attention"):
    study.get_config("attention,B,wrn")
  with pytest.raises(ValueError, match="Unknown regime 'C'"):
    study.get_config("all,C")
  with pytest.raises(ValueError, match="Unknown part 'full'"):
    study.get_config("full")


def test_finetune_cifar_script_starts_each_seed_from_its_own_pretraining(tmp_path):
  """The script's sweeps, printed (--print_commands writes each run's variant.json): METHODS
  keeps a subset, the lr part runs the two rates beside the default at ε = 3, and fine-tuning
  seed S starts from R_pretrain/seed=S."""
  pretrain_dir = tmp_path / "elsewhere" / "B_pre"  # PRETRAIN_DIR: the device's /tmp
  env = dict(os.environ, SWEEP_FLAGS="--print_commands", METHODS="head,sparta", SEEDS="0,2",
             PYTHON=sys.executable, PYTHONPATH=str(EXPERIMENTS.parent),
             PRETRAIN_DIR=str(pretrain_dir))
  subprocess.run(["bash", "experiments/finetune_cifar.sh", str(tmp_path / "runs"), "pretrain",
                  "lr"], cwd=EXPERIMENTS.parent, env=env, check=True, capture_output=True)
  runs = {p.parent.relative_to(tmp_path).as_posix(): json.loads(p.read_text())
          for p in tmp_path.glob("**/variant.json")}
  assert sorted(runs) == ["elsewhere/B_pre/seed=0", "elsewhere/B_pre/seed=2"] + [
      f"runs/B_lr/{m},B,wrn,seed={s},learning_rate={lr}" for m in ("head", "sparta")
      for s in (0, 2) for lr in ("0.0005", "0.008")]
  for name, run in runs.items():
    command = shlex.split(run["command"])
    if name.startswith("runs/B_lr/"):
      seed = run["overrides"]["seed"]
      assert f"--config.finetune.init_from={pretrain_dir}/seed={seed}" in command
      assert "--config.dp.target_epsilon=3" in command


def _fake_cifar10_jpeg(root):
  """A cifar10_jpeg archive of random 32×32 JPEGs (20 per class for training, 2 for test)."""
  classes = specs.get_spec("cifar10_jpeg").classes
  testing.write_image_folder(root / "src", classes, {"train": 20, "test": 2}, shape=(32, 32, 3),
                             suffixes=(".jpg",))
  testing.pack(root / "src", root / "data" / "cifar10-jpeg" / specs.CIFAR10_JPEG_ARCHIVE)
  return root / "data"


def _set(config, values):
  """`config` with each "block.key" (or top-level "key") of `values` set."""
  for key, value in values.items():
    block, _, name = key.rpartition(".")
    (config[block] if block else config)[name] = value
  return config


def test_bu2024_regime_a_trains_alike_on_one_and_on_eight_devices(tmp_path):
  """Regime A's run (2 public steps, then 3 DP steps: automatic clipping, ghost, crop + flip,
  Adam with its reset, σ calibrated by PLD), shrunk to a WRN-10-1 on 200 fake images, on one
  device and on a mesh of 8 with the same global expected batch (32) and microbatch (16: 2 rows
  per device) and the same insecure seed: the same ε, ledger and batches, and params and test
  loss equal to float32 rounding (measured: 2.3e-7 at most, 1e-6 of the leaf's largest entry;
  rtol 1e-5, atol 1e-6 leave ~10× room). float32, not the study's bfloat16: in bfloat16 the two
  layouts' compiled programs round differently (a step's clipped sum differed by 4e-3 of its norm,
  2⁻⁸), which a test could not tell from a bug. The ViT is not used: Adam turns its attention key
  biases' gradients, 0 up to rounding (softmax ignores them), into ±lr steps that differ in sign
  between layouts."""
  study = _experiment("bu2024_cifar")
  data_dir = _fake_cifar10_jpeg(tmp_path)
  results, params, ledgers = {}, {}, {}
  for devices in (1, 8):
    config = _set(study.get_config("dp,A,wrn"), {
        "data.dir": str(data_dir), "data.verify": False, "data.cache_dir": str(tmp_path / "c"),
        "model.depth": 10, "model.width": 1, "model.num_groups": 4, "model.name": "wrn",
        "schedule.public_batch_size": 16, "dp.expected_batch_size": 32,
        "perf.microbatch_size": 16, "perf.dtype": "float32", "eval.batch_size": 24,
        "schedule.warmup_steps": 1, "schedule.total_steps": 5, "mixing.switch_step": 2,
        "dp.insecure_reproducible_seed": 0, "mesh.data": devices, "seed": 0})
    workdir = str(tmp_path / f"devices={devices}")
    results[devices] = loop.train_and_evaluate(config, workdir, show_progress=False)
    trained, record = loop.load_trained_state(config, workdir)
    params[devices] = jax.tree_util.tree_leaves(jax.device_get(trained))
    ledgers[devices] = record["ledger"]
  assert ledgers[8] == ledgers[1]
  one, eight = results[1]["privacy"], results[8]["privacy"]
  assert one["private_steps"] == 3 and one["epsilon"] <= 8.0
  for key in ("epsilon", "noise_multiplier", "sampling_rate", "private_steps"):
    assert eight[key] == one[key], key
  assert results[8]["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-5)
  for a, b in zip(params[1], params[8]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


WRN_10_1 = {"model.depth": 10, "model.width": 1, "model.num_groups": 4, "model.name": "wrn"}


@pytest.mark.parametrize("variant,shrink", [
    # Regime C's public part (1%: 500 images) is smaller than its batch of 1024; here 2 public
    # images of 200 are read 8 times per public batch of 16 (each copy augmented on its own:
    # tests/data_pipeline_test.py).
    ("dp,C,wrn", WRN_10_1),
    # The study's CIFAR ViT (MODEL=vit), shrunk to one block: ghost clipping through attention.
    ("dp,B,vit", {"model.depth": 1})])
def test_bu2024_cifar_parts_run_their_public_then_dp_steps(tmp_path, variant, shrink):
  """A study config, shrunk, on 200 fake images: 2 public steps, then 3 DP steps with σ
  calibrated, so a change that breaks a part shows here, not at a device call's first step."""
  study = _experiment("bu2024_cifar")
  config = _set(study.get_config(variant), {
      "data.dir": str(_fake_cifar10_jpeg(tmp_path)), "data.verify": False,
      "data.cache_dir": str(tmp_path / "c"), "schedule.public_batch_size": 16,
      "dp.expected_batch_size": 32, "perf.microbatch_size": 16, "eval.batch_size": 24,
      "schedule.warmup_steps": 1, "schedule.total_steps": 5, "mixing.switch_step": 2, **shrink})
  results = loop.train_and_evaluate(config, str(tmp_path / "run"), show_progress=False)
  assert results["privacy"]["private_steps"] == 3 and results["privacy"]["epsilon"] <= 8.0
  assert np.isfinite(results["test_loss"])


def test_finetune_cifar_pretrain_then_sparta_end_to_end(tmp_path):
  """The experiment's configs, shrunk (a WRN-10-1, 200 fake images, a few steps): pre-training on
  regime B's public part, then SPARTA from it, laid out as the script lays them out; the table
  reads them and every private step, the selection steps included, is in the ε that dp_accounting
  gives for the run's steps."""
  study, table = _experiment("finetune_cifar"), _experiment("finetune_cifar_table")
  data_dir = _fake_cifar10_jpeg(tmp_path)
  shrink = {"data.dir": str(data_dir), "data.verify": False, "data.cache_dir": str(tmp_path / "c"),
            "model.depth": 10, "model.width": 1, "model.num_groups": 4, "model.name": "wrn",
            "schedule.public_batch_size": 16, "dp.expected_batch_size": 16,
            "perf.microbatch_size": 16, "eval.batch_size": 20, "mesh.data": 1,
            "schedule.warmup_steps": 1}
  runs = tmp_path / "runs"

  def run(arg, part, steps, **overrides):
    config = _set(study.get_config(arg),
                  {**shrink, "schedule.total_steps": steps, "seed": 0, **overrides})
    variants = [{"seed": "0"}]
    (cmd,) = sweeps.commands(f"experiments/finetune_cifar.py:{arg}", str(runs / part), variants,
                             prefix="" if arg.startswith("pretrain") else arg)
    sweeps.write_variants(cmd[3].split("=", 1)[1], [cmd], variants)
    return loop.train_and_evaluate(config, cmd[4].split("=", 1)[1], show_progress=False)

  pre = run("pretrain,B,wrn", "B_pretrain", 3)
  assert pre["privacy"]["private_steps"] == 0
  r = run("sparta,B,wrn", "B_sparse", 5, **{
      "finetune.init_from": str(runs / "B_pretrain" / "seed=0"),
      "finetune.sparse.warmup_steps": 1, "finetune.sparse.selection_steps": 2})
  privacy = r["privacy"]
  assert privacy["private_steps"] == 5 and privacy["accountant"] == "pld"
  assert privacy["sampling_rate"] == pytest.approx(16 / 180)  # 20 of 200 images are public
  kept = r["finetune"]["kept_fraction"]  # 20% of each kernel's rows, rounded, the head whole
  assert len(kept) == 9 and all(0.18 < f < 0.21 for f in kept.values()), kept
  rows = table.run_rows(str(runs))
  assert [(row["method"], row["seed"], row["target_epsilon"]) for row in rows] == [
      ("pretrain", 0, None), ("sparta", 0, 3.0)]
  tuned = rows[1]
  assert tuned["epsilon"] == pytest.approx(tuned["epsilon_dp_accounting"], rel=1e-9)
  assert tuned["epsilon"] <= 3.0
  assert "largest |ε reported − ε of dp_accounting for the steps that ran| = 0.00e+00" in (
      table.markdown(table.cells(rows), rows))


def test_finetune_cifar_table_states_each_claim_against_the_seed_spread(tmp_path):
  """Cells, claims and the figure from made-up runs: sparta 0.60 ± 0.01 beats head 0.50 ± 0.01
  (holds), ties magnitude (within the spread), loses to full fine-tuning 0.70 (reversed)."""
  table = _experiment("finetune_cifar_table")
  means = dict(all=0.70, head=0.50, last_blocks=0.715, sparta=0.60, magnitude=0.599, random=0.55)
  rows = []
  for (method, mean), eps, lr, seed in itertools.product(means.items(), (1.0, 3.0),
                                                         (5e-4, 2e-3, 8e-3), (0, 1, 2)):
    if eps == 1.0 and lr != 2e-3:
      continue  # the lr grid is at ε = 3 only
    rows.append(dict(regime="B", model="wrn", method=method, target_epsilon=eps,
                     learning_rate=lr, seed=seed, test_accuracy=mean + 0.01 * (seed - 1)
                     - (lr != 2e-3) * 0.05, epsilon=eps - 0.01, epsilon_dp_accounting=eps - 0.01,
                     private_steps=200, trainable_params=1))
  cells = table.cells(rows)
  assert len(cells) == 6 * 4 and {c["runs"] for c in cells} == {3}
  text = table.markdown(cells, rows)
  assert "- ε = 3, default lr: best layer subset (last_blocks) vs full fine-tuning: +1.50 points " \
         "(summed std 2.00: within the spread)" in text
  assert "- ε = 1, default lr: sparta vs head: +10.00 points (summed std 2.00: holds)" in text
  assert "sparta vs all: -10.00 points (summed std 2.00: reversed)" in text
  assert "sparta vs magnitude: +0.10 points (summed std 2.00: within the spread)" in text
  assert "| sparta | 0.5500 ± 0.0100 | 0.6000 ± 0.0100 | 0.5500 ± 0.0100 | 0.002 |" in text
  assert "ε check: 72 DP runs; largest |ε reported − ε of dp_accounting" in text
  table.plot(cells, "B", "wrn", str(tmp_path / "f.png"))
  assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_bu2024_cifar_table_names_what_decided_each_switch_and_states_the_claims(tmp_path):
  """Made-up runs of regime B at ε = 8: switch 200 (0.61 ± 0.01) beats private-only DP (0.52) and
  public-only (0.38); a plateau run that switched at the cap alone is marked so, and the
  automatic switch is judged against the best fixed switch, within 1 point or not."""
  table = _experiment("bu2024_cifar_table")

  def run(variant, accuracy, seed, switch=None, reason=None, cap=None, augmult=1):
    changes = [dict(step=switch, reason=reason, noise_multiplier=0.6)] if reason else []
    r = dict(results=dict(privacy=dict(plan_changes=changes)))
    return dict(regime="B", model="wrn", variant=variant, switch_step=switch, seed=seed,
                target_epsilon=None if variant in ("public_only", "nonprivate") else 8.0,
                warmup_steps=None if variant in ("public_only", "nonprivate") else 20,
                test_accuracy=accuracy + 0.01 * (seed - 1), epsilon=7.98,
                switch_fired_by=table.fired_by(r["results"]) if reason else None,
                max_switch_step=cap, augmult=augmult)

  rows = [run("dp", 0.52, s, 0) for s in range(3)] + [run("dp", 0.61, s, 200) for s in range(3)]
  rows += [run("public_only", 0.38, s) for s in range(3)]
  rows += [run("nonprivate", 0.76, s) for s in range(3)]
  rows += [run("auto_plateau", 0.605, 0, 200, "reached max_switch_step 200"),
           run("auto_plateau", 0.605, 1, 200, "held-out public loss has not improved for 3 "
               "checks; reached max_switch_step 200"),
           run("auto_plateau", 0.605, 2, 160, "held-out public loss has not improved for 3 checks")]
  rows += [run("auto", 0.55, s, 80, "DP step efficiency 0.3 >= public generalisation 0")
           for s in range(3)]
  rows += [run("auto_window", 0.60, s, 240, "DP step efficiency 0.3 >= public generalisation 0.2",
               cap=350) for s in range(3)]
  # augmentation multiplicity 4: its own cells, compared with K = 1, never the best fixed switch
  rows += [run("dp", 0.56, s, 0, augmult=4) for s in range(3)]
  rows += [run("dp", 0.66, s, 200, augmult=4) for s in range(3)]
  cells = table.cells(rows)
  text = table.markdown(cells) + "\n" + "\n".join(table.claims(cells))
  assert "auto_window, cap 350 (switched at 240 240 240) vs the best fixed switch: -1.00" in text
  assert "| 200 (cap) 200 (cap+) 160 |" in text
  assert ("- B, wrn, ε = 8: best fixed switch (200) vs private-only DP: +9.00 points "
          "(summed std 2.00: holds)") in text
  assert "- B, wrn, ε = 8: best fixed switch vs public-only: +23.00 points" in text
  assert "- B, wrn, ε = 8: gap of the best fixed switch to non-private: 15.00 points" in text
  assert ("auto_plateau (switched at 200 (cap) 200 (cap+) 160) vs the best fixed switch: -0.50 "
          "points (summed std 2.00: within the spread), by seed: -0.50 -0.50 -0.50 (every seed "
          "lower); within 1 point: yes") in text
  # By seed: only the seeds both cells ran are paired; signs that disagree are "mixed".
  cell = lambda seeds, accuracies: dict(mean=0.6, std=0.1, seeds=seeds, accuracies=accuracies)
  assert table.compare(cell("0 1 2", "0.5 0.6 0.7"), cell("0 1 3", "0.6 0.5 0.9")).endswith(
      ", by seed: -10.00 +10.00 (mixed)")
  assert "by seed" not in table.compare(cell("0 1", "0.5 0.6"), cell("1 2", "0.6 0.5"))
  assert "auto (switched at 80 80 80) vs the best fixed switch: -6.00 points" in text
  assert "(summed std 2.00: reversed), by seed: -6.00 -6.00 -6.00 (every seed lower); within 1 " \
         "point: no" in text
  assert "| B | wrn | 8 | switch 200, K = 4 | 0.6600 ± 0.0100 |" in text
  assert ("- B, wrn, ε = 8: switch 200, K = 4 vs K = 1: +5.00 points (summed std 2.00: holds)"
          in text)
  assert ("- B, wrn, ε = 8: private_only (switch 0), K = 4 vs K = 1: +4.00 points (summed std "
          "2.00: holds)") in text
  table.plot(cells, rows, "B", "wrn", str(tmp_path / "b.png"))
  assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bu2024_cifar_table_reads_each_models_parts_from_one_folder(tmp_path):
  """bu2024_cifar.sh puts the ViT's sweeps beside the WRN's (B_plateau_vit beside B_plateau): the
  table reads the part's criterion and the run's model from each, and draws one figure per
  regime and model."""
  table = _experiment("bu2024_cifar_table")
  for part, model, accuracy in (("B_plateau", "wrn", 0.6), ("B_plateau_vit", "vit", 0.5)):
    folder = tmp_path / "runs" / part / "seed=0,target_epsilon=8"
    folder.mkdir(parents=True)
    (folder / "variant.json").write_text(json.dumps(dict(
        config=f"experiments/bu2024_cifar.py:auto,B,{model}", command="",
        overrides={"seed": "0", "dp.target_epsilon": "8"})))
    (folder / "results.json").write_text(json.dumps(dict(
        switch_step=80, test_accuracy=accuracy, train_seconds=1.0,
        config=dict(schedule=dict(warmup_steps=20), dp=dict(augmult=1, target_epsilon=8.0)),
        privacy=dict(epsilon=7.96, private_steps=320, noise_multiplier=0.6, plan_changes=[
            dict(step=80, reason="held-out public loss has not improved for 3 checks")]))))
  rows = table.run_rows(str(tmp_path / "runs"))
  assert [(r["model"], r["variant"], r["test_accuracy"]) for r in rows] == [
      ("wrn", "auto_plateau", 0.6), ("vit", "auto_plateau", 0.5)]
  assert [r["run"] for r in rows] == ["B_plateau/seed=0,target_epsilon=8",
                                      "B_plateau_vit/seed=0,target_epsilon=8"]
  subprocess.run([sys.executable, str(EXPERIMENTS / "bu2024_cifar_table.py"),
                  str(tmp_path / "runs"), "--out", str(tmp_path)], check=True,
                 capture_output=True)
  assert sorted(p.name for p in tmp_path.glob("*.png")) == ["accuracy_B.png", "accuracy_B_vit.png"]


def _auto_run(path, switch_step, heldout, auto=None, accuracies=None):
  """A finished automatic-switch run's files: results.json (its switch and mixing.auto config)
  and metrics.jsonl (a check record every 20 steps from `heldout`, losses as logged, NaN as the
  writer's "nan"; records after the switch from the private phase; held-out accuracies if
  given, as runs log them since the accuracy plateau)."""
  path.mkdir(parents=True)
  auto = dict(dict(criterion="plateau", check_every=20, patience=3, min_delta=0.0,
                   min_rel_delta=0.0, min_switch_step=0, max_switch_step=-1,
                   generalisation_checks=1, lookahead_steps=10), **(auto or {}))
  (path / "results.json").write_text(json.dumps(dict(switch_step=switch_step,
                                                     config=dict(mixing=dict(auto=auto)))))
  lines = [json.dumps(dict(kind="curvature", step=20 * i, heldout_loss=loss,
                           public_train_loss=1.0 - 0.01 * i, dp_efficiency="nan",
                           **({} if accuracies is None else dict(heldout_accuracy=accuracies[i]))))
           for i, loss in enumerate(heldout)]
  lines.insert(2, json.dumps(dict(kind="train", step=30, loss=9.0)))  # not a check
  (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_switch_replay_reproduces_a_run_and_reads_only_its_public_phase(tmp_path):
  """experiments/bu2024_cifar_replay.py: the run's own criterion replayed gives its switch step;
  other patiences switch where their rule says on the same records; records after the switch
  (here a drop that would reset the plateau) are not read; "nan" is a NaN, not an error."""
  replay = _experiment("bu2024_cifar_replay")
  # best at step 60; no new best at 80, 100, 120; the run switched at 120; 140: private phase.
  heldout = [2.0, 1.5, 1.2, 1.0, 1.1, 1.3, 1.05, 0.1]
  run = tmp_path / "B_plateau" / "seed=0"
  _auto_run(run, 120, heldout)
  records, switch, auto = replay.public_checks(str(run))
  assert [r["step"] for r in records] == [0, 20, 40, 60, 80, 100, 120] and switch == 120
  assert all(np.isnan(r["dp_efficiency"]) for r in records)
  assert replay.replay(records, replay.own_switch(auto)) == 120
  assert replay.replay(records, mixing.AutoSwitch(criterion="plateau", patience=2)) == 100
  assert replay.replay(records, mixing.AutoSwitch(criterion="plateau", patience=4)) is None
  table = replay.table([str(run)])
  row = table.splitlines()[2].split(" | ")
  assert row[1:3] == ["120", "120"]
  names = list(replay.RULES)
  assert row[3 + names.index("plateau, patience 2")] == "100"
  assert row[3 + names.index("plateau, patience 4")] == "> 120"
  assert row[3 + names.index("efficiency, g over 1 check")] == "> 120"  # NaN efficiency
  assert row[3 + names.index("accuracy plateau, patience 3")] == "—"  # no accuracy logged
  # With the held-out accuracy logged: still rising at 80 and 100, its last new best at 100.
  logged = tmp_path / "A_plateau" / "seed=0"
  _auto_run(logged, 120, heldout, accuracies=[0.1, 0.3, 0.5, 0.6, 0.62, 0.63, 0.63, 0.9])
  row = replay.table([str(logged)]).splitlines()[2].split(" | ")
  assert row[3 + names.index("accuracy plateau, patience 3")] == "> 120"
  assert replay.replay(replay.public_checks(str(logged))[0], mixing.AutoSwitch(
      criterion="plateau", patience=1, plateau_metric="accuracy")) == 120
  _auto_run(tmp_path / "B_plateau" / "seed=1", 100, heldout)  # a run that did not switch there
  assert "MISMATCH" in replay.table([str(tmp_path / "B_plateau" / "seed=1")])
