"""The config specs: defaults in one place, unknown keys and wrong types refused, every value check,
the mixing block's per-schedule keys, the registries' names and `--help`."""

import copy
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpjax import config as config_lib
from dpjax import mixing
from dpjax.config import blocks, contrastive_block, fields, mixing_block, registries
from dpjax.config.run import RunSpec
from dpjax.train import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _base() -> dict:
  """The default config with σ set: the smallest supervised config that runs."""
  c = config_lib.default_config().to_dict()
  c["dp"]["noise_multiplier"] = 1.0
  return c


def _with(changes: dict, base: dict | None = None) -> dict:
  """`base` (default: _base()) with dotted keys set, e.g. {"dp.clip_norm": 2.0}."""
  c = copy.deepcopy(_base() if base is None else base)
  for key, value in changes.items():
    *blocks_, name = key.split(".")
    node = c
    for b in blocks_:
      node = node.setdefault(b, {})
    node[name] = value
  return c


def test_default_config_is_generated_from_the_specs_and_round_trips():
  default = config_lib.default_config()
  assert set(default) == {f.name for f in dataclasses.fields(RunSpec)} - {"contrastive"}
  # The keys once read with .get are defaults now.
  assert default.perf.row_chunk == 8 and default.perf.jacobian_chunk == 0
  assert default.dp.clip_fraction_noise == 0.0 and default.dp.insecure_reproducible_seed is None
  # Unset numbers are typed placeholders, so --config.dp.noise_multiplier=1 parses as a float.
  default.dp.noise_multiplier = 1
  assert default.dp.noise_multiplier == 1.0
  assert config_lib.parse(default) == RunSpec(dp=blocks.DPSpec(noise_multiplier=1.0))
  for name in config_lib.TRAJECTORY_BLOCKS[1:] + ("perf", "audit", "curvature", "checkpoint"):
    assert config_lib.parse_block(config_lib.default_config(), name) == RunSpec.block_type(name)()
  contrastive = config_lib.default_contrastive_block()
  assert (contrastive_block.ContrastiveSpec.from_mapping(contrastive.to_dict())
          == contrastive_block.ContrastiveSpec())
  assert "contrastive" not in default  # its presence selects the contrastive trainer


def test_a_missing_key_takes_its_default():
  c = _base()
  del c["perf"]["row_chunk"], c["audit"]
  spec = config_lib.parse(c)
  assert spec.perf.row_chunk == 8 and spec.audit == blocks.AuditSpec()


@pytest.mark.parametrize("key,reported,valid", [
    ("dp.clip_nrom", "dp.clip_nrom", "clip_norm"), ("mixin.schedule", "mixin", "mixing"),
    ("finetune.sparse.fracton", "finetune.sparse.fracton", "fraction"),
    ("mixing.switch", "mixing.switch", "switch_step"),
    ("mixing.auto.patient", "mixing.auto.patient", "patience"),
    ("contrastive.augment.hue", "contrastive.augment.hue", "brightness")])
def test_unknown_keys_are_refused_naming_the_valid_ones(key, reported, valid):
  c = _with({key: 1})
  if key.startswith("contrastive"):
    c = _with({key: 1}, _with({"contrastive": config_lib.default_contrastive_block().to_dict(),
                               "data.public_fraction": 0.0}))
  with pytest.raises(config_lib.ConfigError, match=rf"Unknown config key {reported};.*{valid}"):
    config_lib.parse(c)


@pytest.mark.parametrize("key,value,match", [
    ("dp.clip_norm", "1.0", "dp.clip_norm must be a number"),
    ("schedule.total_steps", 10.5, "schedule.total_steps must be an integer"),
    ("perf.microbatch_size", True, "perf.microbatch_size must be an integer"),
    ("data.verify", "yes", "data.verify must be True or False"),
    ("optimizer.name", 3, "optimizer.name must be a string"),
    ("dp.target_epsilon", "3", "dp.target_epsilon must be a number .*or unset"),
    ("finetune.sparse", 0.5, "finetune.sparse must be a SparseSpec"),
    ("mixing.auto.check_every", 2.0, "mixing.auto.check_every must be an integer")])
