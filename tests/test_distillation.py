"""Distiller: the distillation term against a NumPy formula, where its
gradient goes in each mode, the moving statistics, external teachers,
serialization, and train.py's flags."""

import csv
import json
import os
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf

import bs_keras
from bs_keras import gating
from bs_keras.cli import train as train_cli
from bs_keras.distillation import Distiller, distillation_loss, unwrap
from bs_keras.gates import find_gates, gates_open
from bs_keras.models import cifar_resnet
from bs_keras.training import file_sha256

SHAPE = (12, 12, 1)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SHAPE)).astype("float32"), rng.integers(0, 3, n)


def _student(seed=0, hard=True):
    keras.utils.set_random_seed(seed)
    model = cifar_resnet(8, num_classes=3, input_shape=SHAPE, seed=seed, gate_kwargs={"init_bias": 0.0})
    if hard:  # deterministic gates (logit > 0, no sampling): gradients compare exactly
        gating.set_hard_training(find_gates(model), True)
    return model


def test_distillation_loss_is_t2_times_kl_of_the_softened_outputs():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    for t in (1.0, 4.0):
        p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
        q = np.exp(student / t) / np.exp(student / t).sum(-1, keepdims=True)
        expected = t**2 * (p * (np.log(p) - np.log(q))).sum(-1)
        got = distillation_loss(tf.constant(teacher, tf.float32), tf.constant(student, tf.float32), t)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)
    same = distillation_loss(tf.constant(teacher, tf.float32), tf.constant(teacher, tf.float32), 2.0)
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-6)


def test_gates_open_runs_the_ungated_network():
    model = _student(hard=False)
    for gate in find_gates(model):  # every gate closed at inference
        gate.logits_dense.bias.assign(np.full(gate.logits_dense.bias.shape, -5.0, "float32"))
    x, _ = _data(8)
    plain = cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False)
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    with gates_open():
        opened = model(x, training=False)
    np.testing.assert_allclose(opened, plain(x, training=False), rtol=1e-5, atol=1e-6)
    assert not np.allclose(model(x, training=False), opened, atol=1e-3)  # closed gates do change it


def _grads(distiller, x, y):
    with tf.GradientTape() as tape:
        y_pred = distiller(x, training=True)
        loss = distiller.compute_loss(x, y, y_pred, training=True)
    weights = distiller.trainable_weights
    return loss, [g if g is not None else tf.zeros_like(w) for g, w in zip(tape.gradient(loss, weights), weights)]


@pytest.mark.parametrize("train_teacher", [False, True])
def test_self_teacher_gradient_reaches_the_student_and_the_teacher_only_in_sandwich_mode(train_teacher):
    x, y = _data()
    model = _student()
    distiller = Distiller(model, "self", alpha=0.7, temperature=3.0, train_teacher=train_teacher)
    distiller.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    ce = keras.losses.SparseCategoricalCrossentropy()
    loss, grads = _grads(distiller, x, y)

    # The same loss built by hand, the teacher's outputs taken as constants.
    with gates_open():
        teacher = tf.constant(model(x, training=True))
    with tf.GradientTape() as tape:
        student = model(x, training=True)
        hand = ce(y, student) + tf.add_n(model.losses) + 0.7 * tf.reduce_mean(
            distillation_loss(tf.math.log(teacher), tf.math.log(student), 3.0))
        if train_teacher:
            with gates_open():
                hand += ce(y, model(x, training=True))
    hand_grads = tape.gradient(hand, distiller.trainable_weights)
    hand_grads = [g if g is not None else tf.zeros_like(w) for g, w in zip(hand_grads, distiller.trainable_weights)]
    np.testing.assert_allclose(float(loss), float(hand), rtol=1e-5)
    for g, h in zip(grads, hand_grads):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)

    # The distillation term moves the student: alpha 0 gives other gradients.
    _, no_kd = _grads(Distiller(model, "self", alpha=0.0), x, y) if not train_teacher else (None, None)
    if no_kd is not None:
        assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(grads, no_kd)) > 1e-4


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_the_self_teacher_leaves_the_moving_statistics_to_the_student():
    x, y = _data()
    plain_step, distilled = _student(seed=3), _student(seed=3)
    plain_step.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    d = Distiller(distilled, "self")
    d.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")
    plain_step.fit(x, y, batch_size=32, epochs=1, verbose=0)
    d.fit(x, y, batch_size=32, epochs=1, verbose=0)
    moving = [w.path for w in plain_step.weights if "moving" in w.path]
    assert moving
    before = _student(seed=3)
    changed = 0
    for a, b, c in zip(plain_step.weights, distilled.weights, before.weights):
        if "moving" in a.path:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7, err_msg=a.path)
            changed += not np.allclose(a.numpy(), c.numpy())
    assert changed > len(moving) // 2  # the step did update them (the student's pass)


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_external_teacher_stays_frozen_and_the_student_learns(tmp_path):
    x, y = _data(64)
    keras.utils.set_random_seed(1)
    teacher = cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False)
    before = [w.numpy().copy() for w in teacher.weights]
    student = _student(hard=False)
    start = [w.numpy().copy() for w in student.trainable_weights]
    d = Distiller(student, teacher, alpha=0.5, temperature=2.0)
    d.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    history = d.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y),
                    callbacks=[bs_keras.GateLossScheduler(0.75, 0.2)])
    for a, b in zip(before, teacher.weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(start, student.trainable_weights))
    assert history.history["distill_loss"][-1] > 0 and history.history["val_distill_loss"][-1] > 0
    assert "l0_loss" in history.history  # the gate callback sees the student through the wrapper
    assert unwrap(d) is student and unwrap(student) is student

    d.save(tmp_path / "d.keras")
    loaded = keras.models.load_model(tmp_path / "d.keras")
    assert isinstance(loaded, Distiller) and loaded.alpha == 0.5 and loaded.temperature == 2.0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), d.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher", ["self", "external"])
