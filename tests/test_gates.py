import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import expit

import bs_keras
from bs_keras.gates import ChannelGate, record_gates
from bs_keras.losses import batch_shaping_loss


def _gate_model(channels=8, seed=1, **kwargs):
    x = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
    gate = ChannelGate(seed=seed, name="gate", **kwargs)
    out = gate([x, h])
    return keras.Model(x, out), gate


def _set_logits(gate, bias, kernel_scale=0.0):
    kernel, _ = gate.logits_dense.get_weights()
    gate.logits_dense.set_weights([kernel * kernel_scale, np.asarray(bias, "float32")])


def _masks(model, gate, x, training, calls):
    """The gate's masks of `calls` successive model calls on `x`."""
    out = []
    for _ in range(calls):
        with record_gates() as rec:
            model(x, training=training)
        out.append(np.asarray(rec[gate][0]))
    return out


def test_inference_gates_are_hard_deterministic_and_follow_logit_sign():
    model, gate = _gate_model()
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 4)).astype("float32")
    masks = _masks(model, gate, x, False, 2)
    np.testing.assert_array_equal(masks[0], masks[1])
    assert set(np.unique(masks[0])) <= {0.0, 1.0}
    logits = np.asarray(gate.gate_logits(tf.constant(x), training=False))
    np.testing.assert_array_equal(masks[0], (logits > 0).astype("float32"))


def test_inference_graph_has_no_random_op():
    model, _ = _gate_model()
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec((None, 6, 6, 4))).graph
    ops = {op.type for op in graph.get_operations()}
    assert not any("Random" in t or "Stateless" in t for t in ops), ops
    # Training does sample.
    fn_t = tf.function(lambda x: model(x, training=True))
    ops_t = {op.type for op in fn_t.get_concrete_function(tf.TensorSpec((None, 6, 6, 4))).graph.get_operations()}
    assert any("Stateless" in t or "Random" in t for t in ops_t)


@pytest.mark.parametrize("noise", [1.0, 0.5, 2.0, 1e6])
def test_training_gates_are_exactly_binary_and_bernoulli_sigmoid_logit(noise):
    # Hard-thresholded binary concrete is Bernoulli(sigmoid(logit)); with the
    # noise scaled, logit + noise * L > 0 (L standard logistic): sigmoid(logit / noise).
    bias = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, -3.0], "float32")
    model, gate = _gate_model(channels=8, noise=noise)
    _set_logits(gate, bias)
    x = np.ones((500, 6, 6, 4), "float32")
    samples = np.concatenate(_masks(model, gate, x, True, 8))
    assert set(np.unique(samples)) == {0.0, 1.0}
    freq = samples.mean(axis=0)
    np.testing.assert_allclose(freq, expit(bias / noise), atol=0.025)
    # The relaxed gradient stays finite at any scale.
    _set_logits(gate, bias, kernel_scale=1.0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x[:64], training=True))
    assert all(np.all(np.isfinite(g)) for g in tape.gradient(loss, gate.trainable_weights))


def test_zero_noise_trains_deterministic_straight_through_gates():
    temperature = 0.5
    model, gate = _gate_model(channels=8, noise=0.0, temperature=temperature)
    _set_logits(gate, np.linspace(-2, 2, 8), kernel_scale=1.0)
    x = np.random.default_rng(2).normal(size=(32, 6, 6, 4)).astype("float32")
    masks = _masks(model, gate, x, True, 2)
    np.testing.assert_array_equal(masks[0], masks[1])
    # Open exactly where the training-mode logit is positive.
    logits = tf.Variable(gate.gate_logits(tf.constant(x), training=True))
    np.testing.assert_array_equal(masks[0], (logits.numpy() > 0).astype("float32"))
    assert 0 < masks[0].mean() < 1
    # Backward: the gradient of sigmoid(logit / temperature), by hand.
    with tf.GradientTape() as tape:
        mask = gate._sample(logits)
        loss = tf.reduce_sum(mask * np.arange(8, dtype="float32"))
    np.testing.assert_array_equal(mask.numpy(), masks[0])
    s = 1.0 / (1.0 + np.exp(-logits.numpy() / temperature))
    expected = np.arange(8, dtype="float32") * s * (1 - s) / temperature
    np.testing.assert_allclose(tape.gradient(loss, logits).numpy(), expected, rtol=1e-4, atol=1e-5)  # float32 sigmoid
    # And it reaches the gate MLP through the model.
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, gate.trainable_weights)
    assert all(g is not None and np.abs(g).sum() > 0 for g in grads)


