"""Privacy audits of one small model trained non-privately and with DP (issue 9).

Fashion-MNIST's first 10,000 training examples, Tramèr & Boneh's tanh CNN, and 1000 canaries
(noise images with random labels), each inserted with probability 1/2. Every variant runs the
same 2000 steps (about 49 epochs) at the same batch size of 256: long enough on little data for
the non-private model to memorise what it can.

  python -m dpjax.main --config=experiments/audit.py:VARIANT[,INCLUSION] --workdir=DIR
  python -m dpjax.audit --workdir=DIR [--shadow_workdirs=DIR1,DIR2,...]

VARIANT:
  nonprivate  everything public, α = 1: plain training, no DP guarantee (canaries join the
              public set)
  eps1, eps8  DP-SGD on everything (private set, α = 0) to ε = 1 or 8 at δ = 1e-5 (PLD)
INCLUSION: audit.inclusion_seed (default 0, the audited run); shadow runs for LiRA use 1, 2, ...
  and the same seed offset for training randomness (config.seed), so each is an independent run
  with its own coin flips over the same canaries.
"""

import ml_collections

from dpjax import config as config_lib

VARIANTS = {"nonprivate": None, "eps1": 1.0, "eps8": 8.0}
TRAIN_EXAMPLES = 10_000
CANARIES = 1000
STEPS = 2000
BATCH = 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, inclusion = (list((arg or "nonprivate").split(",")) + ["0"])[:2]
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  inclusion = int(inclusion)
  config = config_lib.default_config()
  config.seed = inclusion
  config.data.update(name="fashion_mnist", train_examples=TRAIN_EXAMPLES)
  config.model = dict(name="cnn_tanh")
  config.audit.update(canaries=CANARIES, kind="noise", seed=0, inclusion_seed=inclusion)
  config.schedule.update(total_steps=STEPS, public_batch_size=BATCH)
  config.optimizer.update(name="adam", learning_rate=1e-3)
  config.perf.microbatch_size = 256
  config.eval.every_steps = 500
  config.checkpoint.every_steps = 1000
  epsilon = VARIANTS[variant]
  # The DP mechanism; the non-private variant has no private step, so it never applies there.
  config.dp.update(clip="flat", clip_norm=1.0, target_epsilon=epsilon or 8.0, delta=1e-5,
                   accountant="pld", expected_batch_size=BATCH)
  if epsilon is None:
    config.data.public_fraction = 1.0
    config.mixing.update(schedule="constant", alpha=1.0)
    config.audit.insert_into = "public"
  else:
    config.data.public_fraction = 0.0
    config.mixing.update(schedule="switch", switch_step=0)
    config.audit.insert_into = "private"
  return config
