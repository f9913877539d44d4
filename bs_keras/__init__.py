"""bs_keras: conditional channel-gated ResNets trained with batch-shaping.

Keras 3 (TensorFlow backend) implementation of Bejnordi, Blankevoort and
Welling, "Batch-Shaping for Learning Conditional Channel Gated Networks"
(ICLR 2020).

Top-level names: the builders (`cifar_resnet`, `imagenet_resnet`, `pspnet`),
`add_gates` (gates for a ResNet you already have),
the gate layer and its losses, the schedules and `GateLossScheduler`, and the
MAC counters (`count_macs`, `conditional_macs`, `gate_masks`). The deployment
transforms live in `bs_keras.deploy`.

`import bs_keras` itself is cheap, so the command lines answer `--help`
without TensorFlow: the library loads on first use of a top-level class or
function (or `register_custom_objects()`); a submodule (`bs_keras.gates`,
`bs_keras.deploy`) on first use of it. Every custom layer, loss and schedule
is registered for `keras.saving.load_model` as soon as Keras is imported:
at `import bs_keras` if Keras already is, otherwise right after Keras'
own import, so `import bs_keras` then `keras.models.load_model(path)` works.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# The backend Keras runs on: set when Keras is imported, from KERAS_BACKEND.
_backend = sys.modules["keras"].backend.backend() if "keras" in sys.modules else os.environ["KERAS_BACKEND"]
if _backend != "tensorflow":
    raise ImportError(
        "bs_keras needs the TensorFlow backend of Keras 3 (it uses "
        "tensorflow-probability inside its layers). Set KERAS_BACKEND=tensorflow. "
        f"Current backend: {_backend!r}"
    )

__version__ = "0.1.0"

_SUBMODULES = ("blocks", "budget", "callbacks", "distillation", "gates", "gating", "losses", "lr_schedules", "macs",
               "models", "schedules", "segmentation")
_NAMES = {
    "MacBudget": "budget",
    "GateLossScheduler": "callbacks",
    "Distiller": "distillation",
    "ChannelGate": "gates",
    "find_gates": "gates",
    "record_gates": "gates",
    "configure_gate_losses": "gating",
    "start_gates_at": "gating",
    "exclude_gates_from_weight_decay": "gating",
    "conditional_macs": "macs",
    "count_macs": "macs",
    "gate_masks": "macs",
    "add_gates": "models",
    "cifar_resnet": "models",
    "imagenet_resnet": "models",
    "Constant": "schedules",
    "Linear": "schedules",
    "paper_schedules": "schedules",
    "pspnet": "segmentation",
}

__all__ = sorted([*_SUBMODULES, *_NAMES, "register_custom_objects"], key=str.lower)


def register_custom_objects():
    """Imports the library now, which registers every bs_keras layer, loss and
    schedule (a PSPNet's included) with Keras: `keras.saving.load_model` then
    reads any saved bs_keras model with no `custom_objects`. Using a top-level
    class or function of bs_keras does this too."""
    for module in _SUBMODULES:
        importlib.import_module(f"bs_keras.{module}")
    for name, module in _NAMES.items():
        globals()[name] = getattr(sys.modules[f"bs_keras.{module}"], name)


def _initializing(done=None):
    """True while a bs_keras submodule (other than `done`, whose code has
    just run) is part-way through its import."""
    return any(
        getattr(getattr(m, "__spec__", None), "_initializing", False)
        for n, m in list(sys.modules.items()) if n.startswith("bs_keras.") and n != done
    )


class _RegisterAfterKeras(importlib.abc.MetaPathFinder):
    """Registers the library once Keras is imported: right after `import
    keras`, or, when a bs_keras submodule imported Keras (`import
    bs_keras.gates` first), right after that submodule's import completes."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras" and not name.startswith("bs_keras."):
            return None
        sys.meta_path.remove(self)  # the other finders locate the module
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        exec_module = getattr(spec.loader, "exec_module", None) if spec is not None else None
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            if "keras" in sys.modules and self in sys.meta_path and not _initializing(module.__name__):
                sys.meta_path.remove(self)
                register_custom_objects()

        spec.loader.exec_module = exec_then_register
        return spec


if "keras" in sys.modules:
    register_custom_objects()
elif not any(isinstance(f, _RegisterAfterKeras) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterKeras())


def __getattr__(name):
    if name in _NAMES:
        register_custom_objects()
        return globals()[name]
    if name in _SUBMODULES:  # also `from bs_keras import gates` inside the package
        return importlib.import_module(f"bs_keras.{name}")
    # bs_keras.deploy (SavedModel / TFLite / compaction) is heavier than the
    # training library: not loaded with it (nor by `from bs_keras import *`).
    if name == "deploy":
        return importlib.import_module("bs_keras.deploy")
    raise AttributeError(f"module 'bs_keras' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
