"""SavedModel export through Keras' `ExportArchive`, and a checked runner.

The SavedModel has two signatures, both taking one input `images`: float32
`(batch, H, W, C)` images preprocessed exactly as in training (`bs_keras.data`
scales pixels to [0, 1], then subtracts the dataset's per-channel mean and
divides by its std: Fashion-MNIST 0.2860/0.3530, CIFAR-10
(0.4914, 0.4822, 0.4465)/(0.2470, 0.2435, 0.2616), ImageNet
(0.485, 0.456, 0.406)/(0.229, 0.224, 0.225), image folders and other TFDS
datasets 0.5/0.5):

- `serving_default` -> `{"probabilities": (batch, classes)}` (the model's
  softmax output; a model without a final softmax names it `outputs`);
- `serving_with_gates` -> the same plus one `(batch, num_gates)` float32 0/1
  mask per `ChannelGate`, named after the gate layer, and
  `conditional_macs`: int64 `(batch,)`, the MACs each sample executes,
  `static - sum(closed gates * group_size * MACs per channel)` with the
  constants of `bs_keras.macs.gate_table` (as `bs_keras.macs.conditional_macs`).

Gates are the deterministic inference gates (`logit > 0`): the graphs contain
no random op. An image of the wrong size fails inside the graph with a message
naming the expected signature; `SavedModelRunner` also checks dtype and rank
before calling.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from bs_keras.gates import find_gates, record_gates
from bs_keras.io_utils import atomic_path
from bs_keras.macs import count_macs, gate_table

SERVING_DEFAULT = "serving_default"
SERVING_WITH_GATES = "serving_with_gates"
INPUT_NAME = "images"
MACS_OUTPUT = "conditional_macs"
SIGNATURES = (SERVING_DEFAULT, SERVING_WITH_GATES)


def input_spec(model):
    """`tf.TensorSpec` of the `images` input: `(None, H, W, C)` float32."""
    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        raise ValueError(
            "Export needs a model with exactly one image input. "
            f"Received a model with {len(inputs or [])} inputs."
        )
    shape = tuple(inputs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"Export needs an NHWC image input. Received input shape {shape}.")
    return tf.TensorSpec((None, *shape[1:]), tf.float32, name=INPUT_NAME)


def describe_spec(spec):
    dims = ", ".join("None" if d is None else str(d) for d in spec.shape)
    return f"{spec.dtype.name} `{spec.name}` of shape ({dims})"


def output_names(model):
    """Output names of the signatures for the model's output structure."""
    outputs = model.output
    if isinstance(outputs, dict):
        return list(outputs)
    if isinstance(outputs, (list, tuple)):
        return [f"outputs_{i}" for i in range(len(outputs))]
    layer = outputs._keras_history[0]
    softmax = isinstance(layer, keras.layers.Softmax) or (
        getattr(layer, "activation", None) is keras.activations.softmax
    )
    return ["probabilities" if softmax else "outputs"]


def _as_dict(model, outputs):
    names = output_names(model)
    if isinstance(outputs, dict):
        return dict(outputs)
    if isinstance(outputs, (list, tuple)):
        return dict(zip(names, outputs))
    return {names[0]: outputs}


def _shape_check(images, spec, signature):
    """In-graph check of the image size, naming the expected signature."""
    expected = [-1 if d is None else int(d) for d in spec.shape]
    shape = tf.shape(images)
    rank = len(expected)
    # Padded so that a wrong rank fails this check, not a shape mismatch in it.
    padded = tf.concat([shape, tf.fill([rank], -2)], axis=0)[:rank]
    known = tf.constant([d >= 0 for d in expected])
    same = tf.logical_or(tf.logical_not(known), tf.equal(padded, expected))
    same = tf.logical_and(tf.reduce_all(same), tf.equal(tf.size(shape), rank))
    message = (
        f"Signature `{signature}` expects {describe_spec(spec)} (normalized images); "
        "received images of shape"
    )
    check = tf.debugging.Assert(same, [message, shape])
    with tf.control_dependencies([check]):
        return tf.identity(images)


