"""The hard-gate phase: training with the inference decisions (ChannelGate's
`hard_training`, GateLossScheduler(hard=...), train.py --hard-gates-begin)."""

import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras import recipes, training
from bs_keras.gates import ChannelGate, find_gates, record_gates
from bs_keras.recipes import get_recipe
from bs_keras.schedules import Linear


def _gate_model(seed=1):
    x = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x)
    gate = ChannelGate(seed=seed, init_bias=0.0, name="gate")
    out = keras.layers.GlobalAveragePooling2D()(gate([x, h]))
    return keras.Model(x, keras.layers.Dense(3, name="head")(out)), gate


def _masks(model, gate, x, training):
    with record_gates() as rec:
        model(x, training=training)
    return np.asarray(rec[gate][0])


def test_hard_training_uses_the_inference_decisions_and_freezes_the_gate():
    model, gate = _gate_model()
    x = np.random.default_rng(0).normal(size=(32, 6, 6, 4)).astype("float32")
    bn = gate.hidden_bn
    # Soft training samples (two calls differ) and updates the gate BN's moving mean.
    before = np.asarray(bn.moving_mean).copy()
    soft = [_masks(model, gate, x, True) for _ in range(2)]
    assert not np.array_equal(soft[0], soft[1])
    assert not np.array_equal(before, np.asarray(bn.moving_mean))
    # Hard: exactly the inference masks, every call, moving statistics untouched.
    gate.hard_training.assign(1.0)
    before = np.asarray(bn.moving_mean).copy()
    inference = _masks(model, gate, x, False)
    assert 0 < inference.mean() < 1
    for _ in range(2):
        np.testing.assert_array_equal(_masks(model, gate, x, True), inference)
    np.testing.assert_array_equal(before, np.asarray(bn.moving_mean))
    np.testing.assert_array_equal(model(x, training=True), model(x, training=False))
    # No gradient reaches the gate MLP, even with a loss weight left on; the
    # backbone and head still learn.
    gate.l0_coef.assign(1.0)
    gate.bs_coef.assign(1.0)
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_mean(out**2) + tf.add_n(model.losses)
    grads = dict(zip([v.path for v in model.trainable_variables],
                     tape.gradient(loss, model.trainable_variables)))
    gate_paths = {v.path for v in gate.trainable_variables}
    assert gate_paths and all(grads[p] is None or not np.any(grads[p]) for p in gate_paths)
    assert np.any(grads["conv/kernel"]) and np.any(grads["head/kernel"])
    gate.hard_training.assign(0.0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x, training=True) ** 2) + tf.add_n(model.losses)
    assert np.any(tape.gradient(loss, gate.logits_dense.kernel))


def test_scheduler_phase_zeroes_the_gate_losses_and_leaves_the_gates_alone():
    """Two epochs, the second hard: plain SGD (no momentum) leaves every gate
    variable as it was after epoch 1, while the backbone keeps training."""
    model = bs_keras.cifar_resnet(8, num_classes=3, input_shape=(16, 16, 3), seed=0, gate_kwargs={"init_bias": 0.5})
    gates = find_gates(model)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16, 16, 3)).astype("float32"), np.arange(64) % 3
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots[epoch] = {v.path: np.asarray(v).copy() for v in model.variables}

    # 4 steps an epoch: hard after step 3, i.e. from the first step of epoch 2.
    scheduler = bs_keras.GateLossScheduler(0.75, 2.0, hard=Linear(0, 1, 3, 3, unit="step"))
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[scheduler, Snapshot()])
    assert history.history["hard_gates"] == [0.0, 1.0]
    assert history.history["lam"] == [2.0, 0.0] and history.history["gamma"][1] == 0.0
    assert all(float(g.hard_training) == 1.0 and float(g.l0_coef) == 0.0 and float(g.bs_coef) == 0.0 for g in gates)
    # Everything of the gates but their seed state and the coefficients the
    # scheduler assigns (checked above).
    gate_paths = {v.path for g in gates for v in g.variables
                  if not v.path.endswith(("seed_generator_state", "_coef", "hard_training"))}
    assert any(p.endswith("hidden_bn/moving_mean") for p in gate_paths)
    moved = {p for p in snapshots[0] if not np.array_equal(snapshots[0][p], snapshots[1][p])}
    assert not moved & gate_paths, sorted(moved & gate_paths)
    assert any("conv" in p and "kernel" in p for p in moved)
    # The phase trained on the inference gates: the MACs of the training
    # masks are those of the logit > 0 gates.
    ungated = bs_keras.macs.ungated_macs(model, bs_keras.count_macs(model))
    h = history.history
    assert h["cond_macs"][1] / ungated == pytest.approx(h["hard_macs_ratio"][1], rel=1e-6)
    assert h["cond_macs"][0] / ungated != pytest.approx(h["hard_macs_ratio"][0], rel=1e-6)
    # A new fit without a phase trains the gates softly again.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[bs_keras.GateLossScheduler(0.0, 0.0)])
    assert all(float(g.hard_training) == 0.0 for g in gates)


