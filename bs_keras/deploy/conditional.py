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
ZeroPadShortcut, ChannelGate). The weights are copied into `tf.Variable`s, or
with `constant_weights=True` (the default under XLA) embedded in the traced
graphs as constants; the module holds no Keras object and has no random op.

`FoldedModel(model, mode="masked")` is the same walk without branches (full
convolutions x 0/1 mask): the BN-folded equivalent of the Keras model, used by
the latency benchmark as the fair TF baseline for dense / masked / compact.

Example:

```python
cond = conditional_model(model, calibration_images, widths=(0.25, 0.5, 0.75, 1.0))
probs = cond(images)                       # == model(images, training=False)
outputs = cond.with_gates(images)          # also gate masks, executed MACs, widths
cond.save("exported/conditional")          # serving_default (batch 1), serving_batch, serving_with_gates
tflite = cond.to_tflite("dynamic", with_gates=True)   # batch 1, LiteRT IF branches
xla = conditional_model(model, calibration_images, jit_compile=True)  # XLA, nested tf.cond
```

`python -m export MODEL.keras --mode conditional --calibration ... [--format tflite]`
writes these (`bs_keras.cli.export`); `ConditionalRunner` puts the module or its
SavedModel behind the parity-table interface of `bs_keras.deploy.parity`.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from bs_keras.blocks import ZeroPadShortcut
from bs_keras.gates import ChannelGate, find_gates
from bs_keras.macs import count_macs, gate_masks, gate_table
from bs_keras.deploy.savedmodel import output_names

_L = keras.layers

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


def _width_step(multiple_of, group_size):
    """Widths are multiples of both `multiple_of` and the gate group size."""
    step = int(multiple_of or 1)
    return step * group_size // math.gcd(step, group_size)


def bucket_widths(channels, widths, multiple_of=8, group_size=1):
    """Precompiled widths in channels: fractions of `channels` rounded up.

    Each width is rounded up to a multiple of `multiple_of` (and of
    `group_size`) and capped at `channels`; the full width is always
    included, so every mask is covered. Sorted, unique.
    """
    step = _width_step(multiple_of, group_size)
    out = set()
    for f in widths:
        if not 0 < f <= 1:
            raise ValueError(f"widths are fractions in (0, 1]. Received: {f}")
        out.add(min(channels, int(math.ceil(f * channels / step)) * step))
    out.add(channels)
    return sorted(out)


def calibrated_widths(needed, channels, max_widths=6, multiple_of=8, group_size=1):
    """Precompiled widths fitted to the widths calibration samples need.

    Args:
        needed: `(N,)` channels each calibration sample needs in this block
            (end of its last open channel in the reordered block).
        channels: the block's gated width (always a width: the fallback for
            inputs that need more than any calibration sample did).
        max_widths: at most this many widths besides `channels`.
        multiple_of, group_size: as `bucket_widths`.

    Returns the sorted widths minimising the calibration samples' total
    executed channels (each sample runs the smallest width covering it);
    an exact dynamic programme over the distinct rounded needs.
    """
    if max_widths < 1:
        raise ValueError(f"max_widths must be >= 1. Received: {max_widths}")
    step = _width_step(multiple_of, group_size)
    rounded = np.minimum(channels, np.maximum(step, np.ceil(np.asarray(needed) / step) * step)).astype(int)
    values, counts = np.unique(rounded, return_counts=True)
    m, k_max = len(values), min(max_widths, len(values))
    if m == 0:
        return [channels]
    # cost[k][j]: least executed channels for values[:j+1] with k+1 widths, the last values[j].
    inf = float("inf")
    cost = np.full((k_max, m), inf)
    back = np.zeros((k_max, m), int)
    csum = np.concatenate([[0], np.cumsum(counts)])
    for j in range(m):
        cost[0, j] = values[j] * csum[j + 1]
    for k in range(1, k_max):
        for j in range(k, m):
            cands = [cost[k - 1, i] + values[j] * (csum[j + 1] - csum[i + 1]) for i in range(k - 1, j)]
            best = int(np.argmin(cands))
            cost[k, j], back[k, j] = cands[best], best + k - 1
    # The full width is free: values[j+1:] may fall through to it.
    best, k, j = channels * csum[m], -1, -1
    for kk in range(k_max):
        for jj in range(kk, m):
            total = cost[kk, jj] + channels * (csum[m] - csum[jj + 1])
            if total < best:
                best, k, j = total, kk, jj
    chosen = []
    while k >= 0:
        chosen.append(int(values[j]))
        j, k = back[k, j], k - 1
    return sorted(set(chosen) | {channels})


