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

The export itself is `bs_keras.deploy.export(model, out, ...)`, whose arguments
the flags name; this command parses them, calls it and reports errors.
"""

import argparse
import sys

from bs_keras import deploy
from bs_keras.cli.args import non_negative_int, positive_int
from bs_keras.cli.tf_startup import import_tensorflow
from bs_keras.deploy import options
from bs_keras.deploy.options import COND_WIDTHS, FORMATS, MODES, ExportError, OptionError


def _quantizations(text):
    try:
        return options.parse_quantize(text)
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _outputs(text):
    try:
        return options.parse_outputs(text)
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser(prog="bs-keras-export"):
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog=prog,
        description=doc[0],
        epilog="\n\n".join([*doc[1:], options.__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]]),
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
        "--outputs", type=_outputs, default=None,
        help="conditional: model outputs to export, comma-separated (default: the first; a PSPNet's "
             "seg without its auxiliary head, --outputs seg,aux keeps both); the other modes export all",
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
    try:
        options.check_options(
            args.model, args.out, format=args.format, mode=args.mode, quantize=args.quantize,
            calibration=args.calibration, round_to=args.round_to, widths=args.widths,
            max_widths=args.max_widths, xla=args.xla, outputs=args.outputs, overwrite=args.overwrite,
        )
    except OptionError as e:
        parser.error(str(e))


def main(argv=None, prog="bs-keras-export"):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    validate_args(parser, args)
    import_tensorflow(verbose=args.verbose)
    try:
        deploy.export(
            args.model, args.out, mode=args.mode, format=args.format, quantize=args.quantize,
            calibration=args.calibration, calibration_samples=args.calibration_samples,
            round_to=args.round_to, widths=args.widths, max_widths=args.max_widths, xla=args.xla,
            outputs=args.outputs, parity_samples=args.parity_samples, latency_runs=args.latency_runs, threads=args.threads,
            data_dir=args.data_dir, manual_dir=args.manual_dir, overwrite=args.overwrite,
        )
    except (ExportError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