def test_a_budget_holds_still_in_the_hard_phase():
    model = bs_keras.cifar_resnet(8, num_classes=3, input_shape=(16, 16, 3), seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16, 16, 3)).astype("float32"), np.arange(64) % 3
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    budget = bs_keras.MacBudget(0.3, begin=0, end=0)
    multipliers = []

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            multipliers.append(budget.multiplier)

    scheduler = bs_keras.GateLossScheduler(0.0, budget, hard=Linear(0, 1, 3, 3, unit="step"))
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[scheduler, Watch()])
    assert multipliers[0] > 0 and multipliers[1] == multipliers[2] == multipliers[0]


def test_models_saved_before_the_phase_existed_still_load(tmp_path):
    """A .keras whose gates have only bs_coef and l0_coef (the format before
    `hard_training`) loads, with the other weights intact and the phase off."""
    model, gate = _gate_model()
    gate.l0_coef.assign(0.25)
    path = tmp_path / "new.keras"
    model.save(path)
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "model.weights.h5":
                h5 = tmp_path / "w.h5"
                h5.write_bytes(data)
                with h5py.File(h5, "a") as f:
                    names = []
                    f.visit(lambda n: names.append(n) if n.endswith("gate/vars") else None)
                    group = f[names[0]]
                    assert sorted(group.keys()) == ["0", "1", "2"]
                    del group["2"]
                data = h5.read_bytes()
            dst.writestr(item, data)
    loaded = keras.saving.load_model(old)
    g = find_gates(loaded)[0]
    assert float(g.l0_coef) == 0.25 and float(g.hard_training) == 0.0
    x = np.random.default_rng(1).normal(size=(8, 6, 6, 4)).astype("float32")
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


def test_recipe_flag_builds_the_phase_and_bad_values_name_the_flag():
    recipe = get_recipe("fashion_mnist_sweep").replace(hard_gates_begin=0.8).validate()
    scheduler = training.gate_callback(recipe)
    assert scheduler.hard(3.2) == 0.0 and scheduler.hard(3.21) == 1.0  # 4 epochs: the last 20 %
    assert training.gate_callback(get_recipe("fashion_mnist_sweep")).hard is None
    for value, message in ((1.0, "between 0 and 1"), (0.5, r"must be >= --lam-end \(0.6\)")):
        with pytest.raises(ValueError, match=rf"--hard-gates-begin={value!r} is invalid: .*{message}"):
            get_recipe("fashion_mnist_sweep").replace(hard_gates_begin=value).validate()
    with pytest.raises(ValueError, match="drop --plain"):
        get_recipe("fashion_mnist_sweep").replace(hard_gates_begin=0.8, gated=False).validate()
    from bs_keras.cli import train as cli

    _, args = cli.parse_args(["--hard-gates-begin", "0.75"])
    assert cli.resolve_recipe(args).hard_gates_begin == 0.75


def test_plain_drops_the_demo_recipes_gate_only_settings(capsys):
    """`train.py --plain` on the demo recipe (a budget and a hard-gate phase)
    trains a plain model with the rest of the recipe; given as flags, the
    gate-only settings are still refused."""
    from bs_keras.cli import train as train_cli

    demo = recipes.RECIPES["fashion_mnist_demo"]
    assert demo.target_macs is not None and demo.hard_gates_begin is not None
    _, args = train_cli.parse_args(["--plain"])
    plain = train_cli.resolve_recipe(args)
    assert not plain.gated and plain.target_macs is None and plain.hard_gates_begin is None
    assert (plain.epochs, plain.limit_train, plain.lr) == (demo.epochs, demo.limit_train, demo.lr)
    for flags in (["--target-macs", "0.5"], ["--hard-gates-begin", "0.8"]):
        _, args = train_cli.parse_args(["--plain", *flags])
        with pytest.raises(ValueError, match=f"{flags[0]}=.* drop --plain"):
            train_cli.resolve_recipe(args)