# --------------------------------------------------------------------------- the module


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
        jit_compile: compile `__call__`, `with_gates` and the saved serving
            functions with XLA (on first call per input shape). Needs
            `branching="cond"`: XLA compiled the nested `tf.cond` ResNet-50
            module in ~10 s but did not finish `Case` in 5 minutes.
        constant_weights: embed the weights in the traced functions as
            graph constants (XLA literals) instead of `tf.Variable`s.
            Default: `jit_compile`. Measured on ResNet-50 at batch 1 under
            XLA (2-core CPU, one interleaved run): the conditional module
            took 0.562 of plain TF's dense time with variables and 0.526 with
            constants, dense itself 0.989 and 0.987: the ~430 variables of the
            width branches (one set of kernels per width) each cost the XLA
            launch per call. `save` then stores the weights inside the
            functions, once per input shape (batch 1, and any batch with
            `dynamic_batch`): every signature calls one shared core function.
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
                "jit_compile=True needs branching='cond' (nested tf.cond): XLA did not finish "
                "compiling the switch_case ResNet-50 module in 5 minutes (nested cond: ~10 s)."
            )
        self.branching = branching
        self.jit_compile = bool(jit_compile)
        # XLA when asked; None (not False): TF's default, no auto-clustering change.
        jit = True if jit_compile else None
        self._call_fn = tf.function(lambda images: self._forward(images)[0], jit_compile=jit)
        self._with_gates_fn = tf.function(self._with_gates, jit_compile=jit)
        self.width_choice = f"auto (at most {max_widths} + full)" if isinstance(widths, str) else list(widths)
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
        auto = isinstance(widths, str)
        if auto and widths != "auto":
            raise ValueError(f"widths must be fractions in (0, 1] or 'auto'. Received: {widths!r}")

        self._vars = []
        self._steps = []  # (fn, input ids, output id)
        self.gate_names = []
        self.gate_channels = []
        self.bucket_widths = []
        self.permutations = {}  # gate name -> channel order (new position -> old channel)
        self.gate_orders = {}  # gate name -> gate (group) order, same convention
        self._gate_fns = []  # per gate: (needed_index, mask_of, id of the gate's input)
        skip = set()  # node ids handled elsewhere
        alias = {}  # tensor id -> tensor id (folded BN outputs)
        segments = {}  # consumer conv node id -> segment step

        self._tflite = False  # True while tracing for TFLite: nested tf.cond, not Case
        self.weight_count = 0  # floats held (per-width branch kernels included)

        def var(value, name):
            value = np.asarray(value, np.float32)
            self.weight_count += value.size
            if self.constant_weights:
                # Made while tracing: a graph constant (an XLA literal), not an input.
                return lambda: tf.constant(value, name=name.replace("/", "_"))
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
            # A ReLU right after conv2 [-> BN] runs inside the branches, where it
            # fuses with the convolution (Conv2D + BiasAdd + Relu): one op fewer per block.
            last_t = bnode.output_tensors[0] if bn2 is not None else out_t
            rnode = only_consumer(last_t)
            relu2 = rnode is not None and _is_relu(rnode.operation)
            if relu2:
                skip.add(id(rnode))
                alias[id(rnode.output_tensors[0])] = id(out_t)
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
            self.gate_orders[gate.name] = gperm
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
            if mode == "conditional" and auto:
                reordered = masks[gate.name][:, gperm] > 0
                last = np.where(reordered.any(axis=1), gate.num_gates - np.argmax(reordered[:, ::-1], axis=1), 0)
                ws = calibrated_widths(last * gs, channels, max_widths, multiple_of, gs)
            elif mode == "conditional":
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
            # Per gate (group), the index of the smallest branch covering it.
            group_end = (np.arange(gate.num_gates) + 1) * gs
            bucket_of = np.searchsorted(np.asarray(ws), group_end).astype(np.int32)

            def logits_of(x, g_wh=g_wh, g_hb=g_hb, g_wl=g_wl, g_bl=g_bl):
                if self._tflite or None in x.shape[1:3]:
                    pooled = tf.reduce_mean(x, axis=[1, 2])
                else:  # measured faster than reduce_mean in TF on CPU
                    pooled = tf.reshape(tf.nn.avg_pool2d(x, x.shape[1:3], 1, "VALID"), [-1, x.shape[-1]])
                # bias_add (not +): Grappler fuses MatMul + BiasAdd (+ Relu).
                z = tf.nn.relu(tf.nn.bias_add(tf.matmul(pooled, g_wh()), g_hb()))
                return tf.nn.bias_add(tf.matmul(z, g_wl()), g_bl())

            def mask_of(x, logits_of=logits_of):
                return tf.cast(logits_of(x) > 0, tf.float32)

            bucket_row = bucket_of[None]

            def index_of(is_open, axis=1, bucket_row=bucket_row):
                """Per sample (axis=1), the index of the smallest branch covering its open
                gates; axis=None: the widest any sample needs, in one max. The select has
                equal shapes at batch 1 (no broadcasting)."""
                return tf.reduce_max(tf.where(is_open, bucket_row, np.zeros_like(bucket_row)), axis=axis)

            def needed_index(x, logits_of=logits_of, index_of=index_of):
                return index_of(logits_of(x) > 0)

            b1_full = branches[-1][2]  # the full width's conv1 bias (the last width is `channels`)

            def segment(x_in, x_gate, logits_of=logits_of, index_of=index_of, branches=branches,
                        conv1_run=conv1_run, conv2_run=conv2_run, b2v=b2v, relu=relu, relu2=relu2, gs=gs,
                        b1_full=b1_full, channels=channels):
                is_open = logits_of(x_gate) > 0
                index = index_of(is_open, axis=None)
                # At batch 1 a closed channel's conv1 bias is set to -1e30, so the
                # fused Conv2D + BiasAdd + Relu outputs exactly 0 there: no mask
                # multiply (one op fewer per block and no pass over the features).
                fold = relu and x_in.shape[0] == 1 and not self._tflite
                if fold:
                    open_c = tf.reshape(is_open, [-1])
                    if gs > 1:
                        open_c = tf.repeat(open_c, gs)
                    bias = tf.where(open_c, b1_full(), np.full(channels, -1e30, np.float32))
                else:
                    mask = tf.cast(is_open, tf.float32)
                    if gs > 1:
                        mask = tf.repeat(mask, gs, axis=1)
                    mask = mask[:, None, None, :]

                def branch(w, k1v, b1v, k2v):
                    def run():
                        if fold:
                            h = tf.nn.relu(conv1_run(x_in, k1v(), bias[:w]))
                        else:
                            h = conv1_run(x_in, k1v(), b1v())
                            if relu:
                                h = tf.nn.relu(h)
                            h = h * mask[..., :w]
                        y = conv2_run(h, k2v(), b2v())
                        return tf.nn.relu(y) if relu2 else y

                    return run

                fns = [branch(*b) for b in branches]
                if len(fns) == 1:
                    return fns[0](), tf.constant(0, tf.int32)
                return _select(index, fns, nested_cond=self._tflite or self.branching == "cond"), index

            self._gate_fns.append((needed_index, mask_of, id(x_t)))
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
        self.output_name = output_names(model)[0]
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

    def __call__(self, images):
        """Class probabilities (the model's output) for `images`."""
        return self._call_fn(images)

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
        for (needed_index, _, x_id), ws in zip(self._gate_fns, self.bucket_widths):
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

    def _with_gates(self, images):
        out, env, indices = self._forward(images)
        batch = tf.shape(out)[:1]
        result = {self.output_name: out}
        macs = tf.fill(batch, tf.constant(self.static_macs, tf.int64))
        widths = []
        for (_, mask_of, x_id), name, ws, c, index in zip(
            self._gate_fns, self.gate_names, self.bucket_widths, self.gate_channels, indices
        ):
            mask = mask_of(env[self._resolve(x_id)])  # reordered gates
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

    def signatures(self, dynamic_batch=True):
        spec1 = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        sigs = {SERVING_DEFAULT: self._call_fn.get_concrete_function(spec1)}
        if dynamic_batch:
            spec = tf.TensorSpec((None,) + self.input_shape, tf.float32, name=INPUT_NAME)
            sigs[SERVING_BATCH] = self._call_fn.get_concrete_function(spec)
        return sigs

    def _serving_signatures(self, serving, dynamic_batch=True):
        spec1 = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        spec = tf.TensorSpec((None,) + self.input_shape, tf.float32, name=INPUT_NAME)
        sigs = {SERVING_DEFAULT: serving.serve_default.get_concrete_function(spec1)}
        if dynamic_batch:
            sigs[SERVING_BATCH] = serving.serve_default.get_concrete_function(spec)
        sigs[SERVING_WITH_GATES] = serving.serve_with_gates.get_concrete_function(spec if dynamic_batch else spec1)
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
        if self.constant_weights:
            serving = _SharedServing(self, (1, None) if dynamic_batch else (1,))
        else:
            serving = (_XlaServing if self.jit_compile else _Serving)(self)
        signatures = self._serving_signatures(serving, dynamic_batch)
        for batch in (1, None) if dynamic_batch else (1,):  # the reloaded object's __call__
            serving.__call__.get_concrete_function(
                tf.TensorSpec((batch,) + self.input_shape, tf.float32, name=INPUT_NAME))
        tf.saved_model.save(serving, path, signatures=signatures)
        return path

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
        quantize = {"dynamic_range": "dynamic"}.get(quantize, quantize)
        if quantize == "int8":
            raise ValueError(INT8_UNSUPPORTED)
        if quantize not in TFLITE_QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {TFLITE_QUANTIZATIONS}. Received: {quantize!r}")
        spec = tf.TensorSpec((1,) + self.input_shape, tf.float32, name=INPUT_NAME)
        tmp = None
        self._tflite = True
        try:
            if with_gates:
                import tempfile

                tmp = tempfile.mkdtemp(prefix="conditional_tflite_")
                serving = _Serving(self)
                tf.saved_model.save(serving, tmp, signatures=self._serving_signatures(serving, False))
                converter = tf.lite.TFLiteConverter.from_saved_model(
                    tmp, signature_keys=[SERVING_DEFAULT, SERVING_WITH_GATES]
                )
            else:
                fn = tf.function(lambda images: self._forward(images)[0]).get_concrete_function(spec)
                converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], self)
            if quantize != "none":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantize == "float16":
                converter.target_spec.supported_types = [tf.float16]
            return converter.convert()
        finally:
            self._tflite = False
            if tmp:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)


