"""Multiply-accumulate (MAC) accounting, static and per sample.

`count_macs(model)` counts the MACs of one sample through every Conv
(strides, dilation, groups), DepthwiseConv, SeparableConv, ConvTranspose and
Dense layer of a functional model, plus the MLPs of its `ChannelGate`s.

`conditional_macs(model, x)` counts, per sample of `x`, what a gated model
executes given its actual inference-time gates: a closed channel removes its
output filter from the convolution that produced it and its input slice from
the convolution(s) that consume it. The graph is read to find those
convolutions, so any functional model with `ChannelGate`s works, not only the
project's ResNets. Elementwise-per-channel layers (BN, activations, padding,
pooling, dropout) between a gate and a convolution are looked through.
"""

import dataclasses

import keras
import numpy as np

from bs_keras.graph import LayerGraph
from bs_keras.gates import ChannelGate, find_gates, record_gates

_L = keras.layers
MAC_LAYERS = (
    _L.Conv1D,
    _L.Conv2D,
    _L.Conv3D,
    _L.Conv1DTranspose,
    _L.Conv2DTranspose,
    _L.Conv3DTranspose,
    _L.SeparableConv1D,
    _L.SeparableConv2D,
    _L.Dense,
)
PASSTHROUGH = (
    _L.BatchNormalization,
    _L.ReLU,
    _L.Activation,
    _L.LeakyReLU,
    _L.ELU,
    _L.Dropout,
    _L.SpatialDropout1D,
    _L.SpatialDropout2D,
    _L.SpatialDropout3D,
    _L.Identity,
    _L.ZeroPadding1D,
    _L.ZeroPadding2D,
    _L.ZeroPadding3D,
    _L.MaxPooling1D,
    _L.MaxPooling2D,
    _L.MaxPooling3D,
    _L.AveragePooling1D,
    _L.AveragePooling2D,
    _L.AveragePooling3D,
)


def _prod(values):
    out = 1
    for v in values:
        if v is None:
            raise ValueError(
                "MACs need fully known shapes; build the model with a fixed "
                f"input size. Found an unknown dimension in {values}."
            )
        out *= int(v)
    return out


def _shape(tensor):
    return tuple(tensor.shape)


