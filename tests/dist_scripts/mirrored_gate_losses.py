"""Gate losses under a 2-replica MirroredStrategy vs. one device.

Run by tests/test_distribute.py in a subprocess: the two logical CPU devices
must be configured before TensorFlow initialises, which the pytest process
has already done. Usage:

    python mirrored_gate_losses.py OUT.npz

Writes, for two gate configurations ("bs": batch-shaping only, "l0": L0
only), the single-device and the 2-replica values of

- `loss`: the training loss exactly as Keras' `train_step` computes it
  (`model.compute_loss(..., training=True)`, which scales each entry of
  `model.losses` for distribution); for the replicas the SUM over replicas
  (the replicas' losses are what Keras differentiates, and `apply_gradients`
  SUMs the replicas' gradients);
- `grad_<i>`: its gradient for each trainable weight (replicas: SUM);
- `fit_delta_<i>`: the change of each trainable weight after one
  `model.fit` step of plain SGD(lr=1) on the same global batch;
- `fit_loss`: the training loss that `fit` logged for that step;
- `stats_bs` (replicas only): the batch-shaping value the gate recorded in
  its `stats`, i.e. the mean over the replicas of the value each computed;

plus `replica_values`: the per-replica `compute_loss` values, and for the
batch-shaping configuration `bs_global` / `bs_halves` (the batch-shaping
loss of the global batch vs. the mean over the two half batches, to show the
comparison can tell them apart).

Construction (why single device and 2 replicas must agree exactly):

- The model is only a `ChannelGate` gating its own input, so the training
  loss is the gate loss alone and depends on the gate probabilities only,
  not on the sampled (per-replica) noise.
- The gate MLP's BatchNormalization is frozen (`trainable = False`, so
  Keras 3 runs it in inference mode even with training=True). In training
  mode each replica would normalise with its own half-batch statistics
  (BN is not synchronised), which would make the replica probabilities differ
  from the single-device ones for a reason unrelated to what is tested.
  With BN frozen, each sample's gate probability is a function of that sample
  only, so the two replicas' probabilities are exactly the single-device ones,
  split in two.
- Batch-shaping sorts the batch, so it is invariant to the order in which the
  replicas' halves are gathered.

Then the summed replica gradients (and the weight change of a `fit` step)
equal the single-device ones if and only if (a) each replica computes
batch-shaping on the all-gathered global batch and (b) the gate losses are
scaled so that Keras' SUM over the replicas gives the global value.

The loss values themselves (`loss`, `replica_values`, `fit_loss`) are
recorded but not a clean check: Keras keeps a layer's `add_loss` list in one
list shared by MirroredStrategy's replica threads, and the gate's all-gather
pauses replica 0 in the middle of the forward pass, so replica 1's
`model.losses` also holds replica 0's gate loss (its gradient is unaffected:
tapes are per thread).
"""

import sys

import two_cpus  # noqa: F401,E402  (two logical CPUs, before Keras)
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from bs_keras import ChannelGate  # noqa: E402
from bs_keras import losses as gate_losses  # noqa: E402

GLOBAL_BATCH = 16
REPLICAS = 2
SHAPE = (6, 6, 4)


def build(bs_coef, l0_coef):
    x = keras.Input(SHAPE)
    gate = ChannelGate(hidden_units=8, init_bias=0.5, seed=1, bs_coef=bs_coef, l0_coef=l0_coef,
                       name="gate")
    out = keras.layers.GlobalAveragePooling2D()(gate([x, x]))
    model = keras.Model(x, out)
    gate.hidden_bn.trainable = False  # inference-mode BN: see the module docstring
    # No compiled loss: the training loss is the gate's added losses only.
    model.compile(optimizer=keras.optimizers.SGD(1.0, momentum=0.0))
    return model


def set_weights(model, rng_seed=0):
    # Weights chosen so the probabilities spread over (0, 1): the
    # batch-shaping loss and its gradient are far from trivial.
    rng = np.random.default_rng(rng_seed)
    gate = model.get_layer("gate")
    gate.hidden.set_weights([rng.normal(0, 1.0, (SHAPE[-1], 8)).astype("float32")])
    gate.logits_dense.set_weights([
        rng.normal(0, 1.0, (8, SHAPE[-1])).astype("float32"),
        rng.normal(0, 0.5, (SHAPE[-1],)).astype("float32"),
    ])


