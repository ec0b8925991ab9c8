"""The default experiment config and its validation; experiments override blocks of it.

Blocks (see experiments/*.py for complete examples):
  data        dataset name, data/cache dirs, public fraction or a separate public dataset,
              verify (require the official files' checksums; False accepts any well-formed files),
              train_examples (use only the first N of the training split; 0: all)
  model       name plus keyword arguments for `dpjax.models.build_model`
  dp          the privacy mechanism: clip rule and norm, noise multiplier and/or target (ε, δ),
              accountant, expected private batch size, sampler; insecure_reproducible_seed
              (unset: the mechanism's randomness is secret OS entropy, dpjax.privacy.randomness);
              clip_fraction_noise (> 0: a noisy, accounted clip fraction per private step)
  mixing      the α schedule (or the automatic switch) and whether to reset optimizer moments at
              the public→private switch
  curvature   public-data curvature statistics (tr(H), decelerator, α*) logged during training
  perf        microbatch size (0: the largest that fits in memory_fraction of the free device
              memory, dpjax.train.microbatch_size), dtype, remat, per-example method (vmap |
              ghost): never change the privacy event
  mesh        device mesh: `data` (-1: every device left) × `fsdp` (params and optimizer state
              split over it); never changes the privacy event or, beyond float rounding, the result
  distributed multi-process setup (dpjax.parallel.initialize_distributed): coordinator address,
              process count and id; empty/0/-1 = from the environment (launch/multiprocess.py,
              SLURM, Cloud TPU) or a single process
  finetune    which parameters train (dpjax.finetune): start from a trained workdir's params
              (init_from, reset_head; its privacy ledger composed into this run's unless
              init_from_public), a layer selection, and sparse row masks (SPARTA's private
              selection, or the magnitude / random baselines)
  optimizer   optax optimizer and learning rate
  schedule    number of steps, learning-rate schedule, public batch size
  eval, checkpoint
  audit       canaries for privacy audits (dpjax.audit): how many, mislabelled or noise images,
              their seed, the seed of the coin flips that insert each one, and the part (private
              or public) they join; 0 canaries (the default) changes nothing
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from dpjax.audit import canaries

# The blocks that decide the training trajectory; a checkpoint must agree with the config on them.
TRAJECTORY_BLOCKS = ("seed", "data", "model", "dp", "mixing", "finetune", "optimizer",
                     "schedule")


def default_config() -> ml_collections.ConfigDict:
  """A complete config with every field; experiments change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # train_examples: train on the first N examples of the training split only (0: all of it).
  c.data = dict(name="fashion_mnist", dir="", cache_dir="", public_fraction=0.1,
                public_name="", standardize=False, verify=True, train_examples=0)
  c.model = dict(name="cnn_tanh")
  c.dp = dict(clip="flat", clip_norm=0.1, stability=0.01,
              noise_multiplier=config_dict.placeholder(float),
              target_epsilon=config_dict.placeholder(float), delta=1e-5, accountant="pld",
              expected_batch_size=512, sampler="poisson",
              # None (keep it so): the noise and the Poisson batches come from fresh OS entropy
              # (dpjax.privacy.randomness). An int makes them reproducible, for tests and
              # debugging only: the guarantee then holds only while that int stays secret.
              insecure_reproducible_seed=config_dict.placeholder(int),
              # σ_c > 0: every private step also releases its number of clipped examples plus
              # N(0, σ_c²), logged as noisy_clip_fraction (over expected_batch_size). Accounted:
              # the step is one Gaussian of σ_eff = (σ⁻² + σ_c⁻²)^(-1/2); with target_epsilon,
              # σ_eff is calibrated and σ raised to match. 0: not released, nothing changes.
              clip_fraction_noise=0.0)
  c.mixing = dict(schedule="switch", switch_step=0, alpha=0.0, start=1.0, end=0.0, begin=0,
                  until=1, reset_moments="first",
                  # schedule="auto": public until the controller switches (dpjax.mixing.AutoSwitch)
                  auto=dict(criterion="either", check_every=25, patience=3, min_delta=0.0,
                            holdout_fraction=0.1, min_switch_step=0, max_switch_step=-1))
  # Curvature statistics on public data (dpjax.curvature), logged every `every_steps` (0: never;
  # the automatic switch computes them at its checks anyway).
  c.curvature = dict(every_steps=0, batch_size=128, num_probes=8)
  # per_example_method: "vmap" (per-example gradients) or "ghost" (ghost clipping: norms from
  # layer inputs and output gradients, dpjax.privacy.ghost; every clip rule of dp.clip).
  # microbatch_size: private examples per accumulate call; 0 = automatic, the largest power of
  # two (times the device count) up to dp.expected_batch_size whose step XLA estimates to fit in
  # memory_fraction of the free device memory (dpjax.train.microbatch_size).
  c.perf = dict(microbatch_size=128, memory_fraction=0.9, dtype="float32", remat=False,
                per_example_method="vmap")
  c.mesh = dict(data=-1, fsdp=1)
  c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1,
                       cpu_collectives="gloo")
  # sparse.method: none | sparta (warmup_steps training all selected leaves but the prunable
  # kernels, then selection_steps DP steps that only score rows, then the top `fraction` of
  # rows) | magnitude | random (rows chosen at step 0). Sparse steps count as private steps.
  # init_from: a trained workdir whose latest params training starts from. Its privacy ledger
  # (with the ledgers of the runs it started from) is composed into this run's: ε, the budget
  # guard and noise calibration all count it, and dp.target_epsilon is the total. Set
  # init_from_public=True only when that run trained on data other than this run's private set
  # (e.g. another dataset); then its ledger is not composed and the statement says so.
  c.finetune = dict(init_from="", init_from_public=False, reset_head=False, selection="all",
                    num_blocks=1, patterns="",
                    sparse=dict(method="none", fraction=0.2, warmup_steps=0, selection_steps=0))
  c.optimizer = dict(name="sgd", learning_rate=1.0, momentum=0.9, b1=0.9, b2=0.999,
                     weight_decay=0.0)
  c.schedule = dict(total_steps=100, lr_schedule="constant", warmup_steps=0,
                    public_batch_size=256)
  c.eval = dict(every_steps=50, batch_size=1000)
  c.checkpoint = dict(every_steps=100, max_to_keep=2)
  # Canaries (dpjax.audit.canaries): `canaries` examples, each inserted into `insert_into` with
  # probability 1/2 (coin flips from inclusion_seed); audit the run with `python -m dpjax.audit`.
  c.audit = dict(canaries=0, kind="mislabel", seed=0, inclusion_seed=0, insert_into="private")
  c.log_every_steps = 10
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with a clear message for configs that cannot run correctly."""
  dp = config.dp
  if dp.noise_multiplier is None and dp.target_epsilon is None:
    raise ValueError("Set dp.noise_multiplier or dp.target_epsilon (or both: then training stops "
                     "before the budget would be exceeded).")
  seed = dp.get("insecure_reproducible_seed")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
    raise ValueError(f"dp.insecure_reproducible_seed must be unset (secret randomness, the "
                     f"default) or an integer >= 0, got {seed!r}.")
  count_noise = dp.get("clip_fraction_noise", 0.0)
  if (isinstance(count_noise, bool) or not isinstance(count_noise, (int, float))
      or not math.isfinite(count_noise) or count_noise < 0):
    raise ValueError(f"dp.clip_fraction_noise (the noise std σ_c on a private step's count of "
                     f"clipped examples; 0: not released) must be a finite number >= 0, got "
                     f"{count_noise!r}.")
  if dp.sampler not in ("poisson",):
    raise ValueError(f"dp.sampler {dp.sampler!r} is not supported by the trainer; use 'poisson' "
                     "(privacy amplification by subsampling assumes it).")
  if config.mixing.reset_moments not in ("first", "all", "none"):
    raise ValueError(f"mixing.reset_moments must be 'first', 'all' or 'none', got "
                     f"{config.mixing.reset_moments!r}.")
  if config.mixing.schedule == "auto" and config.mixing.auto.check_every <= 0:
    raise ValueError("mixing.auto.check_every must be > 0.")
  if config.perf.dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"perf.dtype must be float32, bfloat16 or float16, got {config.perf.dtype!r}.")
  perf = config.perf
  if perf.per_example_method not in ("vmap", "ghost"):
    raise ValueError(f"perf.per_example_method must be 'vmap' or 'ghost', got "
                     f"{perf.per_example_method!r}.")
  if config.finetune.init_from_public and not config.finetune.init_from:
    raise ValueError("finetune.init_from_public=True declares the data of finetune.init_from's "
                     "run public, but finetune.init_from is empty: set both or neither.")
  sparse = config.finetune.sparse
  if sparse.method not in ("none", "sparta", "magnitude", "random"):
    raise ValueError(f"finetune.sparse.method must be none, sparta, magnitude or random, got "
                     f"{sparse.method!r}.")
  if sparse.method != "none":
    if not 0 < sparse.fraction <= 1:
      raise ValueError(f"finetune.sparse.fraction must be in (0, 1], got {sparse.fraction}.")
    if config.mixing.schedule != "switch" or config.mixing.switch_step != 0:
      raise ValueError("Sparse fine-tuning runs private steps only: set mixing.schedule='switch' "
                       "and mixing.switch_step=0 (pre-train on public data in a run of its own "
                       "and start from it with finetune.init_from).")
  if sparse.method == "sparta":
    if sparse.selection_steps <= 0 or sparse.warmup_steps < 0:
      raise ValueError("finetune.sparse.method='sparta' needs selection_steps > 0 (DP steps that "
                       "score rows) and warmup_steps >= 0.")
    if sparse.warmup_steps + sparse.selection_steps >= config.schedule.total_steps:
      raise ValueError(
          f"finetune.sparse: warmup_steps + selection_steps = "
          f"{sparse.warmup_steps + sparse.selection_steps} leaves no sparse fine-tuning step "
          f"within schedule.total_steps = {config.schedule.total_steps}.")
  if perf.microbatch_size < 0:
    raise ValueError(f"perf.microbatch_size must be > 0, or 0 to choose it from the free device "
                     f"memory; got {perf.microbatch_size}.")
  if not 0 < perf.memory_fraction <= 1:
    raise ValueError(f"perf.memory_fraction (the part of the free device memory an automatic "
                     f"microbatch size may use) must be in (0, 1], got {perf.memory_fraction}.")
  for name, value in (("checkpoint.every_steps", config.checkpoint.every_steps),
                      ("checkpoint.max_to_keep", config.checkpoint.max_to_keep),
                      ("eval.every_steps", config.eval.every_steps),
                      ("eval.batch_size", config.eval.batch_size),
                      ("log_every_steps", config.log_every_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be an integer > 0, got {value!r} (max_to_keep = 0 would "
                       "delete every checkpoint; an interval of 0 divides by zero).")
  if config.schedule.total_steps <= 0:
    raise ValueError(f"schedule.total_steps must be > 0, got {config.schedule.total_steps}.")
  if config.data.train_examples < 0:
    raise ValueError(f"data.train_examples must be >= 0 (0: all), got "
                     f"{config.data.train_examples}.")
  canaries.validate(config.audit)


def agreement_view(config: ml_collections.ConfigDict) -> dict:
  """What every process of a multi-process run must agree on: all but the `distributed` block."""
  return {k: v for k, v in config.to_dict().items() if k != "distributed"}


def trajectory_view(config: ml_collections.ConfigDict) -> dict:
  """The part of the config that must match for a checkpoint to be resumed (the `audit` block
  only when it inserts canaries, finetune.init_from_public only when True, dp.clip_fraction_noise
  only when it is set, so runs without them match checkpoints from before them)."""
  full = config.to_dict()
  view = {k: full[k] for k in TRAJECTORY_BLOCKS}
  if view["dp"].get("clip_fraction_noise") == 0:
    view["dp"] = {k: v for k, v in view["dp"].items() if k != "clip_fraction_noise"}
  if full.get("audit", {}).get("canaries"):
    view["audit"] = full["audit"]
  if not view["finetune"].get("init_from_public", True):  # matches checkpoints from before it
    view["finetune"] = {k: v for k, v in view["finetune"].items() if k != "init_from_public"}
  return view
