"""Conditional execution of a channel-gated model: per-block width branches.

`conditional_model(model, calibration_images)` turns a functional gated
ResNet (`bs_keras.models.cifar_resnet` / `imagenet_resnet`) into a Keras-free
`tf.Module` that computes, in every gated block, only a prefix of the gated
channels, chosen per call among a few precompiled widths:

1. On the calibration images the inference gates are measured and, per gate,
   the channels are reordered by open frequency (most often open first). The
   producer convolution's output filters (with its BatchNormalization), the
   gate's logits (Dense kernel columns and bias) and the consumer
   convolution's input slices are permuted consistently: the function is
   unchanged.
2. At run time the gate logits give the mask; the index of the last open
   channel gives the smallest precompiled width `w` covering every open
   channel, and a `tf.switch_case` runs that branch: conv1 with
   `kernel[..., :w]` (BN folded in), ReLU, `x mask[:w]`, conv2 with
   `kernel[:, :, :w, :]` (its BN folded in). The channels beyond `w` are
   closed, so the result is exact (up to float rounding). For a batch the
   widest width any sample needs is used: still exact.

Every BatchNormalization that directly follows a convolution is folded into
it (also outside the gated blocks), the rest of the graph is re-implemented
with TF ops by a node-by-node walk of the Keras functional graph (Conv2D,
BatchNormalization, ReLU, Add, MaxPooling2D, GlobalAveragePooling2D, Dense,
ZeroPadShortcut, ChannelGate). The weights are copied into `tf.Variable`s; the
module holds no Keras object and has no random op.

`FoldedModel(model, mode="masked")` is the same walk without branches (full
convolutions x 0/1 mask): the BN-folded equivalent of the Keras model, used by
the latency benchmark as the fair TF baseline for dense / masked / compact.

Example:

```python
cond = conditional_model(model, calibration_images, widths=(0.25, 0.5, 0.75, 1.0))
probs = cond(images)                       # == model(images, training=False)
cond.save("exported/conditional")          # SavedModel, signatures below
```
"""

import math

import keras
import numpy as np
import tensorflow as tf

from bs_keras.blocks import ZeroPadShortcut
from bs_keras.gates import ChannelGate, find_gates
from bs_keras.macs import count_macs, gate_masks, gate_table

_L = keras.layers

SERVING_DEFAULT = "serving_default"  # fixed batch 1
SERVING_BATCH = "serving_batch"  # any batch size
INPUT_NAME = "images"


# --------------------------------------------------------------------------- helpers


def _nodes(model):
    if not hasattr(model, "_nodes_by_depth"):
        raise ValueError(
            "conditional_model walks the layer graph and needs a functional model. "
            f"Received: {type(model).__name__}."
        )
    nodes = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        nodes.extend(n for n in model._nodes_by_depth[depth] if not n.is_input)
    return nodes


def _bn_affine(bn):
    """Inference BN as `y = x * scale + shift` (float64 numpy)."""
    var = np.asarray(bn.moving_variance, np.float64)
    mean = np.asarray(bn.moving_mean, np.float64)
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones_like(var)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros_like(var)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _check_bn(bn):
    if bn.axis not in (-1, 3, [-1], [3]):
        raise ValueError(f"BatchNormalization '{bn.name}' must normalize the last axis.")


def _conv_weights(conv, bn=None):
    """Kernel (HWIO) and bias of a Conv2D with an optional BN folded in."""
    if not isinstance(conv, _L.Conv2D) or type(conv) is not _L.Conv2D:
        raise ValueError(f"Layer '{conv.name}' ({type(conv).__name__}) is not a plain Conv2D.")
    if getattr(conv, "groups", 1) != 1:
        raise ValueError(f"Grouped convolution '{conv.name}' is not supported.")
    if conv.activation not in (None, keras.activations.linear):
        raise ValueError(f"Conv2D '{conv.name}' with an activation is not supported.")
    kernel = np.asarray(conv.kernel, np.float64)
    bias = np.asarray(conv.bias, np.float64) if conv.use_bias else np.zeros(kernel.shape[-1])
    if bn is not None:
        _check_bn(bn)
        scale, shift = _bn_affine(bn)
        kernel = kernel * scale
        bias = bias * scale + shift
    return kernel, bias