def single_device(model, x):
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, None, y_pred, training=True)
    grads = tape.gradient(loss, model.trainable_weights)
    return float(loss), [g.numpy() for g in grads]


def replicated(strategy, model, x):
    per_replica = GLOBAL_BATCH // REPLICAS
    dist_x = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[ctx.replica_id_in_sync_group * per_replica:
                      (ctx.replica_id_in_sync_group + 1) * per_replica]
    )

    def step(xr):
        with tf.GradientTape() as tape:
            y_pred = model(xr, training=True)
            loss = model.compute_loss(xr, None, y_pred, training=True)
        return loss, tape.gradient(loss, model.trainable_weights)

    # Traced like Keras' train function: the whole strategy.run in one graph.
    gate = model.get_layer("gate")
    gate.stats.reset_state()
    loss, grads = tf.function(lambda xs: strategy.run(step, args=(xs,)))(dist_x)
    values = [float(v) for v in strategy.experimental_local_results(loss)]
    total = float(strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None))
    grads = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None).numpy() for g in grads]
    # The gate's own record of the batch-shaping term: the mean over the
    # replicas of the (unweighted) value each replica computed.
    stats_bs = gate.stats.values()["batch_shaping"]
    return values, total, grads, stats_bs


def fit_delta(model, x):
    before = [w.numpy() for w in model.trainable_weights]
    ds = tf.data.Dataset.from_tensor_slices(x).batch(GLOBAL_BATCH)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    delta = [w.numpy() - b for w, b in zip(model.trainable_weights, before)]
    return delta, history.history["loss"][0]


def main(out_path):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == REPLICAS
    x = np.random.default_rng(1).normal(0, 1, (GLOBAL_BATCH, *SHAPE)).astype("float32")
    x += np.linspace(-1.5, 1.5, GLOBAL_BATCH, dtype="float32")[:, None, None, None]
    results = {}
    for name, (bs_coef, l0_coef) in {"bs": (1.0, 0.0), "l0": (0.0, 1.0)}.items():
        single = build(bs_coef, l0_coef)
        set_weights(single)
        with strategy.scope():
            mirrored = build(bs_coef, l0_coef)
        set_weights(mirrored)

        if name == "bs":  # before any training step changes the weights
            gate = single.get_layer("gate")
            probs = tf.sigmoid(gate.gate_logits(tf.constant(x), training=True)).numpy()
            results["bs/bs_global"] = float(gate_losses.batch_shaping_loss(probs))
            half = GLOBAL_BATCH // REPLICAS
            results["bs/bs_halves"] = float(np.mean(
                [gate_losses.batch_shaping_loss(probs[i:i + half]) for i in (0, half)]
            ))
            results["bs/l0_global"] = float(np.mean(probs))

        loss_1, grads_1 = single_device(single, x)
        values, loss_2, grads_2, stats_bs = replicated(strategy, mirrored, x)
        delta_1, fit_loss_1 = fit_delta(single, x)
        delta_2, fit_loss_2 = fit_delta(mirrored, x)

        results[f"{name}/single/loss"] = loss_1
        results[f"{name}/mirrored/loss"] = loss_2
        results[f"{name}/mirrored/replica_values"] = np.array(values)
        if stats_bs is not None:  # None when bs_coef is 0: not computed
            results[f"{name}/mirrored/stats_bs"] = stats_bs
        results[f"{name}/single/fit_loss"] = fit_loss_1
        results[f"{name}/mirrored/fit_loss"] = fit_loss_2
        for i, (g1, g2, d1, d2) in enumerate(zip(grads_1, grads_2, delta_1, delta_2)):
            results[f"{name}/single/grad_{i}"] = g1
            results[f"{name}/mirrored/grad_{i}"] = g2
            results[f"{name}/single/fit_delta_{i}"] = d1
            results[f"{name}/mirrored/fit_delta_{i}"] = d2
        results[f"{name}/num_weights"] = len(grads_1)

    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