def test_seeded_noise_is_reproducible_and_advances():
    x = np.ones((64, 6, 6, 4), "float32")

    def draws(seed):
        model, gate = _gate_model(seed=seed)
        _set_logits(gate, np.zeros(8))
        return _masks(model, gate, x, True, 2)

    a, b, c = draws(5), draws(5), draws(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # the seed generator advances
    assert not np.array_equal(a[0], c[0])


def test_noise_advances_inside_tf_function():
    model, gate = _gate_model()
    _set_logits(gate, np.zeros(8))
    x = tf.ones((64, 6, 6, 4))

    @tf.function
    def masks(x):
        with record_gates() as rec:
            model(x, training=True)
        return rec[gate][0]

    m1, m2 = masks(x).numpy(), masks(x).numpy()
    assert set(np.unique(m1)) == {0.0, 1.0}
    assert not np.array_equal(m1, m2)


def test_straight_through_gradient_reaches_gate_weights():
    model, gate = _gate_model(channels=8)
    _set_logits(gate, np.zeros(8), kernel_scale=1.0)
    x = np.random.default_rng(1).normal(size=(32, 6, 6, 4)).astype("float32")
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(tf.square(out))  # no gate loss: coefs are 0
    grads = tape.gradient(loss, gate.trainable_weights)
    names = [w.path for w in gate.trainable_weights]
    for name, g in zip(names, grads):
        assert g is not None, name
        assert np.all(np.isfinite(g)), name
        assert np.abs(g).sum() > 0, name


def test_gate_adds_weighted_losses_in_training_only():
    model, gate = _gate_model(channels=8, bs_coef=0.7, l0_coef=0.3)
    x = np.random.default_rng(2).normal(size=(32, 6, 6, 4)).astype("float32")
    model(x, training=False)
    assert model.losses == []
    model(x, training=True)
    (loss,) = model.losses
    probs = tf.sigmoid(gate.gate_logits(tf.constant(x), training=True))
    expected = 0.7 * batch_shaping_loss(probs) + 0.3 * tf.reduce_mean(probs)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def test_group_size_switches_channel_groups():
    model, gate = _gate_model(channels=8, group_size=4)
    assert gate.num_gates == 2
    _set_logits(gate, [5.0, -5.0])
    x = np.random.default_rng(3).normal(size=(4, 6, 6, 4)).astype("float32")
    out = np.asarray(model(x, training=False))
    assert np.abs(out[..., :4]).sum() > 0
    np.testing.assert_array_equal(out[..., 4:], 0.0)
    with pytest.raises(ValueError, match="group_size"):
        _gate_model(channels=6, group_size=4)


def test_config_round_trip_and_argument_checks():
    gate = ChannelGate(hidden_units=8, temperature=0.5, init_bias=2.0, group_size=2, seed=3, noise=0.25)
    config = gate.get_config()
    assert config["noise"] == 0.25
    # Saved before `noise` existed: binary concrete, as then.
    assert ChannelGate.from_config({k: v for k, v in config.items() if k != "noise"}).noise == 1.0
    clone = ChannelGate.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(gate))
    assert isinstance(restored, ChannelGate)
    assert restored.temperature == 0.5
    for bad in (
        dict(hidden_units=0),
        dict(temperature=0.0),
        dict(group_size=0),
        dict(prior_a=-1.0),
        dict(bs_coef=-0.1),
        dict(noise=-0.5),
        dict(noise=float("inf")),
        dict(noise=float("nan")),
    ):
        with pytest.raises(ValueError):
            ChannelGate(**bad)
    with pytest.raises(ValueError, match=r"\[x, h\]"):
        ChannelGate()(keras.Input((4, 4, 3)))


