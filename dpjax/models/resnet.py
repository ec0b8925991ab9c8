"""ResNet-18-like networks for 32×32 images with GroupNorm instead of BatchNorm.

The CIFAR variant of He et al.'s ResNet-18 (a 3×3 stem of stride 1, no max pool; four stages of
two basic blocks with width, 2·width, 4·width, 8·width channels, strides 1, 2, 2, 2), each
BatchNorm replaced by GroupNorm: the "ResNet-18 without BatchNorm" of Kong et al.'s Logit-DP
CIFAR-10 pre-training (references/papers.md §3). GroupNorm normalises each example on its own,
so the examples of a batch never interact and per-example (and per-pair) gradients stay theirs.
Every layer is a plain nn.Conv, nn.GroupNorm or nn.Dense: all of them ghost-supported.

width = 64 is ResNet-18 (11.2M parameters with 10 outputs); a smaller width scales its FLOPs
and parameters by (width/64)².
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_PAD_1 = ((1, 1), (1, 1))  # torchvision's padding of a 3×3 conv, also at stride 2


class BasicBlock(nn.Module):
  """conv3×3(stride) -> GN -> ReLU -> conv3×3 -> GN, plus the skip path, then ReLU.

  The skip path is the identity, or 1×1 conv(stride) -> GN where the block changes the shape.
  Maps [batch, H, W, C_in] to [batch, H/strides, W/strides, features].
  """

  features: int
  strides: int = 1
  num_groups: int = 16

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    conv = lambda size, strides, pad, name: nn.Conv(
        self.features, (size, size), strides=strides, padding=pad, use_bias=False, name=name)
    norm = lambda name: nn.GroupNorm(num_groups=self.num_groups, name=name)
    x = nn.relu(norm("norm1")(conv(3, self.strides, _PAD_1, "conv1")(inputs)))
    x = norm("norm2")(conv(3, 1, _PAD_1, "conv2")(x))
    skip = inputs
    if self.strides != 1 or inputs.shape[-1] != self.features:
      skip = norm("skip_norm")(conv(1, self.strides, "VALID", "skip_conv")(inputs))
    return nn.relu(x + skip)


class ResNet(nn.Module):
  """ResNet for 32×32 images: conv3×3(width) -> GN -> ReLU -> stages of BasicBlocks ->
  global average pool -> Dense(num_classes).

  Maps images [batch, H, W, C] (float32) to logits [batch, num_classes].
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  num_groups: int = 16

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    check_groups(self.width, self.num_groups)
    x = nn.Conv(self.width, (3, 3), padding=_PAD_1, use_bias=False, name="stem_conv")(images)
    x = nn.relu(nn.GroupNorm(num_groups=self.num_groups, name="stem_norm")(x))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2 ** stage, strides, self.num_groups,
                       name=f"stage{stage + 1}_block{block + 1}")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def check_groups(width: int, num_groups: int) -> None:
  """Raises ValueError unless num_groups divides width (then it divides every stage's channels)."""
  if width < 1 or num_groups < 1 or width % num_groups:
    raise ValueError(f"ResNet: num_groups = {num_groups} must divide width = {width} (every "
                     "stage's channel count is a multiple of width); e.g. width=16, num_groups=8.")
