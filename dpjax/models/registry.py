"""`build_model`: models by name, each checked for BatchNorm before it is returned.

Names and their keyword arguments (every model also takes `input_shape`, the (H, W, C) of one
image, used for the BatchNorm check and where the architecture depends on it):

  cnn_tanh_mnist    Tramèr & Boneh's MNIST / Fashion-MNIST tanh CNN; input_shape=(28, 28, 1).
  cnn_tanh_cifar10  Tramèr & Boneh's CIFAR-10 tanh CNN; input_shape=(32, 32, 3).
  cnn_tanh          one of the two above, picked by input_shape (required): 28x28 images get the
                    MNIST CNN, 32x32 images the CIFAR-10 CNN.
  wrn               WideResNet; depth=16, width=4, num_groups=16; input_shape=(32, 32, 3).
  wrn_16_4          WideResNet with depth 16 and width 4 (2.75M parameters); num_groups=16,
                    input_shape.
  resnet            ResNet (GroupNorm, 32×32 images); stage_sizes=(2, 2, 2, 2), width=64,
                    num_groups=16; input_shape=(32, 32, 3).
  resnet18          ResNet with stage_sizes (2, 2, 2, 2) (11.2M parameters at width 64, 10
                    outputs); width=64, num_groups=16, input_shape.
  vit               ViT; variant="Ti" ("Ti", "S", "B", "L"), patch_size=16, image_size (default
                    input_shape[0], else 224), overrides of width / depth / num_heads / mlp_dim.
                    input_shape defaults to (image_size, image_size, 3); attention="auto"
                    (cuDNN's flash attention where it runs: NVIDIA GPU, bf16/fp16; else XLA's
                    kernel), "fused" (jax.nn.dot_product_attention, XLA's kernel), "einsum"
                    (flax's written-out softmax) or "cudnn" (cuDNN flash attention on padded
                    tokens; GPU, bf16);
                    scan_blocks=True runs the blocks as one nn.scan (compiles once, not depth
                    times; params["blocks"] stacked along a leading depth axis);
                    input_resize=True resizes images of input_shape to image_size on the device
                    (bilinear; e.g. 32² CIFAR images for a 224² ViT).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import cnn, dp_checks, resnet, vit, wrn

InputShape = tuple[int, int, int]
# A builder returns the model and the (H, W, C) of one example image for the BatchNorm check.
Builder = Callable[..., tuple[nn.Module, InputShape]]


def _build_cnn_tanh_mnist(
    num_classes: int, input_shape: InputShape = (28, 28, 1)
) -> tuple[nn.Module, InputShape]:
  return cnn.MnistTanhCNN(num_classes=num_classes), tuple(input_shape)


def _build_cnn_tanh_cifar10(
    num_classes: int, input_shape: InputShape = (32, 32, 3)
) -> tuple[nn.Module, InputShape]:
  return cnn.Cifar10TanhCNN(num_classes=num_classes), tuple(input_shape)


def _build_cnn_tanh(
    num_classes: int, input_shape: InputShape | None = None
) -> tuple[nn.Module, InputShape]:
  builders_by_image_size = {(28, 28): _build_cnn_tanh_mnist, (32, 32): _build_cnn_tanh_cifar10}
  image_size = None if input_shape is None else tuple(input_shape[:2])
  if image_size not in builders_by_image_size:
    raise ValueError(
        "Model 'cnn_tanh' picks its architecture from input_shape=(H, W, C): 28x28 images get "
        f"the MNIST CNN, 32x32 images the CIFAR-10 CNN; got input_shape={input_shape}. Pass "
        "input_shape, or name 'cnn_tanh_mnist' / 'cnn_tanh_cifar10' directly.")
  return builders_by_image_size[image_size](num_classes, input_shape)


def _build_wrn(
    num_classes: int, depth: int = 16, width: int = 4, num_groups: int = 16,
    input_shape: InputShape = (32, 32, 3),
) -> tuple[nn.Module, InputShape]:
  model = wrn.WideResNet(num_classes=num_classes, depth=depth, width=width, num_groups=num_groups)
  return model, tuple(input_shape)


def _build_wrn_16_4(
    num_classes: int, num_groups: int = 16, input_shape: InputShape = (32, 32, 3)
) -> tuple[nn.Module, InputShape]:
  return _build_wrn(num_classes, 16, 4, num_groups, input_shape)


def _build_resnet(
    num_classes: int, stage_sizes: tuple[int, ...] = (2, 2, 2, 2), width: int = 64,
    num_groups: int = 16, input_shape: InputShape = (32, 32, 3),
) -> tuple[nn.Module, InputShape]:
  resnet.check_groups(width, num_groups)
  return (resnet.ResNet(num_classes=num_classes, stage_sizes=tuple(stage_sizes), width=width,
                        num_groups=num_groups), tuple(input_shape))


def _build_resnet18(
    num_classes: int, width: int = 64, num_groups: int = 16, input_shape: InputShape = (32, 32, 3)
) -> tuple[nn.Module, InputShape]:
  return _build_resnet(num_classes, (2, 2, 2, 2), width, num_groups, input_shape)


def _build_vit(
    num_classes: int, variant: str = "Ti", patch_size: int = 16, image_size: int | None = None,
    input_shape: InputShape | None = None, attention: str = "auto", scan_blocks: bool = False,
    scan_unroll: int = 1, input_resize: bool = False, **overrides: int,
) -> tuple[nn.Module, InputShape]:
  if image_size is None:
    image_size = 224 if input_shape is None else input_shape[0]
  config = vit.vit_config(variant, patch_size=patch_size, image_size=image_size, **overrides)
  input_shape = (image_size, image_size, 3) if input_shape is None else tuple(input_shape)
  return vit.ViT(num_classes=num_classes, attention=attention, scan_blocks=scan_blocks,
                 scan_unroll=scan_unroll, input_resize=input_resize, **config), input_shape


_BUILDERS: dict[str, Builder] = {
    "cnn_tanh": _build_cnn_tanh,
    "cnn_tanh_mnist": _build_cnn_tanh_mnist,
    "cnn_tanh_cifar10": _build_cnn_tanh_cifar10,
    "wrn": _build_wrn,
    "wrn_16_4": _build_wrn_16_4,
    "resnet": _build_resnet,
    "resnet18": _build_resnet18,
    "vit": _build_vit,
}


def model_names() -> list[str]:
  """The names `build_model` accepts."""
  return sorted(_BUILDERS)


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the model `name` (see the module docstring for names and kwargs).

  The model maps float32 images [batch, H, W, C] to logits [batch, num_classes]. Before it is
  returned, `assert_dp_compatible` runs an abstract init (no compute) on one example of
  input_shape and raises BatchNormInDPModelError if any submodule is a BatchNorm.

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or invalid sizes.
  """
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model name {name!r}; known names: {', '.join(model_names())}.")
  model, input_shape = _BUILDERS[name](num_classes, **kwargs)
  example_input = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  dp_checks.assert_dp_compatible(model, example_input=example_input)
  return model
