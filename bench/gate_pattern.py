"""Synthetic gate patterns for latency benchmarks and tests (not for training).

`set_gate_pattern(model, images)` overwrites every gate's logits so that a
chosen fraction of its channels is always off, always on, or input-dependent.
"""

import keras
import numpy as np
import tensorflow as tf

from bs_keras.gates import find_gates


def _between_samples(values, q):
    """A threshold near the q-quantile of `values` halfway between two of them, so
    that no sample sits on it (float rounding would decide its gate).

    The two values must be clearly apart (more than 1e-5 x (1 + max |value|)
    each side of the threshold, far above float32 rounding); otherwise the
    nearest such gap is taken, and with none (e.g. a gate MLP whose hidden
    units are dead for every sample: equal values) the gate is open for all."""
    v = np.sort(np.asarray(values, np.float64))
    if len(v) == 1:
        return float(v[0]) - 1.0
    lo = min(int(np.floor(q * (len(v) - 1))), len(v) - 2)
    clear = np.diff(v) > 2e-5 * (1.0 + np.abs(v).max())
    if not clear.any():
        return float(v[0]) - 1.0
    if not clear[lo]:
        candidates = np.flatnonzero(clear)
        lo = int(candidates[np.argmin(np.abs(candidates - lo))])
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