@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_distillation_under_mixed_precision_keeps_the_term_float32_and_finite(teacher):
    x, y = _data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        student = _student(hard=False)
        other = cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False) if teacher == "external" else "self"
        d = Distiller(student, other, alpha=1.0, temperature=4.0)
        d.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
        assert isinstance(d.optimizer, keras.optimizers.LossScaleOptimizer)
        history = d.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[bs_keras.GateLossScheduler(0.75, 0.2)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert student.get_layer("stage1_block1_conv1").compute_dtype == "float16"
    assert np.isfinite(history.history["loss"][-1]) and history.history["distill_loss"][-1] > 0
    assert all(np.isfinite(w.numpy()).all() for w in student.weights)


def test_the_self_teacher_trains_by_default_and_an_external_one_never():
    from bs_keras import recipes

    student = _student()
    assert Distiller(student, "self").train_teacher is True  # the sandwich rule measured better
    assert Distiller(student, "self", train_teacher=False).train_teacher is False
    external = cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False)
    assert Distiller(student, external).train_teacher is False
    demo = recipes.get_recipe("fashion_mnist_demo")
    assert demo.replace(distill="self").resolved().distill_train_teacher is True
    assert demo.resolved().distill_train_teacher is False


def test_bad_distillers_are_refused():
    student = _student()
    with pytest.raises(ValueError, match="teacher='self'"):
        Distiller(student, student)
    wrong = cifar_resnet(8, num_classes=4, input_shape=SHAPE, gated=False)
    with pytest.raises(ValueError, match=r"The teacher's outputs \(4,\) differ from the student's \(3,\)"):
        Distiller(student, wrong)
    with pytest.raises(ValueError, match="train_teacher is for teacher='self'"):
        Distiller(student, cifar_resnet(8, num_classes=3, input_shape=SHAPE, gated=False), train_teacher=True)
    with pytest.raises(ValueError, match="temperature must be"):
        Distiller(student, "self", temperature=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--distill", "self", "--plain"], "a plain network has no gates to open"),
        (["--distill-from", "missing.keras"], "--distill-from='missing.keras' is invalid"),
        (["--distill-train-teacher"], "--distill-train-teacher=True is invalid"),
        (["--distill", "self", "--distill-temperature", "0"], "--distill-temperature=0.0 is invalid"),
        (["--dataset", "fashion_canvas", "--distill", "self"], "distillation trains classifiers only"),
    ],
)
def test_cli_refuses_bad_distillation_flags(args, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main([*args, "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.heavy  # whole-program run, >= ~30 s: make test-all / CI only
@pytest.mark.slow
def test_train_py_distils_from_a_teacher_file_resumes_with_it_and_records_it(tmp_path, capsys):
    """--distill-from with --gate-from, --target-macs and --mixed-precision,
    killed inside epoch 2 and resumed: the teacher comes back with the run
    (config.json records it and its sha256), and last.keras is the student."""
    from shared_runs import TINY, run_train as _run
    from test_train_cli import _start_paused

    # The teacher (and --gate-from source): an untrained plain ResNet-20 of the run's shape.
    teacher_path = tmp_path / "teacher.keras"
    cifar_resnet(20, num_classes=10, input_shape=(28, 28, 1), gated=False, width_multiplier=0.25,
                 seed=0).save(teacher_path)
    run_dir = tmp_path / "run"
    args = [*TINY, "--epochs", "2", "--limit-train", "256", "--gate-from", str(teacher_path),
            "--distill-from", str(teacher_path), "--distill-alpha", "0.5", "--target-macs", "0.7",
            "--mixed-precision", "--run-dir", str(run_dir)]
    proc = _start_paused(args, tmp_path / "sync", 1, 0, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.kill()
    proc.wait()
    config = json.loads((run_dir / "config.json").read_text())["recipe"]
    assert config["distill_from"] == str(teacher_path) and config["distill_alpha"] == 0.5
    assert config["distill_from_sha256"] == file_sha256(teacher_path)

    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" in result.stdout and f"distilled from {teacher_path}" in result.stdout
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(float(r["distill_loss"]) > 0 for r in rows) and "val_distill_loss" in rows[0]
    last = keras.models.load_model(run_dir / "last.keras")
    assert not isinstance(last, Distiller) and find_gates(last)  # the gated student, ready to export
    assert json.loads((run_dir / "config.json").read_text())["runtime"]["mixed_precision"] is True
    # The teacher inside the resume state is the file's model, unchanged by training.
    state = json.loads((run_dir / "state" / "state.json").read_text())
    teacher = keras.models.load_model(teacher_path)
    student = bs_keras.add_gates(teacher)
    wrapper = Distiller(student, keras.models.load_model(teacher_path))
    wrapper.load_weights(run_dir / "state" / state["weights"])
    for a, b in zip(teacher.weights, wrapper.teacher.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["recipe"]["distill_from_sha256"] == config["distill_from_sha256"]
    assert float(rows[-1]["mac_target"]) == pytest.approx(0.7)  # the budget ran beside the teacher

    # A changed teacher file is a different run.
    kernel = teacher.get_layer("predictions").kernel
    kernel.assign(kernel.numpy() + 1.0)
    teacher.save(tmp_path / "other.keras")
    os.replace(tmp_path / "other.keras", teacher_path)
    capsys.readouterr()
    assert train_cli.main(args) == 2  # in this process: a refusal needs no new TensorFlow
    assert "distill_from_sha256" in capsys.readouterr().err.split("different settings")[1]
