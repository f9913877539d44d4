"""Model-level view of the gates: loss shares and loss weights.

Every `ChannelGate` adds `bs_coef * batch_shaping + l0_coef * l0` for its
own gates. Choosing `bs_coef = gamma * share_bs` and `l0_coef = lam *
share_l0` makes the sum over gates equal to the paper's global terms:

- batch-shaping: the mean over all gates of the model (share = the gate's
  fraction of all gates);
- L0, `l0_weighting="channels"`: the expected fraction of open gates;
- L0, `l0_weighting="macs"`: the expected fraction of the gate-controlled
  MACs that are executed (each gate weighted by the MACs it switches), so
  that `lam` trades accuracy directly against compute.
"""

import numpy as np

from bs_keras.gates import find_gates

L0_WEIGHTINGS = ("macs", "channels")


def gate_loss_shares(model, l0_weighting="macs"):
    """Per-gate `(bs_share, l0_share)` lists, each summing to 1."""
    if l0_weighting not in L0_WEIGHTINGS:
        raise ValueError(
            f"l0_weighting must be one of {L0_WEIGHTINGS}. Received: l0_weighting={l0_weighting!r}"
        )
    gates = find_gates(model)
    if not gates:
        raise ValueError(f"Model '{model.name}' has no ChannelGate layers.")
    counts = np.array([g.num_gates for g in gates], dtype=np.float64)
    bs_share = counts / counts.sum()
    if l0_weighting == "channels":
        l0_share = bs_share
    else:
        from bs_keras.macs import gate_table

        per_gate = {id(i.gate): i.channels * i.macs_per_channel for i in gate_table(model)}
        weights = np.array([per_gate[id(g)] for g in gates])
        if weights.sum() <= 0:
            raise ValueError("The gates control no MACs; use l0_weighting='channels'.")
        l0_share = weights / weights.sum()
    return gates, list(bs_share), list(l0_share)


def set_gate_loss_weights(gates, bs_share, l0_share, gamma, lam):
    """Assign `gamma * share` and `lam * share` to every gate's coefficients."""
    for gate, bs, l0 in zip(gates, bs_share, l0_share):
        gate.bs_coef.assign(gamma * bs)
        gate.l0_coef.assign(lam * l0)


def set_hard_training(gates, hard):
    """Switch the gates' training to their inference decisions (`hard`) or back."""
    for gate in gates:
        gate.hard_training.assign(1.0 if hard else 0.0)


def configure_gate_losses(model, gamma=0.75, lam=0.0, l0_weighting="macs"):
    """Set constant gate-loss weights so the gate losses are the global terms.

    The builders call this; call it yourself on a model you assembled from
    `ChannelGate` layers. `GateLossScheduler` later overrides the weights
    each step.

    Args:
        model: a built functional model with `ChannelGate` layers.
        gamma: batch-shaping weight.
        lam: L0 weight.
        l0_weighting: "macs" or "channels" (see module docstring).

    Returns:
        The model.
    """
    if gamma < 0 or lam < 0:
        raise ValueError(f"gamma and lam must be >= 0. Received: gamma={gamma}, lam={lam}")
    gates, bs_share, l0_share = gate_loss_shares(model, l0_weighting)
    set_gate_loss_weights(gates, bs_share, l0_share, gamma, lam)
    return model


def exclude_gates_from_weight_decay(optimizer, model):
    """Keep an optimizer's decoupled weight decay (AdamW, SGD(weight_decay=))
    off every gate parameter. Call before the first training step.

    Returns:
        The optimizer.
    """
    gates = find_gates(model)
    if not gates:
        raise ValueError(f"Model '{model.name}' has no ChannelGate layers.")
    if getattr(optimizer, "built", False):
        raise ValueError(
            "The optimizer is already built; call exclude_gates_from_weight_decay "
            "before compile/fit runs the first step (or on a fresh optimizer)."
        )
    optimizer.exclude_from_weight_decay(var_list=[v for g in gates for v in g.trainable_weights])
    return optimizer


def start_gates_at(model, macs_ratio):
    """Start a fresh gated model at a conditional MAC ratio.

    In every gate layer the same fraction of the gates starts open (logit
    bias `+|init_bias|`) and the rest closed (`-|init_bias|`), the fraction
    chosen so that the network with exactly those gates open executes
    `macs_ratio` of the ungated network's MACs. A budget run that holds its
    target from the first step (`MacBudget(begin=0, end=0)`) then trains a
    network of the target's cost from the start instead of cutting channels
    it has already trained.

    Args:
        model: a built functional model with `ChannelGate` layers.
        macs_ratio: the starting ratio, in `(0, 1]`, at least the ratio
            with every gate closed.

    Returns:
        The fraction of each layer's gates that starts open.
    """
    from bs_keras.macs import count_macs, gate_table, ungated_macs

    if not 0 < macs_ratio <= 1:
        raise ValueError(
            "macs_ratio is a fraction of the ungated network's MACs and must be in (0, 1]. "
            f"Received: macs_ratio={macs_ratio}"
        )
    table = gate_table(model)
    if not table:
        raise ValueError(f"Model '{model.name}' has no ChannelGate layers.")
    static = count_macs(model)
    ungated = ungated_macs(model, static)
    gated = sum(info.channels * info.macs_per_channel for info in table)
    closed_ratio = (static - gated) / ungated
    if macs_ratio < closed_ratio:
        raise ValueError(
            f"With every gate closed, model '{model.name}' still executes {closed_ratio:.3f} of its "
            f"ungated MACs (the layers no gate controls); macs_ratio={macs_ratio} is below that."
        )
    fraction = min(1.0, (macs_ratio * ungated - (static - gated)) / gated)
    for info in table:
        gate = info.gate
        if gate.init_bias == 0:
            raise ValueError(
                f"Gate '{gate.name}' has init_bias=0, so open and closed gates would start alike; "
                "give the gates a nonzero init_bias."
            )
        n = gate.num_gates
        k = int(round(fraction * n))
        bias = np.full((n,), -abs(gate.init_bias), dtype="float32")
        bias[:k] = abs(gate.init_bias)
        gate.logits_dense.bias.assign(bias)
    return fraction
