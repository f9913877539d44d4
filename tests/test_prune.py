"""Static magnitude channel pruning (bs_keras/deploy/prune.py), checked against hand
arithmetic and against the original model with the pruned channels zeroed."""

import keras
import numpy as np
import pytest

from bs_keras import macs, models
from bs_keras.gates import find_gates
from bs_keras.deploy.prune import magnitude_prune

SHAPE = (16, 16, 1)


def _plain_and_twin(seed=0):
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    plain = models.cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False)
    rng = np.random.default_rng(seed)
    for layer in plain.layers:  # distinct magnitudes and non-trivial statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.1, 2.0, c).astype(np.float32) * rng.choice([-1, 1], c))
            layer.beta.assign(rng.normal(0, 0.2, c).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype(np.float32))
    twin = models.cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=True)
    return plain, twin


BLOCKS = ("stage1_block1", "stage2_block1", "stage3_block1")
WIDTHS = (16, 32, 64)


def test_keeps_the_largest_gamma_channels_and_equals_zeroed_original():
    plain, twin = _plain_and_twin()
    gammas = {b: np.abs(np.asarray(plain.get_layer(f"{b}_bn1").gamma)) for b in BLOCKS}
    kernels = {b: np.asarray(plain.get_layer(f"{b}_conv1").kernel) for b in BLOCKS}
    pruned = magnitude_prune(plain, twin, macs_ratio=0.5)
    assert not find_gates(pruned)
    x = np.random.default_rng(1).normal(size=(6, *SHAPE)).astype(np.float32)
    for b, c in zip(BLOCKS, WIDTHS):
        k = pruned.get_layer(f"{b}_conv1").kernel.shape[-1]
        assert 1 <= k < c
        top = np.sort(np.argsort(-gammas[b])[:k])  # channel order is preserved
        np.testing.assert_array_equal(np.asarray(pruned.get_layer(f"{b}_conv1").kernel), kernels[b][..., top])
        # Reference: the original model with the other channels' BN output forced to 0.
        bn = plain.get_layer(f"{b}_bn1")
        drop = np.setdiff1d(np.arange(c), top)
        for var in (bn.gamma, bn.beta):
            v = np.asarray(var).copy()
            v[drop] = 0.0
            var.assign(v)
    np.testing.assert_allclose(pruned(x, training=False), plain(x, training=False), atol=1e-5)


def test_macs_match_hand_arithmetic_and_target():
    plain, twin = _plain_and_twin()
    static = macs.count_macs(plain)
    for target in (0.7, 0.45):
        _, twin = _plain_and_twin()
        pruned = magnitude_prune(plain, twin, macs_ratio=target)
        kept = [pruned.get_layer(f"{b}_conv1").kernel.shape[-1] for b in BLOCKS]
        # Basic block: a hidden channel costs one 3x3 filter of conv1 and one
        # input slice of conv2, at the block's output resolution.
        in_c = (16, 16, 32)
        size = (16, 8, 4)
        removed = sum((c - k) * s * s * 9 * (ci + c) for c, k, ci, s in zip(WIDTHS, kept, in_c, size))
        assert macs.count_macs(pruned) == static - removed
        # same keep fraction in every block (within rounding of one channel)
        fractions = np.array(kept) / np.array(WIDTHS)
        assert fractions.max() - fractions.min() <= 1.0 / 16 + 1e-9
        # closest achievable: one channel more or less everywhere moves away from the target
        assert abs(macs.count_macs(pruned) / static - target) < 0.04


def test_bad_arguments_are_named():
    plain, twin = _plain_and_twin()
    with pytest.raises(ValueError, match=r"macs_ratio must be in \(0, 1\]"):
        magnitude_prune(plain, twin, 1.5)
    with pytest.raises(ValueError, match="starts from a plain model"):
        magnitude_prune(twin, twin, 0.5)
    other = models.cifar_resnet(14, num_classes=3, input_shape=SHAPE, gated=True)
    with pytest.raises(ValueError, match="layer names differ"):
        magnitude_prune(plain, other, 0.5)


def test_macs_ratio_holds_at_the_twins_input_size():
    """A source built for 24x24 pruned for 16x16 inputs: the ratio is of the 16x16 network."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    plain = models.cifar_resnet(8, num_classes=3, input_shape=(24, 24, 1), gated=False)
    twin = models.cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=True)
    reference = macs.count_macs(models.cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False))
    pruned = magnitude_prune(plain, twin, 0.5)
    assert tuple(pruned.input_shape[1:]) == SHAPE
    assert abs(macs.count_macs(pruned) / reference - 0.5) < 0.06
