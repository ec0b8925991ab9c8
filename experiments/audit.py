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
  epsE        DP-SGD on everything (private set, α = 0) to ε = E at δ = 1e-5 (PLD): eps1 and eps8
              are the experiment's; larger E (eps50, eps1000) show how the audit grows with ε
INCLUSION: audit.inclusion_seed (default 0, the audited run); shadow runs for LiRA use 1, 2, ...
  and the same seed offset for training randomness (config.seed), so each is an independent run
  with its own coin flips over the same canaries.
"""

import ml_collections

from dpjax import config as config_lib

TRAIN_EXAMPLES = 10_000
CANARIES = 1000
STEPS = 2000
BATCH = 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, inclusion = (list((arg or "nonprivate").split(",")) + ["0"])[:2]
  epsilon = _epsilon(variant)
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


def _epsilon(variant: str) -> float | None:
  """None for "nonprivate", E for "epsE"."""
  if variant == "nonprivate":
    return None
  try:
    epsilon = float(variant.removeprefix("eps")) if variant.startswith("eps") else -1.0
  except ValueError:
    epsilon = -1.0
  if not epsilon > 0:
    raise ValueError(f"Unknown variant {variant!r}; use nonprivate or epsE with E > 0 (eps1, "
                     "eps8, ...).")
  return epsilon
