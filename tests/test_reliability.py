"""What goes wrong on a real machine: undecodable files in an image folder,
two runs on one run directory, damaged checkpoints, a full disk."""

import csv
import dataclasses
import errno
import io
import json
import os
import select
import subprocess
import sys

import keras
import numpy as np
import pytest

from bs_keras import data, recipes, run_lock, training
from bs_keras.callbacks import RunCSVLogger, StopOnNaN
from bs_keras.training.run_dir import CheckpointWriteError, RunCheckpoint, keras_file_problem, resume_states
from bs_keras.cli import train as train_cli
from bs_keras.io_utils import atomic_path

PIL_Image = pytest.importorskip("PIL.Image")


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _save(path, image, fmt, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(image, fmt, **kwargs))


def _rgb(rng, size=16):
    return PIL_Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _good_folder(root, per_class=4, classes=("cat", "dog", "fish"), seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            _save(root / name / f"{i:03d}.png", _rgb(rng), "PNG")
    return root


# ---------------------------------------------------------------- bad images


def test_folder_scan_names_every_undecodable_file_and_skip_leaves_them_out(tmp_path):
    root = _good_folder(tmp_path / "images")
    rng = np.random.default_rng(1)
    # Unusual but valid: gray+alpha, 16-bit gray, CMYK JPEG, palette PNG, animated GIF.
    _save(root / "cat" / "gray_alpha.png", _rgb(rng).convert("LA"), "PNG")
    _save(root / "dog" / "deep.png", PIL_Image.fromarray(rng.integers(0, 65535, (16, 16)).astype(np.uint16)), "PNG")
    _save(root / "fish" / "print.jpg", _rgb(rng).convert("CMYK"), "JPEG")
    _save(root / "fish" / "palette.png", _rgb(rng).convert("P"), "PNG")
    _save(root / "dog" / "anim.gif", _rgb(rng), "GIF", save_all=True, append_images=[_rgb(rng)])
    # Undecodable.
    (root / "cat" / "broken.png").write_text("this is not an image\n")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    png = _encode(_rgb(rng, 32), "PNG")
    (root / "fish" / "truncated.png").write_bytes(png[: len(png) // 2])
    _save(root / "fish" / "scan.png", _rgb(rng), "TIFF")
    (root / "cat" / "README.txt").write_text("not an image extension: ignored")
    reasons = {
        root / "cat" / "broken.png": "a text file, not an image",
        root / "dog" / "empty.jpg": "empty file (0 bytes)",
        root / "fish" / "scan.png": "a TIFF file",
        root / "fish" / "truncated.png": "corrupt or truncated (Invalid PNG data",
    }

    with pytest.raises(data.BadImagesError) as raised:
        data.get_dataset(str(root), validation_split=0.25)
    assert isinstance(raised.value, ValueError)  # train.py: "error: ...", exit 2
    message = str(raised.value)
    assert message.startswith(f"4 of the 21 image files in {str(root)!r} cannot be decoded:")
    for path, reason in reasons.items():
        assert f"  {path}: {reason}" in message, (path, message)
    assert "README.txt" not in message and "gray_alpha" not in message and "print.jpg" not in message
    assert "--skip-bad-images" in message and "skip_bad_images=True" in message
    assert sorted(p for p, _ in raised.value.bad) == sorted(map(str, reasons))

    source = data.get_dataset(str(root), validation_split=0.25, skip_bad_images=True)
    info = source.info
    assert sorted(p for p, _ in info.bad_files) == sorted(map(str, reasons))
    assert info.train_examples + info.eval_examples == 17
    assert info.image_shape == (16, 16, 3)
    # Every remaining file goes through the pipeline: no error mid-epoch.
    train_labels = np.concatenate([y for _, y in source.train(1, shuffle=False, augment=False)])
    eval_labels = np.concatenate([y for _, y in source.eval(4)])
    assert len(train_labels) == info.train_examples and len(eval_labels) == info.eval_examples
    np.testing.assert_array_equal(np.bincount(np.concatenate([train_labels, eval_labels])), [5, 6, 6])


def test_a_folder_with_no_decodable_image_fails_even_with_skip(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_text("text")
    with pytest.raises(data.BadImagesError, match="no images are left once its 2 undecodable"):
        data.get_dataset(str(tmp_path), skip_bad_images=True)


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_train_stops_on_a_bad_image_before_training_and_skip_bad_images_leaves_it_out(tmp_path, capsys):
    root = _good_folder(tmp_path / "images", per_class=12)
    (root / "cat" / "broken.png").write_text("not a png")
    (root / "cat" / "README.txt").write_text("ignored")
    run_dir = tmp_path / "run"
    args = ["--dataset", str(root), "--model", "resnet20", "--width-multiplier", "0.25", "--batch-size", "8",
            "--epochs", "1", "--limit-eval", "8", "--run-dir", str(run_dir)]
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: 1 of the 37 image files in {str(root)!r} cannot be decoded:\n")
    assert f"{root / 'cat' / 'broken.png'}: a text file, not an image" in err
    assert "README.txt" not in err and "Traceback" not in err
    assert not (run_dir / "last.keras").exists() and not (run_dir / ".lock").exists()

    assert train_cli.main([*args, "--skip-bad-images"]) == 0
    out = capsys.readouterr().out
    assert f"left out 1 undecodable image file(s) of {root}:\n  {root / 'cat' / 'broken.png'}: a text file" in out
    report = json.loads((run_dir / "report.json").read_text())
    assert report["skipped_bad_images"] == [{"path": str(root / "cat" / "broken.png"),
                                             "reason": "a text file, not an image"}]
    assert report["evaluation"]["num_samples"] == 4  # round(0.1 * 37) held out, none of them bad


# ---------------------------------------------------------------- run lock

_HOLD_LOCK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.RunLock(sys.argv[2], command=["train.py", "--run-dir", sys.argv[2], "--epochs", "9"]).acquire()
print("locked", flush=True)
sys.stdin.read()  # held until the test closes stdin or kills this process
"""


def _hold_lock(run_dir):
    """A child process holding the lock of `run_dir` (bs_keras/run_lock.py
    loaded alone: no TensorFlow import, so it is ready in well under a second)."""
    child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, run_lock.__file__, str(run_dir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([child.stdout], [], [], 60)
    line = child.stdout.readline() if ready else ""
    if line.strip() != "locked":
        child.kill()
        child.wait()
        pytest.fail(f"the lock holder did not lock within 60 s (exit {child.returncode}, said {line!r})")
    return child


def test_a_second_run_on_a_held_run_dir_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    child = _hold_lock(run_dir)
    try:
        code = train_cli.main(["--model", "resnet20", "--epochs", "1", "--run-dir", str(run_dir)])
        assert code == 2
        err = capsys.readouterr().err
        assert f"error: {run_dir} is in use by another run (pid {child.pid} on " in err
        assert f"train.py --run-dir {run_dir} --epochs 9)" in err
        assert f"kill {child.pid}" in err and "choose another --run-dir" in err
        assert os.listdir(run_dir) == [".lock"]  # nothing written, the holder's lock kept
        with pytest.raises(run_lock.RunLockedError, match=f"pid {child.pid}"):
            run_lock.RunLock(run_dir).acquire()
    finally:
        child.kill()  # SIGKILL: no cleanup, the lock file stays
        child.wait()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == child.pid
    logs = []
    with run_lock.RunLock(run_dir, command=["again"], log=logs.append):
        assert len(logs) == 1 and "Taking over the stale lock" in logs[0] and f"pid {child.pid}" in logs[0]
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == ["again"]
    assert not (run_dir / ".lock").exists()


def test_the_lock_is_released_on_exit_and_each_worker_dir_locks_on_its_own(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        with run_lock.RunLock(run_dir):
            raise SystemExit(3)
    assert not (run_dir / ".lock").exists()

    recipe = recipes.default_recipe_for("fashion_mnist").replace(model="resnet20", epochs=1).validate()
    with run_lock.RunLock(run_dir):
        with run_lock.RunLock(run_dir / "worker-1"):
            # Held: another acquisition, even in this process, is refused.
            with pytest.raises(run_lock.RunLockedError, match=f"pid {os.getpid()}"):
                run_lock.RunLock(run_dir).acquire()
            assert training.prepare_run_dir(str(run_dir / "worker-1"), recipe, {}) is None
            assert training.prepare_run_dir(str(run_dir), recipe, {}) is None  # .lock and worker-1/ are fine
        assert os.listdir(run_dir / "worker-1") == ["config.json"]
        (run_dir / "junk.txt").write_text("x")
        assert training.prepare_run_dir(str(run_dir), recipe, {}, overwrite=True) is None
        assert sorted(os.listdir(run_dir)) == [".lock", "config.json"]  # --overwrite keeps the lock
    assert os.listdir(run_dir) == ["config.json"]


def test_a_run_dir_that_cannot_be_locked_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train_cli.main(["--epochs", "1", "--run-dir", str(tmp_path / "file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot lock the run directory {tmp_path / 'file' / 'run'}: ")
    assert "Choose a writable --run-dir." in err


# ------------------------------------------------------- checkpoints, full disk


def _tiny_fit(run_dir, epochs, state=None, callbacks=(), initial_epoch=0):
    from bs_keras.models import cifar_resnet

    keras.utils.set_random_seed(0)
    model = cifar_resnet(8, input_shape=(8, 8, 1), num_classes=3, seed=0)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)  # so that load_weights restores it too
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 3
    if epochs > initial_epoch:
        guard = StopOnNaN()
        checkpoint = RunCheckpoint(str(run_dir), guard, state=state)
        model.fit(x, y, batch_size=16, epochs=epochs, initial_epoch=initial_epoch, verbose=0,
                  validation_data=(x, y), callbacks=[guard, checkpoint, *callbacks])
    return model


def _no_temp_files(run_dir):
    return [os.path.join(d, f) for d, _, files in os.walk(run_dir) for f in files if ".tmp-" in f] == []


def _full_disk_on(method, call):
    """`keras.Model.<method>` that writes half a file and fails with ENOSPC on its `call`-th call."""
    real = getattr(keras.Model, method)
    calls = []

    def patched(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == call:
            with open(filepath, "wb") as f:
                f.write(b"PK\x03\x04 half written")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filepath)
        return real(self, filepath, *args, **kwargs)

    return patched


# Model.save: last.keras and best.keras of epoch 1, then last.keras of epoch 2;
# Model.save_weights: the resume weights of epoch 1, then of epoch 2.
@pytest.mark.parametrize("method, call", [("save", 3), ("save_weights", 2)])
@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch, method, call):
    monkeypatch.setattr(keras.Model, method, _full_disk_on(method, call))
    with pytest.raises(CheckpointWriteError) as raised:
        _tiny_fit(tmp_path, epochs=3)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    name = "last.keras" if method == "save" else os.path.join("state", "epoch-0002.weights.h5")
    assert message.startswith(f"Could not write {tmp_path / name}: No space left on device (the disk is full). "
                              "Free some space;")
    assert "the checkpoint of epoch 1 is intact, and rerunning the same command resumes from it" in message
    monkeypatch.undo()
    assert _no_temp_files(tmp_path)
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["epoch"] == 1
    for path in (tmp_path / "last.keras", tmp_path / "best.keras"):
        assert keras_file_problem(path) is None
        keras.models.load_model(path)
    model = _tiny_fit(tmp_path, epochs=0)
    model.load_weights(tmp_path / "state" / state["weights"])


def test_a_late_write_error_at_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_resume_goes_back_to_the_previous_epoch_when_the_newest_state_is_damaged(tmp_path):
    _tiny_fit(tmp_path, epochs=3)
    state_dir = tmp_path / "state"
    assert sorted(os.listdir(state_dir)) == ["epoch-0002.weights.h5", "epoch-0003.weights.h5",
                                             "previous.json", "state.json"]
    assert json.loads((state_dir / "previous.json").read_text())["epoch"] == 2
    states, damaged = resume_states(tmp_path)
    assert [s["epoch"] for s in states] == [3, 2] and damaged == []

    weights = state_dir / "epoch-0003.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    model = _tiny_fit(tmp_path, epochs=0)
    logs = []
    state = training.restore_checkpoint(model, str(tmp_path), states, damaged, log=logs.append)
    assert state["epoch"] == 2
    assert f"{weights} (OSError" in logs[0] and "the intact checkpoint of epoch 2" in logs[0]
    assert int(model.optimizer.iterations.numpy()) == 4  # 2 epochs of 2 steps

    (state_dir / "state.json").write_text('{"epoch": 3, "wei')  # truncated JSON
    states, damaged = resume_states(tmp_path)
    assert [s["epoch"] for s in states] == [2] and damaged[0][0] == str(state_dir / "state.json")
    (state_dir / "epoch-0002.weights.h5").write_bytes(b"")
    with pytest.raises(training.RunError) as raised:
        training.restore_checkpoint(model, str(tmp_path), states, damaged)
    message = str(raised.value)
    assert f"Cannot resume {tmp_path}: damaged checkpoint files: {state_dir / 'state.json'} (JSONDecodeError" in message
    assert f"{state_dir / 'epoch-0002.weights.h5'} (" in message
    assert "Restore the files from a backup, or pass --overwrite to start the run again" in message


def test_keras_file_problem_detects_truncated_and_corrupt_archives(tmp_path):
    path = tmp_path / "last.keras"
    _tiny_fit(tmp_path, epochs=0).save(path)
    assert keras_file_problem(path) is None
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert "BadZipFile" in keras_file_problem(path)
    corrupt = bytearray(whole)
    corrupt[len(whole) // 3] ^= 0xFF  # inside a member's data: its CRC fails
    path.write_bytes(bytes(corrupt))
    assert keras_file_problem(path) is not None
    assert keras_file_problem(tmp_path / "none.keras") == "missing"


def test_csv_rows_of_epochs_trained_again_are_dropped(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n3,0.")  # the run went back to epoch 2's checkpoint
    logger = RunCSVLogger(path)
    logger.on_epoch_begin(2)
    logger.on_epoch_end(2, {"loss": 0.7})
    logger.on_epoch_begin(3)  # only the first epoch of a run looks back
    logger.on_epoch_end(3, {"loss": 0.6})
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["loss"]) for r in rows] == [("0", "1.0"), ("1", "0.9"), ("2", "0.7"), ("3", "0.6")]


# --------------------------------------------------------------- train(), end to end

TINY = dict(model="resnet20", width_multiplier=0.25, batch_size=32, limit_train=64, limit_eval=32, seed=0)


@pytest.mark.slow
def test_train_recovers_from_a_full_disk_and_from_damaged_checkpoints(tmp_path, monkeypatch):
    # The L0 ramp over 10-40 % (not the demo's target from step 0): epoch 1 writes no best.keras.
    recipe = recipes.default_recipe_for("fashion_mnist").replace(**TINY, epochs=3, lam_begin=0.1, lam_end=0.4)
    recipe = recipe.validate()
    run_dir = tmp_path / "run"
    logs = []

    def train(**kwargs):
        logs.clear()
        return training.train(recipe, str(run_dir), verbose=0, log=logs.append, **kwargs)

    def epochs_logged():
        with open(run_dir / "log.csv") as f:
            return [r["epoch"] for r in csv.DictReader(f)]

    # The disk fills up while epoch 2 writes last.keras (the second save: epoch 1 ends before the
    # L0 ramp, so it writes no best.keras): a RunError (train.py prints it, exit 2).
    monkeypatch.setattr(keras.Model, "save", _full_disk_on("save", 2))
    with pytest.raises(training.RunError, match="^Could not write .*last.keras: No space left on device .* "
                       "epoch 1 is intact"):
        train()
    monkeypatch.undo()
    assert json.loads((run_dir / "state" / "state.json").read_text())["epoch"] == 1
    assert keras_file_problem(run_dir / "last.keras") is None and _no_temp_files(run_dir)
    assert not (run_dir / ".lock").exists()
    train()  # the same flags again: resumes
    assert f"Resuming {run_dir} after epoch 1 of 3." in logs
    assert epochs_logged() == ["0", "1", "2"]

    # The newest resume weights are truncated (and the run died before its report).
    weights = run_dir / "state" / "epoch-0003.weights.h5"
    weights.write_bytes(weights.read_bytes()[:2000])
    (run_dir / "report.json").unlink()
    train()
    assert any(f"{weights} (OSError" in line and "checkpoint of epoch 2" in line for line in logs), logs
    assert f"Resuming {run_dir} after epoch 2 of 3." in logs
    assert epochs_logged() == ["0", "1", "2"]
    model = keras.models.load_model(run_dir / "last.keras")
    assert int(model.optimizer.iterations.numpy()) == 6  # epoch 2's optimizer state, then one epoch
    assert (run_dir / "report.json").exists()

    # A complete run whose last.keras is truncated: rebuilt from the final resume state.
    last = run_dir / "last.keras"
    last.write_bytes(last.read_bytes()[:3000])
    train()
    assert any(f"{last} was damaged" in line and "checkpoint of epoch 3" in line for line in logs), logs
    assert int(keras.models.load_model(last).optimizer.iterations.numpy()) == 6

    # Nothing left to resume from: one error naming the files and the way out.
    (run_dir / "state" / "state.json").write_text("{")
    (run_dir / "state" / "epoch-0002.weights.h5").write_bytes(b"\0" * 100)
    with pytest.raises(training.RunError) as raised:
        train()
    message = str(raised.value)
    assert "state.json (JSONDecodeError" in message and "epoch-0002.weights.h5 (" in message
    assert "pass --overwrite to start the run again" in message
    (run_dir / "config.json").write_text('{"recipe": ')
    with pytest.raises(training.RunError, match="config.json is damaged .* pass --overwrite"):
        train()
    assert not (run_dir / ".lock").exists()


def test_the_checkpoint_names_moved_to_run_dir_still_import_from_callbacks():
    from bs_keras import callbacks
    from bs_keras.training import run_dir

    for name in ("STATE_FILES", "CheckpointWriteError", "RunCheckpoint", "keras_file_problem", "load_state",
                 "resume_states"):
        assert getattr(callbacks, name) is getattr(run_dir, name), name
    with pytest.raises(AttributeError):
        callbacks.no_such_name


def test_best_keras_is_chosen_only_among_epochs_after_the_l0_ramp(tmp_path):
    """A gated run's epochs before its L0 ramp ends (gates still open, full
    MACs) may score higher; they must not become best.keras."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    guard = StopOnNaN()
    checkpoint = RunCheckpoint(str(tmp_path), guard, first_best_epoch=3)
    checkpoint.set_model(model)
    for epoch, value in enumerate([0.9, 0.95, 0.5, 0.6, 0.55]):
        model.get_layer("d").bias.assign([float(epoch)])
        checkpoint.on_epoch_end(epoch, {"val_accuracy": value})
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert (state["best_epoch"], state["best"]) == (4, 0.6)
    best = keras.models.load_model(tmp_path / "best.keras")
    assert float(best.get_layer("d").bias.numpy()[0]) == 3.0  # the weights of epoch 4
    with pytest.raises(ValueError, match="first_best_epoch"):
        RunCheckpoint(str(tmp_path), guard, first_best_epoch=0)


def test_best_candidates_start_where_the_l0_ramp_ends():
    from bs_keras.training.model import best_candidate_from

    demo = recipes.get_recipe("fashion_mnist_demo")  # budget 0.5 held from step 0: every epoch
    assert best_candidate_from(demo) == 1
    demo = demo.replace(lam_begin=0.1, lam_end=0.4)  # budget 0.5, L0 ramp 0.1-0.4 of 4 epochs
    assert best_candidate_from(demo) == 2
    assert best_candidate_from(demo.replace(epochs=10, lam_end=0.6)) == 6
    assert best_candidate_from(demo.replace(epochs=1)) == 1
    # (dataclasses.replace: Recipe.replace keeps a field given None)
    assert best_candidate_from(dataclasses.replace(demo, gated=False, target_macs=None)) == 1
    fixed = dataclasses.replace(demo, target_macs=None, lam=0.5, lam_end=0.6)
    assert best_candidate_from(fixed) == 3
    assert best_candidate_from(fixed.replace(lam=0.0)) == 1  # no L0 term: every epoch
