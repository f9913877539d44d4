"""fashion_mnist_levels (bs_keras.data.levels): levels recorded, balanced and
deterministic; the corruption checked against the clipped-normal formula;
the eval order and its levels aligned; the report's per-level numbers and
bench/difficulty.py checked against NumPy/SciPy on hand-made runs."""

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

import difficulty
from bs_keras import data as data_lib
from bs_keras.data import levels as levels_data
from bs_keras.models import cifar_resnet
from bs_keras.report import evaluate_model, per_level_table


def test_levels_are_balanced_fixed_and_per_split():
    a = levels_data.assign_levels(10_001, "test")
    assert a.dtype == np.int32 and set(np.unique(a)) == {0, 1, 2, 3}
    counts = np.bincount(a, minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10_001
    np.testing.assert_array_equal(a, levels_data.assign_levels(10_001, "test"))
    # Not the identity pattern, and its own permutation per split and seed.
    assert not np.array_equal(a, np.arange(10_001) % 4)
    assert np.mean(a != levels_data.assign_levels(10_001, "train")) > 0.5
    assert np.mean(a != levels_data.assign_levels(10_001, "test", seed=1)) > 0.5
    with pytest.raises(ValueError, match="split must be one of"):
        levels_data.assign_levels(10, "validation")


def _clipped_normal_std(mu, sigma, lo=0.0, hi=255.0):
    """Std of clip(mu + sigma Z, lo, hi), by quadrature (independent of the code)."""
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    mass_lo, mass_hi = stats.norm.cdf(a), stats.norm.sf(b)

    def moment(k):
        inside = integrate.quad(lambda z: (mu + sigma * z) ** k * stats.norm.pdf(z), a, b)[0]
        return inside + mass_lo * lo**k + mass_hi * hi**k

    m1, m2 = moment(1), moment(2)
    return math.sqrt(m2 - m1 * m1)


def test_corruption_has_the_level_sigmas_and_leaves_level_0_alone():
    n = 2_000
    images = np.full((n, 28, 28), 128, np.uint8)
    levels = np.arange(n) % 4
    out = levels_data.corrupt(images, levels, "train")
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out[levels == 0], images[levels == 0])
    stds = []
    for level in (1, 2, 3):
        pixels = out[levels == level].astype(np.float64)
        sigma = levels_data.NOISE_SIGMAS[level]
        expected = math.sqrt(_clipped_normal_std(128.0, sigma) ** 2 + 1 / 12)  # + rounding
        assert pixels.std() == pytest.approx(expected, rel=0.01), level
        stds.append(pixels.std())
    assert stds[0] < stds[1] < stds[2]
    # Deterministic, index-bound noise: the same call gives the same bytes,
    # another seed other noise.
    np.testing.assert_array_equal(out, levels_data.corrupt(images, levels, "train"))
    assert np.mean(out != levels_data.corrupt(images, levels, "train", seed=7)) > 0.5
    assert np.mean(out != levels_data.corrupt(images, levels, "test")) > 0.5


