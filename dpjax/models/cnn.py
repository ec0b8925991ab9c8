"""Tramèr & Boneh (2021)'s end-to-end tanh CNNs for MNIST-like and CIFAR-10 images.

Architectures as in ftramer/Handcrafted-DP `models.py` (see references/papers.md §6.2): every
activation is tanh, and there is no normalisation layer, so examples never interact.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# CIFAR-10 feature extractor: an int is a 3x3 / pad 1 conv with that many channels, "M" a 2x2 max
# pool with stride 2.
CIFAR10_CONV_PLAN: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")


def _flatten_and_classify(
    features: jax.Array, hidden: int, num_classes: int
) -> jax.Array:
  """[batch, h, w, c] -> flatten [batch, h*w*c] -> Dense(hidden) -> tanh -> logits [batch, k].

  Must be called from inside a compact module; creates the Dense layers "fc1" and "fc2".
  """
  flat = features.reshape((features.shape[0], -1))
  hidden_activations = jnp.tanh(nn.Dense(hidden, name="fc1")(flat))
  return nn.Dense(num_classes, name="fc2")(hidden_activations)


class MnistTanhCNN(nn.Module):
  """Tanh CNN for 28x28 MNIST / Fashion-MNIST images (26,010 parameters with 10 classes).

  Conv(16, 8x8, stride 2, pad 2) -> tanh -> MaxPool(2, stride 1)
  -> Conv(32, 4x4, stride 2, VALID) -> tanh -> MaxPool(2, stride 1)
  -> flatten (4*4*32 = 512 for 28x28 inputs) -> Dense(32) -> tanh -> Dense(num_classes).

  Maps images [batch, 28, 28, channels] (float32, values in [0, 1]) to logits [batch, num_classes].
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.Conv(16, (8, 8), strides=(2, 2), padding=((2, 2), (2, 2)), name="conv1")(images)
    x = nn.max_pool(jnp.tanh(x), (2, 2), strides=(1, 1))  # [batch, 12, 12, 16]
    x = nn.Conv(32, (4, 4), strides=(2, 2), padding="VALID", name="conv2")(x)
    x = nn.max_pool(jnp.tanh(x), (2, 2), strides=(1, 1))  # [batch, 4, 4, 32]
    return _flatten_and_classify(x, hidden=32, num_classes=self.num_classes)


class Cifar10TanhCNN(nn.Module):
  """Tanh CNN for 32x32 CIFAR-10 images.

  conv_plan [32, 32, M, 64, 64, M, 128, 128, M] (Conv 3x3 pad 1 + tanh; M = MaxPool 2/2)
  -> flatten (4*4*128 = 2048 for 32x32 inputs) -> Dense(128) -> tanh -> Dense(num_classes).

  Maps images [batch, 32, 32, channels] (float32) to logits [batch, num_classes].
  """

  num_classes: int = 10
  conv_plan: Sequence[int | str] = CIFAR10_CONV_PLAN

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x, num_convs = images, 0
    for layer in self.conv_plan:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        num_convs += 1
        x = nn.Conv(layer, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{num_convs}")(x)
        x = jnp.tanh(x)
    return _flatten_and_classify(x, hidden=128, num_classes=self.num_classes)
