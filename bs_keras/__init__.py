"""bs_keras: conditional channel-gated ResNets trained with batch-shaping.

Keras 3 (TensorFlow backend) implementation of Bejnordi, Blankevoort and
Welling, "Batch-Shaping for Learning Conditional Channel Gated Networks"
(ICLR 2020).

Top-level names: the builders (`cifar_resnet`, `imagenet_resnet`, `pspnet`),
`add_gates` (gates for a ResNet you already have),
the gate layer and its losses, the schedules and `GateLossScheduler`, and the
MAC counters (`count_macs`, `conditional_macs`, `gate_masks`). The deployment
transforms live in `bs_keras.deploy`, imported on first attribute access.
"""

import importlib

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "bs_keras needs the TensorFlow backend of Keras 3 (it uses "
        "tensorflow-probability inside its layers). Set KERAS_BACKEND=tensorflow. "
        f"Current backend: {keras.backend.backend()!r}"
    )

from bs_keras import blocks, budget, callbacks, distillation, gates, gating, losses, macs, models, schedules, segmentation  # noqa: E402
from bs_keras.budget import MacBudget  # noqa: E402
from bs_keras.callbacks import GateLossScheduler  # noqa: E402
from bs_keras.distillation import Distiller  # noqa: E402
from bs_keras.gates import ChannelGate, find_gates, record_gates  # noqa: E402
from bs_keras.gating import configure_gate_losses, exclude_gates_from_weight_decay  # noqa: E402
from bs_keras.macs import conditional_macs, count_macs, gate_masks  # noqa: E402
from bs_keras.models import add_gates, cifar_resnet, imagenet_resnet  # noqa: E402
from bs_keras.schedules import Constant, Linear, paper_schedules  # noqa: E402
from bs_keras.segmentation import pspnet  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ChannelGate",
    "add_gates",
    "Constant",
    "GateLossScheduler",
    "Linear",
    "MacBudget",
    "blocks",
    "budget",
    "callbacks",
    "cifar_resnet",
    "conditional_macs",
    "configure_gate_losses",
    "count_macs",
    "exclude_gates_from_weight_decay",
    "find_gates",
    "gate_masks",
    "gates",
    "gating",
    "imagenet_resnet",
    "losses",
    "macs",
    "models",
    "paper_schedules",
    "pspnet",
    "record_gates",
    "schedules",
    "segmentation",
]


def __getattr__(name):
    # bs_keras.deploy (SavedModel / TFLite / compaction) is heavier than the
    # training library: import it only when it is first used (and not by
    # `from bs_keras import *`).
    if name == "deploy":
        return importlib.import_module("bs_keras.deploy")
    raise AttributeError(f"module 'bs_keras' has no attribute {name!r}")

