"""What goes wrong on a real machine: undecodable files in an image folder,
two runs on one run directory, damaged checkpoints, a full disk."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bs_keras import data, recipes, run_lock, training
from bs_keras.cli import train as train_cli

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
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.RunLock(sys.argv[2], command=["train.py", "--run-dir", sys.argv[2], "--epochs", "9"]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold_lock(run_dir):
    """A child process holding the lock of `run_dir` (bs_keras/run_lock.py
    loaded alone: no TensorFlow import, so it is ready in well under a second)."""
    child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, run_lock.__file__, str(run_dir)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
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


def test_without_flock_a_lock_is_stale_when_its_pid_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    lock_file = tmp_path / ".lock"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_file.write_text(json.dumps({"pid": gone.pid, "host": run_lock.socket.gethostname(), "command": ["x"]}))
    logs = []
    with run_lock.RunLock(tmp_path, log=logs.append):
        assert "stale" in logs[0]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"pid": alive.pid, "host": run_lock.socket.gethostname()}))
        with pytest.raises(run_lock.RunLockedError, match=f"pid {alive.pid}"):
            run_lock.RunLock(tmp_path).acquire()
        lock_file.write_text(json.dumps({"pid": gone.pid, "host": "another-machine"}))
        with pytest.raises(run_lock.RunLockedError, match="delete .*\\.lock and rerun"):
            run_lock.RunLock(tmp_path).acquire()  # another host's pid cannot be checked
    finally:
        alive.kill()
        alive.wait()
