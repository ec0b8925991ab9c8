"""Image classifiers for DP training: tanh CNNs, ResNets, Wide ResNets and ViTs, none with
BatchNorm.

`build_model(name, num_classes, **kwargs)` builds one by name (names in `registry`); every model
maps float32 images [batch, H, W, C] to logits [batch, num_classes].
"""

from dpjax.models.cnn import Cifar10TanhCNN, MnistTanhCNN
from dpjax.models.dp_checks import (
    BatchNormInDPModelError,
    assert_dp_compatible,
    assert_no_cross_example_dependence,
)
from dpjax.models.projection import ProjectedEncoder
from dpjax.models.registry import build_model, model_names
from dpjax.models.resnet import ResNet
from dpjax.models.vit import EncoderBlock, ViT, vit_config
from dpjax.models.wrn import WideResNet, WideResNetBlock, WSConv, standardize_kernel

__all__ = [
    "BatchNormInDPModelError",
    "Cifar10TanhCNN",
    "EncoderBlock",
    "MnistTanhCNN",
    "ProjectedEncoder",
    "ResNet",
    "ViT",
    "WSConv",
    "WideResNet",
    "WideResNetBlock",
    "assert_dp_compatible",
    "assert_no_cross_example_dependence",
    "build_model",
    "model_names",
    "standardize_kernel",
    "vit_config",
]
