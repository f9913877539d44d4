"""Command line: export a trained `.keras` model to SavedModel or TFLite.

    python -m export runs/demo/best.keras --out exported/demo
    python -m export best.keras --out exported/tfl --format tflite --quantize none,dynamic,float16
    python -m export best.keras --out exported/int8 --format tflite --quantize int8 \\
        --calibration fashion_mnist
    python -m export best.keras --out exported/compact --mode compact --round-to 8 \\
        --calibration fashion_mnist --calibration-samples 2000
    python -m export best.keras --out exported/cond --mode conditional --format tflite \\
        --quantize none,dynamic --calibration fashion_mnist
    python -m export best.keras --out exported/cond_xla --mode conditional --xla \\
        --calibration fashion_mnist        # SavedModel, serving functions compiled by XLA

Inputs of every exported signature are float32 (batch, H, W, C) images
preprocessed as in training (pixels / 255, minus the dataset mean, divided by
its std); see export.json in the output directory.

Modes (--mode) and formats (--format, --quantize):

  mode         what is exported                           saved_model  tflite --quantize
  masked       the model as trained (0/1 gate masks)      yes          none float16 dynamic int8
  compact      always-off channels removed (calibration)  yes          none float16 dynamic int8
  conditional  per block a branch between precompiled     yes          none float16 dynamic
               widths, BN folded, batch-1 TFLite          (any batch)  (batch 1; no int8)

Output directory (written to a temporary sibling, renamed when complete):
  saved_model/          --format saved_model: signatures serving_default and serving_with_gates
                        (conditional: serving_default is batch 1, plus serving_batch)
  model[_QUANT].tflite  --format tflite: one file per --quantize value, same two signatures
  compact.keras         --mode compact: the compacted Keras model
  compaction.json       --mode compact: gate categories per layer
  conditional.json      --mode conditional: per-block widths, executed MACs
  parity.json           parity with Keras inference (also printed)
  export.json           what was exported: input spec, preprocessing, outputs, files
  export_log.txt        this run's log
"""

import argparse
import json
import os
import shutil
import sys
import time

from bs_keras.cli.args import non_negative_int, positive_int
from bs_keras.cli.tf_startup import import_tensorflow
from bs_keras.io_utils import atomic_path

FORMATS = ("saved_model", "tflite")
MODES = ("masked", "compact", "conditional")
# --mode conditional --widths: fitted to the calibration data, or fixed fractions.
COND_FRACTIONS = {"quarters": (0.25, 0.5, 0.75, 1.0), "eighths": tuple(i / 8 for i in range(1, 9))}
COND_WIDTHS = ("auto", *COND_FRACTIONS)
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")


class ExportError(Exception):
    """A user-facing error: printed as `error: ...`, exit status 2."""


def _quantizations(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in QUANTIZATIONS]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"expected one or more of {', '.join(QUANTIZATIONS)} (comma-separated), got {text!r}"
        )
    return list(dict.fromkeys(values))


