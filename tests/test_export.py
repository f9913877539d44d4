"""SavedModel / TFLite export: parity with Keras measured on the same inputs, the CLI.

A gated CIFAR ResNet-8 at 16x16 is trained for a few steps on synthetic,
learnable data (class prototypes + noise) so that its predictions are
confident and its gates input-dependent (init_bias 0.5: some gates switch).
Every exported variant is compared with Keras inference on held-out samples.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras.gates import find_gates
from bs_keras.macs import conditional_macs, gate_masks
from bs_keras.models import cifar_resnet
from bs_keras.cli import export as cli
from bs_keras.deploy import parity, savedmodel, tflite
from bs_keras.deploy.calibration import load_calibration

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 3)


def synthetic(n, seed):
    """Images = an upsampled 4x4 prototype of the class + noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    prototypes = np.random.default_rng(123).standard_normal((10, 4, 4, 3)).astype("float32")
    images = np.repeat(np.repeat(prototypes[labels], 4, axis=1), 4, axis=2)
    images = images + 0.8 * rng.standard_normal((n, *SHAPE)).astype("float32")
    return images.astype("float32"), labels


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = cifar_resnet(8, input_shape=SHAPE, seed=0, gate_kwargs={"init_bias": 0.5})
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    x, y = synthetic(512, 0)
    model.fit(x, y, batch_size=64, epochs=3, verbose=0)
    return model


@pytest.fixture(scope="module")
def images():
    return synthetic(96, 1)[0]


