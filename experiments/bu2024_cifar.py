"""DP continual pre-training with limited public data (Bu et al. 2024) on cifar10_jpeg.

The paper's regime at a scale one GPU runs in minutes: a small public part, DP on the rest, the
same number of steps of the same batch size (1024) in every variant, so the same compute.

  python -m dpjax.main --config=experiments/bu2024_cifar.py:VARIANT[,REGIME[,MODEL]] --workdir=DIR

REGIME (the public part; the private part is the rest of the 50,000 training images):
  A   public = 10% of the training set, all classes
  B   public = 10% of the training set from classes 0-4 only (airplane, automobile, bird, cat,
      deer); the private part has all 10 classes, and so has the test set (the paper's analogue:
      its public ImageNet-1k lacks most of the private ImageNet-11k's classes). Default.
  C   public = 1% of the training set (500 images), all classes; a public batch of 1024 reads
      each image about twice, each copy with its own augmentation (`data.ShuffledOrder`)
VARIANT: dp (public steps, then DP from mixing.switch_step), auto (the automatic switch, public
  statistics only), private_only (DP from scratch), public_only, nonprivate (all data, no DP),
  clip_only (private only, clipping without noise: no DP guarantee; isolates clipping).
MODEL: wrn (WRN-16-4, GroupNorm, default) or vit (the CIFAR ViT: patch 4, width 384, depth 6).

What makes DP from scratch strong here (De et al. 2022, scaled to the budget): batches of 1024,
crop-and-flip augmentation with multiplicity dp.augmult, no BatchNorm, automatic clipping R = 1,
Adam with a cosine decay after a linear warm-up of WARMUP_STEPS; the whole optimizer state reset
at the switch (Adam's moments and the step counts: the warm-up and the cosine restart, as in the
main job, where resetting the first moment alone or Adam's moments alone lost to private-only DP).
The warm-up decides the result: without it, the first steps after the reset are Adam's sign-like
full-size steps on the noisy gradient, and every switch point lost to private-only DP at ε = 8
(experiments/results/bu2024_cifar/README.md). σ is calibrated with PLD so that each run ends at
dp.target_epsilon (default 8), δ = 1e-5.
"""

import ml_collections

from dpjax import config as config_lib

TOTAL_STEPS = 400
SWITCH_STEP = 100
WARMUP_STEPS = 20  # linear lr warm-up at the start and again after the switch's reset
VARIANTS = ("dp", "auto", "private_only", "public_only", "nonprivate", "clip_only")
REGIMES = {
    "A": dict(public_fraction=0.1, public_classes=()),
    "B": dict(public_fraction=0.1, public_classes=(0, 1, 2, 3, 4)),
    "C": dict(public_fraction=0.01, public_classes=()),
}
MODELS = {
    "wrn": (dict(name="wrn_16_4"), 2e-3),
    "vit": (dict(name="vit", variant="S", patch_size=4, image_size=32, depth=6), 1e-3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, regime, model = split_arg(arg, ("dp", "B", "wrn"),
                                     (("variant", VARIANTS), ("regime", REGIMES),
                                      ("model", MODELS)))
  config = base_config(regime, model)
  _apply_variant(config, variant)
  return config


def split_arg(arg: str | None, defaults: tuple[str, ...],
              known: tuple[tuple[str, object], ...]) -> list[str]:
  """The comma-separated parts of a config arg, missing ones from `defaults`; each part must be
  in its (what, choices) of `known` (ValueError naming the choices otherwise)."""
  given = (arg or defaults[0]).split(",")
  if len(given) > len(defaults):
    raise ValueError(f"Config arg {arg!r} has more than {len(defaults)} parts "
                     f"({', '.join(what for what, _ in known)}).")
  parts = given + list(defaults[len(given):])
  for value, (what, choices) in zip(parts, known):
    if value not in choices:
      raise ValueError(f"Unknown {what} {value!r}; choose one of {sorted(choices)}.")
  return parts


def base_config(regime: str, model: str) -> ml_collections.ConfigDict:
  """The study's shared setup (data split of REGIME, MODEL, DP, optimizer, 400 steps, perf) before
  a variant's schedule; experiments/finetune_cifar.py starts from it too."""
  config = config_lib.default_config()
  config.data.update(name="cifar10_jpeg", standardize=True, in_memory=True, augment="crop_flip",
                     **REGIMES[regime])
  config.model, learning_rate = MODELS[model]
  config.dp.update(clip="automatic", clip_norm=1.0, target_epsilon=8.0, delta=1e-5,
                   accountant="pld", expected_batch_size=1024, augmult=1)
  config.optimizer.update(name="adam", learning_rate=learning_rate)
  config.schedule.update(total_steps=TOTAL_STEPS, public_batch_size=1024, lr_schedule="cosine",
                         warmup_steps=WARMUP_STEPS)
  config.mixing.reset_moments = "all"
  config.perf.update(microbatch_size=512, per_example_method="ghost", dtype="bfloat16")
  config.eval.update(every_steps=200, batch_size=2000)
  config.checkpoint.every_steps = 200
  config.log_every_steps = 50
  return config


def _apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  if variant == "dp":
    config.mixing.update(schedule="switch", switch_step=SWITCH_STEP)
  elif variant == "auto":
    config.mixing.schedule = "auto"
    config.mixing.auto.update(criterion="efficiency", check_every=20, holdout_fraction=0.1,
                              max_switch_step=TOTAL_STEPS // 2)
    config.curvature.update(every_steps=20, batch_size=256, num_probes=8)
  elif variant in ("private_only", "clip_only"):
    config.mixing.update(schedule="constant", alpha=0.0)
    if variant == "clip_only":
      config.dp.update(noise_multiplier=0.0, target_epsilon=None)
  elif variant == "public_only":
    config.mixing.update(schedule="constant", alpha=1.0)
  elif variant == "nonprivate":
    config.data.update(public_fraction=1.0, public_classes=())  # everything public: no DP
    config.mixing.update(schedule="constant", alpha=1.0)