def test_corruption_refuses_bad_arrays():
    images = np.zeros((4, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, H, W\); got float32"):
        levels_data.corrupt(images.astype(np.float32), np.zeros(4, int), "test")
    with pytest.raises(ValueError, match=r"levels must be 4 integers in \[0, 4\)"):
        levels_data.corrupt(images, np.zeros(3, int), "test")
    with pytest.raises(ValueError, match=r"got shape \(4,\), range 0..4"):
        levels_data.corrupt(images, np.array([0, 1, 2, 4]), "test")


def _eval_arrays(source, batch_size=64):
    xs, ys = [], []
    for x, y in source.eval(batch_size):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_eval_split_keeps_its_order_and_levels():
    """Against plain fashion_mnist on the same IDX files: the same labels in
    the same order, and the images equal exactly where the level is 0."""
    levels_source = data_lib.get_dataset("fashion_mnist_levels")
    clean_source = data_lib.get_dataset("fashion_mnist")
    levels = levels_source.info.eval_metadata["level"]
    x, y = _eval_arrays(levels_source)
    x_clean, y_clean = _eval_arrays(clean_source)
    assert len(levels) == len(y) == levels_source.info.eval_examples
    np.testing.assert_array_equal(levels, levels_data.assign_levels(len(y), "test"))
    np.testing.assert_array_equal(y, y_clean)
    same = np.all(x == x_clean, axis=(1, 2, 3))
    np.testing.assert_array_equal(same, levels == 0)
    # Stronger noise moves the normalized pixels further from the clean image.
    dist = [np.abs(x - x_clean)[levels == lv].mean() for lv in (1, 2, 3)]
    assert dist[0] < dist[1] < dist[2]
    # Built twice: the same bytes (nothing depends on the run's seed).
    x2, _ = _eval_arrays(data_lib.get_dataset("fashion_mnist_levels", seed=5))
    np.testing.assert_array_equal(x, x2)


def test_training_split_is_corrupted_too():
    source = data_lib.get_dataset("fashion_mnist_levels")
    clean = data_lib.get_dataset("fashion_mnist")
    a = next(iter(source.train(256, shuffle=False, augment=False)))[0].numpy()
    b = next(iter(clean.train(256, shuffle=False, augment=False)))[0].numpy()
    same = np.all(a == b, axis=(1, 2, 3))
    # The validation split is cut from the training images, so compare the
    # fraction: a quarter of the images are clean.
    assert 0.15 < same.mean() < 0.35


def test_report_breaks_accuracy_and_macs_down_by_level():
    """evaluate_model with a level array: per-level rows and Spearman(MACs,
    level) against NumPy and scipy.stats on the per-sample arrays."""
    model = cifar_resnet(8, num_classes=3, input_shape=(16, 16, 3), seed=0, gate_kwargs={"init_bias": 0.0})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 16, 16, 3)).astype("float32") * np.repeat([0.2, 1.0, 3.0], 32)[:, None, None, None]
    y = rng.integers(0, 3, size=96)
    levels = np.repeat([0, 1, 2], 32).astype(np.int32)
    ds = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    summary, per_sample = evaluate_model(model, ds, metadata={"level": levels})
    np.testing.assert_array_equal(per_sample["level"], levels)
    assert [r["level"] for r in summary["per_level"]] == [0, 1, 2]
    for row in summary["per_level"]:
        pick = levels == row["level"]
        assert row["count"] == 32
        assert row["accuracy"] == pytest.approx(np.mean(per_sample["correct"][pick]))
        assert row["macs_ratio"] == pytest.approx(per_sample["macs"][pick].mean() / summary["ungated_macs"])
        assert set(row["gate_categories"]) == {"always_on", "conditional", "always_off"}
    assert np.ptp(per_sample["macs"]) > 0  # the gates do vary: the correlation means something
    assert summary["spearman_macs_level"] == pytest.approx(stats.spearmanr(per_sample["macs"], levels).statistic)
    with pytest.raises(ValueError, match="has 10 values for the 96 evaluated examples"):
        evaluate_model(model, ds, metadata={"level": levels[:10]})
    with pytest.raises(ValueError, match="'level' must hold integers >= 0"):
        evaluate_model(model, ds, metadata={"level": levels.astype(np.float32)})


def _level_run(path, levels, macs, correct, gated=True):
    path.mkdir()
    ungated = 100.0
    n = len(levels)
    ev = {"ungated_macs": ungated, "gated": gated, "accuracy": float(np.mean(correct)),
          "gate_categories": {"always_on": 0.5, "conditional": 0.25, "always_off": 0.25},
          "per_level": [{"level": lv, "gate_categories": {"conditional": 0.1 * lv}} for lv in range(4)]}
    recipe = {"dataset": "fashion_mnist_levels", "gated": gated, "gamma": 0.75, "gate_granularity": "channel"}
    (path / "report.json").write_text(json.dumps({"recipe": recipe, "evaluation": ev}))
    np.savez(path / "per_sample.npz", macs=np.asarray(macs, float), level=np.asarray(levels, np.int32),
             correct=np.asarray(correct, bool), loss=np.linspace(0, 1, n), label=np.zeros(n, int),
             prediction=np.zeros(n, int))


def test_difficulty_report_against_numpy(tmp_path):
    rng = np.random.default_rng(1)
    levels = np.repeat(np.arange(4), 50)
    macs = 40 + 5 * levels + rng.normal(0, 4, 200)
    correct = rng.random(200) > 0.1 * levels
    _level_run(tmp_path / "bas_s0", levels, macs, correct)
    out = tmp_path / "out"
    text = difficulty.write_difficulty_report([str(tmp_path / "bas_s0")], str(out))
    data = json.loads((out / "difficulty.json").read_text())["runs"][0]
    assert data["spearman_macs_level"] == pytest.approx(stats.spearmanr(macs, levels).statistic)
    for row in data["levels"]:
        pick = levels == row["level"]
        assert row["macs_ratio"] == pytest.approx(macs[pick].mean() / 100.0)
        assert row["error"] == pytest.approx(1 - correct[pick].mean())
        assert row["conditional"] == pytest.approx(0.1 * row["level"])
    assert f"{macs[levels == 3].mean() / 100:.1%}" in text
    assert (out / "difficulty_levels.png").stat().st_size > 0


def test_difficulty_refuses_a_run_without_levels(tmp_path, capsys):
    run = tmp_path / "plain_s0"
    _level_run(run, [0, 1], [1.0, 1.0], [True, False], gated=False)
    np.savez(run / "per_sample.npz", macs=np.ones(2), correct=np.ones(2, bool), loss=np.ones(2))
    assert difficulty.main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "per_sample.npz has no difficulty 'level'" in err and "--dataset fashion_mnist_levels" in err
    assert not (tmp_path / "out" / "difficulty.md").exists()
