"""Distributed training: gate losses across replicas, multi-worker `train.py`.

TensorFlow's logical devices must be configured before it initialises, and a
multi-worker cluster needs one process per worker, so everything distributed
runs in subprocesses (scripts in tests/dist_scripts/). All on CPU.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from bs_keras import recipes, training

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "dist_scripts"
RTOL = 1e-5


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _tail(text, n=3000):
    return text[-n:] if text else ""


# ------------------------------------------------- gate losses, 2 replicas


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    """Runs tests/dist_scripts/mirrored_gate_losses.py once (see its docstring).

    One subprocess: a `ChannelGate`-only model on one device and under
    `MirroredStrategy` over two logical CPUs, same weights, same global
    batch of 16; batch-shaping-only ("bs") and L0-only ("l0") gates.
    """
    out = tmp_path_factory.mktemp("mirrored") / "results.npz"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "mirrored_gate_losses.py"), str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        return result.stdout + result.stderr
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def _results(mirrored_run):
    # Called in the tests, so that a failing script fails them (not a setup error).
    if isinstance(mirrored_run, str):
        pytest.fail("the 2-replica gate-loss script failed:\n" + _tail(mirrored_run), pytrace=False)
    return mirrored_run


def _grads(results, name, kind, prefix="grad"):
    n = int(results[f"{name}/num_weights"])
    return [results[f"{name}/{kind}/{prefix}_{i}"] for i in range(n)]


def _assert_same(actual, expected, what):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = float(np.abs(e).max())
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=RTOL * scale, err_msg=f"{what}, weight {i}")


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_batch_shaping_under_mirrored_strategy_uses_the_global_batch(mirrored_run):
    r = _results(mirrored_run)
    # The test has teeth: batch-shaping on the global batch of 16 differs
    # clearly from the mean of the two replicas' own 8-sample values.
    assert r["bs/bs_global"] > 0
    assert abs(r["bs/bs_halves"] - r["bs/bs_global"]) > 0.5 * r["bs/bs_global"]
    # Each replica computed batch-shaping on the all-gathered global batch
    # (the gate's statistics hold the mean of the replicas' values).
    assert float(r["bs/mirrored/stats_bs"]) == pytest.approx(float(r["bs/bs_global"]), rel=RTOL)
    # The single-device loss is exactly the batch-shaping term.
    assert float(r["bs/single/loss"]) == pytest.approx(float(r["bs/bs_global"]), rel=RTOL)
    # Keras differentiates each replica's `compute_loss` and SUMs the
    # replicas' gradients: that sum must be the single-device gradient.
    _assert_same(_grads(r, "bs", "mirrored"), _grads(r, "bs", "single"),
                 "batch-shaping gradient, sum over 2 replicas vs one device")
    # And one real `fit` step (SGD, lr=1) moves the weights the same way.
    _assert_same(_grads(r, "bs", "mirrored", "fit_delta"), _grads(r, "bs", "single", "fit_delta"),
                 "weight change of one fit step with batch-shaping, 2 replicas vs one device")


def test_l0_loss_under_mirrored_strategy_is_scaled_to_the_global_value(mirrored_run):
    r = _results(mirrored_run)
    assert float(r["l0/single/loss"]) == pytest.approx(float(r["bs/l0_global"]), rel=RTOL)
    _assert_same(_grads(r, "l0", "mirrored"), _grads(r, "l0", "single"),
                 "L0 gradient, sum over 2 replicas vs one device")
    _assert_same(_grads(r, "l0", "mirrored", "fit_delta"), _grads(r, "l0", "single", "fit_delta"),
                 "weight change of one fit step with L0, 2 replicas vs one device")


@pytest.mark.xfail(
    strict=True,
    reason="Keras keeps a layer's add_loss() list shared by the replica threads of "
    "MirroredStrategy; the gate's all_gather pauses replica 0 mid-forward, so replica 1's "
    "loss also sums replica 0's gate losses. Gradients are right (tapes are per thread); "
    "the logged training loss is not.",
)
@pytest.mark.parametrize("name", ["bs", "l0"])
def test_logged_training_loss_under_mirrored_strategy_matches_one_device(mirrored_run, name):
    r = _results(mirrored_run)
    single = float(r[f"{name}/single/fit_loss"])
    assert float(r[f"{name}/mirrored/fit_loss"]) == pytest.approx(single, rel=RTOL)


# -------------------------------------------------------------- multi-worker


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_folder(root, classes=3, per_class=32, size=16, seed=0):
    """One subfolder of PNGs per class; class c has a saturated channel c."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            image[..., c] = 255
            PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def _recipe():
    return recipes.default_recipe_for("fashion_mnist").replace(
        model="resnet20", width_multiplier=0.25, epochs=1, batch_size=16
    ).validate()


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_mac_budget_under_mirrored_strategy_measures_the_global_batch(tmp_path):
    """tests/dist_scripts/mirrored_budget.py: the ratio MacBudget follows is
    the global batch's (mean of the replicas'), as on one device."""
    out = tmp_path / "budget.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "mirrored_budget.py"), str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, _tail(result.stdout + result.stderr)
    data = json.loads(out.read_text())
    one, two, halves = data["one_device"], data["mirrored"], data["halves"]
    assert two == pytest.approx(one, rel=RTOL)  # (hard_macs_ratio, multiplier)
    assert one[0] == pytest.approx(sum(halves) / 2, rel=RTOL)
    assert min(abs(one[0] - h) for h in halves) > 1e-3  # one replica's half would differ
    assert one[1] == pytest.approx(one[0] - 0.2, rel=RTOL)  # gain 0, rate 1: one step of the excess


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_distiller_under_mirrored_strategy_steps_like_one_device(tmp_path):
    """tests/dist_scripts/mirrored_distill.py: after one step, the weights of
    a 2-replica Distiller equal the single-device ones, in every teacher mode."""
    out = tmp_path / "distill.npz"
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "mirrored_distill.py"), str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, _tail(result.stdout + result.stderr)
    data = np.load(out)
    for mode in ("self", "sandwich", "external"):
        count = len([k for k in data.files if k.startswith(f"one_{mode}_")])
        assert count > 10
        moved = 0
        for i in range(count):
            one, two = data[f"one_{mode}_{i}"], data[f"two_{mode}_{i}"]
            np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6, err_msg=f"{mode} weight {i}")
            moved += not np.allclose(one, data[f"start_{mode}_{i}"])
        assert moved == count // 2, mode  # all but the gates' 9 (frozen by the hard gates)


