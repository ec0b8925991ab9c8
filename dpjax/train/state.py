"""Building a run's pieces from its config: data, α schedule, model and params, optimizer."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import config as config_lib
from dpjax import data, finetune, mixing, models
from dpjax.audit import canaries as canaries_lib
from dpjax.config import registries
from dpjax.privacy import accounting
from dpjax.train import checkpoint


@dataclasses.dataclass(frozen=True)
class TrainingData:
  """A run's data: the public/private training parts (with any inserted canaries appended to
  the part `config.audit.insert_into` names), the test set, and the canaries (None without)."""
  parts: data.PublicPrivate
  test: data.Dataset
  canaries: canaries_lib.Canaries | None


def load_split(config: ml_collections.ConfigDict, name: str, split: str) -> data.Dataset:
  """Split `split` of dataset `name` where and as the config's data block says: data.dir (for an
  image folder its folder or archive, then no other dataset's), data.cache_dir, data.verify, and
  an image folder's data.classes and data.image_shape, a TFDS dataset's data.manual_dir."""
  c = config.data
  if name == "image_folder":
    return data.load_dataset(name, split, c.dir, c.cache_dir or None, verify=c.verify,
                             classes=tuple(c.classes) or None,
                             image_shape=tuple(c.image_shape) or None)
  directory = None if c.name == "image_folder" else c.dir or None
  manual_dir = (c.manual_dir or None) if data.specs.tfds_name(name) else None
  return data.load_dataset(name, split, directory, c.cache_dir or None, verify=c.verify,
                           manual_dir=manual_dir)


def load_training_data(config: ml_collections.ConfigDict) -> TrainingData:
  """Loads the config's datasets, keeps the first data.train_examples training examples (all if
  0), takes out canaries (config.audit) and splits the rest."""
  c = config.data
  load = lambda name, split: load_split(config, name, split)
  train = load(c.name, "train")
  if c.train_examples:
    if c.train_examples > len(train):
      raise ValueError(f"data.train_examples = {c.train_examples} exceeds the {len(train)} "
                       f"examples of {c.name}'s training split.")
    train = train.subset(np.arange(c.train_examples), f"first {c.train_examples}")
  if c.in_memory:
    train = data.in_memory(train)
  train, canaries = canaries_lib.take_canaries(train, config.audit)
  if c.public_name:
    parts = data.pair_datasets(load(c.public_name, "train"), train)
  else:
    parts = data.split_dataset(train, c.public_fraction, config.seed, tuple(c.public_classes))
  if canaries is not None:
    parts = dataclasses.replace(parts, **{canaries.part: canaries_lib.insert(
        getattr(parts, canaries.part), canaries)})
  return TrainingData(parts, load(c.name, "test"), canaries)


def accounting_size(loaded: TrainingData) -> int:
  """The private set size N that the sampling rate q = expected_batch_size / N is computed from.

  Its real size, except that canaries inserted into it count as ⌊m/2⌋, their expected number:
  then q (and the noise calibrated from it) does not depend on the canaries' coin flips, so
  adding or removing a canary changes the data and nothing else, as the DP analysis (and the
  one-run audit's theorem) assume.
  """
  size = len(loaded.parts.private)
  c = loaded.canaries
  if c is not None and c.part == "private":
    size += len(c) // 2 - int(c.included.sum())
  return size


def load_data(config: ml_collections.ConfigDict) -> tuple[data.PublicPrivate, data.Dataset]:
  """(public/private training parts, test set). The test set is used for evaluation only."""
  loaded = load_training_data(config)
  return loaded.parts, loaded.test


def alpha_schedule(config: ml_collections.ConfigDict) -> mixing.AlphaSchedule:
  """The config's α schedule (`config.mixing`, parsed into its schedule's spec), evaluated at
  every step once so that a bad α fails now, not mid-run."""
  spec = config_lib.parse_block(config, "mixing").schedule
  schedule = spec.build(config.schedule.public_batch_size, config.dp.expected_batch_size)
  if not isinstance(schedule, mixing.AutoSwitch):
    for step in range(config.schedule.total_steps):
      schedule(step)
  return schedule


def create_model(config: ml_collections.ConfigDict, dataset: data.Dataset) -> tuple[Any, Any]:
  """(model, params) for `dataset`'s image shape and classes; refuses models with BatchNorm."""
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  model = models.build_model(config.model.name, num_classes=dataset.num_classes,
                             input_shape=dataset.image_shape, **kwargs)
  variables = jax.jit(model.init)(jax.random.PRNGKey(config.seed),
                                  jnp.zeros((1,) + dataset.image_shape, jnp.float32))
  models.assert_dp_compatible(model, variables)
  return model, variables["params"]


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer `optimizer.name` with the learning rate of `schedule.lr_schedule`."""
  o = config_lib.parse_block(config, "optimizer")
  s = config_lib.parse_block(config, "schedule")
  lr = registries.LR_SCHEDULES.lookup(s.lr_schedule).build(o.learning_rate, s)
  return registries.OPTIMIZERS.lookup(o.name).build(lr, o)


def preprocessor(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [..., C] -> float32: [0, 1], or standardised with the dataset's constants."""
  if config.data.standardize:  # a partial, not a lambda: the pipeline's workers unpickle it
    return functools.partial(data.standardize, name=config.data.name)
  return data.to_float


