"""Compaction: a gated model -> a physically narrower model.

On calibration data every gate (a group of `group_size` channels) falls in one
of three categories, measured with the deterministic inference gates:

- always off: the channels are removed from the weights: the output filters
  of the convolution that produces them (and the per-channel parameters of the
  BatchNormalization between it and the gate) and the input slices of the
  convolution(s) that consume them;
- always on: the channels stay but the gate no longer switches them: their
  logit becomes a constant (zero kernel column, positive bias), so the mask is
  exactly 1 whatever the input;
- conditional: the channels keep their gate, with its original logit.

A block without conditional channels loses its gate altogether. Channel order
is preserved. The result is an ordinary functional model of standard layers
and `ChannelGate`s (it saves and loads as `.keras` with nothing but
`bs_keras` imported); on the calibration data it computes what the masked
model computes, up to float rounding of the narrower convolutions. On other
data it differs wherever a gate would have opened an "always off" channel or
closed an "always on" one.

`round_to=8` keeps every compacted width a multiple of 8 (faster kernels,
especially quantized): the extra channels have zero filters, zero
BatchNormalization scale and shift, and zero consumer weights, so they add
exactly nothing.

Example:

```python
compact = compact_model(model, calibration_images, round_to=8)
compact.save("compact.keras")
```
"""

import dataclasses
import math

import keras
import numpy as np

from bs_keras.gates import ChannelGate, find_gates
from bs_keras.graph import LayerGraph
from bs_keras.macs import PASSTHROUGH, gate_masks

_L = keras.layers

# Logit of a gate that must stay open. Any positive value gives exactly 1
# (the kernel column is zero); a moderate one keeps the int8 range of the
# logits tensor close to that of the trained logits.
ON_LOGIT = 1.0

# Layers between the producing convolution and the gate: per-channel maps
# (the same set the MAC accounting looks through).
_BACKWARD_PASSTHROUGH = PASSTHROUGH
# Layers between the gate and the consuming convolution: they must map a
# closed (zero) channel to zero, or removing it would change the consumer
# (Activation layers are checked one by one below).
_FORWARD_PASSTHROUGH = tuple(
    t for t in PASSTHROUGH if t not in (_L.BatchNormalization, _L.Activation)
)
_ZERO_PRESERVING_ACTIVATIONS = (
    "relu", "relu6", "linear", "leaky_relu", "elu", "selu", "tanh", "gelu", "silu", "swish",
)  # fmt: skip
_CONVS = (_L.Conv1D, _L.Conv2D, _L.Conv3D)


@dataclasses.dataclass
class GatePlan:
    """What compaction does to one gate.

    Group indices refer to the gates (`group_size` channels each) of the
    original layer.

    Attributes:
        gate: name of the `ChannelGate` layer.
        group_size: channels per gate.
        num_groups: gates in the original layer.
        always_on: indices of the gates open on every calibration sample.
        conditional: indices of the gates that switch.
        always_off: indices of the gates closed on every calibration sample.
        pad_groups: zero groups appended to reach a multiple of `round_to`.
        producer: name of the layer producing the gated channels.
        chain: names of the per-channel layers between producer and gate.
        consumers: names of the layers consuming the gated channels.
    """

    gate: str
    group_size: int
    num_groups: int
    always_on: np.ndarray
    conditional: np.ndarray
    always_off: np.ndarray
    pad_groups: int
    producer: str
    chain: tuple
    consumers: tuple

    @property
    def kept_groups(self):
        """Original indices of the kept gates, in their original order."""
        return np.sort(np.concatenate([self.always_on, self.conditional])).astype(np.int64)

    @property
    def drop_gate(self):
        """True when no gate switches any more: the layer is removed."""
        return len(self.conditional) == 0

    @property
    def channels(self):
        return self.num_groups * self.group_size

    @property
    def new_groups(self):
        return len(self.kept_groups) + self.pad_groups

    @property
    def new_channels(self):
        return self.new_groups * self.group_size

    @property
    def removed_channels(self):
        return self.channels - self.new_channels

    def group_index(self):
        """Original gate index of every new gate; -1 for padding."""
        return np.concatenate([self.kept_groups, -np.ones(self.pad_groups, np.int64)])

    def channel_index(self):
        """Original channel index of every new channel; -1 for padding."""
        groups = self.group_index()
        offsets = np.arange(self.group_size)
        channels = groups[:, None] * self.group_size + offsets[None, :]
        channels[groups < 0] = -1
        return channels.reshape(-1)

    def summary(self):
        """A JSON-ready dict."""
        return {
            "gate": self.gate,
            "group_size": self.group_size,
            "channels": self.channels,
            "always_on": len(self.always_on) * self.group_size,
            "conditional": len(self.conditional) * self.group_size,
            "always_off": len(self.always_off) * self.group_size,
            "padding": self.pad_groups * self.group_size,
            "new_channels": self.new_channels,
            "gate_kept": not self.drop_gate,
            "producer": self.producer,
            "consumers": list(self.consumers),
        }


