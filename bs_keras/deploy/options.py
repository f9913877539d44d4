"""The options of `bs_keras.deploy.export`: their choices and the checks that need no TensorFlow.

Modes (mode) and formats (format, quantize):

  mode         what is exported                           saved_model  tflite quantize
  masked       the model as trained (0/1 gate masks)      yes          none float16 dynamic int8
  compact      always-off channels removed (calibration)  yes          none float16 dynamic int8
  conditional  per block a branch between precompiled     yes          none float16 dynamic
               widths, BN folded, batch-1 TFLite          (any batch)  (batch 1; no int8)

Output directory (written to a temporary sibling, renamed when complete):
  saved_model/          format saved_model: signatures serving_default and serving_with_gates
                        (conditional: serving_default is batch 1, plus serving_batch)
  model[_QUANT].tflite  format tflite: one file per quantize value, same two signatures
  compact.keras         mode compact: the compacted Keras model
  compaction.json       mode compact: gate categories per layer
  conditional.json      mode conditional: per-block widths, executed MACs
  parity.json           parity with Keras inference (also printed)
  export.json           what was exported: input spec, preprocessing, outputs, files
  export_log.txt        this run's log

Inputs of every exported signature are float32 (batch, H, W, C) images
preprocessed as in training (pixels / 255, minus the dataset mean, divided by
its std); see export.json in the output directory.

This module is kept apart from the export itself (`bs_keras.deploy.pipeline`)
so that the command line offers the same choices and rejects bad
combinations before TensorFlow starts.
"""

import os

FORMATS = ("saved_model", "tflite")
MODES = ("masked", "compact", "conditional")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
# mode="conditional", widths=...: fitted to the calibration data, or fixed fractions.
COND_FRACTIONS = {"quarters": (0.25, 0.5, 0.75, 1.0), "eighths": tuple(i / 8 for i in range(1, 9))}
COND_WIDTHS = ("auto", *COND_FRACTIONS)
DEFAULT_MAX_WIDTHS = 6


class ExportError(Exception):
    """The export failed (a model that does not load, a failed conversion, random ops in the graph)."""


class OptionError(ValueError):
    """A bad option or combination of options, found before anything is loaded."""


def parse_quantize(text):
    """`"none,dynamic"` -> `["none", "dynamic"]` (each once); raises `OptionError`."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in QUANTIZATIONS]
    if not values or bad:
        raise OptionError(
            f"expected one or more of {', '.join(QUANTIZATIONS)} (comma-separated), got {text!r}"
        )
    return list(dict.fromkeys(values))


def parse_outputs(text):
    """`"seg,aux"` -> `["seg", "aux"]`; raises `OptionError`. Whether the
    model has these outputs is checked when it is loaded."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or len(set(values)) != len(values):
        raise OptionError(f"expected distinct output names, comma-separated (e.g. seg,aux), got {text!r}")
    return values


def has_calibration(calibration):
    """Whether a calibration source (name, path or array) was given."""
    return calibration is not None and not (isinstance(calibration, str) and not calibration)


def check_options(model, out, *, format, mode, quantize, calibration, round_to=None, widths=None,
                  max_widths=None, xla=False, outputs=None, overwrite=False):
    """Raises `OptionError` for a bad combination of `export` options.

    `model` is a `.keras` path (checked to exist) or a model object (not
    checked here); the other arguments are those of `export`, `quantize` a
    list of `QUANTIZATIONS`. Messages name the command-line flags, which have
    the same names as the arguments.
    """
    if isinstance(model, (str, os.PathLike)):
        model = os.fspath(model)
        if not os.path.exists(model):
            raise OptionError(f"model file {model!r} does not exist")
        if os.path.isdir(model) or not model.endswith(".keras"):
            raise OptionError(f"expected a Keras v3 model file ending in .keras, got {model!r}")
    if format not in FORMATS:
        raise OptionError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if widths is not None and widths not in COND_WIDTHS:
        raise OptionError(f"widths must be one of {', '.join(COND_WIDTHS)}, got {widths!r}")
    calibrated = has_calibration(calibration)
    if format == "saved_model" and list(quantize) != ["none"]:
        raise OptionError(
            f"--quantize {','.join(quantize)} applies to --format tflite; a SavedModel is exported in float32"
        )
    if "int8" in quantize and not calibrated:
        raise OptionError("--quantize int8 needs --calibration (representative data for the activation ranges)")
    if mode == "compact" and not calibrated:
        raise OptionError("--mode compact needs --calibration (the gate categories are measured on it)")
    if mode == "conditional" and not calibrated:
        raise OptionError("--mode conditional needs --calibration (channels are ordered by open frequency)")
    if mode == "conditional" and "int8" in quantize:
        raise OptionError(
            "--mode conditional --format tflite supports --quantize none, float16, dynamic; int8 is "
            "not supported (the converter quantizes only the width branches the calibration data "
            "visits and leaves the rest in float32: not a full-integer model)"
        )
    if xla and (mode != "conditional" or format != "saved_model"):
        raise OptionError("--xla applies to --mode conditional --format saved_model (TFLite has no XLA)")
    if mode != "conditional" and (widths or max_widths):
        raise OptionError("--widths and --max-widths apply to --mode conditional")
    if max_widths and widths not in (None, "auto"):
        raise OptionError("--max-widths applies to --widths auto")
    if outputs is not None and mode != "conditional":
        raise OptionError("--outputs applies to --mode conditional (the other modes export every output)")
    if round_to and mode != "compact":
        raise OptionError("--round-to applies to --mode compact")
    out_path = os.path.abspath(out)
    if os.path.exists(out_path) and not overwrite:
        raise OptionError(f"--out {os.fspath(out)!r} already exists (pass --overwrite to replace it)")
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise OptionError(f"--out {os.fspath(out)!r} exists and is not a directory")
    if isinstance(model, str) and os.path.abspath(model).startswith(out_path + os.sep):
        raise OptionError("--out must not contain the model file")
