"""Small dense, convolutional and attention models and per-example losses for the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpjax.privacy import ghost


class Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


class Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.GroupNorm(num_groups=2)(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    tokens = nn.Dense(8)(x.reshape((x.shape[0], 4, -1)))  # 4 tokens per image
    tokens = tokens + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(tokens))
    return nn.Dense(3)(tokens.mean(axis=1))


MODELS = {"dense": Dense(), "conv": Conv(), "attention": Attention()}
IMAGE_SHAPE = (8, 8, 1)


def init(model, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + IMAGE_SHAPE))["params"]


def per_example_loss(model):
  """loss(params, example) for one example {image [8,8,1], label []}."""
  def loss(params, example):
    logits = model.apply({"params": params}, example["image"][None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, example["label"][None])[0]
  return loss


def batch_losses(model):
  """losses(params, batch[, ghost_variables]) -> [m] (or with the mutated ghost variables)."""
  def losses(params, batch, ghost_variables=None):
    found = ghost.apply_model(model, params, batch["image"], ghost_variables)
    logits, mutated = found if ghost_variables is not None else (found, None)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return losses if ghost_variables is None else (losses, mutated)
  return losses


def batch(n, seed=0, scale=1.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return dict(image=scale * jax.random.normal(k1, (n,) + IMAGE_SHAPE),
              label=jax.random.randint(k2, (n,), 0, 3))
