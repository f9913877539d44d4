"""The wheel: what it holds, and that the CLIs run from it without the checkout.

Built from a copy of the working tree (no stale build/ of the checkout can
leak into it), installed non-editably with `pip install --target`, and run
from a folder outside the repository with only that folder on PYTHONPATH, so
neither the editable install of .venv nor the repository root (train.py,
export/, bench/) can stand in for a file the wheel lacks.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from bs_keras.macs import count_macs
from bs_keras.models import cifar_resnet

pytestmark = pytest.mark.slow  # builds a wheel, two TensorFlow subprocesses: ~25 s

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache")


def _pip(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    _pip("wheel", ".", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", str(tmp / "dist"), cwd=src)
    (path,) = (tmp / "dist").glob("bs_keras-*.whl")
    return path


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--no-cache-dir", "--target", str(target), str(wheel), cwd=target)
    return target


def test_wheel_holds_the_package_and_its_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(entry_points).decode()
    for sub in ("deploy", "cli"):
        expected = {f"bs_keras/{sub}/{p.name}" for p in (ROOT / "bs_keras" / sub).glob("*.py")}
        assert len(expected) >= 3 and expected <= names, sorted(expected - names)
    assert {f"bs_keras/{p.name}" for p in (ROOT / "bs_keras").glob("*.py")} <= names
    top = {n.split("/")[0] for n in names}
    assert top == {"bs_keras", next(t for t in top if t.endswith(".dist-info"))}, top  # no export/, tests/, bench/
    assert not [n for n in names if n.split("/")[0] in ("export", "tests", "bench") or n == "train.py"]
    assert "bs-keras-train = bs_keras.cli.train:main" in entry_points
    assert "bs-keras-export = bs_keras.cli.export:main" in entry_points


def _run(args, site, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3")  # Fashion-MNIST dir: conftest
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_installed_wheel_prunes_trains_and_exports(site, tmp_path):
    work = tmp_path / "work"  # outside the repository: `import bs_keras` cannot find the checkout
    work.mkdir()
    result = _run([sys.executable, "-c", "import bs_keras, bs_keras.deploy.prune; print(bs_keras.__file__)"],
                  site, work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert pathlib.Path(result.stdout.strip()).is_relative_to(site), result.stdout

    # A plain source model for the fashion_mnist input (28x28x1).
    source = cifar_resnet(20, num_classes=10, input_shape=(28, 28, 1), gated=False, width_multiplier=0.25, seed=0)
    source.save(work / "plain.keras")
    run_dir = work / "pruned"
    result = _run([sys.executable, "-m", "bs_keras.cli.train", "--plain", "--model", "resnet20",
                   "--width-multiplier", "0.25", "--prune-from", "plain.keras", "--prune-macs", "0.5",
                   "--epochs", "1", "--batch-size", "32", "--limit-train", "128", "--limit-eval", "64",
                   "--seed", "0", "--run-dir", str(run_dir)], site, work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pruned = keras.saving.load_model(run_dir / "last.keras")
    assert count_macs(pruned) / count_macs(source) == pytest.approx(0.5, abs=0.06)
    report = json.loads((run_dir / "report.json").read_text())["evaluation"]
    assert report["num_samples"] == 64 and not report["gated"]

    # The console script of the wheel exports the pruned model.
    out = work / "export"
    result = _run([str(site / "bin" / "bs-keras-export"), str(run_dir / "last.keras"), "--out", str(out),
                   "--latency-runs", "0"], site, work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    assert rows["saved_model"]["max_abs_diff"] < 1e-5
    loaded = tf.saved_model.load(str(out / "saved_model"))
    images = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype("float32")
    (got,) = loaded.signatures["serving_default"](images=tf.constant(images)).values()
    np.testing.assert_allclose(got.numpy(), np.asarray(pruned(images, training=False)), atol=1e-5)
