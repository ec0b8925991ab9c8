"""The main job: DP continual pre-training on Fashion-MNIST with 10% public and 90% private data.

Public-only steps first (α = 1, no privacy cost), then DP steps on the private 90% (α = 0) to
ε = 3 at δ = 1e-5, with Adam's first moment reset at the switch (Bu et al. 2024). Adam with a
cosine learning-rate decay over the whole run; automatic clipping (R = 1).

  python -m dpjax.main --config=experiments/fmnist_continual.py --workdir=/tmp/fmnist
Baselines (config arg), all with the same total number of steps:
  :private_only   DP from scratch on the private 90% only, same ε
  :public_only    non-private training on the public 10% only
  :nonprivate     non-private training on everything (the private part used as if public)
"""

import ml_collections

from dpjax import config as config_lib

PUBLIC_STEPS = 300
PRIVATE_STEPS = 120


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "dp"
  config = config_lib.default_config()
  config.data.update(name="fashion_mnist", public_fraction=0.1)
  config.model.name = "cnn_tanh"
  config.dp.update(clip="automatic", clip_norm=1.0, target_epsilon=3.0, delta=1e-5,
                   accountant="pld", expected_batch_size=1024)
  config.optimizer.update(name="adam", learning_rate=5e-3)
  config.schedule.update(total_steps=PUBLIC_STEPS + PRIVATE_STEPS, public_batch_size=256,
                         lr_schedule="cosine")
  config.mixing.update(schedule="switch", switch_step=PUBLIC_STEPS, reset_moments="first")
  config.perf.microbatch_size = 256
  config.eval.every_steps = 60
  config.checkpoint.every_steps = 200
  if variant == "private_only":
    config.mixing.update(schedule="constant", alpha=0.0)
  elif variant == "public_only":
    config.mixing.update(schedule="constant", alpha=1.0)
  elif variant == "nonprivate":
    config.data.public_fraction = 1.0  # everything public: no private data, no DP
    config.mixing.update(schedule="constant", alpha=1.0)
  elif variant != "dp":
    raise ValueError(f"Unknown variant {variant!r}: use dp, private_only, public_only, nonprivate.")
  return config
