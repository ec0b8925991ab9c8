"""The config blocks of a supervised run, one frozen spec each: fields with types, defaults and
meanings, and the block's own value checks. (mixing: `mixing_block`; contrastive:
`contrastive_block`; checks across blocks: `run.RunSpec`.)"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from dpjax import finetune, models
from dpjax.audit import canaries as canaries_lib
from dpjax.config import registries
from dpjax.config.fields import (INTERVAL, Spec, check, check_at_least, check_positive_int,
                                 field, refuse_unread)
from dpjax.data import specs as data_specs
from dpjax.data import views
from dpjax.privacy import accounting


@dataclasses.dataclass(frozen=True)
class DataSpec(Spec):
  BLOCK: ClassVar[str] = "data"
  name: str = field("fashion_mnist", "the dataset trained on: "
                                     f"{', '.join(data_specs.KNOWN_DATASETS)} (image_folder: the "
                                     "folder or archive data.dir names), or tfds:<name> for a TFDS "
                                     "image-classification dataset (tfds:cifar100, "
                                     "tfds:<name>/<config>:<version>) read from the TFDS data_dir")
  dir: str = field("", "folder of the original files ('': $DPJAX_DATA_DIR, system folders); for "
                       "image_folder the folder or .tar/.tar.gz/.tgz/.zip archive of "
                       "train/<class>/*.jpg (.jpeg, .png) and test/<class>/*.jpg; for tfds: names "
                       "the TFDS data_dir ('': TFDS's default)")
  manual_dir: str = field("", "tfds: names: folder of the files TFDS cannot download "
                              "(imagenet2012's tars; '': <data_dir>/downloads/manual)")
  cache_dir: str = field("", "dataset cache root ('': $DPJAX_CACHE_DIR or ~/.cache/dpjax)")
  classes: tuple = field((), "image_folder: class folder names in label order (empty: the sorted "
                             "folder names)")
  image_shape: tuple = field((), "image_folder: the (H, W, C) every image must have (empty: the "
                                 "first image's)")
  public_fraction: float = field(0.1, "part of the training split that is public (the rest is "
                                      "private)")
  public_name: str = field("", "a separate public dataset ('': public_fraction of data.name's "
                               "training split)")
  public_classes: tuple = field((), "labels the public part is drawn from (empty: all); the "
                                    "split then reads the labels, so it simulates a public "
                                    "dataset given beforehand (dpjax.data.splits)")
  in_memory: bool = field(False, "decode the training split into host memory once at the start "
                                 "(N·H·W·C bytes: 150 MB for CIFAR-10), so the pipeline only "
                                 "indexes arrays")
  standardize: bool = field(False, "standardise images with the dataset's mean and std (else "
                                   "scale to [0, 1]); not for image_folder, whose statistics are "
                                   "private")
  verify: bool = field(True, "require the official files' checksums (False: any well-formed "
                             "files; image_folder has none)")
  train_examples: int = field(0, "train on the first N examples of the training split only "
                                 "(0: all)")
  workers: int = field(0, "grain worker processes that read, decode and preprocess batches "
                          "(0: threads of the training process only)")
  threads: int = field(4, "reading threads per process of the data pipeline")
  prefetch: int = field(2, "steps the data pipeline reads ahead")
  augment: str = field("none", "augmentation of training examples (public and private; never "
                               "at evaluation), on the device: crop_flip = random crop of the "
                               "image mirror-padded by 4 pixels + horizontal flip "
                               "(dpjax.data.views)", ("none",) + tuple(views.AUGMENTATIONS))

  def check(self):
    check(0 <= self.public_fraction <= 1,
          f"data.public_fraction must be in [0, 1], got {self.public_fraction}.")
    _check_dataset_name("data.name", self.name)
    check(all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
              for c in self.public_classes)
          and len(set(self.public_classes)) == len(self.public_classes),
          f"data.public_classes must be distinct labels (ints >= 0), got {self.public_classes!r}.")
    check(not (self.public_classes and self.public_name),
          "data.public_classes selects the public part of data.name's training split; with a "
          "separate data.public_name there is nothing to select. Set one of the two.")
    if self.public_name:
      check(self.public_name != "image_folder", "data.public_name cannot be 'image_folder' "
                                                "(data.dir names the image folder of data.name).")
      _check_dataset_name("data.public_name", self.public_name)
    check(not self.manual_dir or bool(data_specs.tfds_name(self.name)
                                      or data_specs.tfds_name(self.public_name)),
          "data.manual_dir is read only for tfds: datasets; leave it empty.")
    check(not (self.standardize and data_specs.tfds_name(self.name)),
          f"data.standardize=True: dpjax has no normalisation constants for {self.name}. "
          "Leave data.standardize False (images scaled to [0, 1]).")
    check(self.train_examples >= 0,
          f"data.train_examples must be >= 0 (0: all), got {self.train_examples}.")
    check_at_least("data.workers", self.workers, 0, " (0: no worker processes)")
    check_positive_int("data.threads", self.threads)
    check_positive_int("data.prefetch", self.prefetch, "steps read ahead")
    if self.name == "image_folder":
      self._check_image_folder()
    else:
      check(not self.classes and not self.image_shape,
            f"data.classes and data.image_shape are read only when data.name is 'image_folder'; "
            f"{self.name} has its own. Leave them empty.")

  def _check_image_folder(self):
    check(bool(self.dir), "data.name = 'image_folder' needs data.dir: the folder or archive "
                          "(.tar, .tar.gz, .tgz, .zip) holding train/<class>/ images.")
    check(all(isinstance(c, str) and c for c in self.classes)
          and len(set(self.classes)) == len(self.classes),
          f"data.classes must be distinct class folder names, got {self.classes!r}.")
    check(self.image_shape == () or (len(self.image_shape) == 3 and all(
        isinstance(d, int) and d > 0 for d in self.image_shape)),
          f"data.image_shape must be empty or (H, W, C) of positive integers, got "
          f"{self.image_shape!r}.")
    check(not self.standardize,
          "data.standardize=True would standardise with the image folder's mean and std, which "
          "are computed from its (private) training images: a release the DP guarantee does not "
          "cover. Leave data.standardize False (images scaled to [0, 1]).")


def _check_dataset_name(path: str, name: str) -> None:
  """ConfigError unless `name` is a dataset dpjax can load (`data_specs.check_name`)."""
  try:
    data_specs.check_name(name)
  except ValueError as e:
    check(False, f"{path}: {e}")


@dataclasses.dataclass(frozen=True)
class ModelSpec(Spec):
  """name, plus keyword arguments for `dpjax.models.build_model` (`kwargs`, written flat in the
  block: `config.model = dict(name="vit", variant="Ti", patch_size=4)`)."""
  BLOCK: ClassVar[str] = "model"
  name: str = field("cnn_tanh", "the model (dpjax/models/registry.py); the block's other keys "
                                "are its keyword arguments")
  kwargs: dict = field({}, "keyword arguments of the model builder")

  def check(self):
    check(self.name in models.model_names(),
          f"Unknown model.name {self.name!r}; known names: {', '.join(models.model_names())}.")

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> ModelSpec:
    values = dict(values)
    return cls(name=values.pop("name", "cnn_tanh"), kwargs=values)

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    return {"name": "cnn_tanh"}

  @classmethod
  def describe(cls) -> list[tuple[str, Any, str]]:
    return super().describe()[:1]


@dataclasses.dataclass(frozen=True)
class DPSpec(Spec):
  BLOCK: ClassVar[str] = "dp"
  clip: str = field("flat", "clip rule: flat, per_layer, automatic or normalized "
                            "(dpjax.privacy.clipping)")
  clip_norm: float = field(0.1, "C, the bound on one example's contribution")
  stability: float = field(0.01, "γ of the automatic and normalized clip rules")
  noise_multiplier: float | None = field(None, "σ (unset: calibrated to target_epsilon)")
  target_epsilon: float | None = field(None, "ε to calibrate σ to, and the budget training stops "
                                             "at")
  delta: float = field(1e-5, "δ of the guarantee")
  accountant: str = field("pld", "privacy accountant", accounting.ACCOUNTANTS)
  expected_batch_size: int = field(512, "expected private batch size (Poisson rate q = this / N)")
  sampler: str = field("poisson", "how private batches are drawn (amplification by subsampling "
                                  "assumes Poisson)", ("poisson",))
  insecure_reproducible_seed: int | None = field(
      None, "unset: the noise and batches come from secret OS entropy; an integer makes them "
            "reproducible (tests, debugging only: the guarantee then holds only while it stays "
            "secret)")
  clip_fraction_noise: float = field(
      0.0, "σ_c > 0: each private step also releases its clipped count + N(0, σ_c²), accounted "
           "(σ raised to keep ε); 0: not released")
  constant_time: bool = field(
      False, "pad every private step's Poisson batch to one fixed capacity (its size's "
             "1 - 2^-64 quantile, in whole microbatches) and read every row, so that a step's "
             "work and time do not follow its batch size, which is private; the capacity's "
             "overflow probability is added to δ (sampling.timing_delta). Off: a step runs "
             "ceil(|B|/m) microbatches, and its time (train_seconds too) depends on |B|")
  augmult: int = field(1, "augmentation multiplicity K (De et al. 2022): each example's loss "
                          "is the mean over K views (data.augment), so its gradient, averaged "
                          "over them, is clipped once: sensitivity, noise and ε unchanged; costs "
                          "K forward/backward passes per example (public steps too)")

  def check(self):
    check(math.isfinite(self.clip_norm) and self.clip_norm > 0,
          f"dp.clip_norm must be > 0, got {self.clip_norm}.")
    if self.noise_multiplier is not None:
      check_at_least("dp.noise_multiplier", self.noise_multiplier, 0.0)
    if self.target_epsilon is not None:
      check(self.target_epsilon > 0, f"dp.target_epsilon must be > 0, got {self.target_epsilon}.")
    check(0 < self.delta < 1, f"dp.delta must be in (0, 1), got {self.delta}.")
    check(self.expected_batch_size > 0,
          f"dp.expected_batch_size must be > 0, got {self.expected_batch_size}.")
    seed = self.insecure_reproducible_seed
    check(seed is None or seed >= 0,
          f"dp.insecure_reproducible_seed must be unset (secret randomness, the default) or an "
          f"integer >= 0, got {seed!r}.")
    check(math.isfinite(self.clip_fraction_noise) and self.clip_fraction_noise >= 0,
          f"dp.clip_fraction_noise (the noise std σ_c on a private step's count of clipped "
          f"examples; 0: not released) must be a finite number >= 0, got "
          f"{self.clip_fraction_noise!r}.")
    check_positive_int("dp.augmult", self.augmult, "views per example")
    check(isinstance(self.constant_time, bool),
          f"dp.constant_time must be True or False, got {self.constant_time!r}.")


@dataclasses.dataclass(frozen=True)
class CurvatureSpec(Spec):
  BLOCK: ClassVar[str] = "curvature"
  every_steps: int = field(0, "log public-data curvature statistics (tr(H), decelerator, α*) "
                              "every N steps (0: never; the automatic switch computes them at its "
                              "checks anyway when its criterion reads them: improvement, either, "
                              "efficiency)")
  batch_size: int = field(128, "public examples per curvature estimate")
  num_probes: int = field(8, "Hutchinson probes per tr(H) estimate")

  def check(self):
    check_at_least("curvature.every_steps", self.every_steps, 0)
    check_positive_int("curvature.batch_size", self.batch_size)
    check_positive_int("curvature.num_probes", self.num_probes)


@dataclasses.dataclass(frozen=True)
class PerfSpec(Spec):
  """Performance settings: they never change the privacy event."""
  BLOCK: ClassVar[str] = "perf"
  microbatch_size: int = field(
      128, "private examples per accumulate call; 0: the largest power of two (times the devices) "
           "whose step fits in memory_fraction of the free memory (supervised trainer only)")
  memory_fraction: float = field(0.9, "part of the free device memory an automatic microbatch "
                                      "size may use")
  dtype: str = field("float32", "compute dtype of the forward and backward passes",
                     ("float32", "bfloat16", "float16"))
  remat: bool = field(False, "rematerialise activations in the backward pass")
  per_example_method: str = field("auto", "per-example gradients (vmap), ghost clipping "
                                          "(dpjax.privacy.ghost), or auto: ghost where the model "
                                          "keeps examples apart, else vmap "
                                          "(dpjax.train.per_example)", ("vmap", "ghost", "auto"))
  row_chunk: int = field(8, "contrastive: pair-gradient norms are formed this many rows at a "
                            "time")
  jacobian_chunk: int = field(0, "contrastive: embedding Jacobians this many views at a time "
                                 "(0: all at once)")

  def check(self):
    check(self.microbatch_size >= 0,
          f"perf.microbatch_size must be > 0, or 0 to choose it from the free device memory; got "
          f"{self.microbatch_size}.")
    check(0 < self.memory_fraction <= 1,
          f"perf.memory_fraction (the part of the free device memory an automatic microbatch size "
          f"may use) must be in (0, 1], got {self.memory_fraction}.")
    check_positive_int("perf.row_chunk", self.row_chunk)
    check_at_least("perf.jacobian_chunk", self.jacobian_chunk, 0, " (0: all at once)")


@dataclasses.dataclass(frozen=True)
class MeshSpec(Spec):
  """The device mesh: never changes the privacy event or, beyond float rounding, the result."""
  BLOCK: ClassVar[str] = "mesh"
  data: int = field(-1, "devices the batch is split over (-1: every device left)")
  fsdp: int = field(1, "devices params and optimizer state are split over")

  def check(self):
    check(self.data == -1 or self.data > 0, f"mesh.data must be -1 or > 0, got {self.data}.")
    check_positive_int("mesh.fsdp", self.fsdp)


@dataclasses.dataclass(frozen=True)
class DistributedSpec(Spec):
  """Multi-process setup (dpjax.parallel.initialize_distributed); empty / 0 / -1: from the
  environment (launch/multiprocess.py, SLURM, Cloud TPU) or a single process."""
  BLOCK: ClassVar[str] = "distributed"
  coordinator_address: str = field("", "host:port of process 0 ('': from the environment)")
  num_processes: int = field(0, "number of processes (0: from the environment)")
  process_id: int = field(-1, "this process's index (-1: from the environment)")
  cpu_collectives: str = field("gloo", "collectives implementation of CPU processes")


@dataclasses.dataclass(frozen=True)
class SparseSpec(Spec):
  BLOCK: ClassVar[str] = "finetune.sparse"
  method: str = field("none", "sparse row masks: sparta (DP selection after warm-up), magnitude "
                              "or random (rows chosen at step 0)", registries.SPARSE_MASKS)
  fraction: float = field(0.2, "the part of each kernel's rows that trains")
  warmup_steps: int = field(0, "sparta: steps training all selected leaves but the prunable "
                               "kernels")
  selection_steps: int = field(0, "sparta: DP steps that only score rows")

  def check(self):
    if self.method != "none":
      check(0 < self.fraction <= 1,
            f"finetune.sparse.fraction must be in (0, 1], got {self.fraction}.")
    if self.method == "sparta":
      check(self.selection_steps > 0 and self.warmup_steps >= 0,
            "finetune.sparse.method='sparta' needs selection_steps > 0 (DP steps that score "
            "rows) and warmup_steps >= 0.")


@dataclasses.dataclass(frozen=True)
class FinetuneSpec(Spec):
  BLOCK: ClassVar[str] = "finetune"
  init_from: str = field("", "a trained workdir whose latest params training starts from; its "
                             "privacy ledger is composed into this run's")
  init_from_public: bool = field(False, "init_from's run trained on data other than this run's "
                                        "private set: its ledger is not composed")
  reset_head: bool = field(False, "re-initialise the head after loading init_from")
  selection: str = field("all", "which parameters train (dpjax.finetune.select)",
                         finetune.SELECTIONS)
  num_blocks: int = field(1, "last_blocks: how many blocks train")
  patterns: str = field("", "patterns: comma-separated regexes of the 'a/b/c' paths that train")
  sparse: SparseSpec = field(SparseSpec(), "sparse fine-tuning")

  def check(self):
    check(not self.init_from_public or self.init_from,
          "finetune.init_from_public=True declares the data of finetune.init_from's run public, "
          "but finetune.init_from is empty: set both or neither.")
    check_positive_int("finetune.num_blocks", self.num_blocks)


def _refuse_unread(spec: Spec, key: str, chosen: str, registry) -> None:
  """refuse_unread for a block whose entry (registry's name `chosen`) reads some of its fields."""
  readers: dict[str, list[str]] = {}
  for name, entry in registry.entries.items():
    for read in entry.reads:
      readers.setdefault(read, []).append(name)
  defaults = {f.name: f.default for f in dataclasses.fields(spec)}
  refuse_unread(spec.path(key), chosen, {k: getattr(spec, k) for k in readers}, defaults, readers)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec(Spec):
  BLOCK: ClassVar[str] = "optimizer"
  name: str = field("sgd", "optax optimizer", registries.OPTIMIZERS)
  learning_rate: float = field(1.0, "(peak) learning rate")
  momentum: float = field(0.9, "sgd: momentum (0: none)")
  b1: float = field(0.9, "adam, adamw: first-moment decay")
  b2: float = field(0.999, "adam, adamw: second-moment decay")
  weight_decay: float = field(0.0, "sgd, adamw: weight decay")

  def check(self):
    _refuse_unread(self, "name", self.name, registries.OPTIMIZERS)


@dataclasses.dataclass(frozen=True)
class ScheduleSpec(Spec):
  BLOCK: ClassVar[str] = "schedule"
  total_steps: int = field(100, "training steps (public and private)")
  lr_schedule: str = field("constant", "learning-rate schedule", registries.LR_SCHEDULES)
  warmup_steps: int = field(0, "cosine: linear warm-up steps (again after a switch with "
                                   "mixing.reset_moments=all)")
  public_batch_size: int = field(256, "public examples per step")

  def check(self):
    check(self.total_steps >= 0, "schedule.total_steps must be >= 0.")
    check_at_least("schedule.warmup_steps", self.warmup_steps, 0)
    check_positive_int("schedule.public_batch_size", self.public_batch_size)
    _refuse_unread(self, "lr_schedule", self.lr_schedule, registries.LR_SCHEDULES)


@dataclasses.dataclass(frozen=True)
class EvalSpec(Spec):
  BLOCK: ClassVar[str] = "eval"
  every_steps: int = field(50, "evaluate on the test set every N steps")
  batch_size: int = field(1000, "test examples per evaluation batch")

  def check(self):
    check_positive_int("eval.every_steps", self.every_steps, INTERVAL)
    check_positive_int("eval.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec(Spec):
  BLOCK: ClassVar[str] = "checkpoint"
  every_steps: int = field(100, "save a checkpoint every N steps (and at the end)")
  max_to_keep: int = field(2, "checkpoints kept")

  def check(self):
    check_positive_int("checkpoint.every_steps", self.every_steps, INTERVAL)
    check_positive_int("checkpoint.max_to_keep", self.max_to_keep,
                       "0 would delete every checkpoint")


@dataclasses.dataclass(frozen=True)
class AuditSpec(Spec):
  """Canaries for privacy audits (dpjax.audit); 0 canaries (the default) changes nothing."""
  BLOCK: ClassVar[str] = "audit"
  canaries: int = field(0, "canaries, each inserted with probability 1/2 (audit the run with "
                           "python -m dpjax.audit)")
  kind: str = field("mislabel", "mislabelled training images or uniform-noise images",
                    canaries_lib.KINDS)
  seed: int = field(0, "seed of the canary set")
  inclusion_seed: int = field(0, "seed of the coin flips that insert each canary (shadow runs "
                                 "change it)")
  insert_into: str = field("private", "the part the inserted canaries join", canaries_lib.PARTS)

  def check(self):
    check(self.canaries >= 0, f"audit.canaries must be >= 0, got {self.canaries}.")

