"""Model builders and model transforms.

- `bs_keras.models.resnet`: `cifar_resnet`, `imagenet_resnet` (gated or
  plain, one code path).
- `bs_keras.models.retrofit`: `add_gates(model)`, gates for a ResNet you
  already have (ours, `keras.applications`, keras-hub).

The gated PSPNet is `bs_keras.segmentation.pspnet`.
"""

from bs_keras.models.resnet import (
    CIFAR_WIDTHS,
    IMAGENET_SPECS,
    IMAGENET_WIDTHS,
    cifar_resnet,
    gate_factory,
    imagenet_resnet,
    weight_decay_regularizer,
)
from bs_keras.models.retrofit import ResidualBlock, adapt_inputs, add_gates, copy_model, residual_blocks

__all__ = [
    "CIFAR_WIDTHS",
    "IMAGENET_SPECS",
    "IMAGENET_WIDTHS",
    "ResidualBlock",
    "adapt_inputs",
    "add_gates",
    "cifar_resnet",
    "copy_model",
    "gate_factory",
    "imagenet_resnet",
    "residual_blocks",
    "weight_decay_regularizer",
]
