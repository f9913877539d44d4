"""Conditional execution of a channel-gated model: per-block width branches.

`conditional_model(model, calibration_images)` turns a functional gated
ResNet into a Keras-free, BN-folded `tf.Module` (`FoldedModel`) that runs, in
every gated block, only the smallest of a few precompiled widths covering the
open channels: the channels are reordered by their open frequency on the
calibration images (producer filters, gate logits and consumer slices
permuted together, so the function is unchanged), and at run time the gate
logits pick the branch; the result equals the Keras model's up to float
rounding. `folded_model(model)` is the same walk without branches (the model
as trained, BN folded), the fair TF baseline for benchmarks.

Example:

```python
cond = conditional_model(model, calibration_images, widths=(0.25, 0.5, 0.75, 1.0))
probs = cond(images)                       # == model(images, training=False)
outputs = cond.with_gates(images)          # also gate masks, executed MACs, widths
cond.save("exported/conditional")          # serving_default (batch 1), serving_batch, serving_with_gates
tflite = cond.to_tflite("dynamic", with_gates=True)   # batch 1, LiteRT IF branches
xla = conditional_model(model, calibration_images, jit_compile=True)  # XLA, nested tf.cond
```

`bs_keras.deploy.export(model, out, mode="conditional", calibration=...)` writes
these (`python -m export` on the command line); serving and saving are in
`bs_keras.deploy.conditional_serving`, the width
fitting in `bs_keras.deploy.widths`, the layer re-implementations in
`bs_keras.deploy.tf_layers`.
"""

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from bs_keras.blocks import ZeroPadShortcut
from bs_keras.deploy import conditional_serving
from bs_keras.deploy.conditional_serving import EXECUTED_MACS, INPUT_NAME, SERVING_BATCH, SERVING_DEFAULT, WIDTHS
from bs_keras.deploy.savedmodel import output_names
from bs_keras.deploy.tf_layers import (
    activation_fn,
    bn_affine,
    check_bn,
    conv_fn,
    conv_weights,
    dense_fn,
    depthwise_fn,
    depthwise_problem,
    depthwise_weights,
    pool_fn,
    resize_like_fn,
    select_branch,
    zero_pad_fn,
    zero_padding_fn,
)
from bs_keras.deploy.widths import bucket_widths, calibrated_widths  # noqa: F401  (re-exported)
from bs_keras.gates import ChannelGate
from bs_keras.graph import LayerGraph
from bs_keras.macs import count_macs, gate_masks, gate_table
from bs_keras.segmentation import AdaptiveAveragePooling2D, ResizeLike

_L = keras.layers