def test_chief_accepts_a_run_dir_holding_worker_subdirs(tmp_path):
    # The workers of a multi-worker run start together; a non-chief worker
    # may create <run>/worker-1/ before the chief creates <run>/config.json.
    run = tmp_path / "run"
    recipe = _recipe()
    runtime = {"strategy": "multi_worker", "replicas": 2}
    assert training.prepare_run_dir(str(run / "worker-1"), recipe, runtime) is None
    assert training.prepare_run_dir(str(run), recipe, runtime) is None
    assert (run / "config.json").exists()
    assert (run / "worker-1" / "config.json").exists()


@pytest.mark.heavy  # whole-program run, >= ~30 s: make test-all / CI only
@pytest.mark.slow  # 30-55 s on 2 busy CPU cores: two TensorFlow processes training
def test_multi_worker_train_py_on_two_local_workers(tmp_path):
    data = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    args = [
        "--strategy", "multi_worker", "--dataset", str(data), "--image-size", "16",
        "--model", "resnet20", "--width-multiplier", "0.25", "--epochs", "1",
        "--batch-size", "16", "--limit-train", "64", "--limit-eval", "32",
        "--validation-split", "0.25", "--run-dir", str(run), "--seed", "0",
    ]  # fmt: skip
    procs, logs = [], []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        # Worker 1 waits for the chief's config.json before creating its
        # run directory: see test_chief_accepts_a_run_dir_holding_worker_subdirs.
        wait = str(run / "config.json") if index else ""
        log = open(tmp_path / f"worker-{index}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPTS / "train_child.py"), *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=_env(TF_CONFIG=json.dumps(tf_config), BS_KERAS_TEST_WAIT_FOR=wait),
        ))  # fmt: skip
    codes = []
    try:
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=180))
            except subprocess.TimeoutExpired:
                codes.append("timeout")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(
        f"--- worker {i} (exit {c}):\n{_tail(o)}" for i, (c, o) in enumerate(zip(codes, outputs))
    )

    assert (run / "report.json").exists()
    assert (run / "last.keras").exists()
    assert (run / "worker-1" / "last.keras").exists()
    assert not (run / "worker-1" / "report.json").exists()  # only the chief reports
    with open(run / "config.json") as f:
        assert json.load(f)["runtime"]["replicas"] == 2

    chief = keras.models.load_model(run / "last.keras")
    other = keras.models.load_model(run / "worker-1" / "last.keras")
    assert [w.path for w in chief.weights] == [w.path for w in other.weights]
    # Synchronous training: every trainable weight (and the gate-loss
    # weights, seeds, ...) is the same on both workers, bit for bit.
    # Keras 3 BatchNormalization keeps its moving statistics per replica
    # (aggregation "none": each worker averages its own shard's batches), so
    # those legitimately differ between the workers.
    moving = ("moving_mean", "moving_variance")
    same = [w.path for w in chief.weights if not w.path.endswith(moving)]
    assert len(same) > len(chief.weights) // 2
    for a, b in zip(chief.weights, other.weights):
        if a.path in same:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
        else:
            assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))
