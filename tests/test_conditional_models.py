"""Conditional export of every block `add_gates` gates (issue 28 item 2):
pre-activation ResNets (a ZeroPadding2D between the gate and the strided
conv), MobileNetV2's inverted residuals (ReLU6, a depthwise conv between the
gate and the projection) and keras-hub's ResNetBackbone, on random gate
patterns, against the masked Keras model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras.deploy.conditional import conditional_model, support_problems
from bs_keras.gates import find_gates
from bs_keras.macs import conditional_macs, gate_masks
from gate_pattern import set_gate_pattern  # bench/gate_pattern.py
from test_conditional import _perturb_bn, one_block_model


def _mobilenet_v2():
    return keras.applications.MobileNetV2(weights=None, input_shape=(48, 48, 3), alpha=0.35, classes=7,
                                          classifier_activation=None)


def _resnet50_v2():
    return keras.applications.ResNet50V2(weights=None, input_shape=(48, 48, 3), classes=7,
                                         classifier_activation=None)


def _keras_hub_backbone():
    keras_hub = pytest.importorskip("keras_hub")
    return keras_hub.models.ResNetBackbone(
        block_type="bottleneck_block", use_pre_activation=False, input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[2, 2], stackwise_num_strides=[1, 2],
        image_shape=(32, 32, 3))  # fmt: skip


BUILDERS = {"mobilenet_v2": _mobilenet_v2, "resnet50_v2": _resnet50_v2, "keras_hub_backbone": _keras_hub_backbone}


@pytest.fixture(scope="module", params=list(BUILDERS))
def gated(request):
    keras.utils.set_random_seed(5)
    model = bs_keras.add_gates(BUILDERS[request.param](), seed=0)
    _perturb_bn(model, 2)  # also the depthwise convs' BN: closed channels leave act(bias) behind
    images = np.random.default_rng(3).normal(size=(14, *model.input_shape[1:])).astype("float32")
    set_gate_pattern(model, images, off=0.4, on=0.3, nested=True)
    return request.param, model, images[:8], images[8:]


@pytest.mark.slow  # builds MobileNetV2, ResNet50V2 and a keras-hub backbone: 5-15 s each
def test_gated_blocks_of_every_kind_run_conditionally_equal_to_keras(gated):
    kind, model, calib, test = gated
    assert support_problems(model) == [], kind
    cond = conditional_model(model, calib)
    assert len(cond.gate_names) == len(find_gates(model)) > 0
    images = np.concatenate([calib, test])
    ref = np.asarray(model(images, training=False))
    scale = np.abs(ref).max()
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])  # batch 1
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, scale), kind
    np.testing.assert_allclose(cond(images).numpy(), ref, atol=1e-5 * max(1.0, scale), rtol=0)  # batch N
    # Some samples run narrower widths than the full block: the branches are used.
    chosen = cond.chosen_widths(images).numpy()
    assert np.any(chosen < np.array(cond.gate_channels)[None, :]), kind
    executed, cmacs = cond.executed_macs(images), conditional_macs(model, images)
    assert np.all(executed >= cmacs - 1) and np.all(executed <= cond.static_macs) and executed.mean() < cond.static_macs
    gates = cond.with_gates(test)
    for name, mask in gate_masks(model, test).items():
        np.testing.assert_array_equal(gates[name].numpy(), mask, err_msg=f"{kind} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("gated", ["mobilenet_v2"], indirect=True)  # the others: the ResNet path (test_conditional)
def test_inverted_residuals_convert_to_tflite_exactly(gated):
    """LiteRT IF branches with ReLU6, depthwise convs and the per-width
    conv2 biases that stand in for the closed channels."""
    from ai_edge_litert.interpreter import Interpreter

    _, model, calib, test = gated
    cond = conditional_model(model, calib)
    runner = Interpreter(model_content=cond.to_tflite("none", with_gates=True)).get_signature_runner(
        "serving_with_gates")
    ref = np.asarray(model(test, training=False))
    for i in range(len(test)):
        got = runner(images=test[i : i + 1])
        np.testing.assert_allclose(got["outputs"], ref[i : i + 1], atol=1e-5, rtol=0)
        assert got["executed_macs"][0] == int(cond.executed_macs(test[i : i + 1])[0])


def test_closed_channels_after_a_depthwise_conv_leave_their_bias_behind():
    """A hand-made inverted residual whose depthwise bias is large: the
    narrow branches are exact only with the closed channels' act(bias)
    added to the projection's bias (ReLU6 clips it at 6)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 1, name="stem")(inputs)
    h = keras.layers.Conv2D(16, 1, use_bias=False, name="b_expand")(x)
    h = keras.layers.BatchNormalization(name="b_expand_bn")(h)
    h = keras.layers.ReLU(6.0, name="b_expand_relu")(h)
    h = keras.layers.ZeroPadding2D(1, name="b_pad")(h)
    h = keras.layers.DepthwiseConv2D(3, name="b_depthwise")(h)
    h = keras.layers.BatchNormalization(name="b_depthwise_bn")(h)
    h = keras.layers.ReLU(6.0, name="b_depthwise_relu")(h)
    h = keras.layers.Conv2D(8, 1, name="b_project")(h)
    x = keras.layers.Add(name="b_add")([x, h])
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = bs_keras.add_gates(keras.Model(inputs, outputs), seed=0)
    bn = model.get_layer("b_depthwise_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, np.linspace(-2, 9, len(beta)).astype("float32"), mean, var])  # some above 6
    images = np.random.default_rng(1).normal(size=(16, 8, 8, 4)).astype("float32")
    set_gate_pattern(model, images, off=0.5, on=0.2)
    cond = conditional_model(model, images[:10], widths=(0.25, 0.5, 1.0))
    assert np.any(cond.chosen_widths(images).numpy() < 16)
    ref = model(images, training=False).numpy()
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    # What the closed channels beyond the narrowest width leave behind, from the layers' weights:
    # large, so the exact outputs above needed it.
    w = min(min(ws) for ws in cond.bucket_widths)
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    d_bias = (model.get_layer("b_depthwise").bias.numpy() - bn.moving_mean.numpy()) * scale + bn.beta.numpy()
    order = cond.permutations["b_gate"]
    kernel = model.get_layer("b_project").kernel.numpy()[0, 0]
    assert np.abs(np.clip(d_bias[order][w:], 0, 6) @ kernel[order][w:]).max() > 0.1


def test_blocks_it_cannot_run_are_named_with_the_alternative():
    """An ELU before the gate (add_gates gates it; the folded blocks run ReLU
    and ReLU6 only): refused, naming the gate, the layer and --mode compact."""
    model = one_block_model(keras.layers.ELU(name="b_elu"), keras.layers.GlobalAveragePooling2D())
    problems = support_problems(model)
    assert problems == ["gates 'b_gate': unsupported layers between the producer conv and the gate, expected conv "
                        "[-> BN] [-> ReLU or ReLU6] (in 'b_gate': 'b_elu' (ELU))"]
    with pytest.raises(ValueError, match="Export it with --mode compact"):
        conditional_model(model, np.zeros((2, 8, 8, 4), np.float32))