def _conv_fn(conv):
    strides = tuple(conv.strides)
    dilations = tuple(conv.dilation_rate)
    padding = conv.padding.upper()
    if conv.data_format != "channels_last":
        raise ValueError(f"Conv2D '{conv.name}' must be channels_last.")

    def run(x, kernel, bias):
        y = tf.nn.conv2d(x, kernel, strides=strides, padding=padding, dilations=dilations)
        return tf.nn.bias_add(y, bias)

    return run


def _check_relu(op):
    if isinstance(op, _L.ReLU):
        if op.max_value is not None or op.negative_slope or op.threshold:
            raise ValueError(f"ReLU '{op.name}' with max_value/negative_slope/threshold is not supported.")
        return
    if isinstance(op, _L.Activation) and op.activation in (keras.activations.relu,):
        return
    raise ValueError(f"Layer '{op.name}' is not a plain ReLU.")


def _is_relu(op):
    try:
        _check_relu(op)
        return True
    except ValueError:
        return False


def bucket_widths(channels, widths, multiple_of=8, group_size=1):
    """Precompiled widths in channels: fractions of `channels` rounded up.

    Each width is rounded up to a multiple of `multiple_of` (and of
    `group_size`) and capped at `channels`; the full width is always
    included, so every mask is covered. Sorted, unique.
    """
    step = int(multiple_of or 1)
    step = step * group_size // math.gcd(step, group_size)
    out = set()
    for f in widths:
        if not 0 < f <= 1:
            raise ValueError(f"widths are fractions in (0, 1]. Received: {f}")
        out.add(min(channels, int(math.ceil(f * channels / step)) * step))
    out.add(channels)
    return sorted(out)


# --------------------------------------------------------------------------- the module


