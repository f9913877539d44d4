"""Compaction: outputs unchanged on the calibration data, counts reduced by hand arithmetic.

The gates of a CIFAR ResNet-8 (16x16x3, widths 16/32/64, zero-pad
shortcuts) are set so that every gate layer has chosen always-on, always-off
and conditional channels (the conditional ones switch on part of the
calibration set). Expected parameter and MAC savings are written out from the
layer shapes, never taken from `bs_keras.macs` or the compaction plan.
"""

import keras
import numpy as np
import pytest

import bs_keras
from bs_keras.gates import ChannelGate, find_gates
from bs_keras.macs import count_macs, gate_masks
from bs_keras.models import cifar_resnet
from bs_keras.deploy.compact import compact_model, expand_gate_masks, plan_compaction

HIDDEN = 16  # ChannelGate hidden_units default
# Per gated block: input channels, hidden width, output pixels of its convs.
BLOCKS = {
    "stage1_block1": {"cin": 16, "width": 16, "pixels": 16 * 16},
    "stage2_block1": {"cin": 16, "width": 32, "pixels": 8 * 8},
    "stage3_block1": {"cin": 32, "width": 64, "pixels": 4 * 4},
}
OFF, ON, COND = 0, 1, 2


def design_gates(model, images, designs, seed=0):
    """Sets each gate's logits so its gates are OFF / ON / COND as designed.

    OFF/ON: zero kernel column, bias -4/+4. COND: a random kernel column and
    a bias between the 40th-percentile neighbours of its logits on `images`,
    so that it opens for about 60% of them. Gates are set in graph order (a gate changes the
    inputs of the later ones).
    """
    rng = np.random.default_rng(seed)
    for gate in find_gates(model):
        design = np.asarray(designs[gate.name])
        assert design.shape == (gate.num_gates,)
        kernel = rng.standard_normal((gate.hidden_units, gate.num_gates)).astype("float32")
        kernel[:, design != COND] = 0.0
        gate.logits_dense.set_weights([kernel, np.zeros(gate.num_gates, "float32")])
        block_input = keras.Model(model.input, gate.input[0])(images)
        logits = np.asarray(gate.gate_logits(block_input))
        bias = np.where(design == ON, 4.0, -4.0).astype("float32")
        cond = design == COND
        # Halfway between two neighbouring samples' logits (not at a sample's own logit,
        # where float rounding differences between equal graphs would decide the gate).
        ranked = np.sort(logits[:, cond], axis=0)
        k = max(1, int(round(0.4 * len(ranked))))
        bias[cond] = -(ranked[k - 1] + ranked[k]) / 2
        gate.logits_dense.set_weights([kernel, bias])


def assert_same_outputs(compact, masked, images):
    """The compact model's probabilities equal the masked model's up to float32 rounding.

    atol 1e-5 plus rtol 1e-4: a ResNet-50's summation-order differences reached
    1.06e-5 on a probability of 0.62 in one CI run; a flipped gate moves them by >0.01.
    """
    np.testing.assert_allclose(np.asarray(compact(images)), np.asarray(masked(images)), atol=1e-5, rtol=1e-4)


def categories(model, images):
    masks = gate_masks(model, images)
    out = {}
    for name, mask in masks.items():
        on, off = mask.min(axis=0) == 1, mask.max(axis=0) == 0
        out[name] = np.where(on, ON, np.where(off, OFF, COND))
    return out


def _designs(rng, sizes, first_without_cond=True):
    designs = {}
    for i, (name, n) in enumerate(sizes.items()):
        choices = [OFF, ON] if (first_without_cond and i == 0) else [OFF, ON, COND]
        d = rng.choice(choices, size=n)
        d[: len(choices)] = choices  # every category present
        designs[name] = rng.permutation(d)
    return designs


@pytest.fixture(scope="module")
def calibration():
    return np.random.default_rng(1).standard_normal((48, 16, 16, 3)).astype("float32")


@pytest.fixture(scope="module")
def gated(calibration):
    model = cifar_resnet(8, input_shape=(16, 16, 3), seed=0)
    sizes = {g.name: g.num_gates for g in find_gates(model)}
    design_gates(model, calibration, _designs(np.random.default_rng(0), sizes))
    return model


def _expected_savings(cats, new_channels):
    """(params, MACs) removed, from the block shapes of BLOCKS."""
    params = macs = 0
    for block, s in BLOCKS.items():
        cat = cats[f"{block}_gate"]
        removed = s["width"] - new_channels[f"{block}_gate"]
        # conv1 filters (3x3xCin) + bn1 (gamma, beta, mean, var) + conv2 input slices (3x3xCout)
        params += removed * (9 * s["cin"] + 4 + 9 * s["width"])
        macs += removed * (s["pixels"] * 9 * s["cin"] + s["pixels"] * 9 * s["width"])
        if not np.any(cat == COND):  # gate removed: hidden Dense, its BN, logits, 3 scalar weights
            params += s["cin"] * HIDDEN + 4 * HIDDEN + (HIDDEN + 1) * s["width"] + 3
            macs += s["cin"] * HIDDEN + HIDDEN * s["width"]
        else:  # logits of the removed gates
            params += (HIDDEN + 1) * removed
            macs += HIDDEN * removed
    return params, macs


def test_designed_categories_hold_on_the_calibration_set(gated, calibration):
    cats = categories(gated, calibration)
    for name, cat in cats.items():
        assert set(np.unique(cat)) >= {OFF, ON}, name
    assert not np.any(cats["stage1_block1_gate"] == COND)
    assert np.any(cats["stage3_block1_gate"] == COND)


