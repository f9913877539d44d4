"""Conditional execution: exact outputs, the right width branch, SavedModel round trip."""

import itertools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from bs_keras.gates import find_gates
from bs_keras.macs import conditional_macs, gate_masks, gate_table
from bs_keras.models import cifar_resnet, imagenet_resnet
from bs_keras.deploy.conditional import (
    bucket_widths,
    calibrated_widths,
    conditional_model,
    folded_model,
    support_problems,
)
from gate_pattern import set_gate_pattern  # bench/gate_pattern.py


def _perturb_bn(model, seed):
    """Non-trivial (but well-scaled) BN statistics so that folding is tested."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.0, gamma.shape).astype("float32"),
                    rng.normal(0, 0.1, beta.shape).astype("float32"),
                    rng.normal(0, 0.1, mean.shape).astype("float32"),
                    rng.uniform(0.8, 1.5, var.shape).astype("float32"),
                ]
            )


def _model(kind):
    keras.utils.set_random_seed(1)
    if kind == "cifar8_zero_pad":
        model = cifar_resnet(8, input_shape=(16, 16, 3))
    elif kind == "cifar20_projection":
        model = cifar_resnet(20, input_shape=(32, 32, 3), shortcut="projection")
    else:
        model = imagenet_resnet(50, width_multiplier=0.25, input_shape=(32, 32, 3), num_classes=10)
    _perturb_bn(model, 2)
    rng = np.random.default_rng(3)
    images = rng.normal(size=(24,) + tuple(model.input_shape[1:])).astype("float32")
    return model, images


@pytest.fixture(scope="module", params=["cifar8_zero_pad", "cifar20_projection",
                                        pytest.param("resnet50_w025", marks=pytest.mark.slow)])  # 5-12 s a test
def setup(request):
    model, images = _model(request.param)
    designs = set_gate_pattern(model, images, off=0.4, on=0.3, nested=request.param != "cifar20_projection")
    calib, test = images[:16], images[16:]
    cond = conditional_model(model, calib)
    return model, cond, calib, test, designs


def test_pattern_is_realistic(setup):
    model, _, calib, _, designs = setup
    masks = gate_masks(model, calib)
    kinds = np.concatenate([designs[g.name] for g in find_gates(model)])
    freq = np.concatenate([masks[g.name].mean(0) for g in find_gates(model)])
    assert np.all(freq[kinds == 0] == 0) and np.all(freq[kinds == 1] == 1)
    switching = freq[kinds == 2]
    assert np.mean((switching > 0) & (switching < 1)) > 0.5


def test_outputs_match_masked_keras_at_batch_1(setup):
    model, cond, calib, test, _ = setup
    images = np.concatenate([calib, test])
    ref = model(images, training=False).numpy()
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])
    assert np.abs(out - ref).max() < 1e-5
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    # Batch N: widest width any sample needs, still exact.
    np.testing.assert_allclose(cond(images).numpy(), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(folded_model(model)(images).numpy(), ref, atol=1e-5, rtol=0)


def test_an_empty_batch_gives_an_empty_output(setup):
    """(TF's CPU convolution returns a batch-0 input unchanged, so both Keras and
    the branches fail on one: the model answers it without running them.)"""
    model, cond, calib, _, _ = setup
    empty = calib[:0]
    for images in (empty, tf.constant(empty)):
        out = cond(images)
        assert tuple(out.shape) == (0, model.output_shape[-1]) and out.dtype == tf.float32
    assert cond.executed_macs(empty).shape == (0,)


def test_block_relus_run_inside_the_branches(setup):
    """Outside the width branches only the stem's ReLU, one ReLU per residual Add and
    the gate MLPs' hidden ReLUs remain: conv1's ReLU and a ReLU right after conv2
    [+ BN] run in the branch, fused with their convolution."""
    model, cond, calib, _, _ = setup
    adds = sum(isinstance(layer, keras.layers.Add) for layer in model.layers)
    fn = cond.signatures(dynamic_batch=False)["serving_default"]
    top = [op.type for op in fn.graph.get_operations()]
    assert top.count("Relu") == adds + 1 + len(find_gates(model))
    assert "Case" in top or "StatelessCase" in top


def test_public_interface_for_serving(setup):
    """What conditional_serving builds on: `forward` / `forward_with_gates` trace into the
    caller's function; `tracing_for_tflite` switches the branches to nested tf.cond (IF)."""
    _, cond, _, test, _ = setup
    np.testing.assert_allclose(cond.forward(tf.constant(test)).numpy(), cond(test).numpy(), atol=1e-6)
    assert set(cond.forward_with_gates(tf.constant(test))) == set(cond.with_gates(test))
    assert len(cond.weight_variables) > 0 and all(isinstance(v, tf.Variable) for v in cond.weight_variables)
    spec = tf.TensorSpec((1, *cond.input_shape), tf.float32)
    with cond.tracing_for_tflite():
        ops = {op.type for op in tf.function(cond.forward).get_concrete_function(spec).graph.get_operations()}
    assert "If" in ops or "StatelessIf" in ops
    assert not {"Case", "StatelessCase"} & ops
    ops = {op.type for op in tf.function(cond.forward).get_concrete_function(spec).graph.get_operations()}
    assert {"Case", "StatelessCase"} & ops  # switch_case again outside the context