def test_wrong_types_are_refused(key, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.parse(_with({key: value}))


def test_an_int_is_a_float_where_a_float_is_expected():
  spec = config_lib.parse(_with({"dp.clip_norm": 2, "mixing.schedule": "constant",
                                 "mixing.alpha": 1}))
  assert spec.dp.clip_norm == 2.0 and isinstance(spec.dp.clip_norm, float)
  assert spec.mixing.schedule == mixing_block.ConstantSchedule(alpha=1.0)


@pytest.mark.parametrize("changes,error,match", [
    ({"data.name": "imagenet_xl"}, config_lib.ConfigError, "imagenet_xl"),
    ({"data.public_fraction": 1.5}, config_lib.ConfigError, "public_fraction"),
    ({"data.public_name": "imagenet"}, config_lib.ConfigError, "public_name"),
    ({"data.train_examples": -1}, config_lib.ConfigError, "train_examples"),
    ({"data.name": "image_folder"}, config_lib.ConfigError, "image_folder' needs data.dir"),
    ({"data.classes": ("a", "b")}, config_lib.ConfigError,
     "data.classes and data.image_shape are read only when data.name is 'image_folder'"),
    ({"data.name": "cifar10_jpeg", "data.image_shape": (32, 32, 3)}, config_lib.ConfigError,
     "cifar10_jpeg has its own"),
    ({"data.name": "image_folder", "data.dir": "/d.tar", "data.classes": ("a", "a")},
     config_lib.ConfigError, "distinct class folder names"),
    ({"data.name": "image_folder", "data.dir": "/d.tar", "data.image_shape": (8, 8)},
     config_lib.ConfigError, r"\(H, W, C\) of positive integers"),
    ({"data.name": "image_folder", "data.dir": "/d.tar", "data.standardize": True},
     config_lib.ConfigError, "computed from its \\(private\\) training images"),
    ({"data.public_name": "image_folder"}, config_lib.ConfigError, "public_name"),
    ({"data.name": "tfds:"}, config_lib.ConfigError, "data.name: Unknown dataset 'tfds:'"),
    ({"data.name": "tfds:cifar 100"}, config_lib.ConfigError, "or 'tfds:<name>'"),
    ({"data.public_name": "tfds:"}, config_lib.ConfigError, "data.public_name: Unknown"),
    ({"data.name": "tfds:cifar100", "data.standardize": True}, config_lib.ConfigError,
     "no normalisation constants for tfds:cifar100"),
    ({"data.manual_dir": "/m"}, config_lib.ConfigError, "manual_dir is read only for tfds:"),
    ({"data.augment": "blur"}, config_lib.ConfigError, "data.augment must be 'none' or"),
    ({"dp.augmult": 0}, config_lib.ConfigError, "dp.augmult must be an integer > 0"),
    ({"dp.augmult": 2}, config_lib.ConfigError, "need an augmentation: set data.augment"),
    ({"model.name": "resnet9000"}, config_lib.ConfigError, "resnet9000.*cnn_tanh"),
    ({"dp.noise_multiplier": None}, config_lib.ConfigError, "Set dp.noise_multiplier"),
    ({"dp.clip_norm": 0.0}, config_lib.ConfigError, "clip_norm"),
    ({"dp.noise_multiplier": -1.0}, config_lib.ConfigError, "noise_multiplier"),
    ({"dp.target_epsilon": 0.0}, config_lib.ConfigError, "target_epsilon"),
    ({"dp.delta": 1.0}, config_lib.ConfigError, "dp.delta"),
    ({"dp.accountant": "gdp"}, config_lib.ConfigError, "accountant must be 'pld', 'rdp'"),
    ({"dp.expected_batch_size": 0}, config_lib.ConfigError, "expected_batch_size"),
    ({"dp.sampler": "shuffle"}, config_lib.ConfigError, "sampler must be 'poisson'"),
    ({"dp.insecure_reproducible_seed": -1}, config_lib.ConfigError,
     "insecure_reproducible_seed"),
    ({"dp.clip_fraction_noise": -1.0}, config_lib.ConfigError, "clip_fraction_noise"),
    ({"dp.clip_fraction_noise": math.nan}, config_lib.ConfigError, "clip_fraction_noise"),
    ({"dp.clip_fraction_noise": math.inf}, config_lib.ConfigError, "clip_fraction_noise"),
    ({"mixing.reset_moments": "some"}, config_lib.ConfigError, "reset_moments"),
    ({"mixing.schedule": "constant", "mixing.alpha": 1.5}, mixing.AlphaOutOfRangeError,
     r"\[0, 1\]"),
    ({"mixing.switch_step": -1}, ValueError, "switch_step must be >= 0"),
    ({"mixing.schedule": "linear", "mixing.begin": 3, "mixing.until": 3}, ValueError,
     "until > begin"),
    ({"mixing.schedule": "cosine", "mixing.until": 0}, ValueError, "until > 0"),
    ({"mixing.schedule": "auto", "mixing.auto.check_every": 0}, config_lib.ConfigError,
     "check_every must be > 0"),
    ({"mixing.schedule": "auto", "mixing.auto.criterion": "vibes"}, ValueError, "criterion"),
    ({"mixing.schedule": "auto", "mixing.auto.holdout_fraction": 1.0}, config_lib.ConfigError,
     "holdout_fraction"),
    ({"mixing.schedule": "auto", "mixing.auto.plateau_metric": "error"}, config_lib.ConfigError,
     "mixing.auto.plateau_metric must be one of loss, accuracy, got 'error'"),
    ({"mixing.schedule": "sawtooth"}, config_lib.ConfigError,
     "Unknown mixing.schedule 'sawtooth'; choose 'switch', 'constant'"),
    ({"curvature.batch_size": 0}, config_lib.ConfigError, "curvature.batch_size"),
    ({"perf.microbatch_size": -1}, config_lib.ConfigError, "microbatch_size"),
    ({"perf.memory_fraction": 0.0}, config_lib.ConfigError, "memory_fraction"),
    ({"perf.dtype": "float64"}, config_lib.ConfigError, "dtype"),
    ({"perf.per_example_method": "gost"}, config_lib.ConfigError,
     "per_example_method must be 'vmap', 'ghost' or 'auto'"),
    ({"perf.row_chunk": 0}, config_lib.ConfigError, "row_chunk"),
    ({"perf.jacobian_chunk": -1}, config_lib.ConfigError, "jacobian_chunk"),
    ({"mesh.data": 0}, config_lib.ConfigError, "mesh.data"),
    ({"mesh.fsdp": 0}, config_lib.ConfigError, "mesh.fsdp"),
    ({"finetune.selection": "everything"}, config_lib.ConfigError, "finetune.selection"),
    ({"finetune.init_from_public": True}, config_lib.ConfigError, "init_from is empty"),
    ({"finetune.num_blocks": 0}, config_lib.ConfigError, "num_blocks"),
    ({"finetune.sparse.method": "lottery"}, config_lib.ConfigError, "sparse.method"),
    ({"finetune.sparse.method": "magnitude", "finetune.sparse.fraction": 0.0},
     config_lib.ConfigError, r"fraction must be in \(0, 1\]"),
    ({"finetune.sparse.method": "sparta", "finetune.sparse.selection_steps": 0},
     config_lib.ConfigError, "selection_steps > 0"),
    ({"finetune.sparse.method": "random", "mixing.switch_step": 5}, config_lib.ConfigError,
     "private steps only"),
    ({"finetune.sparse.method": "sparta", "finetune.sparse.warmup_steps": 60,
      "finetune.sparse.selection_steps": 40}, config_lib.ConfigError,
     "leaves no sparse fine-tuning step"),
    ({"optimizer.name": "adagrad"}, config_lib.ConfigError, "optimizer.name"),
    ({"optimizer.name": "adam", "optimizer.momentum": 0.5}, config_lib.ConfigError,
     "optimizer.momentum = 0.5 is read only when optimizer.name is 'sgd'"),
    ({"schedule.total_steps": 0}, config_lib.ConfigError, "total_steps must be > 0"),
    ({"schedule.lr_schedule": "step"}, config_lib.ConfigError, "lr_schedule"),
    ({"schedule.warmup_steps": 5}, config_lib.ConfigError, "lr_schedule is 'cosine'"),
    ({"schedule.public_batch_size": 0}, config_lib.ConfigError, "public_batch_size"),
    ({"eval.every_steps": 0}, config_lib.ConfigError, "every_steps must be an integer > 0"),
    ({"eval.batch_size": -1}, config_lib.ConfigError, "batch_size must be an integer > 0"),
    ({"checkpoint.every_steps": 0}, config_lib.ConfigError, "every_steps must be an integer"),
    ({"checkpoint.max_to_keep": 0}, config_lib.ConfigError, "delete every checkpoint"),
    ({"log_every_steps": 0}, config_lib.ConfigError, "log_every_steps must be an integer > 0"),
    ({"audit.canaries": -1}, config_lib.ConfigError, "audit.canaries"),
    ({"audit.kind": "gradient"}, config_lib.ConfigError, "audit.kind"),
    ({"audit.insert_into": "test"}, config_lib.ConfigError, "audit.insert_into"),
])
def test_each_value_check(changes, error, match):
  config_lib.parse(_base())
  with pytest.raises(error, match=match):
    config_lib.parse(_with(changes))


def test_tfds_names_parse_and_manual_dir_stays_out_of_the_trajectory_when_empty():
  for name in ("tfds:cifar100", "tfds:imagenet2012", "tfds:cifar10/plain:3.0.2"):
    assert config_lib.parse(_with({"data.name": name})).data.name == name
  spec = config_lib.parse(_with({"data.public_name": "tfds:cifar100",
                                 "data.manual_dir": "/m"}))
  assert (spec.data.public_name, spec.data.manual_dir) == ("tfds:cifar100", "/m")
  default = config_lib.default_config()
  assert "manual_dir" not in config_lib.trajectory_view(default)["data"]
  default.data.update(name="tfds:imagenet2012", manual_dir="/m")
  assert config_lib.trajectory_view(default)["data"]["manual_dir"] == "/m"


def test_image_folder_keys_parse_and_stay_out_of_the_trajectory_when_empty():
  spec = config_lib.parse(_with({"data.name": "image_folder", "data.dir": "/d.tgz",
                                 "data.classes": ("b", "a"), "data.image_shape": (8, 8, 3)}))
  assert (spec.data.classes, spec.data.image_shape) == (("b", "a"), (8, 8, 3))
  assert config_lib.parse(_with({"data.name": "cifar10_jpeg", "data.standardize": True}))
  default = config_lib.default_config()
  assert {"classes", "image_shape"}.isdisjoint(config_lib.trajectory_view(default)["data"])
  default.data.update(name="image_folder", dir="/d.tgz", classes=("b", "a"))
  assert config_lib.trajectory_view(default)["data"]["classes"] == ("b", "a")


def test_a_checkpoint_from_before_a_new_key_resumes_while_the_key_is_at_its_default():
  """A key the checkpoint's record lacks (added to dpjax since) matches at its default and only
  there; any other difference is named by its dotted path."""
  view = config_lib.trajectory_view(config_lib.default_config())
  old = json.loads(json.dumps(view))
  del old["mixing"]["auto"]["generalisation_checks"]  # a record written before the key
  assert config_lib.trajectory_differences(old, view) == []
  changed = config_lib.default_config()
  changed.mixing.auto.generalisation_checks = 3
  changed.optimizer.learning_rate = 0.5
  assert config_lib.trajectory_differences(old, config_lib.trajectory_view(changed)) == [
      "mixing.auto.generalisation_checks: checkpoint absent vs now 3",
      f"optimizer.learning_rate: checkpoint {view['optimizer']['learning_rate']!r} vs now 0.5"]
  # A key the current config lacks (removed, or left out of the view) is a difference.
  del view["optimizer"]["learning_rate"]
  assert config_lib.trajectory_differences(old, view) == [
      f"optimizer.learning_rate: checkpoint {old['optimizer']['learning_rate']!r} vs now absent"]


@pytest.mark.parametrize("changes,spec", [
    ({}, mixing_block.SwitchSchedule(0)),
    ({"mixing.switch_step": 200}, mixing_block.SwitchSchedule(200)),
    ({"mixing.schedule": "constant", "mixing.alpha": 0.25}, mixing_block.ConstantSchedule(0.25)),
    ({"mixing.schedule": "linear", "mixing.begin": 2, "mixing.until": 6},
     mixing_block.LinearSchedule(1.0, 0.0, 2, 6)),
    ({"mixing.schedule": "cosine", "mixing.start": 0.5, "mixing.until": 10},
     mixing_block.CosineSchedule(0.5, 0.0, 10)),
    ({"mixing.schedule": "sample_ratio"}, mixing_block.SampleRatioSchedule()),
    ({"mixing.schedule": "auto", "mixing.auto.check_every": 4},
     mixing_block.AutoSwitchSpec(check_every=4)),
])
def test_the_flat_mixing_block_parses_into_its_schedules_spec(changes, spec):
  assert config_lib.parse(_with(changes)).mixing.schedule == spec


@pytest.mark.parametrize("changes,match", [
    ({"mixing.schedule": "constant", "mixing.switch_step": 300},
     r"mixing.switch_step = 300 is read only when mixing.schedule is 'switch', but "
     r"mixing.schedule = 'constant' ignores it"),
    ({"mixing.schedule": "cosine", "mixing.begin": 2},
     "mixing.begin = 2 is read only when mixing.schedule is 'linear'"),
    ({"mixing.schedule": "switch", "mixing.start": 0.5},
     "mixing.start = 0.5 is read only when mixing.schedule is 'linear' or 'cosine'"),
    ({"mixing.schedule": "switch", "mixing.auto.check_every": 4},
     "mixing.auto.check_every = 4 is read only when mixing.schedule is 'auto'"),
    ({"mixing.schedule": "auto", "mixing.switch_step": 300}, "mixing.switch_step = 300"),
])
def test_a_changed_key_that_the_chosen_schedule_ignores_is_refused(changes, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.parse(_with(changes))


def test_keys_at_their_defaults_are_accepted_with_any_schedule():
  for name in mixing_block.SCHEDULES.names():
    assert config_lib.parse(_with({"mixing.schedule": name})).mixing.name == name
  # A default written as an int where a float is expected is still the default.
  assert config_lib.parse(_with({"mixing.start": 1})).mixing.name == "switch"


def test_the_mixing_defaults_keep_the_flat_layout_that_checkpoints_record():
  assert config_lib.default_config().mixing.to_dict() == dict(
      schedule="switch", switch_step=0, alpha=0.0, start=1.0, end=0.0, begin=0, until=1,
      reset_moments="first",
      auto=dict(criterion="plateau", check_every=25, patience=3, min_delta=0.0,
                holdout_fraction=0.1, min_switch_step=0, max_switch_step=-1,
                lookahead_steps=10, min_rel_delta=0.0, generalisation_checks=1,
                plateau_metric="accuracy"))


@pytest.mark.parametrize("registry,unknown,names", [
    (registries.OPTIMIZERS, "adagrad", "'sgd', 'adam' or 'adamw'"),
    (registries.LR_SCHEDULES, "step", "'constant' or 'cosine'"),
    (registries.SPARSE_MASKS, "lottery", "'none', 'sparta', 'magnitude' or 'random'"),
    (mixing_block.SCHEDULES, "sawtooth",
     "'switch', 'constant', 'linear', 'cosine', 'sample_ratio' or 'auto'"),
])
def test_registries_refuse_an_unknown_name_listing_the_known_ones(registry, unknown, names):
  with pytest.raises(config_lib.ConfigError,
                     match=f"Unknown {registry.key} '{unknown}'; choose {names}."):
    registry.lookup(unknown)
  assert all(registry.lookup(n) is registry.entries[n] for n in registry.names())


def test_cudnn_attention_needs_a_half_precision_compute_dtype():
  vit = {"model": {"name": "vit", "variant": "Ti", "patch_size": 4, "attention": "cudnn"}}
  with pytest.raises(config_lib.ConfigError, match="cudnn.*bfloat16 or float16 only"):
    config_lib.parse(_with({}, {**_base(), **vit}))
  assert config_lib.parse(_with({"perf.dtype": "bfloat16"}, {**_base(), **vit}))


def test_the_registries_build_what_the_config_names():
  c = ml_collections.ConfigDict(_with({"schedule.lr_schedule": "cosine",
                                       "schedule.warmup_steps": 4}))
  params = {"w": jnp.ones(2)}
  for name in registries.OPTIMIZERS.names():
    c.optimizer.name = name
    opt = state_lib.create_optimizer(c)
    updates, _ = opt.update({"w": jnp.ones(2)}, opt.init(params), params)
    assert updates["w"].shape == (2,)
  c.schedule.update(lr_schedule="constant", warmup_steps=0)
  c.optimizer.update(name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.1)
  opt = state_lib.create_optimizer(c)
  updates, _ = opt.update({"w": jnp.zeros(2)}, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1)  # −lr·(g + wd·w) with g = 0, w = 1
  c.mixing.update(schedule="sample_ratio")
  c.schedule.public_batch_size, c.dp.expected_batch_size = 256, 768
  assert state_lib.alpha_schedule(c)(0) == pytest.approx(0.25)


def test_contrastive_configs_are_checked_against_the_other_blocks():
  c = _with({"contrastive": config_lib.default_contrastive_block().to_dict(),
             "data.public_fraction": 0.0, "dp.noise_multiplier": None})
  with pytest.raises(config_lib.ConfigError, match="for a DP method"):
    config_lib.parse(c)
  for method in ("nonprivate", "random_init"):  # no noise needed, 0 steps allowed
    spec = config_lib.parse(_with({"contrastive.method": method, "schedule.total_steps": 0}, c))
    assert spec.contrastive.method == method and not spec.contrastive.private
  with pytest.raises(config_lib.ConfigError, match="microbatch_size must be > 0"):
    config_lib.parse(_with({"contrastive.method": "nonprivate", "perf.microbatch_size": 0}, c))
  for changes in ({"data.augment": "crop_flip"}, {"dp.augmult": 2}):
    with pytest.raises(config_lib.ConfigError, match="contrastive.augment"):
      config_lib.parse(_with(changes, c))


def test_augmentation_joins_the_trajectory_view_only_when_set():
  """Checkpoints from before data.augment and dp.augmult resume under their defaults; a run
  with views does not resume another's checkpoint."""
  plain = config_lib.trajectory_view(ml_collections.ConfigDict(_base()))
  assert "augment" not in plain["data"] and "augmult" not in plain["dp"]
  views = config_lib.trajectory_view(ml_collections.ConfigDict(
      _with({"data.augment": "crop_flip", "dp.augmult": 4})))
  assert views["data"]["augment"] == "crop_flip" and views["dp"]["augmult"] == 4


def test_every_key_has_a_type_a_default_and_a_meaning():
  rows = RunSpec.describe()
  assert len({k for k, _, _ in rows}) == len(rows) >= 100
  assert all(meaning for _, _, meaning in rows)
  for spec in (blocks.DPSpec, blocks.PerfSpec, mixing_block.LinearSchedule,
               contrastive_block.AugmentSpec):
    hints = fields._hints(spec)
    assert all(hints[f.name] in (int, float, str, bool, int | None, float | None)
               for f in dataclasses.fields(spec))


def test_help_exits_0_and_lists_the_config_keys_with_their_meanings():
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "dpjax.main", "--help"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  out = done.stdout
  assert "--workdir" in out and "\ndp:\n" in out and "\nmixing:\n" in out
  for line in ("  dp.clip_norm = 0.1", "  mixing.switch_step = 0", "  perf.row_chunk = 8",
               "  contrastive.method = 'logit_dp'", "  checkpoint.max_to_keep = 2"):
    assert line in out
  assert "C, the bound on one example's contribution" in out
  assert "switch: the first private step" in out
  assert config_lib.help_text() in out  # `python -m dpjax.config` prints the same


def test_the_data_pipelines_settings_are_not_part_of_the_trajectory():
  """A run may resume with more or fewer reading workers: they change how batches are read,
  never which (dpjax.data.pipeline)."""
  plain = config_lib.trajectory_view(ml_collections.ConfigDict(_base()))
  faster = config_lib.trajectory_view(ml_collections.ConfigDict(
      _with({"data.workers": 8, "data.threads": 16, "data.prefetch": 4, "data.in_memory": True})))
  assert plain == faster
  assert config_lib.trajectory_view(ml_collections.ConfigDict(
      _with({"data.public_fraction": 0.2}))) != plain


@pytest.mark.parametrize("key, value, match", [
    ("data.workers", -1, r"data.workers must be >= 0"),
    ("data.threads", 0, r"data.threads must be an integer > 0"),
    ("data.prefetch", 0, r"data.prefetch must be an integer > 0, got 0 \(steps read ahead\)"),
    ("data.public_classes", (0, 0), r"data.public_classes must be distinct labels"),
    ("data.public_classes", (-1,), r"data.public_classes must be distinct labels")])
def test_bad_data_pipeline_settings_are_refused(key, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.parse(_with({key: value}))


def test_public_classes_select_from_the_training_split_not_a_separate_public_dataset():
  with pytest.raises(config_lib.ConfigError, match="Set one of the two"):
    config_lib.parse(_with({"data.public_classes": (0, 1), "data.public_name": "mnist"}))
