"""Default hyperparameters of the private MNIST example (train.py)."""

import ml_collections


def get_config():
  """The hyperparameters: SGD with momentum on the noisy clipped mean, (ε, δ) for the whole run."""
  config = ml_collections.ConfigDict()
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.batch_size = 128           # the expected size of a Poisson batch
  config.num_epochs = 1
  config.steps_per_epoch = 0        # 0: 60000 // batch_size (one pass over the data on average)
  config.epsilon = 3.0              # ε of the whole run at δ (dpjax's PLD accountant)
  config.delta = 1e-5
  config.clip_norm = 1.0            # each example's gradient is clipped to this L2 norm
  config.microbatch_size = 0        # per-example gradients per vmap call (0: dpjax chooses)
  return config


def metrics():
  return []