def test_chosen_widths_are_the_expected_buckets(setup):
    """Independent recomputation from the Keras masks and calibration frequencies."""
    model, cond, calib, test, _ = setup
    images = np.concatenate([calib, test])
    masks = gate_masks(model, images)
    freq = gate_masks(model, calib)
    chosen = cond.chosen_widths(images).numpy()
    assert chosen.shape == (len(images), len(find_gates(model)))
    for j, gate in enumerate(find_gates(model)):
        order = np.argsort(-freq[gate.name].mean(0), kind="stable")
        reordered = masks[gate.name][:, order]
        last_open = np.array([np.flatnonzero(r).max() + 1 if r.any() else 0 for r in reordered])
        buckets = np.array(bucket_widths(gate.channels, (0.25, 0.5, 0.75, 1.0), 8))
        expected = np.array([buckets[buckets >= n].min() for n in last_open])
        np.testing.assert_array_equal(chosen[:, j], expected, err_msg=gate.name)
    # The width executed for a batch is the widest a sample needs.
    _, executed = cond.call_with_widths(images)
    np.testing.assert_array_equal(executed.numpy(), chosen.max(0))
    # Executed MACs: between the conditional MACs and the static ones.
    macs = cond.executed_macs(images)
    cmacs = conditional_macs(model, images)
    assert np.all(macs >= cmacs - 1e-6) and np.all(macs <= cond.static_macs)


