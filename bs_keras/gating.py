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
