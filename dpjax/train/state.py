"""Building a run's pieces from its config: data, α schedule, model and params, optimizer."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpjax import data, mixing, models


def load_data(config: ml_collections.ConfigDict) -> tuple[data.PublicPrivate, data.Dataset]:
  """(public/private training parts, test set). The test set is used for evaluation only."""
  c = config.data
  load = lambda name, split: data.load_dataset(name, split, c.dir or None, c.cache_dir or None,
                                               verify=c.verify)
  train = load(c.name, "train")
  if c.public_name:
    parts = data.pair_datasets(load(c.public_name, "train"), train)
  else:
    parts = data.split_dataset(train, c.public_fraction, config.seed)
  return parts, load(c.name, "test")


def alpha_schedule(config: ml_collections.ConfigDict) -> mixing.AlphaSchedule:
  m = config.mixing
  if m.schedule == "auto":
    a = m.auto
    return mixing.AutoSwitch(criterion=a.criterion, patience=a.patience, min_delta=a.min_delta,
                             max_switch_step=a.max_switch_step if a.max_switch_step >= 0 else None)
  arguments = dict(constant=dict(alpha=m.alpha), switch=dict(switch_step=m.switch_step),
                   linear=dict(start=m.start, end=m.end, begin=m.begin, until=m.until),
                   cosine=dict(start=m.start, end=m.end, until=m.until),
                   sample_ratio=dict(public_batch_size=config.schedule.public_batch_size,
                                     private_batch_size=config.dp.expected_batch_size))
  if m.schedule not in arguments:
    raise ValueError(f"Unknown mixing.schedule {m.schedule!r}; choose one of "
                     f"{sorted(arguments) + ['auto']}.")
  schedule = mixing.make_schedule(m.schedule, **arguments[m.schedule])
  for step in range(config.schedule.total_steps):  # fail now, not mid-run, on a bad α
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
  o, s = config.optimizer, config.schedule
  lr: Any = o.learning_rate
  if s.lr_schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(s.warmup_steps, 1),
                                            s.total_steps)
  elif s.lr_schedule != "constant":
    raise ValueError(f"Unknown schedule.lr_schedule {s.lr_schedule!r}; use constant or cosine.")
  if o.name == "sgd":
    opt = optax.sgd(lr, momentum=o.momentum or None)
    return optax.chain(optax.add_decayed_weights(o.weight_decay), opt) if o.weight_decay else opt
  if o.name == "adam":
    return optax.adam(lr, b1=o.b1, b2=o.b2)
  if o.name == "adamw":
    return optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  raise ValueError(f"Unknown optimizer.name {o.name!r}; choose sgd, adam or adamw.")


def preprocessor(config: ml_collections.ConfigDict) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 images [..., C] -> float32: [0, 1], or standardised with the dataset's constants."""
  if config.data.standardize:
    return lambda images: data.standardize(images, config.data.name)
  return data.to_float
