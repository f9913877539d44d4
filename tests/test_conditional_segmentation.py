"""Conditional export of the gated PSPNet (issue 28): the pyramid pooling head,
the auxiliary head dropped unless asked for, every format, and the
segmentation parity table (pixel agreement, mIoU against the Keras model)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras.deploy import parity
from bs_keras.deploy.conditional import conditional_model, folded_model, support_problems
from bs_keras.macs import conditional_macs, count_macs, gate_masks
from gate_pattern import set_gate_pattern  # bench/gate_pattern.py
from test_conditional import _perturb_bn

SIZE, CLASSES, WIDTH = 64, 5, 0.25


@pytest.fixture(scope="module")
def psp():
    """A gated PSPNet (aux head on) with realistic BN statistics and a
    nested gate pattern: `(model, calibration images, test images)`."""
    keras.utils.set_random_seed(1)
    model = bs_keras.pspnet(num_classes=CLASSES, input_shape=(SIZE, SIZE, 3), width_multiplier=WIDTH, seed=0)
    _perturb_bn(model, 2)
    images = np.random.default_rng(3).normal(size=(12, SIZE, SIZE, 3)).astype("float32")
    set_gate_pattern(model, images, off=0.4, on=0.3, nested=True)
    return model, images[:8], images[8:]


def _aux_head_macs():
    """MACs of the auxiliary head, from the PSPNet's published layout: a 3x3
    conv from stage 3's output (1024 x width channels at 1/8 of the input)
    to 256 x width channels, then a 1x1 classifier."""
    hw = (SIZE // 8) ** 2
    cin, mid = int(1024 * WIDTH), int(round(256 * WIDTH))
    return hw * (9 * cin * mid + mid * CLASSES)


def _pixels_agree(a, b):
    return float(np.mean(np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)))


@pytest.mark.slow  # builds a PSPNet-50: ~10 s
def test_pspnet_runs_conditionally_equal_to_keras_without_its_aux_head(psp):
    model, calib, test = psp
    assert support_problems(model) == []
    cond = conditional_model(model, calib)
    assert cond.output_names == ("seg",)
    images = np.concatenate([calib, test])
    ref = model(images, training=False)
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])  # batch 1
    assert out.shape == (len(images), SIZE, SIZE, CLASSES)
    assert np.abs(out - ref["seg"].numpy()).max() <= 1e-4
    assert _pixels_agree(out, ref["seg"]) >= 0.999
    np.testing.assert_allclose(cond(images).numpy(), ref["seg"].numpy(), atol=1e-4, rtol=0)  # batch N
    # The masked (as trained) fold of the same part agrees too.
    np.testing.assert_allclose(folded_model(model)(test).numpy(), ref["seg"].numpy()[8:], atol=1e-4, rtol=0)
    # The aux head is not folded: its MACs are not in the exported model's.
    assert cond.static_macs == count_macs(model) - _aux_head_macs()
    # Every sample runs at most its static MACs and at least what its gates open.
    executed = cond.executed_macs(images)
    aux_free = conditional_macs(model, images) - _aux_head_macs()
    assert np.all(executed >= aux_free - 1) and np.all(executed <= cond.static_macs)
    assert executed.mean() < 0.95 * cond.static_macs  # the pattern closes channels: the branches pay
    # Gate masks are the Keras model's.
    gates = cond.with_gates(test)
    assert set(gates) == {"seg", *cond.gate_names, "executed_macs", "widths"}
    for name, mask in gate_masks(model, test).items():
        np.testing.assert_array_equal(gates[name].numpy(), mask)

    both = conditional_model(model, calib, outputs=["seg", "aux"])
    got = both.with_gates(test[:2])
    assert both.output_names == ("seg", "aux") and both.static_macs == count_macs(model)
    for name in ("seg", "aux"):
        assert np.abs(got[name].numpy() - ref[name].numpy()[8:10]).max() <= 1e-4, name
    with pytest.raises(ValueError, match=r"outputs must be distinct names among the model's outputs \['seg', 'aux'\]"):
        conditional_model(model, calib, outputs=["logits"])


@pytest.mark.heavy  # whole-program run, >= ~30 s: make test-all / CI only
@pytest.mark.slow  # XLA and two TFLite conversions of a PSPNet-50: ~1 min
def test_pspnet_conditional_xla_and_tflite_equal_keras(psp):
    """The SavedModel signatures are checked through the export's parity table
    (next tests); float16 TFLite is the float32 conversion with float16
    weights, converted for a small ResNet in test_conditional."""
    from ai_edge_litert.interpreter import Interpreter

    model, calib, test = psp
    ref = model(test, training=False)["seg"].numpy()
    xla = conditional_model(model, calib, jit_compile=True)
    out = np.concatenate([xla(test[i : i + 1]).numpy() for i in range(len(test))])
    assert np.abs(out - ref).max() <= 1e-4 and _pixels_agree(out, ref) >= 0.999

    cond = conditional_model(model, calib)
    expected_macs = cond.executed_macs(test).astype(np.int64)
    agree = {}
    for quantize in ("none", "dynamic"):
        runner = Interpreter(model_content=cond.to_tflite(quantize, with_gates=True)).get_signature_runner(
            "serving_with_gates")
        outs = [runner(images=test[i : i + 1]) for i in range(len(test))]
        assert set(outs[0]) == {"seg", *cond.gate_names, "executed_macs", "widths"}
        seg = np.concatenate([o["seg"] for o in outs])
        agree[quantize] = (np.abs(seg - ref).max(), _pixels_agree(seg, ref))
        if quantize == "none":
            np.testing.assert_array_equal([o["executed_macs"][0] for o in outs], expected_macs)
    assert agree["none"][0] <= 1e-4 and agree["none"][1] >= 0.999, agree
    # int8 weights: the arg-max moves where two classes are close (random weights, this
    # pattern: measured 90 % of the pixels); the gates still pick the branches.
    assert agree["dynamic"][1] >= 0.8, agree


def _numpy_miou(truth, pred, num_classes):
    """Mean IoU over the classes present in either map, written out per class."""
    ious = []
    for c in range(num_classes):
        inter = np.sum((truth == c) & (pred == c))
        union = np.sum((truth == c) | (pred == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_segmentation_parity_reports_pixel_agreement_and_miou_against_keras():
    rng = np.random.default_rng(0)
    reference = {"seg": rng.normal(size=(3, 8, 8, 4)).astype("float32")}
    got = {"seg": reference["seg"].copy()}
    # Change the arg-max of 20 pixels to class 3 (also where it already was 3).
    flat = got["seg"].reshape(-1, 4)
    changed = rng.choice(len(flat), 20, replace=False)
    flat[changed, 3] = flat[changed].max(1) + 1.0
    row = parity.compare(reference, got, "seg", [])
    truth, pred = reference["seg"].argmax(-1), got["seg"].argmax(-1)
    assert row["top1_agreement"] is None
    assert row["pixel_agreement"] == pytest.approx(np.mean(truth == pred))
    assert row["pixel_agreement"] < 1
    assert row["miou"] == pytest.approx(_numpy_miou(truth, pred, 4))
    assert row["max_abs_diff"] == pytest.approx(np.abs(reference["seg"] - got["seg"]).max())
    table = parity.format_table([parity.ParityRow("keras", 0.0, None, pixel_agreement=1.0, miou=1.0),
                                 parity.ParityRow("x", 0.5, None, **{k: row[k] for k in ("pixel_agreement", "miou")})])
    assert "| pixel agree | mIoU vs Keras |" in table and "top-1" not in table
    assert f"{row['pixel_agreement']:.3%}" in table and f"{row['miou']:.4f}" in table
    # Classification keeps top-1.
    probs = {"p": rng.random((5, 3))}
    assert parity.compare(probs, probs, "p", [])["top1_agreement"] == 1.0


@pytest.mark.slow  # a PSPNet-50 SavedModel export with the parity table: ~40 s
def test_export_of_a_pspnet_reports_segmentation_parity_and_drops_the_aux_head(psp, tmp_path):
    """The SavedModel's serving_default (batch 1), serving_batch and
    serving_with_gates against Keras, through `deploy.export`'s parity table."""
    model, calib, test = psp
    out = tmp_path / "cond"
    result = bs_keras.deploy.export(model, out, mode="conditional", calibration=calib, latency_runs=0, log=None)
    rows = {r.name: r for r in result.rows}
    assert set(rows) == {"keras", "saved_model"}
    sm = rows["saved_model"]  # batches of serving_batch; gates and MACs from serving_with_gates at batch 1
    assert sm.top1_agreement is None and sm.pixel_agreement >= 0.999 and sm.miou >= 0.99
    assert sm.max_abs_diff <= 1e-4 and sm.gate_agreement == 1.0
    # Both rows count the MACs of the exported part (no aux head).
    assert rows["keras"].mean_macs == pytest.approx(np.mean(conditional_macs(model, calib)) - _aux_head_macs())
    assert rows["keras"].mean_macs <= sm.mean_macs < 0.95 * count_macs(model)
    summary = json.loads((out / "export.json").read_text())
    assert summary["signatures"]["serving_default"]["outputs"] == ["seg"]
    assert summary["static_macs"] == count_macs(model) - _aux_head_macs()
    log = (out / "export_log.txt").read_text()
    assert "not exported: aux" in log and "pixel agree | mIoU vs Keras" in log
    parity_json = json.loads((out / "parity.json").read_text())
    assert parity_json["rows"][1]["pixel_agreement"] == sm.pixel_agreement
    loaded = tf.saved_model.load(str(out / "saved_model"))
    ref = model(test, training=False)["seg"].numpy()
    (one,) = loaded.signatures["serving_default"](images=tf.constant(test[:1])).values()
    assert one.shape == (1, SIZE, SIZE, CLASSES) and np.abs(one.numpy() - ref[:1]).max() <= 1e-4