@pytest.mark.parametrize("init_bias, open_rate", [(3.0, (0.8, 1.0)), (0.0, (0.3, 0.7)), (-3.0, (0.0, 0.2))])
def test_initial_bias_sets_the_open_rate(init_bias, open_rate):
    # The rate follows init_bias (not a fixed default: a negative one closes most gates).
    model, gate = _gate_model(channels=16, init_bias=init_bias)
    x = np.random.default_rng(4).normal(size=(64, 6, 6, 4)).astype("float32")
    with record_gates() as rec:
        model(x, training=False)
    low, high = open_rate
    assert low <= np.asarray(rec[gate][0]).mean() <= high


def test_find_gates_recurses_into_nested_models():
    inner, _ = _gate_model()
    x = keras.Input((6, 6, 4))
    outer = keras.Model(x, keras.layers.GlobalAveragePooling2D()(inner(x)))
    assert [g.name for g in bs_keras.find_gates(outer)] == ["gate"]


def test_batch_shaping_is_skipped_while_its_weight_is_zero():
    model, gate = _gate_model(channels=8, bs_coef=0.0, l0_coef=0.5)
    x = np.random.default_rng(5).normal(size=(32, 6, 6, 4)).astype("float32")
    gate.stats.reset_state()
    model(x, training=True)
    (loss,) = model.losses
    probs = tf.sigmoid(gate.gate_logits(tf.constant(x), training=True))
    np.testing.assert_allclose(float(loss), 0.5 * float(tf.reduce_mean(probs)), rtol=1e-6)
    assert gate.stats.values()["batch_shaping"] is None
    gate.bs_coef.assign(1.0)
    model(x, training=True)
    assert np.isfinite(gate.stats.values()["batch_shaping"])


def test_stop_input_gradient_changes_only_the_gradient_into_the_block_input():
    """Same weights, same noise: the outputs, the losses and every gradient
    but the one reaching the block input (the stem conv here) are identical."""

    def build(stop):
        x = inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(x)
        h = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(x)
        h = ChannelGate(init_bias=0.5, seed=3, l0_coef=2.0, stop_input_gradient=stop, name="gate")([x, h])
        h = keras.layers.Conv2D(4, 3, padding="same", name="conv2")(h)
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(h)))

    plain, stopped = build(False), build(True)
    stopped.set_weights(plain.get_weights())
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    grads, outs = [], []
    for model in (plain, stopped):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(y * y) + tf.add_n(model.losses)
        grads.append(dict(zip([v.path for v in model.trainable_weights], tape.gradient(loss, model.trainable_weights))))
        outs.append((y.numpy(), float(loss)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]
    for path, g in grads[0].items():
        other = grads[1][path]
        if path == "stem/kernel":
            assert np.abs(g.numpy() - other.numpy()).max() > 1e-5, path  # the gate's path into the backbone
        elif path == "stem/bias":
            # A per-channel shift of x moves every sample's pooled input alike,
            # which the gate's batch-statistics BN removes: ~0 either way.
            np.testing.assert_allclose(g.numpy(), other.numpy(), atol=1e-6)
        else:
            np.testing.assert_allclose(g.numpy(), other.numpy(), rtol=1e-6, atol=1e-7, err_msg=path)
    assert ChannelGate.from_config(stopped.get_layer("gate").get_config()).stop_input_gradient


def test_train_py_gate_stop_gradient_reaches_every_gate():
    from bs_keras import training
    from bs_keras.cli import train as train_cli

    _, args = train_cli.parse_args(["--gate-stop-gradient", "--width-multiplier", "0.25"])
    recipe = train_cli.resolve_recipe(args)
    info = type("Info", (), {"image_shape": (32, 32, 1), "num_classes": 10})()
    model = training.build_model(recipe, info)
    assert [g.stop_input_gradient for g in bs_keras.find_gates(model)] == [True] * 9
    _, args = train_cli.parse_args([])
    assert not any(g.stop_input_gradient for g in bs_keras.find_gates(training.build_model(train_cli.resolve_recipe(args), info)))
