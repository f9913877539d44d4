"""`add_gates`: gates for ResNets built elsewhere, with their weights kept."""

import keras
import numpy as np
import pytest

from bs_keras.gates import find_gates
from bs_keras.macs import conditional_macs, count_macs, gate_masks, gate_table
from bs_keras.models import add_gates, cifar_resnet, imagenet_resnet, residual_blocks
from bs_keras.deploy import parity
from bs_keras.deploy.compact import compact_model, expand_gate_masks, plan_compaction
from bs_keras.deploy.conditional import conditional_model
from bs_keras.deploy.conditional_serving import ConditionalRunner
from gate_pattern import set_gate_pattern  # bench/gate_pattern.py

APPS = keras.applications


def _perturb_bn(model, seed=0):
    """Non-trivial BN statistics (fresh ones are the identity) so copying is tested."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.0, gamma.shape).astype("float32"),
                rng.normal(0, 0.1, beta.shape).astype("float32"),
                rng.normal(0, 0.1, mean.shape).astype("float32"),
                rng.uniform(0.8, 1.5, var.shape).astype("float32"),
            ])  # fmt: skip
    return model


def _images(model, n=4, seed=0, scale=1.0):
    shape = tuple(model.inputs[0].shape[1:])
    return (np.random.default_rng(seed).normal(size=(n,) + shape) * scale).astype("float32")


def _mlp_macs(model):
    """Gate MLP MACs from the blocks' widths: pooled C_in x 16 + 16 x gates
    (C_gated / group_size)."""
    total = 0
    for info in gate_table(model):
        in_channels = info.gate.hidden.kernel.shape[0]
        total += in_channels * 16 + 16 * (info.channels // info.gate.group_size)
    return total


def _check_retrofit(source, gated, images, atol=0.0):
    """Outputs equal at inference, MACs = source + gate MLPs, every gate open."""
    ref = np.asarray(source(images, training=False))
    out = np.asarray(gated(images, training=False))
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    assert count_macs(gated) == count_macs(source) + _mlp_macs(gated)
    masks = gate_masks(gated, images)
    assert all(m.min() == 1.0 for m in masks.values())
    np.testing.assert_array_equal(conditional_macs(gated, images), count_macs(gated))


# --------------------------------------------------------------------------- our builders


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: cifar_resnet(20, input_shape=(16, 16, 3), weight_decay=5e-4, **kw),
        lambda **kw: cifar_resnet(8, input_shape=(16, 16, 1), shortcut="projection", **kw),
        lambda **kw: imagenet_resnet(18, width_multiplier=0.25, input_shape=(32, 32, 3), num_classes=7, **kw),
        lambda **kw: imagenet_resnet(50, width_multiplier=0.25, input_shape=(32, 32, 3), num_classes=7, **kw),
    ],
    ids=["cifar20", "cifar8_projection", "resnet18", "resnet50"],
)
def test_our_plain_models_become_the_gated_builds(build):
    gate_kwargs = {"group_size": 2, "temperature": 0.5}
    plain = _perturb_bn(build(gated=False))
    gated = add_gates(plain, gate_kwargs=gate_kwargs, gamma=0.5, lam=2.0, seed=3)
    built = build(gated=True, gate_kwargs=gate_kwargs, gamma=0.5, lam=2.0, seed=3)
    assert gated.name == built.name
    assert sorted(layer.name for layer in gated.layers) == sorted(layer.name for layer in built.layers)
    _check_retrofit(plain, gated, _images(plain))
    assert count_macs(gated) == count_macs(built)
    ours, theirs = gate_table(gated), gate_table(built)
    assert [(i.gate.name, i.channels, i.macs_per_channel, i.producer, i.consumers) for i in ours] == [
        (i.gate.name, i.channels, i.macs_per_channel, i.producer, i.consumers) for i in theirs
    ]
    for a, b in zip(ours, theirs):
        assert a.gate.get_config() == b.gate.get_config()  # seeds seed * 1000 + i included
        assert float(a.gate.bs_coef) == pytest.approx(float(b.gate.bs_coef))
        assert float(a.gate.l0_coef) == pytest.approx(float(b.gate.l0_coef))
    # Every other layer's weights are copies of the source's, not shared.
    for layer in plain.layers:
        for w_old, w_new in zip(layer.weights, gated.get_layer(layer.name).weights):
            assert w_old is not w_new
            np.testing.assert_array_equal(np.asarray(w_old), np.asarray(w_new))
    # The kernel regularizers come along (the builder's weight decay).
    assert [type(x.kernel_regularizer) for x in gated.layers if hasattr(x, "kernel_regularizer")] == [
        type(x.kernel_regularizer) for x in plain.layers if hasattr(x, "kernel_regularizer")
    ]


def test_training_the_copy_leaves_the_source_alone():
    plain = cifar_resnet(8, gated=False, input_shape=(16, 16, 3), num_classes=3)
    before = [np.array(w) for w in plain.weights]
    gated = add_gates(plain, lam=1.0, seed=0)
    gated.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    x = _images(plain, n=16)
    y = np.arange(16) % 3
    gated.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, gated.weights[: len(before)]))
    for a, w in zip(before, plain.weights):
        np.testing.assert_array_equal(a, np.asarray(w))
    # The gates learned too: the zero-initialised logits kernel moved.
    assert any(np.abs(np.asarray(g.logits_dense.kernel)).max() > 0 for g in find_gates(gated))


# --------------------------------------------------------------------------- keras.applications


def _he_resnet_v1_macs(blocks, size=224, classes=1000):
    """MACs of ResNet v1 (stride 2 on the first 1x1 of a stage, He et al. 2016)
    from its architecture table, for one image of size x size."""
    r = size // 2
    macs = r * r * 7 * 7 * 3 * 64  # conv1
    r = r // 2  # max pool
    c_in = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for b in range(count):
            if b == 0 and stage > 0:
                r = r // 2
            macs += r * r * (c_in * width + 9 * width * width + width * 4 * width)
            if b == 0:
                macs += r * r * c_in * 4 * width  # projection shortcut
            c_in = 4 * width
    return macs + 2048 * classes


@pytest.mark.parametrize(
    "builder, blocks, published",
    [(APPS.ResNet50, (3, 4, 6, 3), 3.8e9), (APPS.ResNet101, (3, 4, 23, 3), 7.6e9),
     pytest.param(APPS.ResNet152, (3, 8, 36, 3), 11.3e9, marks=pytest.mark.slow)],  # 152: 17 s
    ids=["50", "101", "152"],
)  # fmt: skip
def test_keras_applications_macs_are_the_published_v1_figures(builder, blocks, published):
    """He et al. (2016), Table 1: 3.8 / 7.6 / 11.3 x 10^9 multiply-adds (v1:
    stride on the first 1x1; our v1.5 `imagenet_resnet(50)` is 4.09 G)."""
    macs = count_macs(builder(weights=None))
    assert macs == _he_resnet_v1_macs(blocks)
    assert abs(macs - published) / published < 0.02


@pytest.mark.parametrize("builder, gates", [(APPS.ResNet50, 16), pytest.param(APPS.ResNet101, 33, marks=pytest.mark.slow),
                                            pytest.param(APPS.ResNet152, 50, marks=pytest.mark.slow)])  # 6-10 s
def test_keras_applications_resnets(builder, gates):
    source = _perturb_bn(builder(weights=None, input_shape=(64, 64, 3), classes=10))
    gated = add_gates(source, seed=0)
    _check_retrofit(source, gated, _images(source, n=2, scale=50.0), atol=0.0)
    table = gate_table(gated)
    assert len(table) == gates
    for info in table:
        block = info.gate.name[: -len("_gate")]  # conv2_block1_gate -> conv2_block1
        # v1 blocks: after the first 1x1 (+BN+ReLU, stride 2 in the first block
        # of a stage), before the 3x3.
        assert (info.producer, info.consumers) == (f"{block}_1_conv", [f"{block}_2_conv"])
        node = info.gate._inbound_nodes[0]
        assert node.input_tensors[0] is gated.get_layer(f"{block}_1_conv")._inbound_nodes[0].input_tensors[0]


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_keras_applications_resnet50v2_gates_after_the_first_conv_reading_the_preactivation():
    source = _perturb_bn(APPS.ResNet50V2(weights=None, input_shape=(64, 64, 3), classes=10))
    gated = add_gates(source, seed=0)
    _check_retrofit(source, gated, _images(source, n=2), atol=0.0)
    table = gate_table(gated)
    assert len(table) == 16
    for info in table:
        block = info.gate.name[: -len("_gate")]
        assert (info.producer, info.consumers) == (f"{block}_1_conv", [f"{block}_2_conv"])  # through the pad
        x = info.gate._inbound_nodes[0].input_tensors[0]
        assert x._keras_history[0].name == f"{block}_preact_relu"
    # Compaction looks through the ZeroPadding2D between the gate and the 3x3.
    images = _images(gated, n=12, seed=2)
    set_gate_pattern(gated, images, off=0.4, on=0.3)
    compact = compact_model(gated, images)
    np.testing.assert_allclose(np.asarray(compact(images, training=False)),
                               np.asarray(gated(images, training=False)), atol=1e-5)  # fmt: skip
    assert count_macs(compact) < 0.9 * count_macs(gated)


def test_keras_applications_model_inside_a_sequential_classifier():
    base = _perturb_bn(APPS.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3)))
    head = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(4, activation="softmax")])  # fmt: skip
    gated = add_gates(head, seed=0, weight_decay=1e-4)
    _check_retrofit(head, gated, _images(head, n=2, scale=20.0))
    assert len(find_gates(gated)) == 16
    # weight_decay: L2(wd / 2) on every conv/dense kernel that had none, none on the gates.
    gate_parts = {id(x) for g in find_gates(gated) for x in g._flatten_layers(recursive=True)}
    inner = [
        x for x in gated._flatten_layers(recursive=True)
        if isinstance(x, (keras.layers.Conv2D, keras.layers.Dense)) and id(x) not in gate_parts
    ]  # fmt: skip
    assert len(inner) == 54
    assert all(isinstance(x.kernel_regularizer, keras.regularizers.L2) for x in inner)
    assert [float(x.kernel_regularizer.l2) for x in inner] == pytest.approx([5e-5] * len(inner))
    assert all(g.hidden.kernel_regularizer is None for g in find_gates(gated))


def test_mobilenet_v2_inverted_residuals_are_gated():
    source = _perturb_bn(APPS.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=5))
    gated = add_gates(source)
    _check_retrofit(source, gated, _images(source, n=2))
    # The expansion 1x1 is gated; the closed channels also skip the depthwise conv.
    info = gate_table(gated)[0]
    assert info.producer.endswith("_expand") and info.consumers[0].endswith("_depthwise")


# --------------------------------------------------------------------------- keras-hub


def test_keras_hub_resnet_backbone_and_classifier():
    keras_hub = pytest.importorskip("keras_hub")
    kw = dict(input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32],
              stackwise_num_blocks=[2, 2], stackwise_num_strides=[1, 2], image_shape=(32, 32, 3))  # fmt: skip
    backbone = keras_hub.models.ResNetBackbone(block_type="bottleneck_block", use_pre_activation=False, **kw)
    classifier = _perturb_bn(keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=5))
    gated = add_gates(classifier, seed=0)
    _check_retrofit(classifier, gated, _images(classifier, n=2))
    assert sorted(g.name for g in find_gates(gated)) == [f"stack{s}_block{b}_gate" for s in (0, 1) for b in (0, 1)]
    # Pre-activation basic blocks with a padded strided first conv.
    v2 = _perturb_bn(keras_hub.models.ResNetBackbone(block_type="basic_block", use_pre_activation=True, **kw))
    gated_v2 = add_gates(v2)
    _check_retrofit(v2, gated_v2, _images(v2, n=2))
    assert len(find_gates(gated_v2)) == 4


# --------------------------------------------------------------------------- errors


def test_refuses_models_without_residual_blocks():
    with pytest.raises(ValueError, match="no residual block .* It has no Add layer"):
        add_gates(APPS.MobileNet(weights=None, input_shape=(32, 32, 3)))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="needs a functional or Sequential model"):
        add_gates(Subclassed())
    gated = add_gates(cifar_resnet(8, gated=False, input_shape=(8, 8, 1)))
    with pytest.raises(ValueError, match="already has ChannelGate layers"):
        add_gates(gated)
    with pytest.raises(ValueError, match="needs a Keras model"):
        add_gates(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="l0_weighting"):
        add_gates(cifar_resnet(8, gated=False, input_shape=(8, 8, 1)), l0_weighting="flops")


def _two_adds():
    """One real residual block, one Add of two unrelated paths, one of a
    branch without BN."""
    x = inputs = keras.Input((8, 8, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", name="b1_conv1")(x)
    h = keras.layers.BatchNormalization(name="b1_bn1")(h)
    h = keras.layers.ReLU(name="b1_relu1")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="b1_conv2")(h)
    x = keras.layers.Add(name="b1_add")([x, h])
    a = keras.layers.Conv2D(4, 1, name="left")(inputs)
    b = keras.layers.Conv2D(4, 1, name="right")(x)
    y = keras.layers.Add(name="merge")([a, b])
    h = keras.layers.Conv2D(4, 3, padding="same", name="b2_conv1")(y)
    h = keras.layers.ReLU(name="b2_relu1")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="b2_conv2")(h)
    y = keras.layers.Add(name="b2_add")([y, h])
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(y), name="two_adds")


def test_names_the_blocks_it_could_not_gate():
    model = _two_adds()
    blocks, skipped = residual_blocks(model)
    assert [(b.add, b.conv, b.activation, b.gate, b.channels) for b in blocks] == [
        ("b1_add", "b1_conv1", "b1_relu1", "b1_gate", 4)
    ]
    assert dict(skipped) == {
        "merge": "its two inputs do not start from one tensor (no shortcut around a branch)",
        "b2_add": "the branch's first convolution 'b2_conv1' is not followed by BatchNormalization and an activation",
    }
    with pytest.warns(UserWarning, match=r"left 2 Add layer\(s\) ungated: 'two_adds/merge': its two .*'two_adds/b2_add'"):
        gated = add_gates(model)
    assert [g.name for g in find_gates(gated)] == ["b1_gate"]
    _check_retrofit(model, gated, _images(model))


# --------------------------------------------------------------------------- deployment


@pytest.fixture(scope="module")
def gated_resnet50():
    """keras.applications ResNet50 (ZeroPadding2D stem, 1x1-strided v1 blocks,
    projection shortcuts, biased convs), gated, with a realistic gate pattern."""
    keras.utils.set_random_seed(0)
    source = _perturb_bn(APPS.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10))
    model = add_gates(source, seed=0)
    images = _images(model, n=20, seed=1)
    set_gate_pattern(model, images, off=0.4, on=0.3)
    return model, images[:12], images[12:]


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_gated_resnet50_conditional_equals_masked(gated_resnet50):
    model, calib, test = gated_resnet50
    images = np.concatenate([calib, test])
    ref = np.asarray(model(images, training=False))
    masks = gate_masks(model, images)
    assert 0.2 < np.mean([m.mean() for m in masks.values()]) < 0.9  # gates switch
    cond = conditional_model(model, calib)
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])
    assert np.abs(out - ref).max() < 1e-5
    executed = cond.executed_macs(images)
    cmacs = conditional_macs(model, images)
    assert np.all(executed >= cmacs) and np.all(executed < count_macs(model))
    # Parity table: the conditional export and the compacted model against Keras.
    plans = plan_compaction(model, calib)
    compact = compact_model(model, calib)
    rows = parity.parity_rows(model, calib, [
        ("conditional", ConditionalRunner(cond), {}),
        ("compact", parity.KerasRunner(compact), {"expand": lambda m, n: expand_gate_masks(plans, m, n)}),
    ])  # fmt: skip
    keras_row, cond_row, compact_row = rows
    assert keras_row.mean_macs == pytest.approx(conditional_macs(model, calib).mean())
    assert cond_row.max_abs_diff < 1e-5 and cond_row.top1_agreement == 1.0 and cond_row.gate_agreement == 1.0
    assert cond_row.mean_macs == pytest.approx(cond.executed_macs(calib).mean())
    assert compact_row.max_abs_diff < 1e-5 and compact_row.gate_agreement == 1.0
    assert count_macs(compact) < count_macs(model)


# --------------------------------------------------------------------------- adapt_inputs


def _padded_net():
    inputs = keras.Input((16, 16, 3), name="pixels")
    x = keras.layers.ZeroPadding2D(3)(inputs)  # the adapter must run before the padding
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize(
    "preprocessing, reference",
    [("caffe", APPS.resnet.preprocess_input), ("tf", APPS.resnet_v2.preprocess_input),
     ("torch", lambda x: APPS.imagenet_utils.preprocess_input(x, mode="torch"))],
)  # fmt: skip
def test_adapt_inputs_equals_keras_applications_preprocessing(preprocessing, reference):
    from bs_keras.data import IMAGENET_MEAN, IMAGENET_STD
    from bs_keras.models import adapt_inputs

    pixels = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    ours = ((pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).astype("float32")
    model = _padded_net()
    adapted = adapt_inputs(model, preprocessing)
    expected = np.asarray(model(reference(pixels.copy())))
    np.testing.assert_allclose(np.asarray(adapted(ours)), expected, rtol=1e-5, atol=1e-4)
    assert adapted.layers[1].name == "input_adapter" and not adapted.layers[1].trainable
    assert adapted.inputs[0].name == "pixels"
    assert count_macs(adapted) == count_macs(model) + 16 * 16 * 9


def test_adapt_inputs_then_add_gates_on_resnet50():
    from bs_keras.models import adapt_inputs

    source = APPS.ResNet50(weights=None, input_shape=(32, 32, 3), classes=5)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = ((pixels / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).astype("float32")
    gated = add_gates(adapt_inputs(source, "caffe"))
    expected = np.asarray(source(APPS.resnet.preprocess_input(pixels.copy())))
    np.testing.assert_allclose(np.asarray(gated(ours, training=False)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        adapt_inputs(source, "bgr")


def test_dtype_policy_moves_the_float32_layers_of_a_saved_model_to_mixed_precision():
    """A float32 model fine-tuned under mixed precision (`train.py --gate-from
    --mixed-precision`): its layers compute in float16, the output layer and
    the gates stay float32, and the copy still computes the source's function."""
    source = cifar_resnet(8, num_classes=3, input_shape=(16, 16, 3), gated=False, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        gated = add_gates(source, dtype_policy="mixed_float16", seed=0)
        kept = add_gates(source, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    by_name = {layer.name: layer for layer in gated.layers}
    convs = [l for l in gated.layers if isinstance(l, keras.layers.Conv2D)]
    assert convs and all(l.compute_dtype == "float16" and l.variable_dtype == "float32" for l in convs)
    assert by_name["predictions"].compute_dtype == "float32" and gated.outputs[0].dtype == "float32"
    assert all(g.logits_dense.compute_dtype == "float32" for g in find_gates(gated))  # the gate MLP
    # Without dtype_policy every copied layer keeps the source's float32.
    assert all(l.compute_dtype == "float32" for l in kept.layers if isinstance(l, keras.layers.Conv2D))
    np.testing.assert_allclose(gated(x, training=False).numpy(), source(x, training=False).numpy(), atol=2e-2)
    with pytest.raises(ValueError):
        add_gates(source, dtype_policy="float17")
