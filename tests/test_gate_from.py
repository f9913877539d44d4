"""train.py --gate-from: fine-tune a gated copy of a trained classifier."""

import hashlib
import json
import shutil
import types

import keras
import numpy as np
import pytest

from bs_keras import recipes, training
from bs_keras.cli import train as train_cli
from bs_keras.gates import find_gates
from bs_keras.models import cifar_resnet
from shared_runs import TINY, run_train as _run

INFO = types.SimpleNamespace(image_shape=(32, 32, 1), num_classes=10)


def _recipe(path, **changes):
    return recipes.RECIPES["fashion_mnist_sweep"].replace(gate_from=str(path), **changes).validate()


def _save(model, tmp_path, name="source.keras"):
    path = tmp_path / name
    model.save(path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gate-from", "missing.keras"], "--gate-from='missing.keras' is invalid: give an existing .keras file"),
        (["--plain", "--gate-from", "x.keras"], "gates a trained classifier: drop --plain"),
        (["--gate-from", "x.keras", "--prune-from", "x.keras", "--prune-macs", "0.5"],
         "--prune-from (static pruning) are two different baselines"),
        (["--recipe", "imagenet_resnet50_finetune_bas"], "fine-tunes a trained network: pass --gate-from MODEL.keras"),
    ],
)  # fmt: skip
def test_bad_gate_from_flags_fail_fast(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.keras").write_bytes(b"")
    assert train_cli.main([*args, "--run-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gate_from_copies_the_trained_weights(tmp_path):
    keras.utils.set_random_seed(0)
    source = cifar_resnet(20, gated=False, input_shape=(32, 32, 1), width_multiplier=0.25, weight_decay=5e-4)
    path = _save(source, tmp_path)
    model = training.build_model(_recipe(path, width_multiplier=0.25), INFO)
    assert len(find_gates(model)) == 9
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(source(x, training=False)))
    assert float(find_gates(model)[0].l0_coef) == 0.0  # the scheduler ramps lambda in


def test_gate_from_under_mixed_precision_moves_the_source_to_the_mixed_policy(tmp_path):
    """`--gate-from --mixed-precision`: the float32 source's layers follow the
    global policy (they kept float32 before), the softmax output stays float32."""
    source = cifar_resnet(8, gated=False, input_shape=(32, 32, 1), width_multiplier=0.25, seed=0)
    path = _save(source, tmp_path)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = training.build_model(_recipe(path, width_multiplier=0.25), INFO)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("stage1_block1_conv1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert find_gates(model)[0].logits_dense.compute_dtype == "float32"


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_gate_from_a_saved_keras_applications_resnet50(tmp_path):
    """A user's keras.applications model (its ZeroPadding stem, biased convs,
    no regularizers) trains one step through train.py's model path."""
    source = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 1), classes=10)
    recipe = _recipe(_save(source, tmp_path), weight_decay=1e-4)
    model = training.build_model(recipe, INFO)
    assert len(find_gates(model)) == 16
    assert model.get_layer("conv2_block1_1_conv").kernel_regularizer.l2 == pytest.approx(5e-5)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 1)).astype("float32")
    history = model.fit(x, np.arange(8) % 10, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def _dense_classifier(classes=10, activation="softmax"):
    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, activation=activation)(x))


@pytest.mark.parametrize(
    "source, message",
    [
        (lambda: cifar_resnet(8, gated=False, input_shape=(28, 28, 1)),
         "takes inputs of shape (28, 28, 1), the data gives (32, 32, 1)"),
        (lambda: cifar_resnet(8, gated=False, input_shape=(32, 32, 1), num_classes=3),
         "it has 3 outputs, fashion_mnist has 10 classes"),
        (lambda: cifar_resnet(8, gated=False, input_shape=(32, 32, 1), classifier_activation=None),
         "must output softmax probabilities"),
        (_dense_classifier, "has no residual block add_gates can gate"),
    ],
)  # fmt: skip
def test_gate_from_mismatches_are_one_clear_error(source, message, tmp_path):
    path = _save(source(), tmp_path)
    with pytest.raises(training.RunError, match=r"--gate-from .*source\.keras") as e:
        training.build_model(_recipe(path), INFO)
    assert message in str(e.value)


def test_gate_from_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(training.RunError, match="cannot be loaded as a Keras model"):
        training.build_model(_recipe(path), INFO)


@pytest.mark.slow
def test_gate_from_a_plain_run_fine_tunes_and_records_the_source(tiny_plain_run, tmp_path, capsys):
    assert tiny_plain_run.returncode == 0, tiny_plain_run.stderr[-3000:]
    gated_dir = tmp_path / "gated"
    source = tmp_path / "best.keras"  # a copy: the test changes it below, the shared run stays as it is
    shutil.copyfile(tiny_plain_run.run_dir / "best.keras", source)
    # The sweep recipe: a fixed lambda ramp without the demo's hard-gate phase (lambda 0 there).
    gated_args = [*TINY, "--recipe", "fashion_mnist_sweep", "--epochs", "2", "--lam", "12",
                  "--gate-from", str(source), "--run-dir", str(gated_dir)]
    result = _run(gated_args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Training a gated copy of {source}" in result.stdout
    config = json.loads((gated_dir / "config.json").read_text())["recipe"]
    assert config["gate_from"] == str(source)
    assert config["gate_from_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    report = json.loads((gated_dir / "report.json").read_text())["evaluation"]
    assert report["gated"] and len(report["layers"]) == 9
    # The gates trained: their zero-initialised logits kernels moved, the rest
    # of the network started from the plain run's weights.
    model = keras.models.load_model(gated_dir / "last.keras")
    assert all(np.abs(np.asarray(g.logits_dense.kernel)).max() > 0 for g in find_gates(model))
    # The schedules ran over the fine-tuning epochs: gamma annealed, lambda ramped.
    rows = (gated_dir / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    lam = [float(r.split(",")[header.index("lam")]) for r in rows[1:]]
    assert lam[0] < lam[-1] <= 12.0
    # A changed source file is not silently resumed.
    changed = keras.models.load_model(source)
    changed.get_layer("predictions").bias.assign(changed.get_layer("predictions").bias + 1.0)
    changed.save(source)
    capsys.readouterr()
    assert train_cli.main(gated_args) == 2  # in this process: a refusal needs no new TensorFlow
    assert "different settings (gate_from_sha256)" in capsys.readouterr().err
