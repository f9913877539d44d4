"""Gate losses checked against NumPy/SciPy references written here.

Batch-shaping (Bejnordi et al., ICLR 2020, Eq. 2): for each channel, sort the
batch, compare the prior CDF at the sorted values with the empirical CDF
i / (N + 1), sum of squares / N, then mean over channels.
"""

import math

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from bs_keras import losses

PDF_LO, PDF_HI = 1e-3, 100.0


# --------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------


def ref_batch_shaping(x, a, b):
    x = np.asarray(x, np.float64)
    n, c = x.shape
    xs = np.sort(x, axis=0)
    ecdf = np.arange(1, n + 1)[:, None] / (n + 1.0)
    f = scipy.stats.beta(a, b).cdf(xs)
    per_channel = ((ecdf - f) ** 2).sum(axis=0) / n
    return per_channel.mean()


def ref_batch_shaping_grad(x, a, b):
    """d loss / d x at the original (unsorted) positions, pdf clipped."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    prior = scipy.stats.beta(a, b)
    grad = np.zeros_like(x)
    for j in range(c):
        order = np.argsort(x[:, j], kind="stable")
        xs = x[order, j]
        ecdf = np.arange(1, n + 1) / (n + 1.0)
        f = prior.cdf(xs)
        pdf = np.clip(prior.pdf(xs), PDF_LO, PDF_HI)
        grad[order, j] = 2.0 * (f - ecdf) * pdf / n / c
    return grad


def ref_l0(p, w=None):
    p = np.asarray(p, np.float64)
    if w is None:
        return p.mean()
    w = np.asarray(w, np.float64)
    return (p.mean(axis=0) * w).sum() / w.sum()


def distinct_uniform(rng, n, c):
    """(n, c) float32 in (0, 1), no ties within a column (sort order unique)."""
    out = np.empty((n, c), np.float32)
    for j in range(c):
        out[:, j] = rng.permutation(np.linspace(0.01, 0.99, n)) + rng.uniform(
            -0.004, 0.004, n
        )
    return out.astype(np.float32)


# --------------------------------------------------------------------------
# batch_shaping_loss: values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,c", [(1, 1), (2, 3), (7, 1), (16, 5), (64, 12)])
@pytest.mark.parametrize("a,b", [(0.6, 0.4), (2.0, 3.0), (0.5, 0.5), (1.0, 1.0), (4.0, 0.7)])
def test_batch_shaping_value_matches_scipy(n, c, a, b):
    rng = np.random.default_rng(1000 * n + c)
    x = rng.uniform(0.0, 1.0, (n, c)).astype(np.float32)
    got = float(losses.batch_shaping_loss(x, a, b))
    want = ref_batch_shaping(x, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_batch_shaping_default_prior_is_0_6_0_4():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(32, 4)).astype(np.float32)
    np.testing.assert_allclose(
        float(losses.batch_shaping_loss(x)), ref_batch_shaping(x, 0.6, 0.4), rtol=1e-5
    )
    # ...and differs from another prior, so the defaults matter.
    assert abs(ref_batch_shaping(x, 0.6, 0.4) - ref_batch_shaping(x, 0.4, 0.6)) > 1e-3


def test_batch_shaping_hand_value_single_sample():
    # N = 1, C = 1, Beta(1, 1) is uniform: F(x) = x, ecdf = 1/2.
    # loss = (1/2 - 0.2)^2 / 1 = 0.09
    np.testing.assert_allclose(float(losses.batch_shaping_loss([[0.2]], 1.0, 1.0)), 0.09, rtol=1e-6)


def test_batch_shaping_is_permutation_invariant_over_batch_not_channels():
    rng = np.random.default_rng(3)
    x = distinct_uniform(rng, 20, 3)
    base = float(losses.batch_shaping_loss(x))
    shuffled = x[rng.permutation(20)]
    np.testing.assert_allclose(float(losses.batch_shaping_loss(shuffled)), base, rtol=1e-6)
    # Channels are compared per column: a row-wise sort changes the value.
    mixed = np.sort(x, axis=1)
    np.testing.assert_allclose(
        float(losses.batch_shaping_loss(mixed)), ref_batch_shaping(mixed, 0.6, 0.4), rtol=1e-5
    )
    assert abs(ref_batch_shaping(mixed, 0.6, 0.4) - base) > 1e-4


def test_batch_shaping_float64_input_and_boundaries():
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.25]], np.float64)
    got = losses.batch_shaping_loss(x, 0.6, 0.4)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref_batch_shaping(x, 0.6, 0.4), rtol=1e-5)


# --------------------------------------------------------------------------
# batch_shaping_loss: gradient
# --------------------------------------------------------------------------


def _tf_grad(x, a, b):
    xv = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xv)
        loss = losses.batch_shaping_loss(xv, a, b)
    return tape.gradient(loss, xv).numpy()


@pytest.mark.parametrize("n,c", [(5, 1), (16, 4), (50, 3)])
@pytest.mark.parametrize("a,b", [(0.6, 0.4), (2.0, 3.0), (1.5, 0.8)])
def test_batch_shaping_gradient_matches_reference(n, c, a, b):
    rng = np.random.default_rng(7 * n + c)
    x = distinct_uniform(rng, n, c)
    got = _tf_grad(x, a, b)
    want = ref_batch_shaping_grad(x, a, b)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("a,b", [(0.6, 0.4), (2.0, 3.0)])
def test_batch_shaping_gradient_clipped_at_and_near_0_and_1(a, b):
    # Beta(0.6, 0.4): pdf is infinite at 0 and 1 -> clipped to 100.
    # Beta(2, 3): pdf is 0 at 0 (and 1) -> clipped up to 1e-3.
    near0, near1 = np.float32(1e-7), np.float32(1.0) - np.float32(1.2e-7)
    col0 = [0.0, 1.0, near0, near1, 0.3, 0.6, 0.45, 0.8]
    col1 = [1.0, 0.2, 0.0, 0.7, near1, near0, 0.9, 0.05]
    x = np.array([col0, col1], np.float32).T  # (8, 2), no ties in a column
    got = _tf_grad(x, a, b)
    assert np.all(np.isfinite(got))
    want = ref_batch_shaping_grad(x, a, b)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)

    # The clip is really in effect at the boundary entries.
    prior = scipy.stats.beta(a, b)
    raw = prior.pdf(x.astype(np.float64))
    if a < 1:
        assert np.isinf(raw[0, 0]) and raw[2, 0] > PDF_HI  # exact 0, 1e-7
    else:
        assert raw[0, 0] == 0.0 and raw[2, 0] < PDF_LO
    # Gradient magnitude at x = 0 is 2 |F - ecdf| * clip / N / C exactly.
    n, c = x.shape
    rank_of_zero = 1  # 0.0 is the smallest in column 0
    f0 = prior.cdf(0.0)
    clip_val = PDF_HI if a < 1 else PDF_LO
    expected = 2 * (f0 - rank_of_zero / (n + 1)) * clip_val / n / c
    np.testing.assert_allclose(got[0, 0], expected, rtol=1e-4)


def test_batch_shaping_gradient_with_ties_is_finite_and_sums_correctly():
    # Many exact zeros and ones: each tie group gets the sum of its ranks'
    # gradients regardless of how ties are broken.
    x = np.array([[0.0], [0.0], [0.0], [1.0], [1.0], [0.5]], np.float32)
    a, b = 0.6, 0.4
    got = _tf_grad(x, a, b)[:, 0]
    assert np.all(np.isfinite(got))
    n = 6
    prior = scipy.stats.beta(a, b)
    xs = np.sort(x[:, 0]).astype(np.float64)
    ecdf = np.arange(1, n + 1) / (n + 1)
    g_sorted = 2 * (prior.cdf(xs) - ecdf) * np.clip(prior.pdf(xs), PDF_LO, PDF_HI) / n
    np.testing.assert_allclose(got[:3].sum(), g_sorted[:3].sum(), rtol=1e-4)
    np.testing.assert_allclose(got[3:5].sum(), g_sorted[4:].sum(), rtol=1e-4)
    np.testing.assert_allclose(got[5], g_sorted[3], rtol=1e-4)


def test_batch_shaping_gradient_flows_through_sigmoid_in_tf_function():
    rng = np.random.default_rng(11)
    logits = tf.Variable(rng.normal(size=(12, 3)).astype(np.float32))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = losses.batch_shaping_loss(tf.sigmoid(logits), 0.6, 0.4)
        return tape.gradient(loss, logits)

    got = step().numpy()
    p = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    want = ref_batch_shaping_grad(p, 0.6, 0.4) * p * (1 - p)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)


# --------------------------------------------------------------------------
# batch_shaping_loss: bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_batch_shaping_rejects_wrong_rank(shape):
    x = np.full(shape, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"shape=\(" + ", ".join(map(str, shape))):
        losses.batch_shaping_loss(x)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_batch_shaping_rejects_non_float(dtype):
    with pytest.raises(TypeError, match="float"):
        losses.batch_shaping_loss(np.ones((4, 2), dtype))


@pytest.mark.parametrize("a,b", [(0.0, 0.4), (0.6, 0.0), (-1.0, 0.4), (0.6, -0.1)])
def test_batch_shaping_rejects_non_positive_prior(a, b):
    with pytest.raises(ValueError, match="positive"):
        losses.batch_shaping_loss(np.full((4, 2), 0.5, np.float32), a, b)
    with pytest.raises(ValueError, match="positive"):
        losses.BatchShapingLoss(a, b)


@pytest.mark.parametrize("a,b", [(math.nan, 0.4), (0.6, math.nan)])
def test_batch_shaping_rejects_nan_prior(a, b):
    # NaN is not a positive number; accepting it silently gives a NaN loss.
    with pytest.raises(ValueError, match="positive"):
        losses.batch_shaping_loss(np.full((4, 2), 0.5, np.float32), a, b)


# --------------------------------------------------------------------------
# l0_loss
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n,c", [(1, 1), (3, 5), (32, 7)])
def test_l0_unweighted_is_mean(n, c):
    rng = np.random.default_rng(n * c)
    p = rng.uniform(size=(n, c)).astype(np.float32)
    np.testing.assert_allclose(float(losses.l0_loss(p)), ref_l0(p), rtol=1e-6)


@pytest.mark.parametrize("n,c", [(1, 1), (3, 5), (32, 7)])
def test_l0_weighted_matches_reference(n, c):
    rng = np.random.default_rng(100 + n * c)
    p = rng.uniform(size=(n, c)).astype(np.float32)
    w = rng.uniform(0.1, 10.0, size=(c,)).astype(np.float32)
    np.testing.assert_allclose(float(losses.l0_loss(p, w)), ref_l0(p, w), rtol=1e-6)


def test_l0_weights_hand_example():
    # mean_n p = [0.5, 1.0, 0.0]; weights [1, 2, 7] -> (0.5 + 2) / 10
    p = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], np.float32)
    np.testing.assert_allclose(float(losses.l0_loss(p, [1.0, 2.0, 7.0])), 0.25, rtol=1e-7)
    # uniform weights reduce to the plain mean
    np.testing.assert_allclose(float(losses.l0_loss(p, [3.0, 3.0, 3.0])), p.mean(), rtol=1e-7)


@pytest.mark.parametrize("wshape", [(4,), (2,), (3, 1), (1, 3)])
def test_l0_rejects_wrong_weights_shape(wshape):
    p = np.full((5, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match="weights"):
        losses.l0_loss(p, np.ones(wshape, np.float32))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_l0_rejects_wrong_rank(shape):
    with pytest.raises(ValueError, match="shape"):
        losses.l0_loss(np.full(shape, 0.5, np.float32))


# --------------------------------------------------------------------------
# Loss classes
# --------------------------------------------------------------------------


def test_batch_shaping_class_equals_function():
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(24, 6)).astype(np.float32)
    obj = losses.BatchShapingLoss(prior_a=2.0, prior_b=0.5)
    assert isinstance(obj, keras.losses.Loss)
    got = float(obj(np.zeros_like(x), x))
    np.testing.assert_allclose(got, ref_batch_shaping(x, 2.0, 0.5), rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.BatchShapingLoss()(np.zeros_like(x), x)),
        ref_batch_shaping(x, 0.6, 0.4),
        rtol=1e-5,
    )


def test_l0_class_equals_function():
    rng = np.random.default_rng(6)
    p = rng.uniform(size=(10, 4)).astype(np.float32)
    w = [1.0, 5.0, 0.5, 2.0]
    assert isinstance(losses.L0Loss(), keras.losses.Loss)
    np.testing.assert_allclose(float(losses.L0Loss()(np.zeros_like(p), p)), ref_l0(p), rtol=1e-6)
    np.testing.assert_allclose(float(losses.L0Loss(w)(np.zeros_like(p), p)), ref_l0(p, w), rtol=1e-6)


def test_loss_classes_accept_and_fix_reduction():
    # A batch statistic has no per-sample values: the classes fix the Keras
    # reduction to "none" (also when one is passed, e.g. by an old config).
    rng = np.random.default_rng(8)
    x = rng.uniform(size=(9, 2)).astype(np.float32)
    for obj in (
        losses.BatchShapingLoss(reduction="sum_over_batch_size"),
        losses.L0Loss(reduction="sum"),
    ):
        assert obj.reduction == "none"
        assert "reduction" not in obj.get_config()
    obj = losses.BatchShapingLoss(reduction="sum")
    np.testing.assert_allclose(float(obj(x, x)), ref_batch_shaping(x, 0.6, 0.4), rtol=1e-5)


@pytest.mark.parametrize(
    "obj",
    [
        losses.BatchShapingLoss(prior_a=0.3, prior_b=2.5, name="bs_custom"),
        losses.L0Loss(weights=[1.0, 4.0, 2.0], name="l0_custom"),
        losses.L0Loss(),
    ],
    ids=["bs", "l0-weighted", "l0-plain"],
)
def test_loss_config_round_trip(obj):
    rng = np.random.default_rng(9)
    x = rng.uniform(size=(12, 3)).astype(np.float32)
    want = float(obj(x, x))

    config = obj.get_config()
    clone = type(obj).from_config(config)
    assert type(clone) is type(obj)
    assert clone.get_config() == config
    assert clone.name == obj.name
    np.testing.assert_allclose(float(clone(x, x)), want, rtol=1e-7)

    serialized = keras.saving.serialize_keras_object(obj)
    restored = keras.saving.deserialize_keras_object(serialized)  # no custom_objects
    assert type(restored) is type(obj)
    assert restored.get_config() == config
    np.testing.assert_allclose(float(restored(x, x)), want, rtol=1e-7)


def test_loss_config_values():
    cfg = losses.BatchShapingLoss(prior_a=0.3, prior_b=2.5).get_config()
    assert cfg["prior_a"] == 0.3 and cfg["prior_b"] == 2.5
    cfg = losses.L0Loss(weights=np.array([1, 4])).get_config()
    assert cfg["weights"] == [1.0, 4.0]
    assert losses.L0Loss().get_config()["weights"] is None


# --------------------------------------------------------------------------
# Optimisation behaviour
# --------------------------------------------------------------------------


def _ks_mean(probs, a=0.6, b=0.4):
    cdf = scipy.stats.beta(a, b).cdf
    return float(
        np.mean([scipy.stats.kstest(probs[:, j], cdf).statistic for j in range(probs.shape[1])])
    )


def _optimise(loss_fn, logits0, steps, lr):
    logits = tf.Variable(logits0)
    opt = keras.optimizers.Adam(learning_rate=lr)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.sigmoid(logits))
        opt.apply_gradients([(tape.gradient(loss, logits), logits)])
        return loss

    for _ in range(steps):
        step()
    return tf.sigmoid(logits).numpy()


def test_batch_shaping_alone_shapes_distribution_towards_prior():
    rng = np.random.default_rng(42)
    logits0 = rng.normal(2.0, 0.3, size=(256, 8)).astype(np.float32)
    p0 = 1 / (1 + np.exp(-logits0))
    ks0 = _ks_mean(p0)
    bs0 = ref_batch_shaping(p0, 0.6, 0.4)

    p1 = _optimise(lambda p: losses.batch_shaping_loss(p, 0.6, 0.4), logits0, 300, 0.1)
    ks1 = _ks_mean(p1)
    assert ks0 > 0.3  # starts far from the U-shaped prior
    assert ks1 < 0.5 * ks0, (ks0, ks1)
    assert ks1 < 0.1, ks1  # close to the prior, not just better
    assert ref_batch_shaping(p1, 0.6, 0.4) < 0.01 * bs0
    # U shape: the mass near each end matches Beta(0.6, 0.4):
    # P(x < 0.1) = 0.1297, P(x > 0.9) = 0.3049.
    prior = scipy.stats.beta(0.6, 0.4)
    assert abs(np.mean(p1 < 0.1) - prior.cdf(0.1)) < 0.03
    assert abs(np.mean(p1 > 0.9) - prior.sf(0.9)) < 0.03


def test_l0_alone_drives_open_probability_down():
    rng = np.random.default_rng(43)
    logits0 = rng.normal(2.0, 0.5, size=(64, 6)).astype(np.float32)
    p0 = 1 / (1 + np.exp(-logits0))
    p1 = _optimise(losses.l0_loss, logits0, 100, 0.1)
    assert p0.mean() > 0.8
    assert p1.mean() < 0.5 * p0.mean(), (p0.mean(), p1.mean())
    # every probability went down
    assert np.all(p1 < p0)
