"""MAC accounting against hand arithmetic and published figures.

Every expected number is written out from the layer shapes (output pixels x
output channels x kernel taps x input channels per group), never taken from
`bs_keras.macs` itself.
"""

import keras
import numpy as np
import pytest

import bs_keras
from bs_keras import macs, models
from bs_keras.gates import find_gates

L = keras.layers


def _macs_of(input_shape, *layers):
    x = keras.Input(input_shape)
    h = x
    for layer in layers:
        h = layer(h)
    return macs.count_macs(keras.Model(x, h))


def _trainable_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


# --------------------------------------------------------------------------
# Single layers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_shape,layer,expected",
    [
        # 9x9x3 -> stride 2 'same' -> ceil(9/2) = 5x5 x 8 filters, 3x3x3 taps
        ((9, 9, 3), L.Conv2D(8, 3, strides=2, padding="same"), 5 * 5 * 8 * 3 * 3 * 3),
        # 'valid' with stride 2: floor((9 - 3) / 2) + 1 = 4
        ((9, 9, 3), L.Conv2D(8, 3, strides=2, padding="valid"), 4 * 4 * 8 * 3 * 3 * 3),
        # stride 1 'same' on a non-square input, bias adds no MACs
        ((7, 5, 2), L.Conv2D(4, (3, 1), padding="same", use_bias=True), 7 * 5 * 4 * 3 * 1 * 2),
        # groups=2: each of the 6 filters sees 4 / 2 = 2 input channels; 6 -> 4 valid
        ((6, 6, 4), L.Conv2D(6, 3, groups=2), 4 * 4 * 6 * 3 * 3 * 2),
        # groups=4 on 8 channels, 1x1
        ((5, 5, 8), L.Conv2D(12, 1, groups=4), 5 * 5 * 12 * 1 * 1 * 2),
        # dilation 2: effective 5x5 kernel, 10 -> 6 valid, still 9 taps
        ((10, 10, 2), L.Conv2D(3, 3, dilation_rate=2), 6 * 6 * 3 * 3 * 3 * 2),
        # depthwise, multiplier 2, 'same': every of 3*2 outputs has 9 taps
        ((5, 5, 3), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), 5 * 5 * 3 * 2 * 9),
        # depthwise with stride 2 'same' -> 3x3
        ((5, 5, 3), L.DepthwiseConv2D(3, strides=2, padding="same"), 3 * 3 * 3 * 1 * 9),
        # separable: depthwise 4x4 x (4*2) x 9  +  pointwise 4x4 x (4*2) x 7
        (
            (6, 6, 4),
            L.SeparableConv2D(7, 3, depth_multiplier=2),
            4 * 4 * 4 * 2 * 9 + 4 * 4 * 4 * 2 * 7,
        ),
        # Conv1D: length 10 'valid' k=3 -> 8 outputs x 5 filters x 3 taps x 2 ch
        ((10, 2), L.Conv1D(5, 3), 8 * 5 * 3 * 2),
        # Conv2DTranspose: every input pixel scatters a 3x3x6 kernel per input ch
        ((4, 4, 3), L.Conv2DTranspose(6, 3, strides=2, padding="same"), 4 * 4 * 3 * 6 * 9),
        # Dense on rank 2: 10 x 4
        ((10,), L.Dense(4), 10 * 4),
        # Dense on rank 3: applied at each of 5 positions: 5 x 10 x 4
        ((5, 10), L.Dense(4), 5 * 10 * 4),
        # Layers without MACs
        ((6, 6, 3), L.BatchNormalization(), 0),
        ((6, 6, 3), L.MaxPooling2D(2), 0),
        ((6, 6, 3), L.GlobalAveragePooling2D(), 0),
    ],
    ids=[
        "conv-s2-same",
        "conv-s2-valid",
        "conv-rect",
        "conv-groups2",
        "conv-groups4-1x1",
        "conv-dilated",
        "depthwise-dm2",
        "depthwise-s2",
        "separable-dm2",
        "conv1d",
        "conv2d-transpose",
        "dense-rank2",
        "dense-rank3",
        "bn",
        "maxpool",
        "gap",
    ],
)
def test_single_layer_macs(input_shape, layer, expected):
    assert macs.count_macs(keras.Model(*_io(input_shape, layer))) == expected


def _io(input_shape, layer):
    x = keras.Input(input_shape)
    return x, layer(x)