class FoldedModel(tf.Module):
    """A BN-folded TF re-implementation of a functional (gated) ResNet.

    Args:
        model: functional Keras model (gated or plain).
        calibration_images: `(N, H, W, C)` images measuring the gates' open
            frequencies (channel reordering); only for `mode="conditional"`.
        mode: "conditional" (per-block width branches, see module doc) or
            "masked" (full convolutions x 0/1 mask: the model as trained).
        widths: fractions of each gated width to precompile.
        multiple_of: round every width up to a multiple of this.
        batch_size: batch size for measuring the gates.
        branching: "switch_case" (one `Case` op per block) or "cond" (a
            balanced tree of `tf.cond`); TFLite export always uses "cond"
            (LiteRT IF).
    """

    def __init__(
        self,
        model,
        calibration_images=None,
        mode="conditional",
        widths=(0.25, 0.5, 0.75, 1.0),
        multiple_of=8,
        batch_size=64,
        branching="switch_case",
        name=None,
    ):
        super().__init__(name=name)
        if branching not in ("switch_case", "cond"):
            raise ValueError(f"branching must be 'switch_case' or 'cond'. Received: {branching!r}")
        self.branching = branching
        if mode not in ("conditional", "masked"):
            raise ValueError(f"mode must be 'conditional' or 'masked'. Received: {mode!r}")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError("Only single-input, single-output models are supported.")
        self.mode = mode
        self.input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        nodes = _nodes(model)
        consumers = {}
        for node in nodes:
            for t in node.input_tensors:
                consumers.setdefault(id(t), []).append(node)
        producer = {id(t): node for node in nodes for t in node.output_tensors}

        def only_consumer(tensor):
            found = consumers.get(id(tensor), [])
            return found[0] if len(found) == 1 else None

        freqs = {}
        if mode == "conditional" and any(isinstance(n.operation, ChannelGate) for n in nodes):
            if calibration_images is None:
                raise ValueError("mode='conditional' needs calibration_images.")
            masks = gate_masks(model, calibration_images, batch_size=batch_size)
            freqs = {k: v.mean(axis=0) for k, v in masks.items()}

        self._vars = []
        self._steps = []  # (fn, input ids, output id)
        self.gate_names = []
        self.gate_channels = []
        self.bucket_widths = []
        self.permutations = {}
        self._gate_fns = []  # per gate: fn(env) -> per-sample needed width index
        skip = set()  # node ids handled elsewhere
        alias = {}  # tensor id -> tensor id (folded BN outputs)
        segments = {}  # consumer conv node id -> segment step

        self._constants = False  # True while tracing for TFLite: nested tf.cond, not Case

        def var(value, name):
            value = np.asarray(value, np.float32)
            v = tf.Variable(value, trainable=False, name=name)
            self._vars.append(v)
            return lambda: v

        # Gated segments first: producer conv [-> BN] [-> ReLU] -> gate -> consumer conv [-> BN].
        for node in nodes:
            gate = node.operation
            if not isinstance(gate, ChannelGate):
                continue
            x_t, h_t = node.input_tensors
            chain = []
            t = h_t
            while True:
                pnode = producer[id(t)]
                if only_consumer(t) is None:
                    raise ValueError(f"The features gated by '{gate.name}' have other consumers.")
                chain.append(pnode)
                if isinstance(pnode.operation, _L.Conv2D):
                    break
                t = pnode.input_tensors[0]
            chain.reverse()  # conv, [bn], [relu]
            conv1, rest = chain[0], [n.operation for n in chain[1:]]
            bn1 = rest.pop(0) if rest and isinstance(rest[0], _L.BatchNormalization) else None
            relu1 = rest.pop(0) if rest and _is_relu(rest[0]) else None
            if rest:
                raise ValueError(
                    f"Unsupported layers between the producer conv and gate '{gate.name}': "
                    f"{[op.name for op in rest]} (expected conv [-> BN] [-> ReLU])."
                )
            cnode = only_consumer(node.output_tensors[0])
            if cnode is None or type(cnode.operation) is not _L.Conv2D:
                raise ValueError(f"Gate '{gate.name}' must feed exactly one Conv2D.")
            out_t = cnode.output_tensors[0]
            bnode = only_consumer(out_t)
            bn2 = None
            if bnode is not None and isinstance(bnode.operation, _L.BatchNormalization):
                bn2 = bnode.operation
                skip.add(id(bnode))
                alias[id(bnode.output_tensors[0])] = id(out_t)
            for n in chain:
                skip.add(id(n))
            skip.add(id(node))
            skip.add(id(cnode))

            k1, b1 = _conv_weights(conv1.operation, bn1)
            k2, b2 = _conv_weights(cnode.operation, bn2)
            gs = gate.group_size
            channels = k1.shape[-1]
            wh = np.asarray(gate.hidden.kernel, np.float64)
            hs, hb = _bn_affine(gate.hidden_bn)
            wl = np.asarray(gate.logits_dense.kernel, np.float64)
            bl = np.asarray(gate.logits_dense.bias, np.float64)
            if mode == "conditional":
                gperm = np.argsort(-freqs[gate.name], kind="stable")
            else:
                gperm = np.arange(gate.num_gates)
            cperm = (gperm[:, None] * gs + np.arange(gs)[None, :]).reshape(-1)
            self.permutations[gate.name] = cperm
            k1, b1 = k1[..., cperm], b1[cperm]
            k2 = k2[:, :, cperm, :]
            wl, bl = wl[:, gperm], bl[gperm]
            prefix = gate.name
            g_wh = var(wh * hs, f"{prefix}/hidden")
            g_hb = var(hb, f"{prefix}/hidden_bias")
            g_wl = var(wl, f"{prefix}/logits")
            g_bl = var(bl, f"{prefix}/logits_bias")
            b2v = var(b2, f"{prefix}/conv2_bias")
            conv1_run = _conv_fn(conv1.operation)
            conv2_run = _conv_fn(cnode.operation)
            if mode == "conditional":
                ws = bucket_widths(channels, widths, multiple_of, gs)
            else:
                ws = [channels]
            branches = [
                (w, var(k1[..., :w], f"{prefix}/conv1_w{w}"), var(b1[:w], f"{prefix}/conv1_b{w}"),
                 var(k2[:, :, :w, :], f"{prefix}/conv2_w{w}"))
                for w in ws
            ]
            self.gate_names.append(gate.name)
            self.gate_channels.append(channels)
            self.bucket_widths.append(ws)
            relu = relu1 is not None
            ws_t = np.asarray(ws, np.int32)
            ranks = np.arange(1, gate.num_gates + 1, dtype=np.float32)

            def mask_of(x, g_wh=g_wh, g_hb=g_hb, g_wl=g_wl, g_bl=g_bl):
                pooled = tf.reduce_mean(x, axis=[1, 2])
                z = tf.nn.relu(tf.matmul(pooled, g_wh()) + g_hb())
                return tf.cast(tf.matmul(z, g_wl()) + g_bl() > 0, tf.float32)

            def needed_index(x, mask_of=mask_of, ws_t=ws_t, ranks=ranks, gs=gs):
                mask = mask_of(x)
                needed = tf.cast(tf.reduce_max(mask * ranks, axis=1), tf.int32) * gs
                return tf.reduce_sum(tf.cast(needed[:, None] > ws_t[None, :], tf.int32), axis=1)

            def segment(x_in, x_gate, mask_of=mask_of, needed_index=needed_index, branches=branches,
                        conv1_run=conv1_run, conv2_run=conv2_run, b2v=b2v, relu=relu, gs=gs):
                mask = mask_of(x_gate)
                if gs > 1:
                    mask = tf.repeat(mask, gs, axis=1)
                mask = mask[:, None, None, :]

                def branch(w, k1v, b1v, k2v):
                    def run():
                        h = conv1_run(x_in, k1v(), b1v())
                        if relu:
                            h = tf.nn.relu(h)
                        h = h * mask[..., :w]
                        return conv2_run(h, k2v(), b2v())

                    return run

                fns = [branch(*b) for b in branches]
                if len(fns) == 1:
                    return fns[0](), tf.constant(0, tf.int32)
                index = tf.reduce_max(needed_index(x_gate))
                return _select(index, fns, nested_cond=self._constants or self.branching == "cond"), index

            self._gate_fns.append((needed_index, id(x_t)))
            segments[id(cnode)] = ("segment", segment, [id(conv1.input_tensors[0]), id(x_t)], id(out_t))

        # The rest of the graph.
        for node in nodes:
            if id(node) in segments:
                self._steps.append(segments[id(node)])
                continue
            if id(node) in skip:
                continue
            op = node.operation
            ins = [id(t) for t in node.input_tensors]
            out = id(node.output_tensors[0])
            if isinstance(op, _L.InputLayer):
                continue
            if type(op) is _L.Conv2D:
                bnode = only_consumer(node.output_tensors[0])
                bn = None
                if bnode is not None and isinstance(bnode.operation, _L.BatchNormalization):
                    bn = bnode.operation
                    skip.add(id(bnode))
                    alias[id(bnode.output_tensors[0])] = out
                k, b = _conv_weights(op, bn)
                kv, bv = var(k, f"{op.name}/kernel"), var(b, f"{op.name}/bias")
                run = _conv_fn(op)
                fn = lambda x, run=run, kv=kv, bv=bv: run(x, kv(), bv())  # noqa: E731
            elif isinstance(op, _L.BatchNormalization):
                _check_bn(op)
                s, b = _bn_affine(op)
                sv, bv = var(s, f"{op.name}/scale"), var(b, f"{op.name}/shift")
                fn = lambda x, sv=sv, bv=bv: x * sv() + bv()  # noqa: E731
            elif _is_relu(op):
                fn = tf.nn.relu
            elif isinstance(op, _L.Add):
                fn = lambda *xs: tf.add_n(list(xs))  # noqa: E731
            elif isinstance(op, ZeroPadShortcut):
                fn = _zero_pad_fn(op.filters, op.strides)
            elif isinstance(op, _L.MaxPooling2D):
                fn = _pool_fn(op)
            elif isinstance(op, _L.GlobalAveragePooling2D):
                if op.keepdims or op.data_format != "channels_last":
                    raise ValueError(f"GlobalAveragePooling2D '{op.name}' options not supported.")
                fn = lambda x: tf.reduce_mean(x, axis=[1, 2])  # noqa: E731
            elif isinstance(op, _L.Dense):
                fn = self._dense_fn(op, var)
            elif isinstance(op, ChannelGate):
                raise AssertionError("unreachable")
            else:
                raise ValueError(
                    f"Layer '{op.name}' ({type(op).__name__}) is not supported by conditional_model."
                )
            self._steps.append(("op", fn, ins, out))
            skip.add(id(node))
        self._input_id = id(model.inputs[0])
        self._output_id = id(model.outputs[0])
        self._alias = alias
        self.static_macs = int(count_macs(model))
        self._macs_per_channel = {i.gate.name: i.macs_per_channel for i in gate_table(model)} if self.gate_names else {}

    @staticmethod
    def _dense_fn(op, var):
        kv = var(np.asarray(op.kernel), f"{op.name}/kernel")
        bv = var(np.asarray(op.bias) if op.use_bias else np.zeros(op.units), f"{op.name}/bias")
        act = op.activation
        if act in (None, keras.activations.linear):
            post = tf.identity
        elif act is keras.activations.softmax:
            post = tf.nn.softmax
        elif act is keras.activations.relu:
            post = tf.nn.relu
        else:
            raise ValueError(f"Dense '{op.name}' activation {act} is not supported.")
        return lambda x: post(tf.matmul(x, kv()) + bv())

    def _resolve(self, i):
        return self._alias.get(i, i)

    def _forward(self, images):
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
        return env[self._resolve(self._output_id)], env, indices

    @tf.function
    def __call__(self, images):
        """Class probabilities (the model's output) for `images`."""
        return self._forward(images)[0]

    @tf.function
    def call_with_widths(self, images):
        """`(output, widths)`: `widths` (num_gates,) int32: executed width per gate."""
        out, _, indices = self._forward(images)
        widths = [
            tf.gather(tf.constant(ws, tf.int32), i) for ws, i in zip(self.bucket_widths, indices)
        ]
        return out, tf.stack(widths) if widths else tf.zeros((0,), tf.int32)

    @tf.function
    def chosen_widths(self, images):
        """Per-sample widths `(N, num_gates)` int32 the gates need (batch 1 each)."""
        _, env, _ = self._forward(images)
        cols = []
        for (needed_index, x_id), ws in zip(self._gate_fns, self.bucket_widths):
            cols.append(tf.gather(tf.constant(ws, tf.int32), needed_index(env[self._resolve(x_id)])))
        return tf.stack(cols, axis=1)

    def executed_macs(self, images, batch_size=32):
        """MACs executed per sample at batch 1 (convs at the chosen widths + gate MLPs)."""
        images = np.asarray(images, np.float32)
        if not self.gate_names:
            return np.full((len(images),), float(self.static_macs))
        widths = np.concatenate(
            [self.chosen_widths(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
        )
        macs = np.full((len(images),), float(self.static_macs))
        for j, (name, c) in enumerate(zip(self.gate_names, self.gate_channels)):
            macs -= (c - widths[:, j]) * self._macs_per_channel[name]
        return macs

    def signatures(self, dynamic_batch=True):
        spec1 = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        sigs = {SERVING_DEFAULT: self.__call__.get_concrete_function(spec1)}
        if dynamic_batch:
            spec = tf.TensorSpec((None,) + self.input_shape, tf.float32, name=INPUT_NAME)
            sigs[SERVING_BATCH] = self.__call__.get_concrete_function(spec)
        return sigs

    def save(self, path, dynamic_batch=True):
        """SavedModel with `serving_default` (batch 1) and `serving_batch` (any batch).

        Only the serving function is saved (not `call_with_widths` etc.): the
        reloaded object is callable and has the two signatures.
        """
        serving = _Serving(self)
        spec1 = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        sigs = {SERVING_DEFAULT: serving.__call__.get_concrete_function(spec1)}
        if dynamic_batch:
            spec = tf.TensorSpec((None,) + self.input_shape, tf.float32, name=INPUT_NAME)
            sigs[SERVING_BATCH] = serving.__call__.get_concrete_function(spec)
        tf.saved_model.save(serving, path, signatures=sigs)
        return path

    def to_tflite(self, quantize="none"):
        """TFLite flatbuffer of the batch-1 function ("none" or "dynamic_range").

        Traced with the weights as constants (the converter does not freeze
        variables read inside `switch_case` branches).
        """
        if quantize not in ("none", "dynamic_range"):
            raise ValueError(f"quantize must be 'none' or 'dynamic_range'. Received: {quantize!r}")
        spec = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        self._constants = True
        try:
            fn = tf.function(lambda images: self._forward(images)[0]).get_concrete_function(spec)
        finally:
            self._constants = False
        converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], self)
        if quantize == "dynamic_range":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert()