def test_calibrated_widths_are_optimal():
    """Brute force over every set of at most K candidate widths (the rounded needs)."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        channels = int(rng.choice([16, 32, 64]))
        k = int(rng.integers(1, 4))
        needed = rng.integers(0, channels + 1, size=int(rng.integers(1, 25)))
        got = calibrated_widths(needed, channels, max_widths=k)
        rounded = np.minimum(channels, np.maximum(8, -(-needed // 8) * 8))

        def executed(widths):
            ws = np.array(sorted(set(widths) | {channels}))
            return sum(ws[ws >= n].min() for n in rounded)

        candidates = sorted(set(rounded.tolist()))
        best = min(
            executed(c) for r in range(1, min(k, len(candidates)) + 1)
            for c in itertools.combinations(candidates, r)
        )  # fmt: skip
        assert executed(got) == best
        assert channels in got and len(got) <= k + 1 and all(w % 8 == 0 for w in got)
    with pytest.raises(ValueError, match="max_widths"):
        calibrated_widths([8], 16, max_widths=0)


def test_auto_widths_fit_the_calibration_data(setup):
    model, fixed, calib, test, _ = setup
    cond = conditional_model(model, calib, widths="auto", max_widths=3)
    images = np.concatenate([calib, test])
    ref = model(images, training=False).numpy()
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])
    assert np.abs(out - ref).max() < 1e-5
    np.testing.assert_allclose(cond(images).numpy(), ref, atol=1e-5, rtol=0)
    freq = gate_masks(model, calib)
    for j, gate in enumerate(find_gates(model)):
        ws = list(cond.bucket_widths[j])
        assert gate.channels in ws and len(ws) <= 4 and all(w % 8 == 0 for w in ws)
        # Every fitted width below the full one is a width some calibration sample needs.
        order = np.argsort(-freq[gate.name].mean(0), kind="stable")
        reordered = freq[gate.name][:, order]
        needs = {max(8, -(-(np.flatnonzero(r).max() + 1 if r.any() else 0) // 8) * 8) for r in reordered}
        assert set(ws) - {gate.channels} <= needs
    # With as many widths as eighths has, fitted widths execute no more on the calibration set.
    fitted = conditional_model(model, calib, widths="auto", max_widths=8)
    eighths = conditional_model(model, calib, widths=[i / 8 for i in range(1, 9)])
    assert fitted.executed_macs(calib).sum() <= eighths.executed_macs(calib).sum()
    with pytest.raises(ValueError, match="auto"):
        conditional_model(model, calib, widths="fitted")


def test_gate_groups_run_exactly():
    """Gates that switch 4 channels each: reordering by group, widths in whole
    groups, exact at batch 1 and batch N."""
    keras.utils.set_random_seed(4)
    model = cifar_resnet(8, input_shape=(16, 16, 3), gate_kwargs={"group_size": 4})
    _perturb_bn(model, 5)
    images = np.random.default_rng(6).normal(size=(20, 16, 16, 3)).astype("float32")
    set_gate_pattern(model, images, off=0.3, on=0.3)
    cond = conditional_model(model, images[:12], widths="auto", multiple_of=4)
    ref = model(images, training=False).numpy()
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cond(images).numpy(), ref, atol=1e-5, rtol=0)
    masks = gate_masks(model, images)
    chosen = cond.chosen_widths(images).numpy()
    for j, gate in enumerate(find_gates(model)):
        assert gate.num_gates * 4 == gate.channels
        assert all(w % 4 == 0 for w in cond.bucket_widths[j])
        order = cond.gate_orders[gate.name]
        np.testing.assert_array_equal(cond.permutations[gate.name].reshape(-1, 4)[:, 0], order * 4)
        reordered = masks[gate.name][:, order]
        last_open = np.array([4 * (np.flatnonzero(r).max() + 1) if r.any() else 0 for r in reordered])
        assert np.all(chosen[:, j] >= last_open)


def test_hand_set_masks_choose_their_branch():
    keras.utils.set_random_seed(0)
    model = cifar_resnet(8, input_shape=(16, 16, 3))
    open_counts = {}
    for gate, n in zip(find_gates(model), (3, 9, 33)):  # widths 16, 32, 64
        kernel, bias = gate.logits_dense.get_weights()
        b = np.full_like(bias, -10.0)
        b[np.random.default_rng(n).permutation(len(b))[:n]] = 10.0
        gate.logits_dense.set_weights([np.zeros_like(kernel), b])
        open_counts[gate.name] = n
    images = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    cond = conditional_model(model, images)
    assert [list(w) for w in cond.bucket_widths] == [[8, 16], [8, 16, 24, 32], [16, 32, 48, 64]]
    out, executed = cond.call_with_widths(images[:1])
    np.testing.assert_array_equal(executed.numpy(), [8, 16, 48])
    np.testing.assert_allclose(out.numpy(), model(images[:1], training=False).numpy(), atol=1e-5)
    # A different open set at the same count takes the same branch (channels reordered).
    assert cond.permutations["stage1_block1_gate"].shape == (16,)


# Two of the three models: the round trip does not depend on the shortcut type.
@pytest.mark.parametrize("setup", ["cifar8_zero_pad", pytest.param("resnet50_w025", marks=pytest.mark.slow)], indirect=True)  # R50 save: 20 s
def test_saved_model_round_trip(setup, tmp_path):
    model, cond, calib, test, _ = setup
    path = cond.save(str(tmp_path / "conditional"))
    loaded = tf.saved_model.load(path)
    ref = cond(test).numpy()
    one = loaded.signatures["serving_default"](images=tf.constant(test[:1]))
    (out1,) = one.values()
    np.testing.assert_allclose(out1.numpy(), ref[:1], atol=1e-6, rtol=0)
    many = loaded.signatures["serving_batch"](images=tf.constant(test))
    (outn,) = many.values()
    np.testing.assert_allclose(outn.numpy(), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(loaded(tf.constant(test[:1])).numpy(), ref[:1], atol=1e-6, rtol=0)
    ops = {op.type for f in loaded.signatures.values() for op in f.graph.get_operations()}
    ops |= {n.op for f in loaded.signatures.values() for fd in f.graph.as_graph_def().library.function for n in fd.node_def}
    assert not any("Random" in o for o in ops)


def _xla_compiled(signature):
    """Whether a loaded signature calls a function marked for XLA compilation."""
    library = signature.graph.as_graph_def().library.function
    return any(f.attr["_XlaMustCompile"].b for f in library if "_XlaMustCompile" in f.attr)


def test_xla_module_is_exact_and_saved_compiled(tmp_path):
    """jit_compile=True: XLA compiles the whole batch-1 function with HLO
    conditionals (nested tf.cond), the outputs and gate masks stay exact, and
    the SavedModel keeps the functions XLA-compiled."""
    model, images = _model("cifar8_zero_pad")  # small: each XLA compile takes seconds
    set_gate_pattern(model, images, off=0.4, on=0.3)
    calib, test = images[:16], images[16:]
    with pytest.raises(ValueError, match="branching='cond'"):
        conditional_model(model, calib, branching="switch_case", jit_compile=True)
    cond = conditional_model(model, calib, jit_compile=True)
    assert cond.branching == "cond"
    # Different samples take different width tuples, and every one is exact.
    assert len({tuple(w) for w in cond.chosen_widths(images).numpy()}) > 1
    ref = model(images, training=False).numpy()
    out = np.concatenate([cond(images[i : i + 1]).numpy() for i in range(len(images))])
    assert np.abs(out - ref).max() < 1e-5
    hlo = cond._call_fn.experimental_get_compiler_ir(tf.constant(test[:1]))(stage="hlo")
    assert hlo.count(" conditional(") >= len(find_gates(model))
    gates = cond.with_gates(tf.constant(test))
    for name, mask in gate_masks(model, test).items():
        np.testing.assert_array_equal(gates[name].numpy(), mask)

    loaded = tf.saved_model.load(cond.save(str(tmp_path / "xla"), dynamic_batch=False))
    for key in ("serving_default", "serving_with_gates"):
        assert _xla_compiled(loaded.signatures[key]), key
    (got,) = loaded.signatures["serving_default"](images=tf.constant(test[:1])).values()
    np.testing.assert_allclose(got.numpy(), ref[16:17], atol=1e-5, rtol=0)


def _saved_constant_bytes(path):
    """Bytes of float constants in a SavedModel's function library (parsed from
    saved_model.pb, independently of how the module built them)."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(f"{path}/saved_model.pb", "rb") as f:
        sm.ParseFromString(f.read())
    total = 0
    for fd in sm.meta_graphs[0].graph_def.library.function:
        for node in fd.node_def:
            if node.op == "Const" and node.attr["dtype"].type == tf.float32.as_datatype_enum:
                total += tf.make_ndarray(node.attr["value"].tensor).nbytes
    return total


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_constant_weights_exact_and_stored_once_per_batch_shape(tmp_path):
    """constant_weights=True (the default under XLA): no tf.Variable, the
    weights are graph constants; outputs and gate masks stay exact, and the
    SavedModel stores them once per input shape (every signature calls one
    core function), not once per signature."""
    model, images = _model("cifar8_zero_pad")
    set_gate_pattern(model, images, off=0.4, on=0.3)
    calib, test = images[:16], images[16:]
    ref = model(test, training=False).numpy()
    plain = conditional_model(model, calib)
    assert not plain.constant_weights and plain.variables  # variables by default without XLA
    const = conditional_model(model, calib, constant_weights=True)
    assert const.constant_weights and not const.variables
    assert conditional_model(model, calib, jit_compile=True).constant_weights
    assert const.weight_count == sum(int(np.prod(v.shape)) for v in plain.variables)
    out = np.concatenate([const(test[i : i + 1]).numpy() for i in range(4)])
    np.testing.assert_allclose(out, ref[:4], atol=1e-5, rtol=0)
    gates = const.with_gates(tf.constant(test))
    for name, mask in gate_masks(model, test).items():
        np.testing.assert_array_equal(gates[name].numpy(), mask)
    weight_bytes = 4 * const.weight_count
    for dynamic, copies in ((False, 1), (True, 2)):
        path = const.save(str(tmp_path / f"const_{dynamic}"), dynamic_batch=dynamic)
        stored = _saved_constant_bytes(path)
        assert copies * weight_bytes <= stored < (copies + 0.5) * weight_bytes, (stored, weight_bytes)
        loaded = tf.saved_model.load(path)
        assert not any(f.variables for f in loaded.signatures.values())
        (got,) = loaded.signatures["serving_default"](images=tf.constant(test[:1])).values()
        np.testing.assert_allclose(got.numpy(), ref[:1], atol=1e-5, rtol=0)
        with_gates = loaded.signatures["serving_with_gates"](images=tf.constant(test[:1]))
        for name, mask in gate_masks(model, test[:1]).items():
            np.testing.assert_array_equal(with_gates[name].numpy(), mask)
        np.testing.assert_allclose(loaded(tf.constant(test[:1])).numpy(), ref[:1], atol=1e-5, rtol=0)
        if dynamic:
            (got,) = loaded.signatures["serving_batch"](images=tf.constant(test)).values()
            np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, rtol=0)
        ops = {n.op for f in loaded.signatures.values() for fd in f.graph.as_graph_def().library.function
               for n in fd.node_def}
        assert "Const" in ops and not any("Random" in o for o in ops)
    # The variables version keeps the weights out of the graph.
    vars_path = plain.save(str(tmp_path / "vars"))
    assert _saved_constant_bytes(vars_path) < 0.5 * weight_bytes
    loaded = tf.saved_model.load(vars_path)
    assert all(f.variables for f in loaded.signatures.values())


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_cli_conditional_mode(tmp_path):
    from bs_keras.cli import export as cli

    model, images = _model("cifar8_zero_pad")
    set_gate_pattern(model, images, off=0.4, on=0.3)
    model_path = tmp_path / "gated.keras"
    model.save(model_path)
    calib = tmp_path / "calib.npy"
    np.save(calib, images)
    out = tmp_path / "out"
    args = [str(model_path), "--out", str(out), "--mode", "conditional", "--calibration", str(calib)]
    assert cli.main(args) == 0
    loaded = tf.saved_model.load(str(out / "saved_model"))
    (got,) = loaded.signatures["serving_default"](images=tf.constant(images[:1])).values()
    np.testing.assert_allclose(got.numpy(), model(images[:1], training=False).numpy(), atol=1e-5)
    summary = json.loads((out / "conditional.json").read_text())
    assert "auto" in summary["width_choice"] and summary["weights"] == "tf.Variables"  # the defaults
    # serving_with_gates reports the Keras gate decisions in the Keras gate order.
    outputs = loaded.signatures["serving_with_gates"](images=tf.constant(images))
    for name, mask in gate_masks(model, images).items():
        np.testing.assert_array_equal(outputs[name].numpy(), mask)
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    assert rows["saved_model"]["max_abs_diff"] < 1e-5 and rows["saved_model"]["gate_agreement"] == 1.0
    # --xla: the saved serving functions are XLA-compiled, parity holds.
    out_xla = tmp_path / "out_xla"
    assert cli.main([*args[:2], str(out_xla), *args[3:], "--xla"]) == 0
    summary = json.loads((out_xla / "conditional.json").read_text())
    assert "XLA" in summary["branching"] and summary["weights"] == "graph constants"
    loaded_xla = tf.saved_model.load(str(out_xla / "saved_model"))
    assert _xla_compiled(loaded_xla.signatures["serving_default"])
    assert not any(f.variables for f in loaded_xla.signatures.values())  # weights are constants
    rows = {r["name"]: r for r in json.loads((out_xla / "parity.json").read_text())["rows"]}
    assert rows["saved_model"]["max_abs_diff"] < 1e-5 and rows["saved_model"]["gate_agreement"] == 1.0
    with pytest.raises(SystemExit):
        cli.main([str(model_path), "--out", str(tmp_path / "o2"), "--mode", "conditional"])
    for bad in (["--widths", "eighths"], ["--mode", "conditional", "--widths", "eighths", "--max-widths", "3"],
                ["--xla"], ["--mode", "conditional", "--format", "tflite", "--xla"]):
        with pytest.raises(SystemExit):
            cli.main([str(model_path), "--out", str(tmp_path / "o3"), "--calibration", str(calib), *bad])


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_to_tflite_with_gates_and_quantizations():
    """Both signatures over one set of weights; float16 and dynamic convert; int8 is refused.

    Under dynamic-range quantization gate decisions near the threshold may flip, but the
    branch a block runs is always the one its own (quantized) gate masks call for.
    """
    from ai_edge_litert.interpreter import Interpreter

    model, images = _model("cifar8_zero_pad")
    set_gate_pattern(model, images, off=0.4, on=0.3)
    cond = conditional_model(model, images[:16])
    with pytest.raises(ValueError, match="Use none, float16 or dynamic"):
        cond.to_tflite("int8")
    flatbuffer = cond.to_tflite("float16", with_gates=True)
    runner = Interpreter(model_content=flatbuffer).get_signature_runner("serving_with_gates")
    got = runner(images=images[16:17])
    expected = cond.with_gates(images[16:17])
    assert set(got) == set(expected) == {"probabilities", *cond.gate_names, "executed_macs", "widths"}
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"].numpy(), atol=2e-3)
    assert expected["executed_macs"].numpy()[0] == int(cond.executed_macs(images[16:17])[0])

    runner = Interpreter(model_content=cond.to_tflite("dynamic", with_gates=True)).get_signature_runner(
        "serving_with_gates"
    )
    per_channel = {i.gate.name: i.macs_per_channel for i in gate_table(model)}
    for k in range(8):
        got = runner(images=images[k : k + 1])
        macs = cond.static_macs
        for j, name in enumerate(cond.gate_names):
            reordered = got[name][0][cond.gate_orders[name]]
            needed = (np.flatnonzero(reordered).max() + 1) if reordered.any() else 0
            buckets = np.array(cond.bucket_widths[j])
            assert got["widths"][0, j] == buckets[buckets >= needed].min(), (k, name)
            macs -= (cond.gate_channels[j] - got["widths"][0, j]) * per_channel[name]
        assert got["executed_macs"][0] == round(macs)


