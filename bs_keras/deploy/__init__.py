"""Deployment transforms of (channel-gated) bs_keras models.

Every step is a model -> model (or model -> file) transform:

- `compact_model(model, calibration_images, round_to=None)`: a narrower
  Keras model without the always-off channels and with fixed always-on ones
  (`compact`);
- `export_saved_model(model, path)`: a SavedModel with the signatures
  `serving_default` (probabilities) and `serving_with_gates` (also the
  per-sample gate masks and conditional MACs) (`savedmodel`);
- `convert_saved_model(path, quantize)`: TFLite, float32 / float16 /
  dynamic-range / int8 (`tflite`), run with LiteRT by `TFLiteRunner`;
- `parity_rows(model, images, variants)`: how closely each export reproduces
  Keras inference (`parity`);
- `conditional_model(model, calibration_images)`: batch-1 execution that
  computes, per gated block, only the smallest precompiled width covering
  the open channels (`conditional`);
- `export(model, out, mode=..., format=..., quantize=..., calibration=...)`:
  all of the above as one call that writes a directory of files and returns
  the parity table (`pipeline`; its options and their checks: `options`).

Command line: `python -m export MODEL.keras --out DIR ...` (`bs_keras.cli.export`,
argument parsing around `export`).
Submodules import TensorFlow; this package imports them on first use.
"""

import importlib

_EXPORTS = {
    "compact_model": "bs_keras.deploy.compact",
    "plan_compaction": "bs_keras.deploy.compact",
    "apply_compaction": "bs_keras.deploy.compact",
    "expand_gate_masks": "bs_keras.deploy.compact",
    "export_saved_model": "bs_keras.deploy.savedmodel",
    "SavedModelRunner": "bs_keras.deploy.savedmodel",
    "random_ops": "bs_keras.deploy.savedmodel",
    "convert_saved_model": "bs_keras.deploy.tflite",
    "TFLiteRunner": "bs_keras.deploy.tflite",
    "parity_rows": "bs_keras.deploy.parity",
    "format_table": "bs_keras.deploy.parity",
    "load_calibration": "bs_keras.deploy.calibration",
    "conditional_model": "bs_keras.deploy.conditional",
    "folded_model": "bs_keras.deploy.conditional",
    "FoldedModel": "bs_keras.deploy.conditional",
    "export": "bs_keras.deploy.pipeline",
    "ExportResult": "bs_keras.deploy.pipeline",
    "ExportError": "bs_keras.deploy.options",
    "OptionError": "bs_keras.deploy.options",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bs_keras.deploy' has no attribute {name!r}")