def test_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, padding="same"),  # 8*8*4*27
            L.BatchNormalization(),
            L.ReLU(),
            L.MaxPooling2D(2),  # -> 4x4x4
            L.Flatten(),  # 64
            L.Dense(5),  # 64*5
        ]
    )
    assert macs.count_macs(model) == 8 * 8 * 4 * 27 + 4 * 4 * 4 * 5


def test_unbuilt_sequential_raises():
    model = keras.Sequential([L.Dense(3)])
    with pytest.raises(ValueError, match="Sequential"):
        macs.count_macs(model)


def test_nested_functional_model_is_counted_through():
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Model(inner_in, L.Conv2D(4, 1)(inner_in), name="inner")  # 8*8*4*3
    x = keras.Input((8, 8, 3))
    h = inner(x)
    out = L.Conv2D(2, 3, padding="same")(h)  # 8*8*2*9*4
    model = keras.Model(x, out)
    assert macs.count_macs(inner) == 8 * 8 * 4 * 3
    assert macs.count_macs(model) == 8 * 8 * 4 * 3 + 8 * 8 * 2 * 9 * 4


def test_nested_sequential_and_shared_layers_count_every_call():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(3)], name="inner_seq")  # 18
    shared = L.Dense(6, name="shared")  # 6*6 per call
    a = keras.Input((6,))
    b = keras.Input((6,))
    h1 = inner(shared(a))
    h2 = inner(shared(b))
    out = L.Dense(2)(L.Concatenate()([h1, h2]))  # 6*2
    model = keras.Model([a, b], out)
    assert macs.count_macs(model) == 2 * (6 * 6 + 6 * 3) + 6 * 2


def test_subclassed_model_raises_clear_error():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Sub()
    model(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"functional or\s+Sequential"):
        macs.count_macs(model)
    with pytest.raises(ValueError, match=r"functional or\s+Sequential"):
        macs.conditional_macs(model, np.zeros((2, 4), np.float32))


def test_unknown_spatial_size_raises():
    x = keras.Input((None, None, 3))
    model = keras.Model(x, L.Conv2D(4, 3)(x))
    with pytest.raises(ValueError, match="fixed"):
        macs.count_macs(model)


# --------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------


