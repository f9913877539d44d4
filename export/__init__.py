"""Export of (channel-gated) bs_keras models: SavedModel, TFLite, compaction.

Every step is a model -> model (or model -> file) transform:

- `compact_model(model, calibration_images, round_to=None)`: a narrower
  Keras model without the always-off channels and with fixed always-on ones
  (`export.compact`);
- `export_saved_model(model, path)`: a SavedModel with the signatures
  `serving_default` (probabilities) and `serving_with_gates` (also the
  per-sample gate masks and conditional MACs) (`export.savedmodel`);
- `convert_saved_model(path, quantize)`: TFLite, float32 / float16 /
  dynamic-range / int8 (`export.tflite`), run with LiteRT by `TFLiteRunner`;
- `parity_rows(model, images, variants)`: how closely each export reproduces
  Keras inference (`export.parity`);
- `conditional_model(model, calibration_images)`: batch-1 execution that
  computes, per gated block, only the smallest precompiled width covering
  the open channels (`export.conditional`).

Command line: `python -m export MODEL.keras --out DIR ...` (`export.cli`).
Submodules import TensorFlow; this package imports them on first use.
"""

import importlib

_EXPORTS = {
    "compact_model": "export.compact",
    "plan_compaction": "export.compact",
    "apply_compaction": "export.compact",
    "expand_gate_masks": "export.compact",
    "export_saved_model": "export.savedmodel",
    "SavedModelRunner": "export.savedmodel",
    "random_ops": "export.savedmodel",
    "convert_saved_model": "export.tflite",
    "TFLiteRunner": "export.tflite",
    "parity_rows": "export.parity",
    "format_table": "export.parity",
    "load_calibration": "export.calibration",
    "conditional_model": "export.conditional",
    "folded_model": "export.conditional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