# --------------------------------------------------------------------------- graph analysis


def _single_use(layer, what):
    if len(layer._inbound_nodes) != 1:
        raise ValueError(
            f"Layer '{layer.name}' ({what}) is called {len(layer._inbound_nodes)} times; "
            "compaction cannot narrow a shared layer."
        )


def _is_mac_consumer(op):
    if isinstance(op, _CONVS):
        return getattr(op, "groups", 1) == 1
    return isinstance(op, _L.Dense)


_NOT_A_MAC_LAYER = {
    "producer": "The channels gated by '{gate}' come from layer '{layer}' ({kind}); compaction needs "
    "a Conv (groups=1) or Dense producer, optionally followed by BatchNormalization/activations.",
    "consumer": "The output of '{gate}' reaches layer '{layer}' ({kind}); compaction needs it to reach "
    "Conv (groups=1) or Dense layers through zero-preserving layers only (ReLU, pooling, padding, dropout).",
}


def _check_mac_layer(op, role, gate_name):
    """`op` must be a single-use Conv (groups=1) or Dense layer: the gate's producer or a consumer."""
    if not _is_mac_consumer(op):
        raise ValueError(_NOT_A_MAC_LAYER[role].format(gate=gate_name, layer=op.name, kind=type(op).__name__))
    _single_use(op, f"{role} of '{gate_name}'")


def _activation_name(op):
    fn = getattr(op, "activation", None)
    return getattr(fn, "__name__", str(fn))


def _is_zero_preserving(op):
    """Layers between a gate and its consumer that map a closed channel to zero."""
    return isinstance(op, _FORWARD_PASSTHROUGH) or (
        isinstance(op, _L.Activation) and _activation_name(op) in _ZERO_PRESERVING_ACTIVATIONS
    )