def layer_macs(layer, input_shape, output_shape):
    """MACs for one sample through `layer`; 0 for layers without MACs.

    Shapes include the batch dimension (ignored).
    """
    conv_transpose = (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose)
    if isinstance(layer, _L.SeparableConv2D) or isinstance(layer, _L.SeparableConv1D):
        in_c = input_shape[-1]
        spatial = _prod(output_shape[1:-1])
        depthwise = spatial * in_c * layer.depth_multiplier * _prod(layer.kernel_size)
        pointwise = spatial * in_c * layer.depth_multiplier * layer.filters
        return depthwise + pointwise
    if isinstance(layer, (_L.DepthwiseConv1D, _L.DepthwiseConv2D)):
        return (
            _prod(output_shape[1:-1])
            * input_shape[-1]
            * layer.depth_multiplier
            * _prod(layer.kernel_size)
        )
    if isinstance(layer, conv_transpose):
        return _prod(input_shape[1:-1]) * input_shape[-1] * layer.filters * _prod(layer.kernel_size)
    if isinstance(layer, (_L.Conv1D, _L.Conv2D, _L.Conv3D)):
        groups = getattr(layer, "groups", 1)
        return (
            _prod(output_shape[1:-1])
            * layer.filters
            * _prod(layer.kernel_size)
            * (input_shape[-1] // groups)
        )
    if isinstance(layer, _L.Dense):
        return _prod(input_shape[1:]) * layer.units
    return 0


def _nodes(model):
    """Nodes of a functional model from inputs to outputs."""
    return LayerGraph(model, purpose="MAC counting").nodes


def _node_macs(node):
    op = node.operation
    if isinstance(op, keras.Model):
        return count_macs(op)
    if isinstance(op, ChannelGate):
        return op.mlp_macs(node.input_tensors[0].shape[-1])
    if not node.input_tensors or not node.output_tensors:
        return 0
    return layer_macs(op, _shape(node.input_tensors[0]), _shape(node.output_tensors[0]))


def count_macs(model):
    """Static MACs for one sample (every channel computed).

    Args:
        model: a built functional or Sequential Keras model; nested models
            are counted through.

    Returns:
        int: multiply-accumulates of convolutions, dense layers and gate
        MLPs for one input sample.
    """
    return int(sum(_node_macs(node) for node in _nodes(model)))


@dataclasses.dataclass
class GateInfo:
    """What one gate controls: `macs_per_channel` MACs per closed channel."""

    gate: ChannelGate
    channels: int
    macs_per_channel: float
    producer: str
    consumers: list


def _is_depthwise(op):
    return isinstance(op, (_L.DepthwiseConv1D, _L.DepthwiseConv2D))


def _through_forward(op):
    # A depthwise convolution loses channel c with its input: counted and walked through.
    return isinstance(op, PASSTHROUGH) or _is_depthwise(op)


def gate_table(model):
    """For each `ChannelGate` node of a functional model: what it controls."""
    graph = LayerGraph(model, purpose="MAC counting")
    table = []
    for node in graph.nodes:
        op = node.operation
        if isinstance(op, keras.Model):
            table.extend(gate_table(op))
            continue
        if not isinstance(op, ChannelGate):
            continue
        h = node.input_tensors[1]
        channels = int(h.shape[-1])
        per_channel = 0.0
        prod_node, _ = graph.trace_back(h, through=PASSTHROUGH)
        prod_op = None if prod_node is None else prod_node.operation
        if prod_node is not None:
            macs = _node_macs(prod_node)
            out_c = prod_node.output_tensors[0].shape[-1]
            per_channel += macs / out_c
        ends, crossed = graph.trace_forward(node.output_tensors[0], through=_through_forward)
        ends = [n for n in ends if n is not None]  # a model output costs nothing
        for end in ends:
            if not isinstance(end.operation, MAC_LAYERS):
                raise ValueError(
                    f"Gated features reach layer '{end.operation.name}' ({type(end.operation).__name__}), "
                    "whose cost per channel is not known. Put the gate right before "
                    "a convolution or dense layer (optionally through BN/activation)."
                )
        found = [n for n in crossed if _is_depthwise(n.operation)] + ends
        for cnode in found:
            in_c = cnode.input_tensors[0].shape[-1]
            per_channel += _node_macs(cnode) / in_c
        table.append(
            GateInfo(
                gate=op,
                channels=channels,
                macs_per_channel=per_channel,
                producer=None if prod_op is None else prod_op.name,
                consumers=[c.operation.name for c in found],
            )
        )
    gates = find_gates(model)
    if len(table) != len(gates):
        raise ValueError(
            f"Found {len(gates)} ChannelGate layers but only {len(table)} in "
            "the functional graph; gates inside subclassed layers cannot be "
            "accounted for."
        )
    return table


def _as_batch(model, x):
    x = np.asarray(x)
    expected = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if expected is not None and (
        x.ndim != len(expected) + 1
        or any(e is not None and e != d for e, d in zip(expected, x.shape[1:]))
    ):
        raise ValueError(
            f"conditional_macs expects a batch of shape (N, {', '.join(map(str, expected))}). "
            f"Received: shape={x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"conditional_macs expects numeric inputs. Received: dtype={x.dtype}")
    return x.astype("float32")


def gate_masks(model, x, batch_size=128):
    """Inference-time hard gates: `{gate_name: (N, num_gates) 0/1 array}`."""
    x = _as_batch(model, x)
    gates = find_gates(model)
    masks = {g.name: [] for g in gates}
    for start in range(0, len(x), batch_size):
        with record_gates() as record:
            model(x[start : start + batch_size], training=False)
        for g in gates:
            calls = record.get(g, [])
            if len(calls) != 1:
                raise ValueError(
                    f"Gate '{g.name}' ran {len(calls)} times in one model call; "
                    "per-sample MACs need each gate to run exactly once."
                )
            masks[g.name].append(np.asarray(calls[0]))
    return {k: np.concatenate(v, axis=0) for k, v in masks.items()}


def conditional_macs(model, x, batch_size=128):
    """Per-sample MACs a gated model executes on the batch `x`.

    Args:
        model: functional Keras model with `ChannelGate` layers (a model
            without gates gives the static count for every sample).
        x: array of inputs, shape `(N,) + input_shape`.
        batch_size: inference batch size.

    Returns:
        float64 array of shape `(N,)` with integral values.
    """
    static = count_macs(model)
    masks = gate_masks(model, x, batch_size)
    n = len(next(iter(masks.values()))) if masks else len(np.asarray(x))
    return macs_from_masks(static, gate_table(model), masks, n)


def macs_from_masks(static, table, masks, n):
    """Per-sample MACs: `static` minus what each closed channel controls.

    Args:
        static: `count_macs(model)`.
        table: `gate_table(model)`.
        masks: `{gate_name: (n, num_gates) 0/1 array}` of inference gates.
        n: number of samples.
    """
    macs = np.full((n,), float(static))
    for info in table:
        closed = (1.0 - np.asarray(masks[info.gate.name])).sum(axis=-1) * info.gate.group_size
        macs -= closed * info.macs_per_channel
    return macs


def ungated_macs(model, static=None):
    """MACs of the same network without its gates (static minus gate MLPs)."""
    static = count_macs(model) if static is None else static
    return static - sum(g.mlp_macs(g.hidden.kernel.shape[0]) for g in find_gates(model))