class _Serving(tf.Module):
    """What `FoldedModel.save` writes: the weights and one serving function."""

    def __init__(self, folded):
        super().__init__(name="conditional_serving")
        self._vars = list(folded._vars)
        self._forward = folded._forward  # a bound method: not tracked

    @tf.function
    def __call__(self, images):
        return self._forward(images)[0]


def _select(index, fns, nested_cond=False, offset=0):
    """`tf.switch_case(index, fns)`, or a balanced tree of `tf.cond` (LiteRT IF)."""
    if not nested_cond:
        return tf.switch_case(index, fns)
    if len(fns) == 1:
        return fns[0]()
    half = len(fns) // 2
    return tf.cond(
        index < offset + half,
        lambda: _select(index, fns[:half], True, offset),
        lambda: _select(index, fns[half:], True, offset + half),
    )


def _zero_pad_fn(filters, strides):
    def run(x):
        if strides > 1:
            x = x[:, ::strides, ::strides, :]
        pad = filters - x.shape[-1]
        if pad:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [pad // 2, pad - pad // 2]])
        return x

    return run


def _pool_fn(op):
    if op.data_format != "channels_last":
        raise ValueError(f"MaxPooling2D '{op.name}' must be channels_last.")
    size, strides, padding = tuple(op.pool_size), tuple(op.strides), op.padding.upper()
    return lambda x: tf.nn.max_pool2d(x, size, strides, padding)


def conditional_model(
    model, calibration_images, widths=(0.25, 0.5, 0.75, 1.0), multiple_of=8, batch_size=64,
    branching="switch_case",
):
    """A `FoldedModel` in conditional mode (see module doc)."""
    return FoldedModel(
        model, calibration_images, mode="conditional", widths=widths, multiple_of=multiple_of,
        batch_size=batch_size, branching=branching,
    )


def folded_model(model):
    """The BN-folded TF equivalent of `model` (gates, if any, multiply by 0/1)."""
    return FoldedModel(model, mode="masked")


# --------------------------------------------------------------------------- synthetic gate patterns


def set_gate_pattern(model, images, off=0.4, on=0.3, nested=True, seed=0, spread=(0.2, 0.8)):
    """Sets every gate's logits to a synthetic always-off / always-on / conditional mix.

    For benchmarks and tests, not training. Per gate (in graph order, since a
    gate changes the inputs of later ones), a random `off` fraction of its
    groups gets logit -10 (zero kernel column), a random `on` fraction +10,
    and the rest is input-dependent and open for about half of `images`:
    with `nested=True` they share one random direction `u` of the gate's
    hidden features and open when `z @ u` exceeds evenly spread quantiles
    (`spread`) of its values on `images` (a correlated, prefix-friendly
    pattern); with `nested=False` each has its own random column and opens
    above the median (independent channels).

    Returns `{gate_name: array of 0 (off) / 1 (on) / 2 (conditional)}`.
    """
    rng = np.random.default_rng(seed)
    images = np.asarray(images, np.float32)
    designs = {}

    def design(gate, x):
        n = gate.num_gates
        n_off, n_on = int(round(off * n)), int(round(on * n))
        kinds = np.full(n, 2)
        order = rng.permutation(n)
        kinds[order[:n_off]] = 0
        kinds[order[n_off : n_off + n_on]] = 1
        kernel = np.zeros(gate.logits_dense.kernel.shape, np.float32)
        bias = np.where(kinds == 1, 10.0, -10.0).astype(np.float32)
        cond = np.flatnonzero(kinds == 2)
        if len(cond):
            pooled = tf.reduce_mean(x, axis=[1, 2])
            z = keras.ops.convert_to_numpy(gate.hidden_bn(gate.hidden(pooled), training=False))
            z = np.maximum(z, 0.0)
            if nested:
                u = rng.normal(size=(z.shape[1],))
                s = z @ u
                qs = np.linspace(spread[0], spread[1], len(cond)) if len(cond) > 1 else [0.5]
                for c, q in zip(rng.permutation(cond), qs):
                    kernel[:, c] = u
                    bias[c] = -np.quantile(s, q)
            else:
                for c in cond:
                    u = rng.normal(size=(z.shape[1],))
                    kernel[:, c] = u
                    bias[c] = -np.median(z @ u)
        gate.logits_dense.set_weights([kernel, bias])
        designs[gate.name] = kinds

    # One eager forward pass: each gate is designed on its actual inputs, after
    # the gates before it were set (it intercepts its own gate_logits once).
    gates = find_gates(model)
    for gate in gates:
        original = gate.gate_logits

        def intercept(x, training=False, gate=gate, original=original):
            del gate.gate_logits  # back to the class method
            design(gate, x)
            return original(x, training=training)

        gate.gate_logits = intercept
    try:
        model(images, training=False)
    finally:
        for gate in gates:
            gate.__dict__.pop("gate_logits", None)
    missing = [g.name for g in gates if g.name not in designs]
    if missing:
        raise ValueError(f"Gates {missing} did not run in the model call.")
    return designs


# --------------------------------------------------------------------------- CLI support


def export_conditional(model, calibration_images, out_dir, parity_images=None, log=print, **kwargs):
    """Writes `out_dir/saved_model` (conditional module) and `out_dir/conditional.json`.

    Checks the reloaded SavedModel against Keras inference on `parity_images`
    (default: the first 32 calibration images), batch 1 and whole batch.
    Returns the summary dict.
    """
    import json
    import os

    module = conditional_model(model, calibration_images, **kwargs)
    sm_dir = os.path.join(out_dir, "saved_model")
    module.save(sm_dir)
    loaded = tf.saved_model.load(sm_dir)
    images = np.asarray(calibration_images if parity_images is None else parity_images, np.float32)[:32]
    ref = np.asarray(model(images, training=False))
    one = loaded.signatures[SERVING_DEFAULT]
    batch = loaded.signatures[SERVING_BATCH]
    out1 = np.concatenate([next(iter(one(images=tf.constant(images[i : i + 1])).values())).numpy()
                           for i in range(len(images))])
    outn = next(iter(batch(images=tf.constant(images)).values())).numpy()
    err = float(max(np.abs(out1 - ref).max(), np.abs(outn - ref).max()))
    dense = module.static_macs
    executed = module.executed_macs(images)
    summary = {
        "mode": "conditional",
        "signatures": {SERVING_DEFAULT: [1, *module.input_shape], SERVING_BATCH: [None, *module.input_shape]},
        "input": INPUT_NAME,
        "gates": [
            {"gate": g, "channels": int(c), "widths": [int(w) for w in ws]}
            for g, c, ws in zip(module.gate_names, module.gate_channels, module.bucket_widths)
        ],
        "parity_max_abs_diff": err,
        "parity_samples": int(len(images)),
        "static_macs": int(dense),
        "mean_executed_macs": float(executed.mean()),
    }
    with open(os.path.join(out_dir, "conditional.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"conditional SavedModel: {len(module.gate_names)} gated blocks; max |diff| vs Keras on "
        f"{len(images)} samples {err:.2e}; executed MACs {executed.mean() / dense:.3f} of static")
    return summary
