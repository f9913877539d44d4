"""Loss-weight schedules: values against hand formulas, config, validation."""

import math

import keras
import numpy as np
import pytest

import bs_keras
from bs_keras import schedules
from bs_keras.schedules import Constant, Linear, paper_schedules


def hand_linear(t, v0, v1, t0, t1):
    if t <= t0:
        return v0
    if t >= t1:
        return v1
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


# --------------------------------------------------------------------------
# Constant
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, 0.2, 3, 1e6])
def test_constant_value_everywhere(value):
    s = Constant(value)
    for t in (0, 0.5, 1, 99.9, 1e9):
        assert s(t) == float(value)
        assert isinstance(s(t), float)
    assert s.unit == "epoch"
    assert Constant(value, unit="step").unit == "step"


def test_constant_exported_at_top_level():
    assert bs_keras.Constant is Constant and bs_keras.Linear is Linear
    assert bs_keras.paper_schedules is paper_schedules


# --------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------

LINEAR_CASES = [
    (0.75, 0.0, 0.0, 100.0),  # decreasing from 0
    (0.0, 0.2, 100.0, 300.0),  # increasing, later start
    (1.0, 3.0, 2.5, 4.0),  # fractional epochs
    (0.5, 0.5, 1.0, 2.0),  # flat
]


@pytest.mark.parametrize("v0,v1,t0,t1", LINEAR_CASES)
def test_linear_before_at_between_after(v0, v1, t0, t1):
    s = Linear(v0, v1, t0, t1)
    ts = [0.0, t0 - 1.0, t0, t0 + 0.25 * (t1 - t0), (t0 + t1) / 2, t0 + 0.9 * (t1 - t0), t1, t1 + 1, 1e7]
    for t in ts:
        if t < 0:
            continue
        assert s(t) == pytest.approx(hand_linear(t, v0, v1, t0, t1), rel=1e-12, abs=1e-15), t


def test_linear_hand_values():
    s = Linear(start_value=2.0, end_value=0.0, begin=10, end=20)
    assert s(0) == 2.0
    assert s(10) == 2.0
    assert s(12.5) == pytest.approx(1.5)
    assert s(15) == pytest.approx(1.0)
    assert s(19) == pytest.approx(0.2)
    assert s(20) == 0.0
    assert s(1000) == 0.0
    up = Linear(0.0, 4.0, 1, 3, unit="step")
    assert up.unit == "step"
    assert [up(t) for t in (0, 1, 1.5, 2, 2.5, 3, 4)] == pytest.approx([0, 0, 1, 2, 3, 4, 4])


def test_linear_begin_equals_end_is_a_step():
    s = Linear(1.0, 5.0, 3.0, 3.0)
    assert s(2.999) == 1.0
    assert s(3.001) == 5.0
    assert s(100) == 5.0


def test_linear_is_monotone_between_ends():
    s = Linear(0.75, 0.0, 0.0, 100.0)
    vals = np.array([s(t) for t in np.linspace(0, 120, 241)])
    assert np.all(np.diff(vals) <= 0)
    assert vals.max() == 0.75 and vals.min() == 0.0


# --------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------

SCHEDULES = [
    Constant(0.3),
    Constant(2.0, unit="step"),
    Linear(0.75, 0.0, 0.0, 100.0),
    Linear(0.0, 0.2, 100.0, 300.0, unit="step"),
]


PROBE_POINTS = [0.0, 1.0, 50.0, 99.0, 100.0, 150.0, 200.0, 300.0, 1000.0]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_config_round_trip(s):
    config = s.get_config()
    clone = type(s).from_config(config)
    assert type(clone) is type(s)
    assert clone.get_config() == config
    assert clone.unit == s.unit
    assert [clone(t) for t in PROBE_POINTS] == [s(t) for t in PROBE_POINTS]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_keras_serialization_round_trip(s):
    serialized = keras.saving.serialize_keras_object(s)
    assert isinstance(serialized, dict)
    restored = keras.saving.deserialize_keras_object(serialized)  # no custom_objects
    assert type(restored) is type(s)
    assert restored.get_config() == s.get_config()
    assert [restored(t) for t in PROBE_POINTS] == [s(t) for t in PROBE_POINTS]


def test_config_contents():
    assert Linear(1, 2, 3, 4, unit="step").get_config() == {
        "start_value": 1.0,
        "end_value": 2.0,
        "begin": 3.0,
        "end": 4.0,
        "unit": "step",
    }
    assert Constant(0.5).get_config() == {"value": 0.5, "unit": "epoch"}


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(start_value=-0.1, end_value=0, begin=0, end=1), "start_value"),
        (dict(start_value=0, end_value=-1, begin=0, end=1), "end_value"),
        (dict(start_value=0, end_value=1, begin=-1, end=1), "begin"),
        (dict(start_value=0, end_value=1, begin=0, end=-1), "end"),
        (dict(start_value=0, end_value=1, begin=5, end=4), "end must be >= begin"),
        (dict(start_value=math.nan, end_value=1, begin=0, end=1), "start_value"),
        (dict(start_value=0, end_value=math.inf, begin=0, end=1), "end_value"),
        (dict(start_value=0, end_value=1, begin=math.nan, end=1), "begin"),
        (dict(start_value=0, end_value=1, begin=0, end=math.nan), "end"),
        (dict(start_value=0, end_value=1, begin=0, end=1, unit="epochs"), "unit"),
        (dict(start_value=0, end_value=1, begin=0, end=1, unit="batch"), "unit"),
    ],
)
def test_linear_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Linear(**kwargs)