class FoldedModel(tf.Module):
    """A BN-folded TF re-implementation of a functional (gated) ResNet.

    Args:
        model: functional Keras model (gated or plain).
        calibration_images: `(N, H, W, C)` images measuring the gates' open
            frequencies (channel reordering); only for `mode="conditional"`.
        mode: "conditional" (per-block width branches, see module doc) or
            "masked" (full convolutions x 0/1 mask: the model as trained).
        widths: fractions of each gated width to precompile, or "auto":
            per block at most `max_widths` widths fitted to the widths the
            calibration images need (`calibrated_widths`), plus the full width.
        multiple_of: round every width up to a multiple of this.
        max_widths: for `widths="auto"`.
        batch_size: batch size for measuring the gates.
        branching: "switch_case" (one `Case` op per block) or "cond" (a
            balanced tree of `tf.cond`); default: "cond" with
            `jit_compile=True`, else "switch_case". TFLite export always
            uses "cond" (LiteRT IF).
        outputs: names of the model outputs to compute (see
            `bs_keras.deploy.savedmodel.output_names`), the first the
            primary one; default: the model's first output alone (a
            PSPNet's `seg`, its auxiliary head dropped). The layers no
            kept output needs are not folded and their MACs not counted.
        jit_compile: compile `__call__`, `with_gates` and the saved serving
            functions with XLA (on first call per input shape). Needs
            `branching="cond"` (XLA compiles nested `tf.cond`, not `Case`,
            in practical time).
        constant_weights: embed the weights in the traced functions as
            graph constants (XLA literals) instead of `tf.Variable`s.
            Default: `jit_compile` (faster under XLA: a launch no longer
            takes every variable of the width branches; figures in
            docs/LATENCY.md). `save` then stores the weights inside the
            functions, once per input shape (batch 1, and any batch with
            `dynamic_batch`): every signature calls one shared core function.

    Calling: `__call__` and `with_gates` (compiled functions), `executed_macs`,
    `chosen_widths`. Saving and conversion (`save`, `to_tflite`, done by
    `bs_keras.deploy.conditional_serving`) build on `forward` and
    `forward_with_gates` (the same as plain Python functions, traced into the
    serving functions), `weight_variables` and `tracing_for_tflite()`.
    """

    def __init__(
        self,
        model,
        calibration_images=None,
        mode="conditional",
        widths=(0.25, 0.5, 0.75, 1.0),
        multiple_of=8,
        batch_size=64,
        branching=None,
        max_widths=6,
        jit_compile=False,
        constant_weights=None,
        outputs=None,
        name=None,
    ):
        super().__init__(name=name)
        # Constants by default under XLA: measured faster (see the class doc).
        self.constant_weights = bool(jit_compile) if constant_weights is None else bool(constant_weights)
        if branching is None:
            branching = "cond" if jit_compile else "switch_case"
        if branching not in ("switch_case", "cond"):
            raise ValueError(f"branching must be 'switch_case' or 'cond'. Received: {branching!r}")
        if jit_compile and branching != "cond":
            raise ValueError(
                "jit_compile=True needs branching='cond' (nested tf.cond): XLA does not compile "
                "the switch_case module of a ResNet-50 in practical time (docs/LATENCY.md)."
            )
        if mode not in ("conditional", "masked"):
            raise ValueError(f"mode must be 'conditional' or 'masked'. Received: {mode!r}")
        if isinstance(widths, str) and widths != "auto":
            raise ValueError(f"widths must be fractions in (0, 1] or 'auto'. Received: {widths!r}")
        self.branching = branching
        self.jit_compile = bool(jit_compile)
        self.mode = mode
        self.width_choice = f"auto (at most {max_widths} + full)" if isinstance(widths, str) else list(widths)
        self.input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        # XLA when asked; None (not False): TF's default, no auto-clustering change.
        jit = True if jit_compile else None
        self._call_fn = tf.function(self.forward, jit_compile=jit)
        self._with_gates_fn = tf.function(self.forward_with_gates, jit_compile=jit)
        self._tflite = False  # True while tracing for TFLite: nested tf.cond, not Case
        self.weight_count = 0  # floats held (per-width branch kernels included)
        self._vars = []
        self._steps = []  # (kind, fn, input tensor ids, output tensor id)
        self._blocks = []  # one _GatedBlock per gate, in graph order
        self.gate_names = []
        self.gate_channels = []
        self.bucket_widths = []
        self.permutations = {}  # gate name -> channel order (new position -> old channel)
        self.gate_orders = {}  # gate name -> gate (group) order, same convention
        self._alias = {}  # tensor id -> tensor id (outputs of layers folded into another step)

        model = exported_part(model, outputs)  # the kept outputs and what they need
        problems = support_problems(model)
        if problems:  # before measuring the gates or folding a weight
            raise ValueError(refusal(problems))
        self.output_names = tuple(output_names(model))  # a tuple: tf.Module wraps lists
        self.output_name = self.output_names[0]
        # An empty batch gets an empty output of this shape (the branches' ops reject batch 0).
        shape = dict(_named_outputs(model))[self.output_name].shape[1:]
        self._empty_output_shape = None if None in shape else (0, *(int(d) for d in shape))
        graph = LayerGraph(model, purpose="conditional_model")
        masks = {}
        if mode == "conditional" and any(isinstance(n.operation, ChannelGate) for n in graph.nodes):
            if calibration_images is None:
                raise ValueError("mode='conditional' needs calibration_images.")
            masks = gate_masks(model, calibration_images, batch_size=batch_size)
        done = set()  # ids of nodes folded into a gated block or a preceding conv
        segments = {}  # consumer conv node id -> the gated block's step
        # Gated blocks first: producer conv [-> BN] [-> ReLU] -> gate -> consumer conv [-> BN] [-> ReLU].
        for node in graph.nodes:
            if isinstance(node.operation, ChannelGate):
                cnode, step = self._fold_gated_block(graph, node, masks, widths, multiple_of, max_widths, done)
                segments[id(cnode)] = step
        # The rest of the graph.
        for node in graph.nodes:
            if id(node) in segments:
                self._steps.append(segments[id(node)])
            elif id(node) not in done:
                step = self._fold_layer(graph, node, done)
                if step is not None:
                    self._steps.append(step)
                done.add(id(node))
        self._input_id = id(model.inputs[0])
        self._output_ids = {name: id(t) for name, t in _named_outputs(model)}
        self.static_macs = int(count_macs(model))
        self._macs_per_channel = {i.gate.name: i.macs_per_channel for i in gate_table(model)} if self.gate_names else {}

    def _weight(self, value, name):
        """A getter of `value` as a tf.Variable, or (constant weights) a graph constant."""
        value = np.asarray(value, np.float32)
        self.weight_count += value.size
        if self.constant_weights:
            # Made while tracing: a graph constant (an XLA literal), not an input.
            return lambda: tf.constant(value, name=name.replace("/", "_"))
        v = tf.Variable(value, trainable=False, name=name)
        self._vars.append(v)
        return lambda: v

    def _fold_following_bn(self, graph, tensor, done):
        """The BatchNormalization right after `tensor` (marked done, aliased), or None."""
        bnode = graph.only_consumer(tensor)
        if bnode is None or not isinstance(bnode.operation, _L.BatchNormalization):
            return None
        done.add(id(bnode))
        self._alias[id(bnode.output_tensors[0])] = id(tensor)
        return bnode

    def _fold_gated_block(self, graph, node, masks, widths, multiple_of, max_widths, done):
        gate = node.operation
        x_t = node.input_tensors[0]
        nodes = _gated_block(graph, node)
        cnode = nodes.consumer
        out_t = cnode.output_tensors[0]
        bnode = self._fold_following_bn(graph, out_t, done)
        # A ReLU right after conv2 [-> BN] runs inside the branches, where it
        # fuses with the convolution (Conv2D + BiasAdd + Relu): one op fewer per block.
        rnode = graph.only_consumer(bnode.output_tensors[0] if bnode is not None else out_t)
        act2 = None if rnode is None else activation_fn(rnode.operation)
        if act2 is not None:
            done.add(id(rnode))
            self._alias[id(rnode.output_tensors[0])] = id(out_t)
        done.update(id(n) for n in nodes.members())

        if self.mode == "conditional":
            gate_order = np.argsort(-masks[gate.name].mean(axis=0), kind="stable")
        else:
            gate_order = np.arange(gate.num_gates)
        block = _GatedBlock(self, gate, nodes, None if bnode is None else bnode.operation, act2, gate_order,
                            gate_input=id(x_t))
        channels = block.channels
        if self.mode == "conditional" and isinstance(widths, str):
            reordered = masks[gate.name][:, gate_order] > 0
            last = np.where(reordered.any(axis=1), gate.num_gates - np.argmax(reordered[:, ::-1], axis=1), 0)
            ws = calibrated_widths(last * gate.group_size, channels, max_widths, multiple_of, gate.group_size)
        elif self.mode == "conditional":
            ws = bucket_widths(channels, widths, multiple_of, gate.group_size)
        else:
            ws = [channels]
        block.set_widths(ws)
        self._blocks.append(block)
        self.permutations[gate.name] = block.channel_order
        self.gate_orders[gate.name] = gate_order
        self.gate_names.append(gate.name)
        self.gate_channels.append(channels)
        self.bucket_widths.append(ws)
        return cnode, ("segment", block, [id(nodes.producer.input_tensors[0]), id(x_t)], id(out_t))

    def _fold_layer(self, graph, node, done):
        """One step `(kind, fn, input ids, output id)` for a layer outside the
        gated blocks; None for a layer that is the identity at inference."""
        op = node.operation
        problem = _layer_problem(op)
        if problem:
            raise ValueError(problem)
        ins = [id(t) for t in node.input_tensors]
        out = id(node.output_tensors[0])
        if isinstance(op, _L.Dropout):
            self._alias[out] = self._resolve(ins[0])
            return None
        if type(op) in (_L.Conv2D, _L.DepthwiseConv2D):
            bnode = self._fold_following_bn(graph, node.output_tensors[0], done)
            weights, conv = (conv_weights, conv_fn) if type(op) is _L.Conv2D else (depthwise_weights, depthwise_fn)
            k, b = weights(op, None if bnode is None else bnode.operation)
            kv, bv = self._weight(k, f"{op.name}/kernel"), self._weight(b, f"{op.name}/bias")
            run = conv(op)
            fn = lambda x, run=run, kv=kv, bv=bv: run(x, kv(), bv())  # noqa: E731
        elif isinstance(op, _L.BatchNormalization):
            check_bn(op)
            s, b = bn_affine(op)
            sv, bv = self._weight(s, f"{op.name}/scale"), self._weight(b, f"{op.name}/shift")
            fn = lambda x, sv=sv, bv=bv: x * sv() + bv()  # noqa: E731
        elif activation_fn(op):
            fn = activation_fn(op)
        elif isinstance(op, _L.Add):
            fn = lambda *xs: tf.add_n(list(xs))  # noqa: E731
        elif isinstance(op, ZeroPadShortcut):
            fn = zero_pad_fn(op.filters, op.strides)
        elif isinstance(op, _L.MaxPooling2D):
            fn = pool_fn(op)
        elif isinstance(op, _L.ZeroPadding2D):
            fn = zero_padding_fn(op)
        elif isinstance(op, _L.GlobalAveragePooling2D):
            fn = lambda x: tf.reduce_mean(x, axis=[1, 2])  # noqa: E731
        elif isinstance(op, AdaptiveAveragePooling2D):
            fn = op.call  # static slices and means: plain TF ops, no weights
        elif isinstance(op, ResizeLike):
            fn = resize_like_fn
        elif isinstance(op, _L.Concatenate):
            fn = lambda *xs: tf.concat(list(xs), axis=-1)  # noqa: E731
        else:  # _layer_problem let only a Dense through
            fn = dense_fn(op, self._weight)
        return ("op", fn, ins, out)

    def _resolve(self, i):
        return self._alias.get(i, i)

    def _forward(self, images):
        """`(outputs dict, tensors by id, branch index per gated block)`."""
        env = {self._input_id: tf.cast(images, tf.float32)}
        indices = []
        for kind, fn, ins, out in self._steps:
            args = [env[self._resolve(i)] for i in ins]
            if kind == "segment":
                y, index = fn(*args)
                indices.append(index)
            else:
                y = fn(*args)
            env[out] = y
        outputs = {name: env[self._resolve(i)] for name, i in self._output_ids.items()}
        return outputs, env, indices

    def __call__(self, images):
        """The primary output (class probabilities, segmentation logits) for `images`."""
        if self._empty_output_shape is not None and getattr(images, "shape", (1,))[:1] == (0,):
            return tf.zeros(self._empty_output_shape, tf.float32)
        return self._call_fn(images)

    def forward(self, images):
        """`__call__` as a plain Python function: it traces into the calling
        `tf.function` (a serving function, a TFLite conversion) instead of
        calling a compiled function of its own."""
        return self._forward(images)[0][self.output_name]

    def forward_outputs(self, images):
        """Every kept output, `{name: tensor}` (see `outputs`), as `forward`."""
        return self._forward(images)[0]

    @tf.function
    def call_with_widths(self, images):
        """`(output, widths)`: `widths` (num_gates,) int32: executed width per gate."""
        outputs, _, indices = self._forward(images)
        out = outputs[self.output_name]
        widths = [
            tf.gather(tf.constant(ws, tf.int32), i) for ws, i in zip(self.bucket_widths, indices)
        ]
        return out, tf.stack(widths) if widths else tf.zeros((0,), tf.int32)

    @tf.function
    def chosen_widths(self, images):
        """Per-sample widths `(N, num_gates)` int32 the gates need (batch 1 each)."""
        _, env, _ = self._forward(images)
        cols = []
        for block, ws in zip(self._blocks, self.bucket_widths):
            cols.append(tf.gather(tf.constant(ws, tf.int32), block.needed_index(env[self._resolve(block.gate_input)])))
        return tf.stack(cols, axis=1)

    def executed_macs(self, images, batch_size=32):
        """MACs executed per sample at batch 1 (convs at the chosen widths + gate MLPs)."""
        images = np.asarray(images, np.float32)
        if not self.gate_names or not len(images):
            return np.full((len(images),), float(self.static_macs))
        widths = np.concatenate(
            [self.chosen_widths(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
        )
        macs = np.full((len(images),), float(self.static_macs))
        for j, (name, c) in enumerate(zip(self.gate_names, self.gate_channels)):
            macs -= (c - widths[:, j]) * self._macs_per_channel[name]
        return macs

    def forward_with_gates(self, images):
        """`with_gates` as a plain Python function (see `forward`)."""
        outputs, env, indices = self._forward(images)
        batch = tf.shape(outputs[self.output_name])[:1]
        result = dict(outputs)
        macs = tf.fill(batch, tf.constant(self.static_macs, tf.int64))
        widths = []
        for block, name, ws, c, index in zip(
            self._blocks, self.gate_names, self.bucket_widths, self.gate_channels, indices
        ):
            mask = block.mask(env[self._resolve(block.gate_input)])  # reordered gates
            original = np.argsort(self.gate_orders[name]).astype(np.int32)
            result[name] = tf.gather(mask, original, axis=1)
            width = tf.gather(tf.constant(ws, tf.int32), index)
            widths.append(width)
            # int64 arithmetic: exact, and no float16 overflow in TFLite.
            per_channel = int(round(self._macs_per_channel[name]))
            macs = macs - tf.cast(c - width, tf.int64) * tf.constant(per_channel, tf.int64)
        result[EXECUTED_MACS] = macs
        if widths:
            result[WIDTHS] = tf.tile(tf.stack(widths)[None, :], tf.concat([batch, [1]], 0))
        else:
            result[WIDTHS] = tf.zeros(tf.concat([batch, [0]], 0), tf.int32)
        return result

    def with_gates(self, images):
        """What the `serving_with_gates` signature returns, as a dict of tensors.

        - `output_name` (e.g. "probabilities"): the model output;
        - one `(batch, num_gates)` float32 0/1 mask per gate, named after
          the gate layer, in the Keras model's gate order (as
          `bs_keras.macs.gate_masks`);
        - `executed_macs` int64 `(batch,)`: MACs of the executed widths
          (static MACs minus the channels beyond each block's branch width);
        - `widths` int32 `(batch, num_gates)`: the executed branch width per
          gated block (the same for every sample of a batch: the widest any
          sample needs).
        """
        return self._with_gates_fn(images)

    @property
    def weight_variables(self):
        """The `tf.Variable`s holding the weights (none with `constant_weights`):
        what an object saving the `forward` functions must track."""
        return tuple(self._vars)

    @contextlib.contextmanager
    def tracing_for_tflite(self):
        """Within this context `forward` and `forward_with_gates` trace for the
        TFLite converter: branches as nested `tf.cond` (LiteRT IF) instead of
        `switch_case`, and the gate logits as full-input ops."""
        self._tflite = True
        try:
            yield self
        finally:
            self._tflite = False

    def signatures(self, dynamic_batch=True):
        spec1 = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        sigs = {SERVING_DEFAULT: self._call_fn.get_concrete_function(spec1)}
        if dynamic_batch:
            spec = tf.TensorSpec((None,) + self.input_shape, tf.float32, name=INPUT_NAME)
            sigs[SERVING_BATCH] = self._call_fn.get_concrete_function(spec)
        return sigs

    def save(self, path, dynamic_batch=True):
        """SavedModel with signatures `serving_default` (batch 1), `serving_batch`
        (any batch) and `serving_with_gates` (any batch; see `with_gates`).

        The first two return `{output_name: output}`. Only the serving
        functions are saved (not `call_with_widths` etc.); the reloaded
        object is also callable (returns the output tensor). With
        `jit_compile=True` the saved functions keep XLA: the loaded
        SavedModel compiles each on its first call per input shape. With
        constant weights every signature calls one `with_gates` core per
        input shape (the weights stored once per shape; `serving_default`
        drops the gate outputs, a few small ops).
        """
        return conditional_serving.save(self, path, dynamic_batch)

    def to_tflite(self, quantize="none", with_gates=False):
        """TFLite flatbuffer of the batch-1 function.

        Args:
            quantize: "none" (float32), "float16" (float16 weights) or
                "dynamic" (alias "dynamic_range": int8 weights, activations
                quantized on the fly). "int8" is refused: the converter
                quantizes only the branches the calibration data visits and
                leaves a float32 / int8 mix, not a full-integer model.
            with_gates: False: one signature `serving_default` with one
                output (the model output). True: signatures
                `serving_default` (`{output_name: output}`) and
                `serving_with_gates` (see `with_gates`), both batch 1, over
                one set of weights.

        Traced with nested `tf.cond` (LiteRT IF) instead of `switch_case`:
        the converter does not freeze variables read inside `switch_case`
        branches.
        """
        return conditional_serving.to_tflite(self, quantize, with_gates)


# Layers `FoldedModel` re-implements outside the gated blocks, besides an
# exact Conv2D or DepthwiseConv2D (not a subclass) and ReLU / ReLU6 (the layer
# or an Activation).
SUPPORTED_LAYERS = (_L.BatchNormalization, _L.Add, ZeroPadShortcut, _L.MaxPooling2D, _L.ZeroPadding2D,
                    _L.GlobalAveragePooling2D, _L.Dense, _L.Dropout, _L.Concatenate, AdaptiveAveragePooling2D,
                    ResizeLike)


def _layer_problem(op):
    """Why `FoldedModel` cannot run layer `op` (outside a gated block), or None."""
    if not (type(op) in (_L.Conv2D, _L.DepthwiseConv2D) or activation_fn(op) is not None
            or isinstance(op, SUPPORTED_LAYERS)):
        return f"Layer '{op.name}' ({type(op).__name__}) is not supported by conditional_model."
    if type(op) is _L.DepthwiseConv2D:
        return depthwise_problem(op)
    if isinstance(op, _L.GlobalAveragePooling2D) and (op.keepdims or op.data_format != "channels_last"):
        return f"GlobalAveragePooling2D '{op.name}' options not supported (keepdims or channels_first)."
    if isinstance(op, _L.Concatenate) and op.axis not in (-1, 3):
        return f"Concatenate '{op.name}' options not supported (axis={op.axis}; only the channel axis, -1)."
    return None


def _named_outputs(model):
    """`[(name, symbolic tensor)]` of `model`'s outputs, named as the signatures name them."""
    names, out = output_names(model), model.output
    if isinstance(out, dict):
        return [(name, out[name]) for name in names]
    if isinstance(out, (list, tuple)):
        return list(zip(names, out))
    return [(names[0], out)]


def _output_choice(model, outputs):
    """The output names `outputs` selects (default: the first), or a ValueError's message."""
    names = output_names(model)
    if outputs is None:
        return names[:1], None
    chosen = [outputs] if isinstance(outputs, str) else list(outputs)
    unknown = [o for o in chosen if o not in names]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        return None, (f"outputs must be distinct names among the model's outputs {names}. "
                      f"Received: outputs={outputs!r}")
    return chosen, None


def exported_part(model, outputs=None):
    """The part of `model` the conditional export runs: the outputs named in
    `outputs` (default: the first, e.g. a PSPNet's `seg`) and the layers they
    need, sharing `model`'s layers; `model` itself when that is all of it."""
    chosen, error = _output_choice(model, outputs)
    if error:
        raise ValueError(error)
    named = dict(_named_outputs(model))
    if len(model.inputs) != 1 or chosen == list(named):
        return model
    # A dict keeps the output names (a list model's "outputs_1" too).
    return keras.Model(model.input, {name: named[name] for name in chosen}, name=model.name)


class _BlockShapeError(ValueError):
    """A gated block `FoldedModel` does not handle: `kind` (the same for
    every block with this problem) and the detail of this one."""

    def __init__(self, kind, gate, detail):
        super().__init__(f"Gate '{gate}': {kind} ({detail}).")
        self.kind, self.gate, self.detail = kind, gate, detail


@dataclasses.dataclass
class _BlockNodes:
    """The call nodes of one gated block (see `_gated_block`)."""

    producer: object  # conv1 (Conv2D)
    chain: list  # between conv1 and the gate: [BN] [activation], nearest to the gate first
    bn1: object  # conv1's BN layer, or None
    act1: object  # the TF function of the activation before the gate, or None
    gate: object
    pad: object  # ZeroPadding2D node between the gate and what it feeds, or None
    depthwise: list  # [DepthwiseConv2D, [BN], [activation]] nodes between the gate and conv2, or []
    consumer: object  # conv2 (Conv2D)

    def members(self):
        return [self.producer, *self.chain, self.gate, *([self.pad] if self.pad else []), *self.depthwise,
                self.consumer]


def _not_conv(op):
    return not isinstance(op, _L.Conv2D)


def _follow(graph, node, what):
    """The single consumer of `node`'s output if `what(layer)`, else None."""
    nxt = graph.only_consumer(node.output_tensors[0])
    return nxt if nxt is not None and what(nxt.operation) else None


def _gated_block(graph, node):
    """The `_BlockNodes` of the gate at `node`: conv1 [-> BN] [-> ReLU/ReLU6]
    -> gate [-> ZeroPadding2D] -> Conv2D, or, in an inverted residual,
    ... -> gate [-> ZeroPadding2D] -> DepthwiseConv2D [-> BN] [-> ReLU/ReLU6]
    -> 1x1 Conv2D.

    Raises:
        _BlockShapeError: the block has another shape, naming the layers.
    """
    gate = node.operation
    h_t = node.input_tensors[1]
    prod, chain = graph.trace_back(h_t, through=_not_conv)
    for t in [h_t] + [n.input_tensors[0] for n in chain]:
        if graph.only_consumer(t) is None:
            raise _BlockShapeError("the gated features have other consumers", gate.name,
                                   f"{[n.operation.name for n in graph.consumers(t) or []]}")
    if prod is None:
        raise _BlockShapeError("gates the model input, not a Conv2D's output", gate.name, "no producer conv")
    if type(prod.operation) is not _L.Conv2D:
        raise _BlockShapeError("the gated features come from a convolution other than Conv2D", gate.name,
                               f"'{prod.operation.name}' ({type(prod.operation).__name__})")
    rest = [n.operation for n in reversed(chain)]  # [bn], [activation]
    bn1 = rest.pop(0) if rest and isinstance(rest[0], _L.BatchNormalization) else None
    act1 = activation_fn(rest.pop(0)) if rest and activation_fn(rest[0]) is not None else None
    if rest:
        raise _BlockShapeError("unsupported layers between the producer conv and the gate, expected conv [-> BN] "
                               "[-> ReLU or ReLU6]", gate.name,
                               ", ".join(f"'{op.name}' ({type(op).__name__})" for op in rest))
    pad = _follow(graph, node, lambda op: isinstance(op, _L.ZeroPadding2D) and op.data_format == "channels_last")
    depthwise, cnode = [], graph.only_consumer((pad or node).output_tensors[0])
    if cnode is not None and type(cnode.operation) is _L.DepthwiseConv2D:
        problem = depthwise_problem(cnode.operation)
        if problem:
            raise _BlockShapeError("an unsupported depthwise convolution follows the gate", gate.name, problem)
        depthwise.append(cnode)
        bn = _follow(graph, cnode, lambda op: isinstance(op, _L.BatchNormalization))
        depthwise += [bn] if bn else []
        act = _follow(graph, depthwise[-1], lambda op: activation_fn(op) is not None)
        depthwise += [act] if act else []
        cnode = graph.only_consumer(depthwise[-1].output_tensors[0])
        if cnode is None or type(cnode.operation) is not _L.Conv2D or tuple(cnode.operation.kernel_size) != (1, 1):
            raise _BlockShapeError(
                "the depthwise convolution after the gate must feed one 1x1 Conv2D", gate.name,
                f"'{depthwise[-1].operation.name}' feeds " + ", ".join(
                    f"'{n.operation.name}' ({type(n.operation).__name__})"
                    for n in graph.consumers(depthwise[-1].output_tensors[0]) if n is not None))
    if cnode is None or type(cnode.operation) is not _L.Conv2D:
        after = pad or node
        following = [f"'{n.operation.name}' ({type(n.operation).__name__})"
                     for n in graph.consumers(after.output_tensors[0]) if n is not None]
        raise _BlockShapeError("the gate must feed exactly one Conv2D (or DepthwiseConv2D)", gate.name,
                               f"{'its padding' if pad else 'it'} feeds {', '.join(following) or 'a model output'}")
    return _BlockNodes(prod, chain, bn1, act1, node, pad, depthwise, cnode)


def _listed(names):
    shown = ", ".join(f"'{n}'" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def support_problems(model, outputs=None):
    """Why the conditional export cannot run `model` (its `outputs`, see
    `FoldedModel`): one message per kind of gated block or layer it does not
    handle, none when it can. Reads only the layer graph (no calibration, no
    weights), so callers refuse before any work.

    Raises:
        ValueError: `outputs` names an output the model does not have.
    """
    if len(model.inputs) != 1:
        return [f"the model has {len(model.inputs)} inputs (only single-input models are supported)"]
    chosen, error = _output_choice(model, outputs)
    if error:  # a bad argument, not a problem of the model
        raise ValueError(error)
    problems = []
    graph = LayerGraph(exported_part(model, chosen), purpose="conditional_model")
    in_blocks = set()
    blocks = {}  # kind -> [(gate, detail)]
    for node in graph.nodes:
        if isinstance(node.operation, ChannelGate):
            in_blocks.add(id(node))
            try:
                nodes = _gated_block(graph, node)
            except _BlockShapeError as e:
                blocks.setdefault(e.kind, []).append((e.gate, e.detail))
                if e.kind.startswith("unsupported layers between"):  # named there, not again as layers
                    in_blocks.update(id(n) for n in graph.trace_back(node.input_tensors[1], through=_not_conv)[1])
            else:
                in_blocks.update(id(n) for n in nodes.members())
    for kind, found in blocks.items():
        problems.append(f"gates {_listed([g for g, _ in found])}: {kind} (in '{found[0][0]}': {found[0][1]})")
    layers = {}  # layer class -> names
    for node in graph.nodes:
        problem = None if id(node) in in_blocks else _layer_problem(node.operation)
        if problem and isinstance(node.operation, _L.GlobalAveragePooling2D):
            problems.append(problem.rstrip("."))
        elif problem:
            layers.setdefault(_layer_kind(node.operation), []).append(node.operation.name)
    for kind, names in layers.items():
        problems.append(f"{kind} layers ({_listed(names)}) are not supported by conditional_model")
    return problems


def _layer_kind(op):
    """The class name, and what makes a ReLU-like layer not a plain ReLU."""
    if isinstance(op, _L.ReLU):
        return f"ReLU(max_value={op.max_value}, negative_slope={op.negative_slope}, threshold={op.threshold})"
    return type(op).__name__


def refusal(problems):
    """The error message for `support_problems`' list."""
    return ("The conditional export cannot run this model: " + "; ".join(problems)
            + ". Export it with --mode compact (mode='compact': the channels its gates never open are removed, "
            "a static network) or --mode masked (the model as trained).")


class _GatedBlock:
    """One folded gated block: conv1 [BN] [act] -> gate [pad] -> conv2 [BN] [act],
    or, in an inverted residual, conv1 [BN] [act] -> gate [pad] -> depthwise
    [BN] [act] -> 1x1 conv2 [BN] (act: ReLU or ReLU6).

    The gate's groups are reordered by `gate_order` (most often open first)
    and conv1's filters, the gate logits, the depthwise filters and conv2's
    input slices with them; `set_widths` then precompiles one kernel set per
    width. Calling the block runs the smallest width covering every open
    channel. Past a depthwise convolution a closed channel is not zero but
    act(its bias), the same at every pixel: each width's conv2 bias adds what
    the channels beyond it contribute that way, so the output stays exact.
    """

    def __init__(self, owner, gate, nodes, bn2, act2, gate_order, gate_input):
        self.owner = owner  # the FoldedModel: weight storage and tracing flags
        self.gate_input = gate_input  # id of the gate's input tensor
        self.act1, self.act2 = nodes.act1, act2
        self.group_size = gs = gate.group_size
        self.num_gates = gate.num_gates
        conv1, conv2 = nodes.producer.operation, nodes.consumer.operation
        k1, b1 = conv_weights(conv1, nodes.bn1)
        k2, b2 = conv_weights(conv2, bn2)
        self.channels = k1.shape[-1]
        self.channel_order = order = (gate_order[:, None] * gs + np.arange(gs)[None, :]).reshape(-1)
        self._k1, self._b1 = k1[..., order], b1[order]
        self._k2, self._b2_full = k2[:, :, order, :], b2
        self._pad = None if nodes.pad is None else zero_padding_fn(nodes.pad.operation)
        self._dw = None
        if nodes.depthwise:
            dw_layers = [n.operation for n in nodes.depthwise]
            dw_bn = next((op for op in dw_layers if isinstance(op, _L.BatchNormalization)), None)
            dk, db = depthwise_weights(dw_layers[0], dw_bn)
            self._dw_act = activation_fn(dw_layers[-1]) if len(dw_layers) > 1 else None
            self._dk, self._db = dk[:, :, order, :], db[order]
            self._dw = depthwise_fn(dw_layers[0])
        hs, hb = bn_affine(gate.hidden_bn)
        wl = np.asarray(gate.logits_dense.kernel, np.float64)[:, gate_order]
        bl = np.asarray(gate.logits_dense.bias, np.float64)[gate_order]
        name, weight = gate.name, owner._weight
        self._wh = weight(np.asarray(gate.hidden.kernel, np.float64) * hs, f"{name}/hidden")
        self._hb = weight(hb, f"{name}/hidden_bias")
        self._wl = weight(wl, f"{name}/logits")
        self._bl = weight(bl, f"{name}/logits_bias")
        if self._dw is None:
            self._b2 = weight(b2, f"{name}/conv2_bias")
        self._conv1, self._conv2 = conv_fn(conv1), conv_fn(conv2)
        self._name = name

    def _closed_contribution(self, w):
        """What the channels from `w` on add to conv2's output when closed:
        past the depthwise conv each is act(its bias) at every pixel."""
        if self._dw is None:
            return 0.0
        level = self._db[w:]
        if self._dw_act is tf.nn.relu:
            level = np.maximum(level, 0)
        elif self._dw_act is tf.nn.relu6:
            level = np.clip(level, 0, 6)
        return level @ self._k2[0, 0, w:, :]

    def set_widths(self, widths):
        weight, name = self.owner._weight, self._name
        self.branches = []
        for w in widths:
            branch = {
                "w": w,
                "k1": weight(self._k1[..., :w], f"{name}/conv1_w{w}"),
                "b1": weight(self._b1[:w], f"{name}/conv1_b{w}"),
                "k2": weight(self._k2[:, :, :w, :], f"{name}/conv2_w{w}"),
            }
            if self._dw is not None:
                branch["dk"] = weight(self._dk[:, :, :w, :], f"{name}/depthwise_w{w}")
                branch["db"] = weight(self._db[:w], f"{name}/depthwise_b{w}")
                branch["b2"] = weight(self._b2_full + self._closed_contribution(w), f"{name}/conv2_b{w}")
            else:
                branch["b2"] = self._b2
            self.branches.append(branch)
        del self._k1, self._b1, self._k2
        if self._dw is not None:
            del self._dk, self._db
        # Per gate (group), the index of the smallest branch covering it.
        group_end = (np.arange(self.num_gates) + 1) * self.group_size
        self._bucket_row = np.searchsorted(np.asarray(widths), group_end).astype(np.int32)[None]

    def logits(self, x):
        if self.owner._tflite or None in x.shape[1:3]:
            pooled = tf.reduce_mean(x, axis=[1, 2])
        else:  # measured faster than reduce_mean in TF on CPU
            pooled = tf.reshape(tf.nn.avg_pool2d(x, x.shape[1:3], 1, "VALID"), [-1, x.shape[-1]])
        # bias_add (not +): Grappler fuses MatMul + BiasAdd (+ Relu).
        z = tf.nn.relu(tf.nn.bias_add(tf.matmul(pooled, self._wh()), self._hb()))
        return tf.nn.bias_add(tf.matmul(z, self._wl()), self._bl())

    def mask(self, x):
        return tf.cast(self.logits(x) > 0, tf.float32)

    def index_of(self, is_open, axis=1):
        """Per sample (axis=1), the index of the smallest branch covering its open
        gates; axis=None: the widest any sample needs, in one max. The select has
        equal shapes at batch 1 (no broadcasting)."""
        row = self._bucket_row
        return tf.reduce_max(tf.where(is_open, row, np.zeros_like(row)), axis=axis)

    def needed_index(self, x):
        return self.index_of(self.logits(x) > 0)

    def __call__(self, x_in, x_gate):
        """`(output, branch index)` for the block input `x_in` and gate input `x_gate`."""
        owner, gs, channels = self.owner, self.group_size, self.channels
        is_open = self.logits(x_gate) > 0
        index = self.index_of(is_open, axis=None)
        # At batch 1 a closed channel's conv1 bias is set to -1e30, so the
        # fused Conv2D + BiasAdd + Relu (Relu6) outputs exactly 0 there: no mask
        # multiply (one op fewer per block and no pass over the features).
        fold = self.act1 is not None and x_in.shape[0] == 1 and not owner._tflite
        if fold:
            open_c = tf.reshape(is_open, [-1])
            if gs > 1:
                open_c = tf.repeat(open_c, gs)
            b1_full = self.branches[-1]["b1"]  # the full width's conv1 bias (the last width is `channels`)
            bias = tf.where(open_c, b1_full(), np.full(channels, -1e30, np.float32))
        else:
            mask = tf.cast(is_open, tf.float32)
            if gs > 1:
                mask = tf.repeat(mask, gs, axis=1)
            mask = mask[:, None, None, :]

        def branch(b):
            w = b["w"]

            def run():
                if fold:
                    h = self.act1(self._conv1(x_in, b["k1"](), bias[:w]))
                else:
                    h = self._conv1(x_in, b["k1"](), b["b1"]())
                    if self.act1 is not None:
                        h = self.act1(h)
                    h = h * mask[..., :w]
                if self._pad is not None:
                    h = self._pad(h)
                if self._dw is not None:
                    h = self._dw(h, b["dk"](), b["db"]())
                    if self._dw_act is not None:
                        h = self._dw_act(h)
                y = self._conv2(h, b["k2"](), b["b2"]())
                return y if self.act2 is None else self.act2(y)

            return run

        fns = [branch(b) for b in self.branches]
        if len(fns) == 1:
            return fns[0](), tf.constant(0, tf.int32)
        return select_branch(index, fns, nested_cond=owner._tflite or owner.branching == "cond"), index


def conditional_model(
    model, calibration_images, widths=(0.25, 0.5, 0.75, 1.0), multiple_of=8, batch_size=64,
    branching=None, max_widths=6, jit_compile=False, constant_weights=None, outputs=None,
):
    """A `FoldedModel` in conditional mode (see module doc)."""
    return FoldedModel(
        model, calibration_images, mode="conditional", widths=widths, multiple_of=multiple_of,
        batch_size=batch_size, branching=branching, max_widths=max_widths, jit_compile=jit_compile,
        constant_weights=constant_weights, outputs=outputs,
    )


def folded_model(model, jit_compile=False, constant_weights=None, outputs=None):
    """The BN-folded TF equivalent of `model` (gates, if any, multiply by 0/1)."""
    return FoldedModel(model, mode="masked", jit_compile=jit_compile, constant_weights=constant_weights,
                       outputs=outputs)