def module_order(model: Any, params: Any, dataset: data.Dataset) -> list[str]:
  """The model's top-level modules in forward-pass order (`finetune.call_order`)."""
  return finetune.call_order(model, params, jnp.zeros((1,) + dataset.image_shape, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Source:
  """The run that `finetune.init_from` starts from, as far as privacy goes (public facts only).

  ledger: its ledger at `step`, its own prior included, when it took private steps on data not
  declared public; None when declared public (finetune.init_from_public) or it took none. A run
  starting from it composes this ledger into its own (`starting_ledger`).
  delta: the δ of its plan (None when declared public).
  """
  workdir: str
  step: int | None
  declared_public: bool
  ledger: accounting.PrivacyLedger | None
  delta: float | None


def read_source(config: ml_collections.ConfigDict) -> Source | None:
  """`finetune.init_from`'s source (None without one), from its latest checkpoint's record.

  Refuses a source whose δ is above this run's (the composition is stated at this run's δ), and,
  when dp.target_epsilon is set, a source that already spends it: the target is the total budget.
  """
  f, dp = config.finetune, config.dp
  if not f.init_from:
    return None
  if f.init_from_public:
    return Source(f.init_from, None, True, None, None)
  step, record = checkpoint.source_record(f.init_from)
  check_same_split(config, record.get("config"), f.init_from)
  if "ledger" not in record or "delta" not in (record.get("plan") or {}):
    raise checkpoint.CheckpointError(
        f"The checkpoint of {f.init_from} (step {step}) holds no privacy ledger and plan, so the "
        "private data its run trained on cannot be composed into this run's guarantee. If that "
        "run trained on public data only, set finetune.init_from_public=True.")
  ledger = accounting.PrivacyLedger.from_json(record["ledger"])
  delta = float(record["plan"]["delta"])
  if not ledger.total_private_steps:
    return Source(f.init_from, step, False, None, delta)
  if delta > dp.delta:
    raise ValueError(
        f"finetune.init_from = {f.init_from} was trained at δ = {delta:g}, above this run's "
        f"dp.delta = {dp.delta:g}; the composed guarantee is stated at this run's δ, which must "
        "be at least the source's. Raise dp.delta, or, if the source trained on other (public) "
        "data, set finetune.init_from_public=True.")
  spent = ledger.epsilon(dp.delta, dp.accountant)
  if dp.target_epsilon is not None and spent >= dp.target_epsilon:
    raise ValueError(
        f"finetune.init_from = {f.init_from} already spent ε = {spent:.4f} at δ = {dp.delta:g} "
        f"({dp.accountant}; {ledger.total_private_steps} private steps), which is not below "
        f"dp.target_epsilon = {dp.target_epsilon}: the target is the total budget of the composed "
        "guarantee, so nothing is left for this run. Raise dp.target_epsilon, or, if the source "
        "trained on other data than this run's private set, set finetune.init_from_public=True.")
  return Source(f.init_from, step, False, ledger, delta)


SPLIT_KEYS = ("public_fraction", "public_classes", "train_examples")  # with seed: the split


def check_same_split(config: ml_collections.ConfigDict, source_config: dict | None,
                     workdir: str) -> None:
  """Refuses a source that trained on the public part of this run's dataset split otherwise.

  The source saw its public part without DP; this run's guarantee covers its private part only if
  the two are disjoint, which holds when both split data.name alike (the split is a function of
  seed, data.public_fraction, data.public_classes, data.train_examples and the labels,
  `data.splits`). A source of another dataset (or of a separate data.public_name), or one
  declared public (checked before this), is not compared. source_config: the source checkpoint's
  config (`config.trajectory_view`; None for checkpoints without one: not checked).
  """
  if source_config is None:
    return
  theirs, ours = source_config.get("data", {}), config.data
  if theirs.get("name") != ours.name or theirs.get("public_name") or not theirs.get(
      "public_fraction"):
    return
  split = lambda seed, get: (seed, *(tuple(v) if isinstance(v, (list, tuple)) else v
                                     for v in map(get, SPLIT_KEYS)))
  defaults = config_lib.RunSpec.defaults()["data"]
  source_split = split(source_config.get("seed"), lambda k: theirs.get(k, defaults[k]))
  this_split = split(config.seed, lambda k: ours[k])
  if source_split != this_split:
    names = ("seed",) + tuple(f"data.{k}" for k in SPLIT_KEYS)
    show = lambda values: ", ".join(f"{n}={v!r}" for n, v in zip(names, values))
    raise ValueError(
        f"finetune.init_from = {workdir} trained on the public part of {ours.name} split with "
        f"{show(source_split)}; this run splits it with {show(this_split)}, so its private part "
        "can hold examples that run saw without DP. Start from a run split the same way (the "
        "same seed: launch/sweep.py --set=finetune.init_from=DIR/seed={seed}), or, if its data "
        "is public for this run, set finetune.init_from_public=True.")


def finetune_start(config: ml_collections.ConfigDict, params: Any, order: list[str]
                   ) -> tuple[Any, Source | None]:
  """(params, source): the params training starts from, `finetune.init_from`'s (a trained
  workdir) with the head re-initialised if finetune.reset_head, else `params` unchanged; and the
  source's privacy record (`read_source`), read from the same checkpoint step."""
  f = config.finetune
  if not f.init_from:
    return params, None
  source = read_source(config)
  head = finetune.head_module(params, order)
  return checkpoint.restore_params(f.init_from, params,
                                   keep_template=lambda m: f.reset_head and m == head,
                                   step=source.step), source


def starting_ledger(source: Source | None) -> accounting.PrivacyLedger:
  """The ledger of a run at step 0: empty, with the source's ledger (if any) as its prior."""
  return accounting.PrivacyLedger(prior=source.ledger if source is not None else None)


def check_resumed_prior(ledger: accounting.PrivacyLedger, source: Source | None) -> None:
  """A resumed run's ledger must hold the prior its source holds now: its params, noise and
  budget were planned with it. Raises CheckpointError otherwise."""
  expected = source.ledger if source is not None else None
  if ledger.prior != expected:
    count = lambda l: l.total_private_steps if l is not None else 0
    raise checkpoint.CheckpointError(
        f"This run's checkpoint composes {count(ledger.prior)} private steps from the run it "
        f"started from, but finetune.init_from now holds {count(expected)} (that run trained "
        "further, or this checkpoint was written before runs composed their source's ledger). "
        "Use a new --workdir to start afresh from the source as it is now.")


def composition_record(source: Source, ledger: accounting.PrivacyLedger, delta: float,
                       accountant: str) -> dict[str, Any]:
  """What a statement says about the source: declared public, or its private steps and their ε
  alone (at this run's δ, the δ of the composition)."""
  if source.declared_public:
    return dict(workdir=source.workdir, declared_public=True)
  prior = ledger.prior
  return dict(workdir=source.workdir, declared_public=False,
              private_steps=prior.total_private_steps if prior is not None else 0,
              epsilon_alone=prior.epsilon(delta, accountant) if prior is not None else 0.0,
              source_delta=source.delta, composed_at_delta=delta)


@dataclasses.dataclass(frozen=True)
class FineTuning:
  """What trains: the leaf selection (bool pytree), trainable (None when every leaf is
  selected), the initial element mask (None: no restriction) and whether per-example gradients
  are element-masked (sparse methods)."""
  order: list[str]
  selection: Any
  trainable: Any | None
  initial_mask: Any | None
  masked: bool


def finetuning(config: ml_collections.ConfigDict, params: Any, order: list[str]) -> FineTuning:
  f = config_lib.parse_block(config, "finetune")
  selection = finetune.select(params, f.selection, f.num_blocks, f.patterns, order)
  trainable = None if all(jax.tree_util.tree_leaves(selection)) else selection
  mask = registries.SPARSE_MASKS.lookup(f.sparse.method).build(params, selection, trainable,
                                                              order, f.sparse, config.seed)
  if mask is not None and f.sparse.method != "none":
    finetune.check_row_masks(mask)  # the DP step's ghost path keeps them factored
  return FineTuning(order, selection, trainable, mask, f.sparse.method != "none")


def create_training_optimizer(config: ml_collections.ConfigDict, tuning: FineTuning
                              ) -> optax.GradientTransformation:
  """The config's optimizer, followed by `finetune.mask_updates` when fine-tuning restricts it."""
  optimizer = create_optimizer(config)
  if tuning.initial_mask is None:
    return optimizer
  return optax.chain(optimizer, finetune.mask_updates(tuning.initial_mask))
