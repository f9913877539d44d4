"""TFLite conversion of an exported SavedModel, and a LiteRT runner.

`convert_saved_model(path, quantize)` converts both signatures
(`serving_default` and `serving_with_gates`, sharing one set of weights) with
`tf.lite.TFLiteConverter`:

- `none`: float32;
- `float16`: weights stored as float16, computed in float32;
- `dynamic`: dynamic-range quantization (int8 weights, activations quantized
  on the fly);
- `int8`: full-integer ops (`TFLITE_BUILTINS_INT8`) calibrated on a
  representative dataset; input and output stay float32.

The models run with `ai_edge_litert.interpreter.Interpreter` (`TFLiteRunner`;
it also runs the batch-1 conditional models of `bs_keras.deploy.conditional`, one
sample per call).
"""

import os
import warnings

import numpy as np
import tensorflow as tf

from bs_keras import native_log
from bs_keras.deploy.savedmodel import (
    INPUT_NAME, SERVING_DEFAULT, SERVING_WITH_GATES, SIGNATURES, check_images, run_in_chunks,
)

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
REPRESENTATIVE_LIMIT = 200


def tflite_filename(quantize):
    return "model.tflite" if quantize == "none" else f"model_{quantize}.tflite"


def convert_saved_model(saved_model_dir, quantize="none", representative_images=None):
    """Converts a SavedModel written by `export_saved_model` to TFLite.

    Args:
        saved_model_dir: the SavedModel directory.
        quantize: one of `QUANTIZATIONS`.
        representative_images: `(N, H, W, C)` float32 preprocessed images,
            required for `int8` (the first 200 are used).

    Returns:
        The flatbuffer as `bytes`.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}. Received: quantize={quantize!r}")
    converter = tf.lite.TFLiteConverter.from_saved_model(
        os.fspath(saved_model_dir), signature_keys=list(SIGNATURES)
    )
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise ValueError(
                "int8 quantization needs representative images (calibration data) "
                "to choose the activation ranges."
            )
        images = np.asarray(representative_images, np.float32)[:REPRESENTATIVE_LIMIT]

        def representative():
            for i in range(len(images)):
                for key in SIGNATURES:
                    yield key, {INPUT_NAME: images[i : i + 1]}

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
    with warnings.catch_warnings():
        # int8 calibration runs the deprecated tf.lite.Interpreter internally.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        return converter.convert()


class TFLiteRunner:
    """Runs a converted model's signatures with the LiteRT interpreter.

    Args:
        model: path of a `.tflite` file or the flatbuffer bytes.
        num_threads: interpreter threads.
    """

    def __init__(self, model, num_threads=2):
        from ai_edge_litert.interpreter import Interpreter

        with native_log.litert_info_hidden():  # "INFO: Created ... XNNPACK delegate", on allocation
            if isinstance(model, (bytes, bytearray)):
                self.interpreter = Interpreter(model_content=bytes(model), num_threads=num_threads)
                self.size_bytes = len(model)
            else:
                self.interpreter = Interpreter(model_path=os.fspath(model), num_threads=num_threads)
                self.size_bytes = os.path.getsize(model)
            signatures = self.interpreter.get_signature_list()
            missing = [s for s in SIGNATURES if s not in signatures]
            if missing:
                raise ValueError(f"The TFLite model has no signature(s) {missing}; was it written by export?")
            self.interpreter.allocate_tensors()  # applies the delegate now, not at the first call
            self._runners = {s: self.interpreter.get_signature_runner(s) for s in SIGNATURES}
        details = self._runners[SERVING_DEFAULT].get_input_details()[INPUT_NAME]
        shape = [None if d < 0 else int(d) for d in details["shape_signature"]]
        # A batch-1 model (the conditional export) runs one sample per call.
        self.fixed_batch = shape[0] if shape[0] is not None else None
        shape[0] = None
        self.spec = tf.TensorSpec(shape, tf.as_dtype(details["dtype"]), name=INPUT_NAME)

    def run(self, images, signature=SERVING_DEFAULT, batch_size=64):
        check_images(images, self.spec, signature)
        runner = self._runners[signature]
        if self.fixed_batch:
            batch_size = self.fixed_batch
        return run_in_chunks(lambda batch: runner(**{INPUT_NAME: batch}), images, batch_size)

    def __call__(self, images):
        return self.run(images, SERVING_DEFAULT)

    def with_gates(self, images):
        return self.run(images, SERVING_WITH_GATES)