def hand_imagenet_macs(depth):
    """MACs of torchvision-style ResNet-18/34/50 (v1.5) at 224x224, 1000 cls."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    bottleneck = depth == 50
    total = 112 * 112 * 64 * (7 * 7 * 3)  # stem conv, stride 2
    size, c_in = 56, 64  # after the stride-2 max pool
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        for b in range(count):
            stride = 2 if stage > 0 and b == 0 else 1
            out_size = size // stride
            if bottleneck:
                c_out = 4 * width
                total += size * size * width * c_in  # 1x1 at input resolution
                total += out_size**2 * width * 9 * width  # strided 3x3
                total += out_size**2 * c_out * width  # 1x1 expand
            else:
                c_out = width
                total += out_size**2 * width * 9 * c_in
                total += out_size**2 * width * 9 * width
            if stride != 1 or c_in != c_out:
                total += out_size**2 * c_out * c_in  # 1x1 projection
            size, c_in = out_size, c_out
    return total + c_in * 1000  # classifier


PUBLISHED = {  # torchvision: parameters, GMACs ("GFLOPS") at 224x224
    18: (11_689_512, 1.81e9),
    34: (21_797_672, 3.66e9),
    50: (25_557_032, 4.09e9),
}


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_imagenet_resnet_matches_published_figures(depth):
    keras.backend.clear_session()
    model = models.imagenet_resnet(depth, gated=False)
    params, gmacs = PUBLISHED[depth]
    assert _trainable_params(model) == params
    counted = macs.count_macs(model)
    assert counted == hand_imagenet_macs(depth)
    assert abs(counted - gmacs) / gmacs < 0.01


def test_hand_imagenet_arithmetic_sanity():
    # The reference function itself against the well-known exact values.
    assert hand_imagenet_macs(18) == 1_814_073_344
    assert hand_imagenet_macs(50) == 4_089_184_256


def hand_cifar_resnet(depth, projection=False, gated_hidden=None):
    """(params, macs, per-block (conv1 + conv2) MACs) for a CIFAR ResNet."""
    n = (depth - 2) // 6
    params = 3 * 3 * 3 * 16 + 2 * 16  # stem conv + BN
    total = 32 * 32 * 16 * (3 * 3 * 3)  # stem: 32*32*16*27
    block_convs = []
    gates = 0
    size, c_in = 32, 16
    for stage, width in enumerate((16, 32, 64)):
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            out = size // stride
            conv1 = out * out * width * 9 * c_in
            conv2 = out * out * width * 9 * width
            block_convs.append(conv1 + conv2)
            total += conv1 + conv2
            params += 9 * c_in * width + 9 * width * width + 2 * (2 * width)
            if projection and (stride != 1 or c_in != width):
                total += out * out * width * c_in
                params += c_in * width + 2 * width
            if gated_hidden:
                gates += c_in * gated_hidden + gated_hidden * width  # gate MLP
            size, c_in = out, width
    total += 64 * 10
    params += 64 * 10 + 10
    return params, total + gates, block_convs


def test_cifar_resnet20_option_a():
    model = models.cifar_resnet(20, gated=False)
    params, hand_macs, _ = hand_cifar_resnet(20)
    n_params = _trainable_params(model)
    assert 265_000 <= n_params <= 275_000  # published: 0.27M
    assert n_params == params == 269_722
    counted = macs.count_macs(model)
    assert counted == hand_macs == 40_551_040  # published: ~41M
    # the explicit sum: stem + 3 stages + classifier
    assert counted == (
        32 * 32 * 16 * 27
        + 6 * (32 * 32 * 16 * 9 * 16)
        + (16 * 16 * 32 * 9 * 16 + 5 * 16 * 16 * 32 * 9 * 32)
        + (8 * 8 * 64 * 9 * 32 + 5 * 8 * 8 * 64 * 9 * 64)
        + 64 * 10
    )


def test_cifar_resnet20_projection_adds_two_1x1_convs():
    model = models.cifar_resnet(20, gated=False, shortcut="projection")
    params, hand_macs, _ = hand_cifar_resnet(20, projection=True)
    proj_macs = 16 * 16 * 32 * 16 + 8 * 8 * 64 * 32
    proj_params = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert macs.count_macs(model) == hand_macs == 40_551_040 + proj_macs
    assert _trainable_params(model) == params == 269_722 + proj_params


# --------------------------------------------------------------------------
# Conditional MACs on a hand-built gated model
# --------------------------------------------------------------------------

PRODUCER = 8 * 8 * 6 * 9 * 4  # Conv2D(6, 3) on 8x8x4
CONSUMER = 8 * 8 * 5 * 9 * 6  # Conv2D(5, 3) on 8x8x6
PER_CHANNEL = 8 * 8 * 9 * 4 + 8 * 8 * 5 * 9  # one filter of each / one input slice


def _tiny_gated(group_size=1):
    keras.backend.clear_session()
    x = keras.Input((8, 8, 4))
    h = L.Conv2D(6, 3, padding="same", use_bias=False, name="producer")(x)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(h)
    h = bs_keras.ChannelGate(hidden_units=4, group_size=group_size, name="gate")([x, h])
    out = L.Conv2D(5, 3, padding="same", use_bias=False, name="consumer")(h)
    model = keras.Model(x, out)
    return model, model.get_layer("gate")


def _force(gate, bias, kernel=None):
    gate.logits_dense.kernel.assign(
        np.zeros(gate.logits_dense.kernel.shape, np.float32) if kernel is None else kernel
    )
    gate.logits_dense.bias.assign(np.asarray(bias, np.float32))


def _inputs(n, shape=(8, 8, 4), seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def test_tiny_gated_static_macs():
    model, _ = _tiny_gated()
    assert macs.count_macs(model) == PRODUCER + CONSUMER + (4 * 4 + 4 * 6)
    model, _ = _tiny_gated(group_size=2)
    assert macs.count_macs(model) == PRODUCER + CONSUMER + (4 * 4 + 4 * 3)


def test_tiny_gated_all_open_is_static():
    model, gate = _tiny_gated()
    _force(gate, [5.0] * 6)
    static = PRODUCER + CONSUMER + 4 * 4 + 4 * 6
    got = macs.conditional_macs(model, _inputs(4))
    assert got.shape == (4,)
    np.testing.assert_array_equal(got, np.full(4, static, np.float64))


def test_tiny_gated_two_channels_closed():
    model, gate = _tiny_gated()
    _force(gate, [5.0, -5.0, 5.0, -5.0, 5.0, 5.0])  # channels 1 and 3 closed
    static = PRODUCER + CONSUMER + 4 * 4 + 4 * 6
    x = _inputs(5)
    got = macs.conditional_macs(model, x)
    expected = static - 2 * (8 * 8 * 9 * 4 + 8 * 8 * 5 * 9)
    np.testing.assert_array_equal(got, np.full(5, expected, np.float64))
    # The gate really zeroes those channels in the forward pass.
    gated = keras.Model(model.input, model.get_layer("gate").output)(x, training=False)
    gated = np.asarray(gated)
    assert np.all(gated[..., [1, 3]] == 0)
    assert np.any(gated[..., [0, 2, 4, 5]] != 0)


def test_tiny_gated_all_closed_leaves_only_gate_mlp():
    model, gate = _tiny_gated()
    _force(gate, [-5.0] * 6)
    got = macs.conditional_macs(model, _inputs(3))
    np.testing.assert_array_equal(got, np.full(3, 4 * 4 + 4 * 6, np.float64))


def test_tiny_gated_group_size_2():
    model, gate = _tiny_gated(group_size=2)
    assert gate.num_gates == 3
    static = PRODUCER + CONSUMER + 4 * 4 + 4 * 3
    _force(gate, [5.0, -5.0, 5.0])  # gate 1 = channels 2 and 3 closed
    got = macs.conditional_macs(model, _inputs(4))
    np.testing.assert_array_equal(got, np.full(4, static - 2 * PER_CHANNEL, np.float64))
    _force(gate, [-5.0, -5.0, 5.0])  # 4 channels closed
    got = macs.conditional_macs(model, _inputs(4))
    np.testing.assert_array_equal(got, np.full(4, static - 4 * PER_CHANNEL, np.float64))
    _force(gate, [5.0, 5.0, 5.0])
    np.testing.assert_array_equal(macs.conditional_macs(model, _inputs(2)), [static, static])


def test_tiny_gated_per_sample_gates_follow_the_input():
    # Hidden unit 0 reads the mean of input channel 0 (m); the logits are
    # 0.5 - 1.0 * relu(bn(m)) for channel 0 and 0.5 - 0.4 * relu(bn(m)) for
    # channel 1; the others are always open. In inference, BN is
    # z / sqrt(1 + eps) with its initial statistics.
    # m = 0: nothing closed; m = 1: channel 0 closed; m = 2: both closed.
    model, gate = _tiny_gated()
    hidden = np.zeros((4, 4), np.float32)
    hidden[0, 0] = 1.0
    gate.hidden.kernel.assign(hidden)
    kernel = np.zeros((4, 6), np.float32)
    kernel[0, 0], kernel[0, 1] = -1.0, -0.4
    _force(gate, [0.5, 0.5, 5, 5, 5, 5], kernel)

    means = np.array([0.0, 1.0, 2.0, -3.0, 1.1], np.float32)
    x = _inputs(len(means), seed=1) * 0.1
    x[..., 0] = means[:, None, None]
    eps = gate.hidden_bn.epsilon
    z = np.maximum(means / np.sqrt(1.0 + eps), 0.0)
    logits = np.stack([0.5 - z, 0.5 - 0.4 * z], axis=1)
    closed = (logits <= 0).sum(axis=1)
    np.testing.assert_array_equal(closed, [0, 1, 2, 0, 1])

    static = PRODUCER + CONSUMER + 4 * 4 + 4 * 6
    expected = static - closed * PER_CHANNEL
    np.testing.assert_array_equal(macs.conditional_macs(model, x), expected)
    # Batching must not change per-sample results.
    np.testing.assert_array_equal(macs.conditional_macs(model, x, batch_size=2), expected)


def test_gate_table_reports_producer_consumers_and_cost():
    model, gate = _tiny_gated()
    (info,) = macs.gate_table(model)
    assert info.gate is gate
    assert info.producer == "producer"
    assert info.consumers == ["consumer"]
    assert info.channels == 6
    assert info.macs_per_channel == PER_CHANNEL


def test_gate_table_looks_through_passthrough_and_finds_all_consumers():
    keras.backend.clear_session()
    x = keras.Input((8, 8, 4))
    h = L.Conv2D(6, 1, use_bias=False, name="prod")(x)  # 8*8*6*4
    g = bs_keras.ChannelGate(hidden_units=2, name="gate")([x, h])
    a = L.Conv2D(3, 1, name="cons_a")(L.ReLU()(g))  # 8*8*3*6 -> per ch 8*8*3
    b = L.DepthwiseConv2D(3, padding="same", name="dw")(g)  # per ch 8*8*9
    b = L.Conv2D(2, 1, name="cons_b")(b)  # per ch 8*8*2
    model = keras.Model(x, [a, b])
    (info,) = macs.gate_table(model)
    assert info.producer == "prod"
    assert sorted(info.consumers) == ["cons_a", "cons_b", "dw"]
    assert info.macs_per_channel == 8 * 8 * 4 + 8 * 8 * 3 + 8 * 8 * 9 + 8 * 8 * 2


def test_gate_feeding_unknown_layer_raises():
    keras.backend.clear_session()
    x = keras.Input((8, 8, 4))
    h = L.Conv2D(6, 1, name="prod")(x)
    g = bs_keras.ChannelGate(hidden_units=2)([x, h])
    model = keras.Model(x, L.Add()([g, h]))
    with pytest.raises(ValueError, match="cost per channel"):
        macs.gate_table(model)


@pytest.mark.parametrize(
    "shape", [(2, 8, 8, 3), (2, 4, 4, 4), (8, 8, 4), (2, 8, 8, 4, 1)], ids=str
)
def test_conditional_macs_wrong_input_shape(shape):
    model, _ = _tiny_gated()
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 4\)"):
        macs.conditional_macs(model, np.zeros(shape, np.float32))


def test_conditional_macs_non_numeric_input():
    model, _ = _tiny_gated()
    with pytest.raises(TypeError):
        macs.conditional_macs(model, np.full((1, 8, 8, 4), "a"))


def test_conditional_macs_without_gates_is_static():
    keras.backend.clear_session()
    x = keras.Input((6, 6, 2))
    model = keras.Model(x, L.Conv2D(3, 3)(x))  # 4*4*3*9*2
    np.testing.assert_array_equal(
        macs.conditional_macs(model, np.zeros((3, 6, 6, 2), np.float32)), [864, 864, 864]
    )


# --------------------------------------------------------------------------
# Gated CIFAR ResNet-20
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_resnet20():
    keras.backend.clear_session()
    return models.cifar_resnet(20, gated=True, seed=0)


def _force_all(model, bias):
    gates = find_gates(model)
    for g in gates:
        _force(g, np.full((g.num_gates,), bias, np.float32))
    return gates


def test_gated_resnet20_static_macs(gated_resnet20):
    _, hand_macs, _ = hand_cifar_resnet(20, gated_hidden=16)
    assert macs.count_macs(gated_resnet20) == hand_macs == 40_551_040 + 9_984
    assert len(find_gates(gated_resnet20)) == 9


def test_gated_resnet20_all_open_is_static(gated_resnet20):
    _force_all(gated_resnet20, 10.0)
    x = _inputs(3, (32, 32, 3), seed=2)
    got = macs.conditional_macs(gated_resnet20, x)
    np.testing.assert_array_equal(got, np.full(3, macs.count_macs(gated_resnet20), np.float64))


def test_gated_resnet20_all_closed_saves_every_block_conv(gated_resnet20):
    _force_all(gated_resnet20, -10.0)
    _, hand_macs, block_convs = hand_cifar_resnet(20, gated_hidden=16)
    assert len(block_convs) == 9
    x = _inputs(3, (32, 32, 3), seed=3)
    got = macs.conditional_macs(gated_resnet20, x)
    expected = hand_macs - sum(block_convs)
    # what is left: stem + classifier + the nine gate MLPs
    assert expected == 32 * 32 * 16 * 27 + 64 * 10 + 9_984
    np.testing.assert_array_equal(got, np.full(3, expected, np.float64))


def test_gated_resnet20_gate_table_matches_architecture(gated_resnet20):
    _, _, block_convs = hand_cifar_resnet(20)
    table = macs.gate_table(gated_resnet20)
    widths = [16] * 3 + [32] * 3 + [64] * 3
    names = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3)]
    for info, width, name, convs in zip(table, widths, names, block_convs):
        assert info.producer == f"{name}_conv1"
        assert info.consumers == [f"{name}_conv2"]
        assert info.channels == width
        assert info.channels * info.macs_per_channel == convs