def build_parser(prog="bs-keras-export"):
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog=prog,
        description=doc[0],
        epilog="\n\n".join(doc[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="trained model (.keras)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=FORMATS, default="saved_model")
    p.add_argument(
        "--quantize", type=_quantizations, default=["none"],
        help="TFLite: none (default), float16, dynamic, int8; comma-separated for several files",
    )  # fmt: skip
    p.add_argument(
        "--mode", choices=MODES, default="masked",
        help="masked: the model as trained (gates multiply by 0/1); compact: remove always-off "
             "channels and fixed gates measured on the calibration data; conditional: per-block "
             "branches between precompiled widths (SavedModel, or batch-1 TFLite: none, float16, "
             "dynamic)",
    )  # fmt: skip
    p.add_argument(
        "--calibration",
        help="calibration data: a dataset name (fashion_mnist, cifar10, ...), a folder of images "
             "(normalized with mean 0.5/std 0.5) or a .npy of preprocessed float32 images",
    )  # fmt: skip
    p.add_argument("--calibration-samples", type=positive_int, default=256)
    p.add_argument("--round-to", type=positive_int, help="compact: keep widths a multiple of this")
    p.add_argument(
        "--widths", choices=COND_WIDTHS, default=None,
        help="conditional: precompiled widths per block. auto (default): at most --max-widths widths "
             "fitted to the widths the calibration data needs, plus the full width; quarters / "
             "eighths: fixed fractions of each block",
    )  # fmt: skip
    p.add_argument("--max-widths", type=positive_int, default=None,
                   help="conditional, --widths auto: widths per block besides the full one (default 6)")
    p.add_argument(
        "--xla", action="store_true",
        help="conditional, saved_model: compile the serving functions with XLA (jit_compile; "
             "on first call per input shape); branches become nested tf.cond and the weights graph "
             "constants (stored in saved_model.pb, once per input shape)",
    )  # fmt: skip
    p.add_argument(
        "--parity-samples", type=positive_int, default=128,
        help="samples for the parity table (calibration images, else seeded N(0, 1) inputs)",
    )  # fmt: skip
    p.add_argument("--latency-runs", type=non_negative_int, default=20,
                   help="batch-1 calls timed per variant in the parity table (0: none)")
    p.add_argument("--threads", type=positive_int, default=2, help="LiteRT interpreter threads")
    p.add_argument("--data-dir", help="TFDS data directory (dataset calibration)")
    p.add_argument("--manual-dir", help="directory with dataset source archives")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--verbose", action="store_true",
                   help="show TensorFlow's C++ start-up log (CPU instructions, oneDNN, CUDA), hidden unless "
                   "TF_CPP_MIN_LOG_LEVEL is set")
    return p


def validate_args(parser, args):
    """Checks that need no TensorFlow; calls `parser.error` (exit 2)."""
    if not os.path.exists(args.model):
        parser.error(f"model file {args.model!r} does not exist")
    if os.path.isdir(args.model) or not args.model.endswith(".keras"):
        parser.error(f"expected a Keras v3 model file ending in .keras, got {args.model!r}")
    if args.format == "saved_model" and args.quantize != ["none"]:
        parser.error(
            f"--quantize {','.join(args.quantize)} applies to --format tflite; "
            "a SavedModel is exported in float32"
        )
    if "int8" in args.quantize and not args.calibration:
        parser.error("--quantize int8 needs --calibration (representative data for the activation ranges)")
    if args.mode == "compact" and not args.calibration:
        parser.error("--mode compact needs --calibration (the gate categories are measured on it)")
    # --- conditional mode (export.conditional) ---
    if args.mode == "conditional" and not args.calibration:
        parser.error("--mode conditional needs --calibration (channels are ordered by open frequency)")
    if args.mode == "conditional" and "int8" in args.quantize:
        parser.error(
            "--mode conditional --format tflite supports --quantize none, float16, dynamic; int8 is "
            "not supported (the converter quantizes only the width branches the calibration data "
            "visits and leaves the rest in float32: not a full-integer model)"
        )
    if args.xla and (args.mode != "conditional" or args.format != "saved_model"):
        parser.error("--xla applies to --mode conditional --format saved_model (TFLite has no XLA)")
    # --- end conditional ---
    if args.mode != "conditional" and (args.widths or args.max_widths):
        parser.error("--widths and --max-widths apply to --mode conditional")
    if args.max_widths and args.widths not in (None, "auto"):
        parser.error("--max-widths applies to --widths auto")
    args.widths = args.widths or "auto"
    args.max_widths = args.max_widths or 6
    if args.round_to and args.mode != "compact":
        parser.error("--round-to applies to --mode compact")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        parser.error(f"--out {args.out!r} already exists (pass --overwrite to replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {args.out!r} exists and is not a directory")
    if os.path.abspath(args.model).startswith(out + os.sep):
        parser.error("--out must not contain the model file")


class _Log:
    def __init__(self):
        self.lines = []

    def __call__(self, text=""):
        print(text, flush=True)
        self.lines.extend(str(text).split("\n"))

    def text(self):
        return "\n".join(self.lines) + "\n"


def _load_model(path):
    import keras

    import bs_keras

    bs_keras.register_custom_objects()
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # corrupt zip, unknown layer, not a model, ...
        raise ExportError(f"cannot load {path!r} as a Keras model: {type(e).__name__}: {e}") from e
    if not isinstance(model, keras.Model):
        raise ExportError(f"{path!r} does not hold a Keras model.")
    return model


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _preprocessing(calibration):
    """A description of the expected input normalization, for export.json."""
    from bs_keras import data as bs_data

    text = (
        "float32 NHWC images: pixels scaled to [0, 1], minus the training dataset's per-channel "
        "mean, divided by its std (bs_keras.data)"
    )
    known = {
        "fashion_mnist": (bs_data.FASHION_MNIST_MEAN, bs_data.FASHION_MNIST_STD),
        "cifar10": (bs_data.CIFAR10_MEAN, bs_data.CIFAR10_STD),
        "imagenet2012": (bs_data.IMAGENET_MEAN, bs_data.IMAGENET_STD),
    }
    out = {"description": text}
    if calibration in known:
        out["calibration_dataset"] = calibration
        out["mean"], out["std"] = (list(v) for v in known[calibration])
    elif calibration and not calibration.lower().endswith(".npy"):
        out["calibration_dataset"] = calibration
        out["mean"], out["std"] = list(bs_data.DEFAULT_MEAN), list(bs_data.DEFAULT_STD)
    return out


def _compact(model, images, round_to, calibration, tmp, files, log):
    """Compacts `model`, writes compact.keras and compaction.json into `tmp`.

    Returns the compact model and the function expanding its gate masks to
    the original layout.
    """
    from bs_keras.macs import count_macs
    from bs_keras.deploy import compact as compact_lib

    compact, plans = compact_lib.compact_model(model, images, round_to=round_to, return_plan=True)
    compact.save(os.path.join(tmp, "compact.keras"))
    params = [int(model.count_params()), int(compact.count_params())]
    macs = [int(count_macs(model)), int(count_macs(compact))]
    summary = {
        "calibration": calibration,
        "calibration_samples": int(len(images)),
        "round_to": round_to,
        "params": params,
        "static_macs": macs,
        "gates": [p.summary() for p in plans],
    }
    _write_json(os.path.join(tmp, "compaction.json"), summary)
    files += ["compact.keras", "compaction.json"]
    log(f"compact    {params[0]:,} -> {params[1]:,} parameters, "
        f"{macs[0] / 1e6:.2f} -> {macs[1] / 1e6:.2f} M static MACs")  # fmt: skip
    for s in summary["gates"]:
        removed = "" if s["gate_kept"] else ", gate removed"
        log(f"  {s['gate']:<24} on/cond/off {s['always_on']}/{s['conditional']}/{s['always_off']}"
            f" -> {s['new_channels']} channels{removed}")  # fmt: skip

    def expand(masks, n):
        return compact_lib.expand_gate_masks(plans, masks, n)

    return compact, expand


def _write_tflite(convert, quantize, threads, tmp, files, log, what=""):
    """Runs `convert()`, writes the .tflite into `tmp`; returns (runner, size)."""
    from bs_keras.deploy import tflite

    start = time.time()
    try:
        flatbuffer = convert()
    except ValueError:
        raise
    except Exception as e:  # converter errors have many types
        raise ExportError(f"TFLite conversion ({quantize}{what}) failed: {type(e).__name__}: {e}") from e
    name = tflite.tflite_filename(quantize)
    with open(os.path.join(tmp, name), "wb") as f:
        f.write(flatbuffer)
    files.append(name)
    log(f"tflite     {name}: {len(flatbuffer) / 1024:.0f} KiB in {time.time() - start:.1f} s"
        + (f" ({what.strip(', ')})" if what else ""))
    return tflite.TFLiteRunner(flatbuffer, num_threads=threads), len(flatbuffer)


def _convert_tflite(sm_dir, quantize, images, threads, tmp, files, log):
    """Converts the SavedModel, writes the .tflite into `tmp`; returns (runner, size)."""
    from bs_keras.deploy import tflite

    def convert():
        return tflite.convert_saved_model(sm_dir, quantize, representative_images=images)

    return _write_tflite(convert, quantize, threads, tmp, files, log)


def _summary_head(args, input_shape):
    """The export.json fields every mode shares."""
    from bs_keras.deploy import savedmodel

    return {
        "model": os.path.abspath(args.model),
        "format": args.format,
        "mode": args.mode,
        "quantize": args.quantize if args.format == "tflite" else ["none"],
        "input": {
            "name": savedmodel.INPUT_NAME,
            "dtype": "float32",
            "shape": input_shape,
            "preprocessing": _preprocessing(args.calibration),
        },
    }


def _summary(args, exported, spec, files):
    """Contents of export.json."""
    from bs_keras.deploy import savedmodel

    functions = savedmodel.ServingFunctions(exported)
    with_gates = [*functions.output_names, *(g.name for g in functions.gates)]
    if functions.static_macs is not None:
        with_gates.append(savedmodel.MACS_OUTPUT)
    return {
        **_summary_head(args, [None if d is None else int(d) for d in spec.shape]),
        "signatures": {
            savedmodel.SERVING_DEFAULT: functions.output_names,
            savedmodel.SERVING_WITH_GATES: with_gates,
        },
        "static_macs": functions.static_macs,
        "files": files,
    }


def run_export(args, log):
    """The export itself; returns the summary dict. Raises ExportError."""
    from bs_keras.deploy import calibration as calib_lib
    from bs_keras.deploy import parity, savedmodel

    start = time.time()
    model = _load_model(args.model)
    spec = savedmodel.input_spec(model)
    log(f"model      {args.model}: '{model.name}', input {savedmodel.describe_spec(spec)}, "
        f"{model.count_params():,} parameters")  # fmt: skip

    images = None
    if args.calibration:
        images = calib_lib.load_calibration(
            args.calibration, spec.shape, n=args.calibration_samples,
            data_dir=args.data_dir, manual_dir=args.manual_dir,
        )  # fmt: skip
        log(f"calibration {len(images)} images from {args.calibration!r}")

    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with atomic_path(out) as tmp:
        os.mkdir(tmp)
        if args.mode == "conditional":
            summary = _conditional(args, model, spec, images, tmp, log)
            _finish(args, summary, tmp, start, log)
            return summary
        files, variants = [], []
        exported, expand = model, None
        if args.mode == "compact":
            exported, expand = _compact(model, images, args.round_to, args.calibration, tmp, files, log)
            variants.append(("keras compact", parity.KerasRunner(exported), {"expand": expand}))

        sm_dir = os.path.join(tmp, "saved_model")
        savedmodel.export_saved_model(exported, sm_dir)
        runner = savedmodel.SavedModelRunner(sm_dir)
        found = savedmodel.random_ops(runner.loaded)
        if found:
            raise ExportError(f"the exported graph contains random ops {found}; refusing to export")
        variants.append(("saved_model", runner, {"expand": expand}))
        if args.format == "saved_model":
            files.append("saved_model")
            log(f"saved_model signatures {', '.join(savedmodel.SIGNATURES)}")

        if args.format == "tflite":
            for q in args.quantize:
                runner, size = _convert_tflite(sm_dir, q, images, args.threads, tmp, files, log)
                variants.append((f"tflite {q}", runner, {"expand": expand, "size_bytes": size}))

        _parity(args, model, spec, images, variants, tmp, files, log)

        summary = _summary(args, exported, spec, files + ["export.json", "export_log.txt"])
        if args.format == "tflite":
            shutil.rmtree(sm_dir)
        _finish(args, summary, tmp, start, log)
        return summary


def _parity(args, model, spec, images, variants, tmp, files, log):
    """Runs, prints and writes (parity.json) the parity table; returns its rows."""
    import numpy as np

    from bs_keras.deploy import parity

    if images is not None:
        parity_images, parity_source = images[: args.parity_samples], repr(args.calibration)
    else:
        rng = np.random.default_rng(0)
        shape = (args.parity_samples, *spec.shape[1:])
        parity_images = rng.standard_normal(shape).astype(np.float32)
        parity_source = "seeded N(0, 1) inputs (no --calibration)"
    rows = parity.parity_rows(model, parity_images, variants, latency_runs=args.latency_runs)
    log(f"\nparity with Keras inference of '{model.name}' on {len(parity_images)} "
        f"samples from {parity_source}:")  # fmt: skip
    log(parity.format_table(rows))
    _write_json(
        os.path.join(tmp, "parity.json"),
        {"samples": int(len(parity_images)), "source": parity_source,
         "rows": [r.as_dict() for r in rows]},
    )  # fmt: skip
    files.append("parity.json")
    return rows


def _finish(args, summary, tmp, start, log):
    """Writes export.json and export_log.txt into `tmp` (moved into place after)."""
    _write_json(os.path.join(tmp, "export.json"), summary)
    log(f"\nwrote {args.out} ({', '.join(summary['files'])}) in {time.time() - start:.1f} s")
    with open(os.path.join(tmp, "export_log.txt"), "w") as f:
        f.write(log.text())


def _conditional(args, model, spec, images, tmp, log):
    """--mode conditional: writes the SavedModel or .tflite files, conditional.json and
    parity.json into `tmp`; returns the export.json summary."""
    from bs_keras.deploy import conditional as cond_lib
    from bs_keras.deploy import conditional_serving as serving_lib
    from bs_keras.deploy import savedmodel

    widths = COND_FRACTIONS.get(args.widths, "auto")
    module = cond_lib.conditional_model(model, images, widths=widths, max_widths=args.max_widths,
                                        jit_compile=args.xla)
    files, variants = [], []
    if args.format == "saved_model":
        sm_dir = os.path.join(tmp, "saved_model")
        module.save(sm_dir)
        runner = serving_lib.ConditionalRunner(sm_dir)
        found = savedmodel.random_ops(runner.loaded)
        if found:
            raise ExportError(f"the exported graph contains random ops {found}; refusing to export")
        files.append("saved_model")
        variants.append(("saved_model", runner, {}))
        signatures = {
            serving_lib.SERVING_DEFAULT: [1, *spec.shape[1:]],
            serving_lib.SERVING_BATCH: [None, *spec.shape[1:]],
            serving_lib.SERVING_WITH_GATES: [None, *spec.shape[1:]],
        }
        log(f"saved_model signatures {', '.join(signatures)} (conditional{', XLA' if args.xla else ''})")
    else:
        variants.append(("tf conditional", serving_lib.ConditionalRunner(module), {}))
        signatures = {
            serving_lib.SERVING_DEFAULT: [1, *spec.shape[1:]],
            serving_lib.SERVING_WITH_GATES: [1, *spec.shape[1:]],
        }
        for q in args.quantize:
            runner, size = _write_tflite(lambda q=q: module.to_tflite(q, with_gates=True), q, args.threads,
                                         tmp, files, log, what=", conditional")
            variants.append((f"tflite {q}", runner, {"size_bytes": size}))

    parity_images = images[: args.parity_samples]
    info = serving_lib.describe(module, parity_images, calibration_samples=len(images))
    _write_json(os.path.join(tmp, "conditional.json"), info)
    files.append("conditional.json")
    log(f"conditional {len(info['gates'])} gated blocks, widths "
        + "; ".join(f"{g['gate']} {g['widths']}" for g in info["gates"][:3])
        + ("; ..." if len(info["gates"]) > 3 else "")
        + f"\n           executed MACs at batch 1 on {len(parity_images)} samples: "
        f"{info['mean_executed_mac_ratio']:.3f} of {info['static_macs'] / 1e6:.2f} M static")  # fmt: skip

    _parity(args, model, spec, images, variants, tmp, files, log)
    output = module.output_name
    return {
        **_summary_head(args, signatures[serving_lib.SERVING_DEFAULT]),
        "signatures": {
            name: {
                "input_shape": shape,
                "outputs": [output] if name != serving_lib.SERVING_WITH_GATES
                else [output, *module.gate_names, serving_lib.EXECUTED_MACS, serving_lib.WIDTHS],
            }
            for name, shape in signatures.items()
        },
        "static_macs": int(module.static_macs),
        "files": files + ["export.json", "export_log.txt"],
    }


def main(argv=None, prog="bs-keras-export"):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    validate_args(parser, args)
    import_tensorflow(verbose=args.verbose)
    log = _Log()
    try:
        run_export(args, log)
    except (ExportError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