@pytest.mark.parametrize("round_to", [None, 8])
def test_compact_outputs_and_counts(gated, calibration, round_to):
    cats = categories(gated, calibration)
    compact, plans = compact_model(gated, calibration, round_to=round_to, return_plan=True)

    # Same outputs as the masked model wherever the categories hold.
    assert_same_outputs(compact, gated, calibration)

    # Widths: kept channels, rounded up to a multiple of 8 when asked.
    new_channels = {}
    for block, s in BLOCKS.items():
        name = f"{block}_gate"
        kept = int(np.sum(cats[name] != OFF))
        expected = kept if round_to is None else min(-(-kept // 8) * 8, s["width"])
        assert compact.get_layer(f"{block}_conv1").filters == expected
        assert compact.get_layer(f"{block}_bn1").gamma.shape == (expected,)
        assert compact.get_layer(f"{block}_conv2").kernel.shape[2] == expected
        new_channels[name] = expected

    # Gates: the first layer had no conditional channel: its gate is gone; the
    # others keep only their conditional channels switching.
    names = {l.name for l in compact.layers}
    assert "stage1_block1_gate" not in names
    for gate in find_gates(compact):
        plan = next(p for p in plans if p.gate == gate.name)
        assert gate.num_gates == new_channels[gate.name]
        np.testing.assert_array_equal(plan.conditional, np.flatnonzero(cats[gate.name] == COND))

    d_params, d_macs = _expected_savings(cats, new_channels)
    assert gated.count_params() - compact.count_params() == d_params
    assert count_macs(gated) - count_macs(compact) == d_macs

    # The conditional gates decide as before: expanded masks equal the original ones.
    compact_masks = gate_masks(compact, calibration)
    full = expand_gate_masks(plans, compact_masks, len(calibration))
    original = gate_masks(gated, calibration)
    for name in original:
        np.testing.assert_array_equal(full[name], original[name])


def test_padding_channels_are_exactly_zero(gated, calibration):
    compact = compact_model(gated, calibration, round_to=8)
    relu = keras.Model(compact.input, compact.get_layer("stage2_block1_relu1").output)
    plans = plan_compaction(gated, calibration, round_to=8)
    plan = next(p for p in plans if p.gate == "stage2_block1_gate")
    assert plan.pad_groups > 0
    features = np.asarray(relu(calibration))
    np.testing.assert_array_equal(features[..., plan.channel_index() < 0], 0.0)


def test_compact_model_saves_and_loads(gated, calibration, tmp_path):
    compact = compact_model(gated, calibration, round_to=8)
    path = tmp_path / "compact.keras"
    compact.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: registered layers only
    np.testing.assert_array_equal(np.asarray(loaded(calibration)), np.asarray(compact(calibration)))
    assert loaded.count_params() == compact.count_params()


def test_all_off_block_keeps_one_zero_channel(calibration):
    model = cifar_resnet(8, input_shape=(16, 16, 3), seed=1)
    sizes = {g.name: g.num_gates for g in find_gates(model)}
    designs = _designs(np.random.default_rng(3), sizes, first_without_cond=False)
    designs["stage2_block1_gate"] = np.full(32, OFF)
    design_gates(model, calibration, designs)
    compact = compact_model(model, calibration)
    assert compact.get_layer("stage2_block1_conv1").filters == 1
    assert "stage2_block1_gate" not in {l.name for l in compact.layers}
    assert_same_outputs(compact, model, calibration)


def test_grouped_gates(calibration):
    model = cifar_resnet(8, input_shape=(16, 16, 3), seed=2, gate_kwargs={"group_size": 4})
    sizes = {g.name: g.num_gates for g in find_gates(model)}
    design_gates(model, calibration, _designs(np.random.default_rng(5), sizes, first_without_cond=False))
    compact, plans = compact_model(model, calibration, round_to=8, return_plan=True)
    for plan in plans:
        assert plan.new_channels % 8 == 0 or plan.new_channels == plan.channels
        assert compact.get_layer(plan.producer).filters == plan.new_channels
    assert_same_outputs(compact, model, calibration)
    full = expand_gate_masks(plans, gate_masks(compact, calibration), len(calibration))
    for name, mask in gate_masks(model, calibration).items():
        np.testing.assert_array_equal(full[name], mask)


def test_unsupported_graphs_are_rejected_clearly(calibration):
    x = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(3, 3, padding="same", name="conv")(x)
    gated = ChannelGate(name="gate")([x, h])
    out = keras.layers.Add(name="add")([gated, x])  # gate output not into a convolution
    model = keras.Model(x, keras.layers.GlobalAveragePooling2D()(out))
    with pytest.raises(ValueError, match="reaches layer 'add'"):
        compact_model(model, calibration)

    with pytest.raises(ValueError, match="no ChannelGate"):
        compact_model(cifar_resnet(8, input_shape=(16, 16, 3), gated=False), calibration)
    with pytest.raises(ValueError, match="round_to"):
        plan_compaction(cifar_resnet(8, input_shape=(16, 16, 3)), calibration, round_to=0)
    with pytest.raises(ValueError, match="non-empty"):
        compact_model(cifar_resnet(8, input_shape=(16, 16, 3)), calibration[:0])


def test_bottleneck_blocks_compact_exactly():
    model = bs_keras.models.imagenet_resnet(
        50, num_classes=5, input_shape=(32, 32, 3), width_multiplier=0.125, seed=0
    )
    images = np.random.default_rng(4).standard_normal((16, 32, 32, 3)).astype("float32")
    sizes = {g.name: g.num_gates for g in find_gates(model)}
    design_gates(model, images, _designs(np.random.default_rng(6), sizes, first_without_cond=False))
    compact = compact_model(model, images, round_to=4)
    assert count_macs(compact) < count_macs(model)
    assert_same_outputs(compact, model, images)
