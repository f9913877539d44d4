"""One `fit` step of a `Distiller` under a 2-replica MirroredStrategy vs. one device.

Run by tests/test_distribute.py in a subprocess (the logical CPU devices must
be configured before TensorFlow initialises). Usage:

    python mirrored_distill.py OUT.npz

For each teacher mode ("self", "sandwich": self with `train_teacher`,
"external": a frozen plain model), writes the trainable weights after one
step of SGD(lr=1) over a global batch of 16, on one device (`one_<mode>_<i>`)
and on two replicas (`two_<mode>_<i>`), and the weights before (`start_<i>`).

Every sample's outputs depend on that sample only, so the replicas' halves
compute exactly the single-device values: the gates are hard (`logit > 0`,
no sampling noise) and every BatchNormalization is frozen (inference mode;
in training mode each replica would normalise with its own half batch). The
weights then agree iff the distillation term is scaled so that the SUM of
the replicas' gradients is the global batch's mean, as Keras scales its own
losses.
"""

import sys

import two_cpus  # noqa: F401,E402  (two logical CPUs, before Keras)
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bs_keras  # noqa: E402
from bs_keras import gating  # noqa: E402

GLOBAL_BATCH = 16
SHAPE = (8, 8, 1)


def build(mode):
    keras.utils.set_random_seed(0)
    student = bs_keras.cifar_resnet(8, num_classes=3, input_shape=SHAPE, seed=0, gate_kwargs={"init_bias": 0.0})
    keras.utils.set_random_seed(1)
    teacher = bs_keras.cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False)
    for model in (student, teacher):
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    gating.set_hard_training(bs_keras.find_gates(student), True)
    bs_keras.configure_gate_losses(student, gamma=0.0, lam=0.0)
    distiller = bs_keras.Distiller(student, teacher if mode == "external" else "self", alpha=2.0,
                                   temperature=3.0, train_teacher=mode == "sandwich")
    distiller.compile(keras.optimizers.SGD(1.0), "sparse_categorical_crossentropy")
    return distiller


def step(mode, x, y, strategy=None):
    if strategy is None:
        distiller = build(mode)
    else:
        with strategy.scope():
            distiller = build(mode)
    start = [w.numpy().copy() for w in distiller.student.trainable_weights]
    distiller.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return start, [w.numpy() for w in distiller.student.trainable_weights]


def main(out):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(GLOBAL_BATCH, *SHAPE)).astype("float32")
    y = rng.integers(0, 3, GLOBAL_BATCH)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    arrays = {}
    for mode in ("self", "sandwich", "external"):
        start, one = step(mode, x, y)
        _, two = step(mode, x, y, strategy)
        arrays.update({f"start_{mode}_{i}": w for i, w in enumerate(start)})
        arrays.update({f"one_{mode}_{i}": w for i, w in enumerate(one)})
        arrays.update({f"two_{mode}_{i}": w for i, w in enumerate(two)})
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