class _Serving(tf.Module):
    """What `FoldedModel.save` writes: the weights and the serving functions."""

    def __init__(self, folded):
        super().__init__(name="conditional_serving")
        self._vars = list(folded._vars)
        self._forward = folded._forward  # bound methods: not tracked
        self._with_gates = folded._with_gates
        self._output_name = folded.output_name

    @tf.function
    def __call__(self, images):
        return self._forward(images)[0]

    # No method name may be a prefix of another: with `serve` and
    # `serve_with_gates` the TF 2.21 TFLite converter kept only one signature.
    @tf.function
    def serve_default(self, images):
        return {self._output_name: self._forward(images)[0]}

    @tf.function
    def serve_with_gates(self, images):
        return self._with_gates(images)


class _XlaServing(_Serving):
    """`_Serving` with every function compiled by XLA (`jit_compile=True`)."""

    __call__ = tf.function(_Serving.__call__.python_function, jit_compile=True)
    serve_default = tf.function(_Serving.serve_default.python_function, jit_compile=True)
    serve_with_gates = tf.function(_Serving.serve_with_gates.python_function, jit_compile=True)


class _SharedServing(tf.Module):
    """What `FoldedModel.save` writes for constant weights: every serving
    function calls one core function (`with_gates`; XLA-compiled with
    `jit_compile=True`), so the weights, embedded in its graph, are stored
    once per input shape instead of once per signature."""

    def __init__(self, folded, batch_sizes):
        super().__init__(name="conditional_serving")
        core = tf.function(folded._with_gates, jit_compile=True if folded.jit_compile else None)
        # Traced here, once per batch size: a tf.function called while another
        # function is traced is traced again for that caller.
        self._cores = {  # string keys: saved as a trackable dict
            str(b): core.get_concrete_function(tf.TensorSpec((b,) + folded.input_shape, tf.float32, name=INPUT_NAME))
            for b in batch_sizes
        }
        self._output_name = folded.output_name

    def _core(self, images):
        key = str(images.shape[0])
        return self._cores[key if key in self._cores else "None"](images)

    @tf.function
    def __call__(self, images):
        return self._core(images)[self._output_name]

    @tf.function
    def serve_default(self, images):
        return {self._output_name: self._core(images)[self._output_name]}

    @tf.function
    def serve_with_gates(self, images):
        return self._core(images)


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
    branching=None, max_widths=6, jit_compile=False, constant_weights=None,
):
    """A `FoldedModel` in conditional mode (see module doc)."""
    return FoldedModel(
        model, calibration_images, mode="conditional", widths=widths, multiple_of=multiple_of,
        batch_size=batch_size, branching=branching, max_widths=max_widths, jit_compile=jit_compile,
        constant_weights=constant_weights,
    )


