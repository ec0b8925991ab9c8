"""DP continual pre-training with limited public data (Bu et al. 2024), at small scale.

Public-only steps first (α = 1, no privacy cost), then DP steps on the private data (α = 0) to the
target ε (default 3 at δ = 1e-5). Adam with a cosine learning-rate decay over 420 steps; at the
switch the whole optimizer state is reset (reset_moments="all": Adam's moments and the step counts,
so the cosine restarts and the DP phase begins at the peak learning rate: without that restart the
switch lost to private-only DP, see experiments/results/bu2024/fmnist_5classes/); automatic
clipping (R = 1); 420 steps in all.

The main job (`launch/run.sh`) is the default: Fashion-MNIST with 10% of the training set public
but drawn from classes 0-4 only, the other 90% private, CNN. There public data alone cannot solve
the task (public-only ≈ 0.45), as in Bu et al.'s setting, whose public ImageNet-1k lacks most of
the private ImageNet-11k's classes.

  python -m dpjax.main --config=experiments/continual.py:VARIANT[,DATA[,MODEL]] --workdir=DIR

VARIANT (all with the same total number of steps):
  dp             public steps, then DP steps (switch at step 200)
  auto           public steps until the automatic switch (public statistics only), then DP
  private_only   DP from scratch on the private data only, same ε
  public_only    non-private training on the public data only
  nonprivate     non-private training on everything (no DP guarantee)
  clip_only      like dp, but σ = 0: clipping without noise (no DP guarantee; isolates clipping)
DATA: fashion_mnist_5classes (default: the public 10% drawn from classes 0-4 only),
  fashion_mnist (the public 10% from all classes; there public-only training alone nearly matches
  non-private), mnist, or mnist_to_fashion_mnist (public MNIST, private Fashion-MNIST: public and
  private data from different distributions).
MODEL: cnn (Tramèr & Boneh's tanh CNN, default) or vit (a small ViT: patch 4, width 192, depth 4).
"""

import ml_collections

from dpjax import config as config_lib

PUBLIC_STEPS = 200
PRIVATE_STEPS = 220
VARIANTS = ("dp", "auto", "private_only", "public_only", "nonprivate", "clip_only")
DATASETS = ("fashion_mnist_5classes", "fashion_mnist", "mnist", "mnist_to_fashion_mnist")
MODELS = {
    "cnn": dict(name="cnn_tanh"),
    "vit": dict(name="vit", variant="Ti", patch_size=4, depth=4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  given = (arg or "dp").split(",")
  variant, dataset, model = given + ["dp", "fashion_mnist_5classes", "cnn"][len(given):]
  for value, known, what in [(variant, VARIANTS, "variant"), (dataset, DATASETS, "dataset"),
                             (model, MODELS, "model")]:
    if value not in known:
      raise ValueError(f"Unknown {what} {value!r}; choose one of {sorted(known)}.")
  config = config_lib.default_config()
  config.data.update(name=dataset.split("_to_")[-1].removesuffix("_5classes"), public_fraction=0.1)
  if dataset.endswith("_5classes"):
    config.data.public_classes = (0, 1, 2, 3, 4)
  if "_to_" in dataset:  # all of the public dataset is public, all of the private one private
    config.data.update(public_name=dataset.split("_to_")[0], public_fraction=0.0)
  config.model = MODELS[model]
  config.dp.update(clip="automatic", clip_norm=1.0, target_epsilon=3.0, delta=1e-5,
                   accountant="pld", expected_batch_size=1024)
  config.optimizer.update(name="adam", learning_rate=5e-3 if model == "cnn" else 1e-3)
  config.schedule.update(total_steps=PUBLIC_STEPS + PRIVATE_STEPS, public_batch_size=256,
                         lr_schedule="cosine")
  config.mixing.reset_moments = "all"
  config.perf.microbatch_size = 256
  config.eval.every_steps = 60
  config.checkpoint.every_steps = 200
  _apply_variant(config, variant)
  return config


def _apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  if variant in ("dp", "clip_only"):
    config.mixing.update(schedule="switch", switch_step=PUBLIC_STEPS)
  if variant == "auto":
    config.mixing.schedule = "auto"
    config.mixing.auto.update(criterion="either", check_every=20, patience=3,
                              holdout_fraction=0.1, max_switch_step=400)
    config.curvature.update(every_steps=20, batch_size=128, num_probes=8)
  elif variant == "private_only":
    config.mixing.update(schedule="constant", alpha=0.0)
  elif variant == "public_only":
    config.mixing.update(schedule="constant", alpha=1.0)
  elif variant == "nonprivate":
    config.data.update(public_fraction=1.0, public_name="", public_classes=())  # all public: no DP
    config.mixing.update(schedule="constant", alpha=1.0)
  elif variant == "clip_only":
    config.dp.update(noise_multiplier=0.0, target_epsilon=None)
