"""MacBudget's measured MAC ratio under a 2-replica MirroredStrategy vs. one device.

Run by tests/test_distribute.py in a subprocess (the logical CPU devices must
be configured before TensorFlow initialises). Usage:

    python mirrored_budget.py OUT.json

A frozen model (SGD with learning rate 0; the gate MLP's BatchNormalization
not trainable, so it normalises with fixed statistics) whose gates' logits
depend on each sample only: every sample's inference gates are the same on
one device and on either replica. One `fit` step over a global batch of 16
then measures, per configuration, `hard_macs_ratio` and the budget's new
multiplier. Also written: the ratio of each half batch alone (measured on one
device), to show the check can tell the global batch from one replica's.
"""

import json
import sys

import two_cpus  # noqa: F401,E402  (two logical CPUs, before Keras)
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bs_keras  # noqa: E402

GLOBAL_BATCH = 16


def build():
    x = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(8, 1, name="conv1")(x)
    gate = bs_keras.ChannelGate(hidden_units=8, init_bias=0.0, seed=1, name="gate")
    h = gate([x, h])
    h = keras.layers.Conv2D(4, 3, name="conv2")(h)
    model = keras.Model(x, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h)))
    gate.hidden_bn.trainable = False
    rng = np.random.default_rng(0)
    gate.hidden.set_weights([rng.normal(0, 1.0, (4, 8)).astype("float32")])
    gate.logits_dense.set_weights([rng.normal(0, 1.0, (8, 8)).astype("float32"), np.zeros(8, "float32")])
    bs_keras.configure_gate_losses(model, gamma=0.0, lam=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    return model


def measure(x, y, strategy=None):
    scope = strategy.scope() if strategy is not None else keras.utils.custom_object_scope({})
    with scope:
        model = build()
    budget = bs_keras.MacBudget(0.2, rate=1.0, gain=0.0, unit="step")
    history = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False,
                        callbacks=[bs_keras.GateLossScheduler(0.0, budget)])  # fmt: skip
    return history.history["hard_macs_ratio"][0], budget.multiplier


def main(out):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(GLOBAL_BATCH, 6, 6, 4)).astype("float32")
    y = rng.integers(0, 2, GLOBAL_BATCH)
    one = measure(x, y)
    two = measure(x, y, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    halves = [measure(x[:8], y[:8])[0], measure(x[8:], y[8:])[0]]
    with open(out, "w") as f:
        json.dump({"one_device": one, "mirrored": two, "halves": halves}, f)


if __name__ == "__main__":
    main(sys.argv[1])
