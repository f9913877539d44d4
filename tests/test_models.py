import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras import macs
from bs_keras.losses import batch_shaping_loss
from bs_keras.models import cifar_resnet, imagenet_resnet


@pytest.mark.parametrize("depth, blocks", [(20, 9), (32, 15), (56, 27), (110, 54)])
def test_cifar_depths_have_one_gate_per_block(depth, blocks):
    model = cifar_resnet(depth, input_shape=(16, 16, 3))
    assert len(bs_keras.find_gates(model)) == blocks
    # 2 convs per block + stem, dense head.
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == 2 * blocks + 1
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("depth, gates", [(18, 8), (34, 16), (50, 16)])
def test_imagenet_gates_and_gate_position(depth, gates):
    model = imagenet_resnet(depth, num_classes=7, input_shape=(64, 64, 3))
    table = macs.gate_table(model)
    assert len(table) == gates
    first = table[0]
    assert first.producer == "stage1_block1_conv1"
    assert first.consumers == ["stage1_block1_conv2"]
    assert model.output_shape == (None, 7)


def test_plain_and_gated_share_one_code_path():
    plain = cifar_resnet(20, gated=False)
    gated = cifar_resnet(20, gated=True)
    plain_names = {l.name for l in plain.layers}
    gated_names = {l.name for l in gated.layers}
    assert plain_names <= gated_names
    assert {n for n in gated_names - plain_names} == {g.name for g in bs_keras.find_gates(gated)}


def test_width_multiplier_and_input_size_and_channels():
    model = cifar_resnet(20, width_multiplier=0.5, input_shape=(28, 28, 1), num_classes=5, gated=False)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert sorted({c.filters for c in convs}) == [8, 16, 32]
    # Halving every width quarters the conv MACs (up to the 1-channel stem).
    full = cifar_resnet(20, input_shape=(28, 28, 1), num_classes=5, gated=False)
    ratio = macs.count_macs(model) / macs.count_macs(full)
    assert 0.24 < ratio < 0.27
    assert model(np.zeros((2, 28, 28, 1), "float32")).shape == (2, 5)


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="6n"):
        cifar_resnet(21)
    with pytest.raises(ValueError, match="18, 34, 50"):
        imagenet_resnet(101)
    with pytest.raises(ValueError, match="num_classes"):
        cifar_resnet(20, num_classes=0)
    with pytest.raises(ValueError, match="width_multiplier"):
        cifar_resnet(20, width_multiplier=0)
    with pytest.raises(ValueError, match="shortcut"):
        cifar_resnet(20, shortcut="bogus")
    with pytest.raises(ValueError, match="gamma"):
        cifar_resnet(20, lam=-1)


def test_weight_decay_applies_to_kernels_not_gates():
    model = cifar_resnet(8, input_shape=(8, 8, 3), weight_decay=5e-4)
    regularized = [l.name for l in model.layers if getattr(l, "kernel_regularizer", None) is not None]
    convs_dense = [l.name for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    assert sorted(regularized) == sorted(convs_dense)
    for gate in bs_keras.find_gates(model):
        for layer in (gate.hidden, gate.logits_dense):
            assert layer.kernel_regularizer is None
    # SGD-style decay: the penalty is wd / 2 * ||w||^2.
    conv = model.get_layer("stem_conv")
    w = conv.kernel.numpy()
    np.testing.assert_allclose(float(conv.kernel_regularizer(conv.kernel)), 2.5e-4 * np.sum(w**2), rtol=1e-5)


def test_gate_losses_sum_to_the_global_batch_shaping_and_l0_terms():
    """The per-gate shares make the added losses equal the paper's global terms."""
    for l0_weighting in ("channels", "macs"):
        model = cifar_resnet(20, input_shape=(16, 16, 3), gamma=1.0, lam=0.5, l0_weighting=l0_weighting, seed=0)
        gates = bs_keras.find_gates(model)
        x = np.random.default_rng(0).normal(size=(24, 16, 16, 3)).astype("float32")
        # One training call (the sampled gates shape the block inputs) that
        # also returns every gate's input.
        feed = keras.Model(model.input, [g.input[0] for g in gates] + [model.output])
        block_inputs = feed(x, training=True)[:-1]
        total = float(tf.add_n(feed.losses))
        # Reference: all gates' probabilities side by side, one global loss.
        probs = [tf.sigmoid(g.gate_logits(b, training=True)) for g, b in zip(gates, block_inputs)]
        bs = batch_shaping_loss(tf.concat(probs, axis=1))
        if l0_weighting == "channels":
            l0 = tf.reduce_mean(tf.concat(probs, axis=1))
        else:
            table = {id(i.gate): i for i in macs.gate_table(model)}
            weights = [table[id(g)].macs_per_channel for g in gates]
            num = sum(tf.reduce_sum(tf.reduce_mean(p, axis=0)) * w for p, w in zip(probs, weights))
            den = sum(p.shape[1] * w for p, w in zip(probs, weights))
            l0 = num / den
        np.testing.assert_allclose(total, float(bs + 0.5 * l0), rtol=1e-4)


def test_keras_save_load_without_custom_objects(tmp_path):
    model = cifar_resnet(8, input_shape=(16, 16, 3), seed=3, lam=0.2)
    x = np.random.default_rng(1).normal(size=(16, 16, 16, 3)).astype("float32")
    # Make the gates input-dependent so the comparison is meaningful.
    for gate in bs_keras.find_gates(model):
        kernel, _ = gate.logits_dense.get_weights()
        gate.logits_dense.set_weights([kernel * 3, np.zeros(gate.num_gates, "float32")])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    masks_a = macs.gate_masks(model, x)
    masks_b = macs.gate_masks(loaded, x)
    for name in masks_a:
        np.testing.assert_array_equal(masks_a[name], masks_b[name])
    assert 0 < np.mean(np.concatenate(list(masks_a.values()), axis=1)) < 1
    for a, b in zip(bs_keras.find_gates(model), bs_keras.find_gates(loaded)):
        assert float(a.l0_coef) == float(b.l0_coef) > 0


def test_decoupled_weight_decay_skips_gate_parameters():
    model = cifar_resnet(8, input_shape=(8, 8, 3))
    opt = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
    bs_keras.exclude_gates_from_weight_decay(opt, model)
    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    opt.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    gate_ids = {id(v) for g in bs_keras.find_gates(model) for v in g.trainable_weights}
    decayed = 0
    for v, b in zip(variables, before):
        if id(v) in gate_ids:
            np.testing.assert_array_equal(v.numpy(), b)
        elif np.abs(b).sum() > 0:
            # AdamW with a zero gradient: w <- w - lr * wd * w.
            np.testing.assert_allclose(v.numpy(), b * (1 - 0.1 * 0.5), rtol=1e-5, atol=1e-7)
            decayed += 1
    assert decayed > 0
    with pytest.raises(ValueError, match="already built"):
        bs_keras.exclude_gates_from_weight_decay(opt, model)


def test_mixed_precision_keeps_gate_math_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = cifar_resnet(8, input_shape=(8, 8, 3), num_classes=3, lam=0.1, seed=0)
        gate = bs_keras.find_gates(model)[0]
        assert gate.logits_dense.kernel.dtype == "float32"
        assert gate.logits_dense.compute_dtype == "float32"
        x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
        model(x, training=True)
        assert all(l.dtype == tf.float32 for l in model.losses)
        assert gate.output.dtype == "float16"  # gated features keep the model's dtype
        model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
        logs = model.train_on_batch(x, np.zeros(8, "int32"), return_dict=True)
        assert np.isfinite(logs["loss"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