# ----------------------------------------------- what the conditional export refuses, before any work

def _gated_models_it_cannot_run_yet():
    """Models `add_gates` gates that `conditional_model` does not run, with a
    text the refusal must contain (the blocks it runs: test_conditional_models)."""
    import bs_keras

    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        block_type="bottleneck_block", use_pre_activation=False, input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[2, 2], stackwise_num_strides=[1, 2],
        image_shape=(32, 32, 3))  # fmt: skip
    yield "keras_hub classifier", bs_keras.add_gates(keras_hub.models.ResNetImageClassifier(backbone, num_classes=5)), \
        "Functional layers ('res_net_backbone') are not supported"
    yield "leaky relu before the gate", one_block_model(keras.layers.LeakyReLU(name="b_leaky"), keras.layers.Flatten()), \
        "(in 'b_gate': 'b_leaky' (LeakyReLU)); Flatten layers ('flatten') are not supported"


def one_block_model(activation, head):
    """A gated one-block ResNet on 8x8x4 inputs: stem conv, then conv -> BN ->
    `activation` -> gate -> conv added to the stem's output, then `head`."""
    import bs_keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", name="b_conv1")(x)
    h = activation(keras.layers.BatchNormalization(name="b_bn1")(h))
    h = keras.layers.Conv2D(8, 3, padding="same", name="b_conv2")(h)
    x = keras.layers.Add(name="b_add")([x, h])
    return bs_keras.add_gates(keras.Model(inputs, head(x)), seed=0)