@pytest.fixture(scope="module")
def trained_path(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "trained.keras"
    trained.save(path)
    return path


@pytest.fixture(scope="module")
def saved_model_dir(trained, tmp_path_factory):
    return savedmodel.export_saved_model(trained, tmp_path_factory.mktemp("sm") / "saved_model")


@pytest.fixture(scope="module")
def runner(saved_model_dir):
    return savedmodel.SavedModelRunner(saved_model_dir)


@pytest.fixture(scope="module")
def tflite_models(saved_model_dir, images):
    calibration = synthetic(64, 2)[0]
    return {
        q: tflite.convert_saved_model(saved_model_dir, q, representative_images=calibration)
        for q in tflite.QUANTIZATIONS
    }


@pytest.fixture(scope="module")
def parity_by_name(trained, images, runner, tflite_models):
    variants = [("saved_model", runner, {})]
    variants += [
        (f"tflite {q}", tflite.TFLiteRunner(b), {"size_bytes": len(b)}) for q, b in tflite_models.items()
    ]
    rows = parity.parity_rows(trained, images, variants)
    print("\n" + parity.format_table(rows))  # shown with pytest -s
    return {r.name: r for r in rows}


# --------------------------------------------------------------------------- SavedModel


def test_saved_model_signatures(trained, runner, images):
    assert set(runner.loaded.signatures) >= set(savedmodel.SIGNATURES)
    assert tuple(runner.spec.shape) == (None, *SHAPE) and runner.spec.dtype == tf.float32
    plain = runner(images)
    assert set(plain) == {"probabilities"}
    outputs = runner.with_gates(images)
    gates = find_gates(trained)
    assert set(outputs) == {"probabilities", "conditional_macs", *(g.name for g in gates)}
    for g in gates:
        assert outputs[g.name].shape == (len(images), g.num_gates)
        assert set(np.unique(outputs[g.name])) <= {0.0, 1.0}
    assert outputs["conditional_macs"].dtype == np.int64
    np.testing.assert_allclose(outputs["probabilities"].sum(-1), 1.0, atol=1e-5)


def test_saved_model_matches_keras(trained, runner, images):
    expected = np.asarray(trained(images, training=False))
    got = runner.with_gates(images)
    assert np.max(np.abs(got["probabilities"] - expected)) < 1e-5
    assert np.all(got["probabilities"].argmax(-1) == expected.argmax(-1))
    np.testing.assert_array_equal(runner(images)["probabilities"], got["probabilities"])
    for name, mask in gate_masks(trained, images).items():
        np.testing.assert_array_equal(got[name], mask)
    # The in-graph MAC count equals bs_keras.macs, sample by sample, and varies.
    reference = conditional_macs(trained, images)
    np.testing.assert_array_equal(got["conditional_macs"], reference.astype(np.int64))
    assert len(np.unique(reference)) > 1


def test_saved_model_graph_is_deterministic(runner):
    ops = savedmodel.graph_op_types(runner.loaded)
    assert {"Conv2D", "Greater"} <= ops  # the scan sees the model and its gates
    assert savedmodel.random_ops(runner.loaded) == []
    assert not [op for op in ops if "Random" in op or ("Stateless" in op and "Random" in op)]


def test_random_op_scan_detects_random_ops(tmp_path):
    module = tf.Module()
    module.f = tf.function(
        lambda x: x + tf.random.stateless_uniform(tf.shape(x), seed=[1, 2]),
        input_signature=[tf.TensorSpec((None,), tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.f})
    assert "StatelessRandomUniformV2" in savedmodel.random_ops(str(tmp_path / "m"))


@pytest.mark.parametrize("signature", savedmodel.SIGNATURES)
def test_wrong_input_names_the_expected_signature(runner, signature):
    fn = runner.loaded.signatures[signature]
    expected = f"Signature `{signature}` expects float32 `images` of shape (None, 16, 16, 3)"
    # Raw signature, wrong image size or rank: the in-graph check.
    for bad in (np.zeros((2, 8, 8, 3), "float32"), np.zeros((16, 16, 3), "float32")):
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            fn(images=tf.constant(bad))
        assert expected in info.value.message
    # Raw signature, wrong dtype: TF refuses before running the graph.
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        fn(images=tf.zeros((2, *SHAPE), tf.float64))
    # The runner checks dtype and shape and names the signature.
    wrong = [np.zeros((2, *SHAPE), "float64"), np.zeros((2, *SHAPE), "uint8"), np.zeros((2, 8, 8, 3), "float32")]
    for bad in wrong:
        with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            runner.run(bad, signature)
    # The restored tf.function (input_signature) names the expected spec too.
    with pytest.raises(TypeError, match=r"shape=\(None, 16, 16, 3\)"):
        getattr(runner.loaded, signature)(tf.zeros((2, 8, 8, 3)))


# --------------------------------------------------------------------------- TFLite


def test_tflite_runs_with_litert_and_has_both_signatures(tflite_models, images):
    from ai_edge_litert.interpreter import Interpreter

    runner = tflite.TFLiteRunner(tflite_models["none"])
    assert isinstance(runner.interpreter, Interpreter)
    assert set(runner.interpreter.get_signature_list()) == set(savedmodel.SIGNATURES)
    assert runner(images[:3])["probabilities"].shape == (3, 10)
    with pytest.raises(ValueError, match="Signature `serving_default` expects float32"):
        runner(images.astype("float64"))
    # Quantized files are smaller; both signatures share one set of weights.
    sizes = {q: len(b) for q, b in tflite_models.items()}
    assert sizes["float16"] < 0.65 * sizes["none"] and sizes["dynamic"] < 0.45 * sizes["none"]


def test_parity_saved_model(parity_by_name):
    row = parity_by_name["saved_model"]
    assert row.max_abs_diff < 1e-5
    assert row.top1_agreement == 1.0
    assert row.gate_agreement == 1.0


def test_parity_tflite_float32(parity_by_name):
    row = parity_by_name["tflite none"]
    assert row.max_abs_diff < 1e-4
    assert row.top1_agreement == 1.0
    assert row.gate_agreement >= 0.999


@pytest.mark.parametrize("quantize", ["float16", "dynamic"])
def test_parity_tflite_quantized(parity_by_name, quantize):
    row = parity_by_name[f"tflite {quantize}"]
    assert row.top1_agreement >= 0.9
    assert row.gate_agreement >= 0.9


def test_parity_tflite_int8(parity_by_name):
    row = parity_by_name["tflite int8"]
    assert row.top1_agreement >= 0.8
    assert row.gate_agreement >= 0.8
    assert row.mean_macs > 0


def test_parity_table(parity_by_name, trained, images):
    rows = list(parity_by_name.values())
    lines = parity.format_table(rows).splitlines()
    assert lines[0].startswith("| variant | max abs diff | top-1 agree | gate agree")
    assert len(lines) == 2 + len(rows)
    assert [line.split("|")[1].strip() for line in lines[2:]] == [r.name for r in rows]
    # The Keras reference row (compared with itself, so no parity number to check)
    # carries the mean MACs of bs_keras.macs on the same images.
    assert rows[0].name == "keras"
    assert rows[0].mean_macs == pytest.approx(conditional_macs(trained, images).mean())
    saved = lines[2 + [r.name for r in rows].index("saved_model")]
    assert f"| {parity_by_name['saved_model'].max_abs_diff:.3g} | 100.00% | 100.00% |" in saved


def test_parity_measures_a_differing_variant(trained, images):
    """The parity numbers can fail: a variant that differs from Keras in known ways."""
    reference = parity.KerasRunner(trained)
    gates = find_gates(trained)

    class Off:
        def __call__(self, x):
            return self.with_gates(x)

        def with_gates(self, x):
            out = reference.with_gates(x)
            name = reference.output_name
            out[name] = out[name].copy()
            out[name][::2] = np.roll(out[name][::2], 1, axis=-1)  # every other top-1 moves
            out[gates[0].name] = 1.0 - out[gates[0].name]  # the first gate layer's decisions flip
            return out

    keras_row, off = parity.parity_rows(trained, images, [("off", Off(), {})])
    assert (keras_row.max_abs_diff, keras_row.top1_agreement, keras_row.gate_agreement) == (0.0, 1.0, 1.0)
    assert off.top1_agreement == 0.5
    total = sum(g.num_gates for g in gates)
    assert off.gate_agreement == pytest.approx(1 - gates[0].num_gates / total)
    probabilities = np.asarray(trained(images, training=False))
    assert off.max_abs_diff == pytest.approx(
        np.max(np.abs(probabilities[::2] - np.roll(probabilities[::2], 1, axis=-1))), rel=1e-5
    )


# --------------------------------------------------------------------------- calibration


def test_calibration_from_an_image_folder(tmp_path):
    pixels = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1) * 3
    for i, sub in enumerate(["b", "a/deeper"]):
        (tmp_path / sub).mkdir(parents=True)
        tf.io.write_file(str(tmp_path / sub / f"{i}.png"), tf.io.encode_png(pixels + i))
    (tmp_path / "notes.txt").write_text("not an image")
    # Same size, gray -> RGB: exactly (p / 255 - 0.5) / 0.5 per channel.
    images = load_calibration(str(tmp_path), (8, 8, 3), n=10)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.float32
    first = (pixels.astype(np.float32) + 1) / 255.0  # sorted paths: a/deeper/1.png first
    np.testing.assert_allclose(images[0], np.repeat((first - 0.5) / 0.5, 3, axis=-1), atol=1e-6)
    # Resized to the model input.
    assert load_calibration(str(tmp_path), (None, 4, 4, 1), n=1).shape == (1, 4, 4, 1)


def test_calibration_from_npy_and_errors(tmp_path):
    good = np.random.default_rng(0).standard_normal((5, *SHAPE)).astype("float32")
    np.save(tmp_path / "good.npy", good)
    np.testing.assert_array_equal(load_calibration(str(tmp_path / "good.npy"), SHAPE, n=3), good[:3])
    np.save(tmp_path / "pixels.npy", np.zeros((5, *SHAPE), np.uint8))
    with pytest.raises(ValueError, match="preprocessed"):
        load_calibration(str(tmp_path / "pixels.npy"), SHAPE)
    with pytest.raises(ValueError, match=r"the model expects \(N, 32, 32, 3\)"):
        load_calibration(str(tmp_path / "good.npy"), (32, 32, 3))
    with pytest.raises(FileNotFoundError):
        load_calibration(str(tmp_path / "missing.npy"), SHAPE)
    with pytest.raises(FileNotFoundError, match="No images"):
        load_calibration(str(tmp_path), SHAPE)


def test_calibration_from_a_dataset_name():
    try:
        images = load_calibration("fashion_mnist", SHAPE, n=4)
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    assert images.shape == (4, *SHAPE) and images.dtype == np.float32
    # Normalized with the Fashion-MNIST statistics: zero pixels -> -0.286 / 0.353.
    assert np.isclose(images.min(), -0.2860 / 0.3530, atol=1e-4)


# --------------------------------------------------------------------------- CLI


def _cli(args, capsys):
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _leftovers(parent):
    return [p.name for p in pathlib.Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "saved_model", "--quantize", "dynamic"], "applies to --format tflite"),
        (["--format", "tflite", "--quantize", "int8"], "int8 needs --calibration"),
        (["--mode", "compact"], "compact needs --calibration"),
        (["--round-to", "8"], "--round-to applies to --mode compact"),
        (["--outputs", "seg"], "--outputs applies to --mode conditional"),
        (["--mode", "conditional", "--outputs", "seg,seg", "--calibration", "c.npy"],
         "expected distinct output names, comma-separated"),
        (["--mode", "conditional", "--outputs", "seg", "--calibration", "c.npy"],
         "outputs must be distinct names among the model's outputs ['probabilities']. Received: outputs=['seg']"),
        (["--quantize", "int4"], "expected one or more of none, float16, dynamic, int8"),
        (["--format", "onnx"], "invalid choice: 'onnx'"),
        (["--calibration-samples", "0"], "must be a positive integer"),
        (["--mode", "conditional"], "conditional needs --calibration"),
        (["--mode", "conditional", "--format", "tflite", "--quantize", "none,int8", "--calibration", "c.npy"],
         "supports --quantize none, float16, dynamic; int8 is not supported"),
        (["--mode", "conditional", "--quantize", "dynamic", "--calibration", "c.npy"],
         "applies to --format tflite"),
    ],
)
def test_cli_rejects_bad_combinations(trained_path, tmp_path, capsys, extra, message):
    code, _, err = _cli([trained_path, "--out", tmp_path / "out", *extra], capsys)
    assert code == 2
    assert message in err
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_model_files(tmp_path, capsys):
    code, _, err = _cli([tmp_path / "missing.keras", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "model.h5").write_text("x")
    code, _, err = _cli([tmp_path / "model.h5", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "ending in .keras" in err
    (tmp_path / "broken.keras").write_text("not a zip")
    code, _, err = _cli([tmp_path / "broken.keras", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "cannot load" in err
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_cli_tflite_export_with_npy_calibration(trained_path, tmp_path, capsys):
    np.save(tmp_path / "calib.npy", synthetic(48, 3)[0])
    out = tmp_path / "exported"
    args = [trained_path, "--out", out, "--format", "tflite", "--quantize", "none,dynamic",
            "--calibration", tmp_path / "calib.npy", "--latency-runs", "2"]  # fmt: skip
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(
        ["model.tflite", "model_dynamic.tflite", "parity.json", "export.json", "export_log.txt"]
    )
    assert "| tflite dynamic |" in stdout
    log = (out / "export_log.txt").read_text()
    assert "| tflite none |" in log and "parity with Keras inference" in log
    report = json.loads((out / "parity.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert report["samples"] == 48
    assert rows["tflite none"]["max_abs_diff"] < 1e-4 and rows["tflite none"]["top1_agreement"] == 1.0
    assert rows["saved_model"]["max_abs_diff"] < 1e-5
    summary = json.loads((out / "export.json").read_text())
    assert summary["input"]["shape"] == [None, *SHAPE]
    assert "conditional_macs" in summary["signatures"]["serving_with_gates"]
    assert not _leftovers(tmp_path)
    # The output directory is not overwritten by accident.
    code, _, err = _cli(args, capsys)
    assert code == 2 and "already exists" in err


def test_cli_failure_leaves_nothing_behind(trained_path, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(tflite, "convert_saved_model", fail)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    code, _, err = _cli([trained_path, "--out", out, "--format", "tflite", "--overwrite",
                         "--latency-runs", "0"], capsys)  # fmt: skip
    assert code == 2 and "TFLite conversion (none) failed" in err and "converter exploded" in err
    assert os.listdir(out) == ["previous.txt"]  # the old export is untouched
    assert not _leftovers(tmp_path)


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_export_library_call_returns_the_parity_table(trained, images, tmp_path, capsys):
    """`bs_keras.deploy.export` on a model in memory and an array of calibration images: the
    CLI's job without a subprocess or a file, silent with log=None."""
    out = tmp_path / "lib"
    result = bs_keras.deploy.export(trained, out, format="tflite", quantize="none,float16",
                                    calibration=images, calibration_samples=64, latency_runs=0, log=None)
    assert capsys.readouterr().out == ""
    assert [r.name for r in result.rows] == ["keras", "saved_model", "tflite none", "tflite float16"]
    assert result.samples == 64 and result.out == str(out)
    assert result.row("tflite none").max_abs_diff < 1e-4 and "| tflite float16 |" in result.table()
    assert json.loads((out / "parity.json").read_text())["rows"] == [r.as_dict() for r in result.rows]
    assert result.summary == json.loads((out / "export.json").read_text())
    assert result.summary["model"] == trained.name and "mean" not in result.summary["input"]["preprocessing"]
    assert "parity with Keras inference" in (out / "export_log.txt").read_text()
    with pytest.raises(bs_keras.deploy.OptionError, match="already exists"):
        bs_keras.deploy.export(trained, out)
    with pytest.raises(ValueError, match="compact needs --calibration"):
        bs_keras.deploy.export(trained, tmp_path / "other", mode="compact")


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_python_m_export_compact_with_image_folder(trained_path, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    raw = np.random.default_rng(7).integers(0, 256, (24, 20, 20, 3), dtype=np.uint8)
    for i, image in enumerate(raw):
        tf.io.write_file(str(folder / f"{i:03d}.png"), tf.io.encode_png(image))
    out = tmp_path / "compact"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "export", str(trained_path), "--out", str(out), "--mode", "compact",
         "--round-to", "8", "--calibration", str(folder), "--latency-runs", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on/cond/off" in result.stdout
    compaction = json.loads((out / "compaction.json").read_text())
    assert compaction["calibration_samples"] == 24
    for gate in compaction["gates"]:
        assert gate["new_channels"] % 8 == 0
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    # On the calibration images the compact model reproduces the masked one.
    for name in ("keras compact", "saved_model"):
        assert rows[name]["max_abs_diff"] < 1e-5 and rows[name]["gate_agreement"] == 1.0
    compact = keras.saving.load_model(out / "compact.keras")
    loaded = savedmodel.SavedModelRunner(out / "saved_model")
    calib = load_calibration(str(folder), SHAPE)
    np.testing.assert_allclose(loaded(calib)["probabilities"], np.asarray(compact(calib)), atol=1e-6)


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_cli_conditional_tflite(trained, trained_path, images, tmp_path, capsys):
    """--mode conditional --format tflite: batch-1 .tflite files with per-block IF branches."""
    from ai_edge_litert.interpreter import Interpreter

    np.save(tmp_path / "calib.npy", synthetic(48, 3)[0])
    out = tmp_path / "cond"
    args = [trained_path, "--out", out, "--mode", "conditional", "--format", "tflite",
            "--quantize", "none,dynamic", "--calibration", tmp_path / "calib.npy", "--latency-runs", "2"]  # fmt: skip
    code, stdout, err = _cli(args, capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(
        ["model.tflite", "model_dynamic.tflite", "conditional.json", "parity.json", "export.json",
         "export_log.txt"]
    )  # fmt: skip
    assert "| tflite dynamic |" in stdout and "| tf conditional |" in stdout
    assert not _leftovers(tmp_path)

    # The float32 file, run with LiteRT one sample at a time (its input is batch 1), equals
    # the Keras masked model on held-out images, and reports the Keras gate decisions.
    interpreter = Interpreter(model_path=str(out / "model.tflite"), num_threads=2)
    assert set(interpreter.get_signature_list()) == {"serving_default", "serving_with_gates"}
    serve = interpreter.get_signature_runner("serving_default")
    with_gates = interpreter.get_signature_runner("serving_with_gates")
    assert list(serve.get_input_details()["images"]["shape"]) == [1, *SHAPE]
    got = np.concatenate([serve(images=images[i : i + 1])["probabilities"] for i in range(len(images))])
    expected = np.asarray(trained(images, training=False))
    assert np.max(np.abs(got - expected)) < 1e-5
    reference = gate_masks(trained, images)
    gated = [with_gates(images=images[i : i + 1]) for i in range(len(images))]
    agree = np.mean([np.array_equal(g[name][0], reference[name][i])
                     for i, g in enumerate(gated) for name in reference])  # fmt: skip
    assert agree >= 0.999
    widths = np.concatenate([g["widths"] for g in gated])
    blocks = json.loads((out / "conditional.json").read_text())["gates"]
    assert widths.shape == (len(images), len(blocks))
    for j, block in enumerate(blocks):
        assert set(widths[:, j]) <= set(block["widths"]) and block["widths"][-1] == block["channels"]

    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    for name in ("tf conditional", "tflite none"):
        assert rows[name]["max_abs_diff"] < 1e-5 and rows[name]["top1_agreement"] == 1.0
        assert rows[name]["gate_agreement"] >= 0.999
    assert rows["tflite dynamic"]["top1_agreement"] >= 0.9
    assert rows["tflite dynamic"]["size_bytes"] < 0.45 * rows["tflite none"]["size_bytes"]
    # Executed MACs (chosen widths) lie between the gated model's conditional MACs and the static ones.
    summary = json.loads((out / "export.json").read_text())
    assert rows["keras"]["mean_macs"] <= rows["tflite none"]["mean_macs"] <= summary["static_macs"]
    assert summary["input"]["shape"] == [1, *SHAPE] and summary["quantize"] == ["none", "dynamic"]
    assert "widths" in summary["signatures"]["serving_with_gates"]["outputs"]