@pytest.mark.parametrize(
    "args,match",
    [((-1.0,), "value"), ((math.nan,), "value"), ((math.inf,), "value"), ((1.0, "minute"), "unit")],
)
def test_constant_validation(args, match):
    with pytest.raises(ValueError, match=match):
        Constant(*args)


# --------------------------------------------------------------------------
# paper_schedules
# --------------------------------------------------------------------------


def test_paper_schedules_500_epochs():
    gamma, lam = paper_schedules(500, gamma=0.75, lam=0.2)
    # gamma: 0.75 -> 0 linearly over the first 100 epochs (20 %).
    assert gamma(0) == 0.75
    assert gamma(25) == pytest.approx(0.5625)
    assert gamma(50) == pytest.approx(0.375)
    assert gamma(100) == 0.0
    assert gamma(101) == 0.0
    assert gamma(499) == 0.0
    # lambda: 0 until epoch 100, linear to 0.2 at epoch 300 (20 % -> 60 %).
    for t in (0, 50, 99.9, 100):
        assert lam(t) == 0.0
    assert lam(150) == pytest.approx(0.05)
    assert lam(200) == pytest.approx(0.1)
    assert lam(250) == pytest.approx(0.15)
    assert lam(300) == pytest.approx(0.2)
    assert lam(400) == pytest.approx(0.2)
    assert lam(500) == pytest.approx(0.2)
    assert gamma.unit == lam.unit == "epoch"


@pytest.mark.parametrize("epochs", [50, 10, 1, 7.5])
def test_paper_schedules_scale_with_run_length(epochs):
    g500, l500 = paper_schedules(500, gamma=0.75, lam=0.2)
    g, l = paper_schedules(epochs, gamma=0.75, lam=0.2)
    scale = epochs / 500
    for t in (0, 10, 50, 75, 100, 150, 200, 250, 300, 450, 500):
        assert g(t * scale) == pytest.approx(g500(t), abs=1e-12), t
        assert l(t * scale) == pytest.approx(l500(t), abs=1e-12), t


def test_paper_schedules_default_lam_is_zero_and_fractions_are_arguments():
    gamma, lam = paper_schedules(100)
    assert gamma(0) == 0.75 and gamma(10) == pytest.approx(0.375) and gamma(20) == 0.0
    assert all(lam(t) == 0.0 for t in (0, 30, 60, 100))
    gamma, lam = paper_schedules(100, gamma=1.0, lam=1.0, gamma_end=0.5, lam_begin=0.1, lam_end=0.3)
    assert gamma(25) == pytest.approx(0.5) and gamma(50) == 0.0
    assert lam(10) == 0.0 and lam(20) == pytest.approx(0.5) and lam(30) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(epochs=0),
        dict(epochs=-5),
        dict(epochs=math.nan),
        dict(epochs=10, lam_begin=0.7, lam_end=0.6),
        dict(epochs=10, lam_end=1.5),
        dict(epochs=10, lam_begin=-0.1),
        dict(epochs=10, gamma_end=1.2),
        dict(epochs=10, gamma=-1.0),
        dict(epochs=10, lam=-0.1),
    ],
)
def test_paper_schedules_validation(kwargs):
    with pytest.raises(ValueError):
        paper_schedules(**kwargs)


# --------------------------------------------------------------------------
# get
# --------------------------------------------------------------------------


def test_get_number_gives_constant():
    for v in (0, 2, 0.25):
        s = schedules.get(v)
        assert isinstance(s, Constant)
        assert s(0) == s(1e5) == float(v)


def test_get_schedule_is_identity():
    s = Linear(1, 0, 0, 5)
    assert schedules.get(s) is s


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_get_serialized_dict(s):
    restored = schedules.get(keras.saving.serialize_keras_object(s))
    assert type(restored) is type(s)
    assert restored.get_config() == s.get_config()


@pytest.mark.parametrize("junk", ["linear", None, [0.1, 0.2], object()])
def test_get_junk_raises(junk):
    with pytest.raises(ValueError, match="Schedule"):
        schedules.get(junk)


def test_get_serialized_non_schedule_raises():
    # A dict that deserializes to something else (here a Dense layer) is not a
    # schedule; returning it would only fail later, when it is called with t.
    serialized = keras.saving.serialize_keras_object(keras.layers.Dense(3))
    with pytest.raises((ValueError, TypeError)):
        schedules.get(serialized)


def test_get_negative_number_raises():
    with pytest.raises(ValueError):
        schedules.get(-1.0)