@pytest.mark.slow  # builds a keras-hub classifier: ~5 s
def test_unsupported_models_are_refused_before_any_work(tmp_path, monkeypatch):
    import bs_keras
    from bs_keras.deploy import conditional as cond_lib
    from bs_keras.deploy import pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(pipeline._Calibration, "load", no_work)  # no calibration data read
    monkeypatch.setattr(cond_lib, "gate_masks", no_work)  # no gate measured
    for name, model, text in _gated_models_it_cannot_run_yet():
        assert cond_lib.support_problems(model), name
        out = tmp_path / name.replace(" ", "_")
        with pytest.raises(bs_keras.deploy.ExportError) as raised:
            bs_keras.deploy.export(model, out, mode="conditional", calibration="fashion_mnist")
        message = str(raised.value)
        assert text in message and "--mode compact" in message, (name, message)
        assert not out.exists() and not list(tmp_path.glob(f"{out.name}*")), name  # nothing half-written
        with pytest.raises(ValueError, match="cannot run this model"):
            conditional_model(model, np.zeros((2, *model.inputs[0].shape[1:]), np.float32))


def test_support_problems_is_empty_for_the_models_it_runs():
    for model in (cifar_resnet(8, input_shape=(16, 16, 1), num_classes=3, seed=0),
                  imagenet_resnet(50, input_shape=(32, 32, 3), num_classes=3, width_multiplier=0.25, seed=0)):
        assert support_problems(model) == [], model.name
