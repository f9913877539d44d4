import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras import macs
from bs_keras.segmentation import (
    AdaptiveAveragePooling2D,
    PixelAccuracy,
    confusion_matrix,
    iou_from_confusion,
    pspnet,
    segmentation_losses,
)


def _pspnet50_macs(h, w, num_classes, bins=(1, 2, 3, 6)):
    """Hand arithmetic: dilated ResNet-50 (output stride 8) + PPM + heads."""
    total = (h // 2) * (w // 2) * 64 * 49 * 3  # stem 7x7/2
    s = (h // 8) * (w // 8)  # every stage after the stem pool runs at 1/8 here
    p1 = (h // 4) * (w // 4)  # stage 1 at 1/4
    # stage 1: 3 blocks at 1/4, hidden 64, out 256
    total += p1 * (64 * 64 + 9 * 64 * 64 + 256 * 64 + 256 * 64)
    total += 2 * p1 * (64 * 256 + 9 * 64 * 64 + 256 * 64)
    # stage 2: stride 2 on the 3x3 (v1.5); conv1 of block 1 at 1/4
    total += p1 * 128 * 256 + s * (9 * 128 * 128 + 512 * 128 + 512 * 256)
    total += 3 * s * (128 * 512 + 9 * 128 * 128 + 512 * 128)
    # stage 3 and 4: dilated, stay at 1/8
    for hidden, blocks_, cin in ((256, 6, 512), (512, 3, 1024)):
        out = 4 * hidden
        total += s * (hidden * cin + 9 * hidden * hidden + out * hidden + out * cin)
        total += (blocks_ - 1) * s * (hidden * out + 9 * hidden * hidden + out * hidden)
    total += sum(b * b for b in bins) * 512 * 2048  # PPM 1x1 convs
    total += s * 9 * (2048 + 4 * 512) * 512 + s * 512 * num_classes  # head
    total += s * 9 * 1024 * 256 + s * 256 * num_classes  # aux head on stage 4
    return total


def test_plain_pspnet_macs_and_structure_match_hand_arithmetic():
    model = pspnet(19, input_shape=(64, 64, 3), gated=False)
    assert macs.count_macs(model) == _pspnet50_macs(64, 64, 19)
    out = model(np.zeros((1, 64, 64, 3), "float32"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"seg": (1, 64, 64, 19), "aux": (1, 64, 64, 19)}
    # Output stride 8: stage 4 (conv4_x) dilation 2, stage 5 dilation 4 after its first block.
    assert model.get_layer("stage3_block2_conv2").dilation_rate == (2, 2)
    assert model.get_layer("stage4_block1_conv2").dilation_rate == (2, 2)
    assert model.get_layer("stage4_block2_conv2").dilation_rate == (4, 4)
    assert model.get_layer("stage4_block3_out").output.shape[1:] == (8, 8, 2048)
    assert model.get_layer("aux_conv").input.shape[-1] == 1024


def test_gated_pspnet_gates_the_backbone_and_counts_conditional_macs():
    model = pspnet(5, input_shape=(48, 48, 3), width_multiplier=0.25, seed=0)
    gates = bs_keras.find_gates(model)
    assert len(gates) == 16
    x = np.random.default_rng(0).normal(size=(3, 48, 48, 3)).astype("float32")
    for g in gates:
        kernel, _ = g.logits_dense.get_weights()
        g.logits_dense.set_weights([kernel * 0, np.full(g.num_gates, 10.0, "float32")])
    static = macs.count_macs(model)
    np.testing.assert_array_equal(macs.conditional_macs(model, x), static)
    for g in gates:
        kernel, _ = g.logits_dense.get_weights()
        g.logits_dense.set_weights([kernel * 0, np.full(g.num_gates, -10.0, "float32")])
    closed = macs.conditional_macs(model, x)
    saved = sum(i.channels * i.macs_per_channel for i in macs.gate_table(model))
    np.testing.assert_allclose(closed, static - saved)


def test_adaptive_pooling_matches_pytorch_style_bins():
    x = np.random.default_rng(1).normal(size=(2, 7, 5, 3)).astype("float32")
    out = AdaptiveAveragePooling2D(3)(x).numpy()
    ref = np.zeros((2, 3, 3, 3))
    for i in range(3):
        r0, r1 = math.floor(i * 7 / 3), math.ceil((i + 1) * 7 / 3)
        for j in range(3):
            c0, c1 = math.floor(j * 5 / 3), math.ceil((j + 1) * 5 / 3)
            ref[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bins"):
        AdaptiveAveragePooling2D(0)


def test_loss_ignores_255_and_averages_valid_pixels():
    losses, weights = segmentation_losses(aux_weight=0.4)
    loss = losses["seg"]
    assert weights == {"seg": 1.0, "aux": 0.4}
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4, 4))
    labels[0, :2] = 255
    value = float(loss(labels, logits))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    valid = labels != 255
    ce = -np.log(np.take_along_axis(p, np.where(valid, labels, 0)[..., None], -1)[..., 0])
    np.testing.assert_allclose(value, ce[valid].mean(), rtol=1e-5)


def test_pixel_accuracy_and_iou_against_numpy():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(3, 5, 5))
    labels[0, 0] = 255
    pred = rng.integers(0, 4, size=(3, 5, 5))
    logits = np.eye(4)[pred].astype("float32")
    metric = PixelAccuracy()
    metric.update_state(labels, logits)
    valid = labels != 255
    assert float(metric.result()) == pytest.approx((pred == labels)[valid].mean())
    cm = confusion_matrix(labels, pred, 4)
    assert cm.sum() == valid.sum()
    iou, miou, acc = iou_from_confusion(cm)
    for c in range(4):
        t, q = (labels == c) & valid, (pred == c) & valid
        assert iou[c] == pytest.approx((t & q).sum() / (t | q).sum())
    assert miou == pytest.approx(np.mean(iou))
    assert acc == pytest.approx((pred == labels)[valid].mean())
    # The per-class IoU metrics agree with the NumPy IoU.
    from bs_keras.segmentation import segmentation_metrics

    metrics = segmentation_metrics(4, ["a", "b c", "d/e", "f"])["seg"]
    assert [m.name for m in metrics[2:]] == ["iou_a", "iou_b_c", "iou_d_e", "iou_f"]
    for c, m in enumerate(metrics[2:]):
        m.update_state(labels, logits)
        assert float(m.result()) == pytest.approx(iou[c], rel=1e-5)
    # Keras' MeanIoU with ignore_class agrees.
    keras_miou = keras.metrics.MeanIoU(4, ignore_class=255, sparse_y_pred=False)
    keras_miou.update_state(labels, logits)
    assert float(keras_miou.result()) == pytest.approx(miou, rel=1e-5)


def test_pspnet_save_load_and_resize_to_another_input_size(tmp_path):
    from bs_keras.training import rebuild_at_size

    model = pspnet(4, input_shape=(40, 40, 1), width_multiplier=0.25, seed=1)
    x = np.random.default_rng(4).normal(size=(2, 40, 40, 1)).astype("float32")
    model.save(tmp_path / "psp.keras")
    loaded = keras.models.load_model(tmp_path / "psp.keras")
    np.testing.assert_allclose(model(x)["seg"], loaded(x)["seg"], atol=1e-5)
    big = rebuild_at_size(model, (56, 72, 1))
    assert tuple(big(np.zeros((1, 56, 72, 1), "float32"))["seg"].shape) == (1, 56, 72, 4)
    for a, b in zip(model.weights, big.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_init_from_copies_imagenet_backbone_weights(tmp_path):
    from bs_keras.models import imagenet_resnet
    from bs_keras.training import RunError, init_backbone

    source = imagenet_resnet(50, num_classes=10, input_shape=(32, 32, 3), width_multiplier=0.25, seed=2)
    path = tmp_path / "r50.keras"
    source.save(path)
    target = pspnet(3, input_shape=(40, 40, 3), width_multiplier=0.25, seed=3)
    copied = init_backbone(target, str(path))
    assert copied > 100
    for name in ("stem_conv", "stage4_block3_conv3", "stage2_block1_gate"):
        for a, b in zip(source.get_layer(name).weights, target.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    wider = pspnet(3, input_shape=(40, 40, 3), width_multiplier=0.5, seed=3)
    with pytest.raises(RunError, match="shapes"):
        init_backbone(wider, str(path))
    with pytest.raises(RunError, match="does not exist"):
        init_backbone(target, str(tmp_path / "missing.keras"))
