"""Serving and saving a `FoldedModel`: SavedModel signatures, TFLite, runners.

`save(module, path)` writes the SavedModel signatures `serving_default`
(batch 1), `serving_batch` (any batch) and `serving_with_gates` (also gate
masks, executed MACs and widths); `to_tflite(module, quantize)` converts the
batch-1 function for LiteRT; `ConditionalRunner` puts a module or its
SavedModel behind the parity-table interface of `bs_keras.deploy.parity`;
`describe` is what `bs_keras.deploy.export` writes to conditional.json.
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

SERVING_DEFAULT = "serving_default"  # fixed batch 1
SERVING_BATCH = "serving_batch"  # any batch size
SERVING_WITH_GATES = "serving_with_gates"  # also gate masks, executed MACs and widths
INPUT_NAME = "images"
EXECUTED_MACS = "executed_macs"
WIDTHS = "widths"
TFLITE_QUANTIZATIONS = ("none", "float16", "dynamic")
INT8_UNSUPPORTED = (
    "int8 (full-integer) quantization of a conditional model is not supported: the converter "
    "only quantizes the width branches that the calibration images visit and leaves the rest "
    "(and the gate MLPs) in float32 between quantize/dequantize ops. Use none, float16 or dynamic."
)




def _serving_signatures(module, serving, dynamic_batch=True):
    spec1 = tf.TensorSpec((1,) + module.input_shape, tf.float32, name=INPUT_NAME)
    spec = tf.TensorSpec((None,) + module.input_shape, tf.float32, name=INPUT_NAME)
    sigs = {SERVING_DEFAULT: serving.serve_default.get_concrete_function(spec1)}
    if dynamic_batch:
        sigs[SERVING_BATCH] = serving.serve_default.get_concrete_function(spec)
    sigs[SERVING_WITH_GATES] = serving.serve_with_gates.get_concrete_function(spec if dynamic_batch else spec1)
    return sigs


def save(module, path, dynamic_batch=True):
    """Writes `module` (a `FoldedModel`) as a SavedModel; see `FoldedModel.save`."""
    if module.constant_weights:
        serving = _SharedServing(module, (1, None) if dynamic_batch else (1,))
    else:
        serving = (_XlaServing if module.jit_compile else _Serving)(module)
    signatures = _serving_signatures(module, serving, dynamic_batch)
    for batch in (1, None) if dynamic_batch else (1,):  # the reloaded object's __call__
        serving.__call__.get_concrete_function(
            tf.TensorSpec((batch,) + module.input_shape, tf.float32, name=INPUT_NAME))
    tf.saved_model.save(serving, path, signatures=signatures)
    return path


def to_tflite(module, quantize="none", with_gates=False):
    """TFLite flatbuffer of the batch-1 function; see `FoldedModel.to_tflite`."""
    quantize = {"dynamic_range": "dynamic"}.get(quantize, quantize)
    if quantize == "int8":
        raise ValueError(INT8_UNSUPPORTED)
    if quantize not in TFLITE_QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {TFLITE_QUANTIZATIONS}. Received: {quantize!r}")
    spec = tf.TensorSpec((1,) + module.input_shape, tf.float32, name=INPUT_NAME)
    tmp = None
    with module.tracing_for_tflite():
        try:
            if with_gates:
                tmp = tempfile.mkdtemp(prefix="conditional_tflite_")
                serving = _Serving(module)
                tf.saved_model.save(serving, tmp, signatures=_serving_signatures(module, serving, False))
                converter = tf.lite.TFLiteConverter.from_saved_model(
                    tmp, signature_keys=[SERVING_DEFAULT, SERVING_WITH_GATES]
                )
            else:
                fn = tf.function(module.forward).get_concrete_function(spec)
                converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
            if quantize != "none":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantize == "float16":
                converter.target_spec.supported_types = [tf.float16]
            return converter.convert()
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)


class _Serving(tf.Module):
    """What `save` writes for `tf.Variable` weights: the variables and the serving functions."""

    def __init__(self, folded):
        super().__init__(name="conditional_serving")
        self._vars = list(folded.weight_variables)
        self._forward = folded.forward  # bound methods: not tracked
        self._outputs = folded.forward_outputs
        self._with_gates = folded.forward_with_gates

    @tf.function
    def __call__(self, images):
        return self._forward(images)

    # No method name may be a prefix of another: with `serve` and
    # `serve_with_gates` the TF 2.21 TFLite converter kept only one signature.
    @tf.function
    def serve_default(self, images):
        return self._outputs(images)

    @tf.function
    def serve_with_gates(self, images):
        return self._with_gates(images)


class _XlaServing(_Serving):
    """`_Serving` with every function compiled by XLA (`jit_compile=True`)."""

    __call__ = tf.function(_Serving.__call__.python_function, jit_compile=True)
    serve_default = tf.function(_Serving.serve_default.python_function, jit_compile=True)
    serve_with_gates = tf.function(_Serving.serve_with_gates.python_function, jit_compile=True)


class _SharedServing(tf.Module):
    """What `save` writes for constant weights: every serving
    function calls one core function (`with_gates`; XLA-compiled with
    `jit_compile=True`), so the weights, embedded in its graph, are stored
    once per input shape instead of once per signature."""

    def __init__(self, folded, batch_sizes):
        super().__init__(name="conditional_serving")
        core = tf.function(folded.forward_with_gates, jit_compile=True if folded.jit_compile else None)
        # Traced here, once per batch size: a tf.function called while another
        # function is traced is traced again for that caller.
        self._cores = {  # string keys: saved as a trackable dict
            str(b): core.get_concrete_function(tf.TensorSpec((b,) + folded.input_shape, tf.float32, name=INPUT_NAME))
            for b in batch_sizes
        }
        self._output_names = list(folded.output_names)

    def _core(self, images):
        key = str(images.shape[0])
        return self._cores[key if key in self._cores else "None"](images)

    @tf.function
    def __call__(self, images):
        return self._core(images)[self._output_names[0]]

    @tf.function
    def serve_default(self, images):
        core = self._core(images)
        return {name: core[name] for name in self._output_names}

    @tf.function
    def serve_with_gates(self, images):
        return self._core(images)


class ConditionalRunner:
    """A conditional model behind the parity runner interface (`bs_keras.deploy.parity`).

    Args:
        model: a `FoldedModel`, or the path of a SavedModel written by
            `FoldedModel.save`.

    `__call__(images)` returns `{output_name: output}` (batches of
    `batch_size`: exact, every batch runs the widest width a sample needs);
    `with_gates(images)` returns the `with_gates` outputs computed one sample
    at a time, so that `widths` and `executed_macs` are the batch-1 ones.
    """

    def __init__(self, model, batch_size=64):
        self.batch_size = batch_size
        if isinstance(model, tf.Module) and hasattr(model, "with_gates"):  # a FoldedModel
            self.module = model
            self._serve = lambda x: {model.output_name: model(x)}  # the primary output
            self._gates = model.with_gates
        else:
            # Keep the loaded object alive: its signatures reference its variables.
            self.loaded = tf.saved_model.load(os.fspath(model))
            sigs = self.loaded.signatures
            self._serve = lambda x: sigs[SERVING_DEFAULT if x.shape[0] == 1 else SERVING_BATCH](images=x)
            self._gates = lambda x: sigs[SERVING_WITH_GATES](images=x)

    @staticmethod
    def _run(fn, images, batch_size):
        images = np.asarray(images, np.float32)
        chunks = [
            {k: np.asarray(v) for k, v in fn(tf.constant(images[i : i + batch_size])).items()}
            for i in range(0, len(images), batch_size)
        ]
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def __call__(self, images):
        return self._run(self._serve, images, self.batch_size)

    def with_gates(self, images):
        return self._run(self._gates, images, 1)


def describe(module, images=None, calibration_samples=None):
    """What `bs_keras.deploy.export(..., mode="conditional")` writes to conditional.json.

    Per gated block the gate, its channels and the precompiled widths;
    with `images`, the mean executed MACs at batch 1 on them.
    """
    summary = {
        "branching": f"{'nested tf.cond' if module.branching == 'cond' else 'tf.switch_case'}"
        f"{', XLA' if module.jit_compile else ''} (SavedModel); nested tf.cond (TFLite IF)",
        "calibration_samples": calibration_samples,
        "weights": "graph constants" if module.constant_weights else "tf.Variables",
        "width_choice": module.width_choice,
        "gates": [
            {"gate": g, "channels": int(c), "widths": [int(w) for w in ws]}
            for g, c, ws in zip(module.gate_names, module.gate_channels, module.bucket_widths)
        ],
        "static_macs": int(module.static_macs),
    }
    if images is not None:
        executed = module.executed_macs(images)
        summary["mean_executed_macs"] = float(executed.mean())
        summary["mean_executed_mac_ratio"] = float(executed.mean() / module.static_macs)
        summary["executed_macs_samples"] = int(len(images))
    return summary