class ServingFunctions:
    """The two serving functions of a model, as plain callables.

    `serve(images)` and `serve_with_gates(images)` return dicts of tensors;
    wrap them in `tf.function(input_signature=[spec])` (ExportArchive does).

    Args:
        model: functional Keras model with one image input.
        check_shape: add the in-graph image-size check (the TFLite converter
            does not need it).
    """

    def __init__(self, model, check_shape=True):
        self.model = model
        self.spec = input_spec(model)
        self.check_shape = check_shape
        self.gates = find_gates(model)
        self.output_names = output_names(model)
        clash = {g.name for g in self.gates} & {*self.output_names, MACS_OUTPUT}
        if clash:
            raise ValueError(f"Gate names clash with output names: {sorted(clash)}")
        try:
            self.static_macs = count_macs(model)
            self.table = gate_table(model) if self.gates else []
        except ValueError:  # unknown spatial size: no MAC count
            self.static_macs, self.table = None, []

    def _prepare(self, images, signature):
        return _shape_check(images, self.spec, signature) if self.check_shape else images

    def serve(self, images):
        images = self._prepare(images, SERVING_DEFAULT)
        return _as_dict(self.model, self.model(images, training=False))

    def serve_with_gates(self, images):
        images = self._prepare(images, SERVING_WITH_GATES)
        with record_gates() as record:
            outputs = _as_dict(self.model, self.model(images, training=False))
        for gate in self.gates:
            calls = record.get(gate, [])
            if len(calls) != 1:
                raise ValueError(
                    f"Gate '{gate.name}' ran {len(calls)} times in one model call; "
                    "serving_with_gates needs every gate to run exactly once."
                )
            outputs[gate.name] = tf.identity(tf.cast(calls[0], tf.float32))
        if self.static_macs is not None:
            batch = tf.shape(images)[:1]
            macs = tf.fill(batch, tf.constant(self.static_macs, tf.int64))
            for info in self.table:
                # int64 arithmetic: exact, and no float16 overflow in TFLite.
                closed = tf.cast(tf.reduce_sum(1.0 - outputs[info.gate.name], axis=-1), tf.int64)
                per_gate = int(round(info.gate.group_size * info.macs_per_channel))
                macs = macs - closed * tf.constant(per_gate, tf.int64)
            outputs[MACS_OUTPUT] = macs
        return outputs


def export_saved_model(model, path, check_shape=True):
    """Writes the SavedModel with `serving_default` and `serving_with_gates`.

    Written to a temporary directory next to `path`, then renamed: `path`
    never holds a half-written model. `path` must not exist.

    Args:
        model: functional Keras model (masked or compacted).
        path: output directory.
        check_shape: include the in-graph image-size check.

    Returns:
        `path`.
    """
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} already exists.")
    functions = ServingFunctions(model, check_shape=check_shape)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_DEFAULT, functions.serve, input_signature=[functions.spec])
    archive.add_endpoint(
        SERVING_WITH_GATES, functions.serve_with_gates, input_signature=[functions.spec]
    )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with atomic_path(path) as tmp:
        archive.write_out(tmp, verbose=False)
    return path


def check_images(images, spec, signature):
    """Raises a ValueError naming `signature` unless `images` matches `spec`."""
    dtype = getattr(images, "dtype", None)
    shape = tuple(getattr(images, "shape", ()))
    dtype_name = tf.as_dtype(dtype).name if dtype is not None else type(images).__name__
    ok = dtype_name == spec.dtype.name and len(shape) == len(spec.shape) and all(
        e is None or e == d for e, d in zip(spec.shape, shape)
    )
    if not ok:
        raise ValueError(
            f"Signature `{signature}` expects {describe_spec(spec)} (normalized images). "
            f"Received: dtype={dtype_name}, shape={shape}."
        )


class SavedModelRunner:
    """Loads an exported SavedModel and calls its signatures on NumPy batches.

    Inputs are checked against the signature (dtype float32, rank 4, image
    size) before the call; outputs are NumPy arrays.

    Args:
        path: SavedModel directory written by `export_saved_model`.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        # Keep the loaded object alive: its signatures reference its variables.
        self.loaded = tf.saved_model.load(self.path)
        missing = [s for s in SIGNATURES if s not in self.loaded.signatures]
        if missing:
            raise ValueError(f"{self.path!r} has no signature(s) {missing}; was it written by export?")
        self.spec = self._spec(SERVING_DEFAULT)

    def _spec(self, signature):
        _, kwargs = self.loaded.signatures[signature].structured_input_signature
        return kwargs[INPUT_NAME]

    def run(self, images, signature=SERVING_DEFAULT, batch_size=256):
        check_images(images, self._spec(signature), signature)
        fn = self.loaded.signatures[signature]
        return run_in_chunks(lambda batch: fn(**{INPUT_NAME: tf.constant(batch)}), images, batch_size)

    def __call__(self, images):
        return self.run(images, SERVING_DEFAULT)

    def with_gates(self, images):
        return self.run(images, SERVING_WITH_GATES)


def run_in_chunks(call, images, batch_size):
    """`call(batch) -> {name: array}` over `images` in chunks, outputs concatenated."""
    chunks = [
        {k: np.array(v) for k, v in call(images[i : i + batch_size]).items()}  # copies
        for i in range(0, max(len(images), 1), batch_size)
    ]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def graph_op_types(loaded_or_path):
    """Op types of every signature graph of a SavedModel, with the function library."""
    loaded = (
        tf.saved_model.load(os.fspath(loaded_or_path))
        if isinstance(loaded_or_path, (str, os.PathLike))
        else loaded_or_path
    )
    ops = set()
    for fn in loaded.signatures.values():
        graph_def = fn.graph.as_graph_def()
        ops.update(node.op for node in graph_def.node)
        for function in graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


def random_ops(loaded_or_path):
    """The random op types in the exported graphs (empty for a deterministic export)."""
    return sorted(op for op in graph_op_types(loaded_or_path) if "Random" in op)