def _trace_gate(node, graph):
    """Producer, per-channel chain and consumers of one gate node."""
    gate = node.operation
    h = node.input_tensors[1]
    prod_node, chain_nodes = graph.trace_back(h, through=_BACKWARD_PASSTHROUGH)
    path = [h] + [n.input_tensors[0] for n in chain_nodes]
    for tensor in path:
        users = graph.consumers(tensor)
        if len(users) != 1:
            raise ValueError(
                f"The features gated by '{gate.name}' are also used outside the gate "
                f"(tensor feeds {len(users)} layers between producer and gate); "
                "compaction cannot narrow them."
            )
    chain = []
    for n in chain_nodes:
        op = n.operation
        if isinstance(op, _L.BatchNormalization) and op.axis not in (-1, len(n.input_tensors[0].shape) - 1):
            raise ValueError(f"BatchNormalization '{op.name}' must normalize the last axis.")
        if op.weights and not isinstance(op, _L.BatchNormalization):
            raise ValueError(f"Layer '{op.name}' has weights compaction cannot slice.")
        _single_use(op, f"between a convolution and '{gate.name}'")
        chain.append(op)
    if prod_node is None:
        raise ValueError(f"'{gate.name}' gates the model input; there is no layer to narrow.")
    producer = prod_node.operation
    _check_mac_layer(producer, "producer", gate.name)

    ends, crossed = graph.trace_forward(node.output_tensors[0], through=_is_zero_preserving)
    if not ends:
        raise ValueError(f"The output of '{gate.name}' is not used.")
    for n in crossed:
        if isinstance(n.operation, _L.ReLU) and float(n.operation.threshold) != 0.0:
            raise ValueError(f"ReLU '{n.operation.name}' with a threshold does not keep zeros zero.")
    found = []
    for end in ends:
        if end is None:
            raise ValueError(f"The output of '{gate.name}' is a model output; compaction cannot narrow it.")
        _check_mac_layer(end.operation, "consumer", gate.name)
        found.append(end.operation)
    return producer, tuple(chain), tuple(found)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def plan_compaction(model, calibration_images, round_to=None, batch_size=128):
    """Gate categories on the calibration data and what compaction will do.

    Args:
        model: functional model with `ChannelGate` layers in its top-level
            graph.
        calibration_images: `(N, H, W, C)` preprocessed images.
        round_to: None, or keep every compacted width a multiple of this.
        batch_size: inference batch size for measuring the gates.

    Returns:
        A list of `GatePlan`, one per gate, in graph order.
    """
    if round_to is not None and (int(round_to) != round_to or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or None. Received: round_to={round_to}")
    images = np.asarray(calibration_images)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(
            "Compaction needs a non-empty batch of calibration images. "
            f"Received: shape={images.shape}"
        )
    graph = LayerGraph(model, purpose="Compaction")
    gate_nodes = [n for n in graph.nodes if isinstance(n.operation, ChannelGate)]
    all_gates = find_gates(model)
    if len(gate_nodes) != len(all_gates) or len(
        {id(n.operation) for n in gate_nodes}
    ) != len(gate_nodes):
        raise ValueError(
            "Compaction needs every ChannelGate called once in the model's own "
            "graph (not inside nested models or subclassed layers)."
        )
    if not gate_nodes:
        raise ValueError(f"Model '{model.name}' has no ChannelGate layers to compact.")
    masks = gate_masks(model, images, batch_size=batch_size)
    plans = []
    for node in gate_nodes:
        gate = node.operation
        producer, chain, found = _trace_gate(node, graph)
        mask = masks[gate.name]
        always_on = np.flatnonzero(mask.min(axis=0) == 1.0)
        always_off = np.flatnonzero(mask.max(axis=0) == 0.0)
        conditional = np.setdiff1d(np.arange(gate.num_gates), np.union1d(always_on, always_off))
        gs = gate.group_size
        kept = len(always_on) + len(conditional)
        target = max(kept, 1) * gs  # a convolution needs at least one filter
        if round_to:
            target = _round_up(target, math.lcm(int(round_to), gs))
        target = min(target, gate.num_gates * gs)
        plans.append(
            GatePlan(
                gate=gate.name,
                group_size=gs,
                num_groups=gate.num_gates,
                always_on=always_on.astype(np.int64),
                conditional=conditional.astype(np.int64),
                always_off=always_off.astype(np.int64),
                pad_groups=max(target // gs - kept, 0),
                producer=producer.name,
                chain=tuple(l.name for l in chain),
                consumers=tuple(l.name for l in found),
            )
        )
    return plans


# --------------------------------------------------------------------------- rewriting


class _DroppedGate:
    """Stands in for a removed gate while the graph is re-run: passes `h`."""

    def __init__(self, name):
        self.name = name


def _take(array, index, axis, fill=0.0):
    """`array` along `axis` at `index`; entries where index < 0 are `fill`."""
    array = np.asarray(array)
    axis = axis % array.ndim
    out = np.take(array, np.maximum(index, 0), axis=axis)
    pad = index < 0
    if pad.any():
        where = [slice(None)] * array.ndim
        where[axis] = pad
        out[tuple(where)] = fill
    return out


def _copy_weights(old_model, new_model, plans):
    by_gate = {p.gate: p for p in plans}
    out_slices = {}  # layer name -> plan whose channels its output carries
    in_slices = {}  # layer name -> plan whose channels its input carries
    for p in plans:
        out_slices[p.producer] = p
        for name in p.chain:
            out_slices[name] = p
        for name in p.consumers:
            in_slices[name] = p
    for old in old_model.layers:
        if isinstance(old, _L.InputLayer):
            continue
        plan = by_gate.get(old.name)
        if plan is not None:
            if not plan.drop_gate:
                _copy_gate(old, new_model.get_layer(old.name), plan)
            continue
        new = new_model.get_layer(old.name)
        if old.name not in out_slices and old.name not in in_slices:
            new.set_weights(old.get_weights())
            continue
        if isinstance(old, _L.BatchNormalization):
            index = out_slices[old.name].channel_index()
            fills = {"gamma": 0.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
            for attr, fill in fills.items():
                variable = getattr(old, attr, None)
                if variable is not None:
                    getattr(new, attr).assign(_take(variable.numpy(), index, -1, fill))
            continue
        if not old.weights:
            continue
        kernel = old.kernel.numpy()
        if old.name in in_slices:
            kernel = _take(kernel, in_slices[old.name].channel_index(), -2)
        bias = old.bias.numpy() if getattr(old, "bias", None) is not None else None
        if old.name in out_slices:
            index = out_slices[old.name].channel_index()
            kernel = _take(kernel, index, -1)
            if bias is not None:
                bias = _take(bias, index, -1)
        new.kernel.assign(kernel)
        if bias is not None:
            new.bias.assign(bias)


def _copy_gate(old, new, plan):
    new.hidden.set_weights(old.hidden.get_weights())
    new.hidden_bn.set_weights(old.hidden_bn.get_weights())
    kernel, bias = (np.asarray(w) for w in old.logits_dense.get_weights())
    groups = plan.group_index()
    switching = np.isin(groups, plan.conditional)
    new_kernel = np.where(switching[None, :], _take(kernel, groups, -1), 0.0)
    new_bias = np.where(switching, _take(bias, groups, -1), ON_LOGIT)
    new.logits_dense.set_weights([new_kernel.astype(kernel.dtype), new_bias.astype(bias.dtype)])
    new.bs_coef.assign(old.bs_coef)
    new.l0_coef.assign(old.l0_coef)
    new.hard_training.assign(old.hard_training)


def apply_compaction(model, plans, name=None):
    """Builds the compacted model described by `plans` (see `plan_compaction`).

    Returns:
        A new functional model; `model` is not modified.
    """
    by_gate = {p.gate: p for p in plans}
    widths = {p.producer: p.new_channels for p in plans}
    clones = {}

    def clone(layer):
        if id(layer) in clones:
            return clones[id(layer)]
        plan = by_gate.get(layer.name)
        if plan is not None and plan.drop_gate:
            new = _DroppedGate(layer.name)
        else:
            config = layer.get_config()
            if layer.name in widths:
                config["filters" if "filters" in config else "units"] = widths[layer.name]
            new = layer.__class__.from_config(config)
        clones[id(layer)] = new
        return new

    def call(layer, *args, **kwargs):
        if isinstance(layer, _DroppedGate):
            return args[0][1]  # [x, h] -> h
        return layer(*args, **kwargs)

    cloned = keras.models.clone_model(model, clone_function=clone, call_function=call)
    # A new Model only to rename it; `input`/`output` keep the call structure.
    compact = keras.Model(cloned.input, cloned.output, name=name or f"{model.name}_compact")
    _copy_weights(model, compact, plans)
    return compact


def compact_model(model, calibration_images, round_to=None, batch_size=128, return_plan=False):
    """Removes always-off channels and fixes always-on ones (see module doc).

    Args:
        model: functional model with `ChannelGate`s after Conv/Dense(+BN+act).
        calibration_images: `(N, H, W, C)` preprocessed images; the gate
            categories are measured on them with inference gates.
        round_to: None, or keep every compacted width a multiple of this
            (padding channels are exactly zero).
        batch_size: inference batch size for measuring the gates.
        return_plan: also return the list of `GatePlan`s.

    Returns:
        The compacted model, or `(model, plans)` with `return_plan=True`.
    """
    plans = plan_compaction(model, calibration_images, round_to=round_to, batch_size=batch_size)
    compact = apply_compaction(model, plans)
    return (compact, plans) if return_plan else compact


def expand_gate_masks(plans, masks, num_samples):
    """Masks of a compacted model -> the masks the original model would show.

    Args:
        plans: the `GatePlan`s of the compaction.
        masks: `{gate_name: (N, new_groups)}` from the compacted model (gates
            that were removed may be missing).
        num_samples: N.

    Returns:
        `{gate_name: (N, num_groups) float32}` in the original gate layout.
    """
    full = {}
    for p in plans:
        out = np.zeros((num_samples, p.num_groups), np.float32)
        out[:, p.always_on] = 1.0
        if not p.drop_gate:
            compact = np.asarray(masks[p.gate])
            groups = p.group_index()
            keep = groups >= 0
            out[:, groups[keep]] = compact[:, keep]
        full[p.gate] = out
    return full
