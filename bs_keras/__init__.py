"""bs_keras: conditional channel-gated ResNets trained with batch-shaping.

Keras 3 (TensorFlow backend) implementation of Bejnordi, Blankevoort and
Welling, "Batch-Shaping for Learning Conditional Channel Gated Networks"
(ICLR 2020).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "bs_keras needs the TensorFlow backend of Keras 3 (it uses "
        "tensorflow-probability inside its layers). Set KERAS_BACKEND=tensorflow. "
        f"Current backend: {keras.backend.backend()!r}"
    )

from bs_keras import blocks, callbacks, gates, gating, losses, macs, models, schedules  # noqa: E402
from bs_keras.callbacks import GateLossScheduler  # noqa: E402
from bs_keras.gates import ChannelGate, find_gates, record_gates  # noqa: E402
from bs_keras.gating import configure_gate_losses, exclude_gates_from_weight_decay  # noqa: E402
from bs_keras.schedules import Constant, Linear, paper_schedules  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ChannelGate",
    "Constant",
    "GateLossScheduler",
    "Linear",
    "blocks",
    "callbacks",
    "configure_gate_losses",
    "exclude_gates_from_weight_decay",
    "find_gates",
    "gates",
    "gating",
    "losses",
    "macs",
    "models",
    "paper_schedules",
    "record_gates",
    "schedules",
]
