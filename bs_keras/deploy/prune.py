"""Static magnitude channel pruning: the baseline a gated network has to beat.

`magnitude_prune(model, gated_twin, macs_ratio)` removes, in every residual
block, the hidden channels with the smallest magnitude, the same fraction in
every block, so that the pruned model needs `macs_ratio` of the original
model's MACs for every input. The magnitude of a channel is `|gamma|` of the
BatchNormalization after the convolution that produces it (after BN every
channel has unit variance, so gamma is its scale: "network slimming", Liu et
al. 2017), or the L1 norm of its filter when there is no BN (Li et al. 2017).

The channels that can be removed are exactly those a `ChannelGate` would
switch, so the transform reuses the compaction machinery: `gated_twin` is
the gated version of the same architecture (e.g. the builder called with
`gated=True`); it receives the plain weights, its gates are pinned open
(kept channels) or shut (pruned ones), and `bs_keras.deploy.compact` removes the shut
channels and drops the gates. The result is an ordinary narrower functional
model; fine-tune it with `fit` (train.py: `--prune-from RUN/best.keras
--prune-macs 0.5`).

Example:

```python
plain = keras.saving.load_model("runs/plain/best.keras")
twin = cifar_resnet(20, input_shape=(28, 28, 1), gated=True)
pruned = magnitude_prune(plain, twin, macs_ratio=0.5)
```
"""

import keras
import numpy as np

from bs_keras.gates import ChannelGate, find_gates
from bs_keras.graph import LayerGraph
from bs_keras.macs import PASSTHROUGH, gate_table, ungated_macs
from bs_keras.deploy.compact import apply_compaction, plan_compaction


def _producer_chain(graph, gate_node):
    """Layers from the gated tensor back to its producing conv/dense layer."""
    producer, chain = graph.trace_back(gate_node.input_tensors[1], through=PASSTHROUGH)
    return [n.operation for n in chain] + [producer.operation]


def channel_magnitudes(gated_model):
    """`{gate name: per-channel magnitude}` (|BN gamma|, else filter L1 norm)."""
    out = {}
    graph = LayerGraph(gated_model, purpose="Channel pruning")
    for layer in gated_model.layers:
        if not isinstance(layer, ChannelGate):
            continue
        chain = _producer_chain(graph, layer._inbound_nodes[0])
        bns = [l for l in chain if isinstance(l, keras.layers.BatchNormalization)]
        if bns and bns[-1].scale:
            scores = np.abs(np.asarray(bns[-1].gamma))
        else:
            kernel = np.asarray(chain[-1].kernel)
            scores = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        if layer.group_size > 1:
            scores = scores.reshape(-1, layer.group_size).sum(axis=1)
        out[layer.name] = scores
    return out


def _kept(channels, fraction):
    return max(1, int(round(fraction * channels)))


def keep_fraction(gated_model, static_macs, macs_ratio):
    """The per-block keep fraction whose MACs come closest to `macs_ratio`.

    Returns:
        `(fraction, {gate name: channels kept}, achieved ratio)`.
    """
    table = gate_table(gated_model)

    def plan(fraction):
        kept = {i.gate.name: _kept(i.gate.num_gates, fraction) for i in table}
        removed = sum((i.gate.num_gates - kept[i.gate.name]) * i.gate.group_size * i.macs_per_channel
                      for i in table)
        return kept, (static_macs - removed) / static_macs

    # The achieved ratio is non-decreasing in the fraction: bisect, then take
    # the nearer of the two neighbours.
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if plan(mid)[1] < macs_ratio:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda f: abs(plan(f)[1] - macs_ratio))
    kept, ratio = plan(best)
    return best, kept, ratio


def magnitude_prune(model, gated_twin, macs_ratio, name=None):
    """Removes the lowest-magnitude hidden channels of every gated position.

    Args:
        model: the trained plain model.
        gated_twin: the same architecture with `ChannelGate`s (built, any
            weights); its weights are overwritten.
        macs_ratio: target MACs of the pruned model as a fraction of
            `model`'s at `gated_twin`'s input size, in (0, 1].

    Returns:
        The pruned functional model (no gates), with the kept channels'
        trained weights.
    """
    if not 0 < macs_ratio <= 1:
        raise ValueError(f"macs_ratio must be in (0, 1]. Received: macs_ratio={macs_ratio}")
    if find_gates(model):
        raise ValueError(
            f"Model '{model.name}' is gated; magnitude pruning starts from a plain model "
            "(compact a gated model with bs_keras.deploy.compact instead)."
        )
    gates = find_gates(gated_twin)
    if not gates:
        raise ValueError("gated_twin has no ChannelGate layers: pass the gated version of the architecture.")
    twin_layers = {l.name: l for l in gated_twin.layers if not isinstance(l, ChannelGate)}
    plain_layers = {l.name: l for l in model.layers}
    if set(twin_layers) != set(plain_layers):
        diff = sorted(set(twin_layers) ^ set(plain_layers))[:5]
        raise ValueError(
            "gated_twin is not the gated version of model: layer names differ "
            f"(e.g. {diff}). Build it with the same builder and arguments plus gated=True."
        )
    for layer_name, layer in plain_layers.items():
        try:
            twin_layers[layer_name].set_weights(layer.get_weights())
        except ValueError as e:
            raise ValueError(f"Layer '{layer_name}' has different shapes in model and gated_twin: {e}") from e
    # The plain network's MACs at the twin's input size (the pruned model's): the
    # source may have been built for another size, and MACs scale with it.
    static = ungated_macs(gated_twin)
    _, kept, _ = keep_fraction(gated_twin, static, macs_ratio)
    scores = channel_magnitudes(gated_twin)
    for gate in gates:
        order = np.argsort(-scores[gate.name], kind="stable")
        bias = np.full(gate.num_gates, -10.0, np.float32)
        bias[order[: kept[gate.name]]] = 10.0
        gate.logits_dense.kernel.assign(np.zeros(gate.logits_dense.kernel.shape, np.float32))
        gate.logits_dense.bias.assign(bias)
    # The gates are now constant: one image decides every category.
    probe = np.zeros((1, *gated_twin.input_shape[1:]), np.float32)
    plans = plan_compaction(gated_twin, probe)
    return apply_compaction(gated_twin, plans, name=name or f"{model.name}_pruned")