def folded_model(model, jit_compile=False, constant_weights=None):
    """The BN-folded TF equivalent of `model` (gates, if any, multiply by 0/1)."""
    return FoldedModel(model, mode="masked", jit_compile=jit_compile, constant_weights=constant_weights)


# --------------------------------------------------------------------------- synthetic gate patterns


def _between_samples(values, q):
    """A threshold near the q-quantile of `values` halfway between two of them, so
    that no sample sits on it (float rounding would decide its gate)."""
    v = np.sort(np.asarray(values, np.float64))
    if len(v) == 1:
        return float(v[0]) - 1.0
    lo = min(int(np.floor(q * (len(v) - 1))), len(v) - 2)
    return float((v[lo] + v[lo + 1]) / 2)


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
    above the median (independent channels). Thresholds lie halfway between
    two samples' values, never on one.

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
                    bias[c] = -_between_samples(s, q)
            else:
                for c in cond:
                    u = rng.normal(size=(z.shape[1],))
                    kernel[:, c] = u
                    bias[c] = -_between_samples(z @ u, 0.5)
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
        if isinstance(model, FoldedModel):
            self.module = model
            self._serve = lambda x: {model.output_name: model(x)}
            self._gates = model.with_gates
        else:
            import os

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
    """What `python -m export --mode conditional` writes to conditional.json.

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
