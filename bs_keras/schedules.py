"""Loss-weight schedules: small serializable objects, `schedule(t) -> float`.

`t` is in the schedule's `unit`: fractional epochs (`"epoch"`, e.g. 2.5 is
half-way through the third epoch) or optimizer steps (`"step"`). The
callback `GateLossScheduler` evaluates them and assigns the result.
"""

import math

import keras

UNITS = ("epoch", "step")


class Schedule:
    """Base class: `__call__(t) -> float`, `get_config`, `from_config`."""

    unit = "epoch"

    def __call__(self, t):
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def check_unit(unit):
    """`unit` if it is "epoch" or "step", else ValueError."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}. Received: unit={unit!r}")
    return unit


def check_value(name, value):
    """`value` as a float if finite and >= 0, else ValueError naming `name`."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0. Received: {name}={value}")
    return value


@keras.saving.register_keras_serializable(package="bs_keras")
class Constant(Schedule):
    """A constant value.

    Args:
        value: the value, >= 0.
        unit: "epoch" or "step" (irrelevant for a constant).
    """

    def __init__(self, value, unit="epoch"):
        self.value = check_value("value", value)
        self.unit = check_unit(unit)

    def __call__(self, t):
        return self.value

    def get_config(self):
        return {"value": self.value, "unit": self.unit}


@keras.saving.register_keras_serializable(package="bs_keras")
class Linear(Schedule):
    """Piecewise linear: `start_value` until `begin`, `end_value` from `end`.

    Args:
        start_value: value before `begin`, >= 0.
        end_value: value after `end`, >= 0.
        begin: where the linear part begins (in `unit`), >= 0.
        end: where it ends, >= `begin`.
        unit: "epoch" (fractional epochs) or "step".
    """

    def __init__(self, start_value, end_value, begin, end, unit="epoch"):
        self.start_value = check_value("start_value", start_value)
        self.end_value = check_value("end_value", end_value)
        self.begin = check_value("begin", begin)
        self.end = check_value("end", end)
        if self.end < self.begin:
            raise ValueError(f"end must be >= begin. Received: begin={begin}, end={end}")
        self.unit = check_unit(unit)

    def __call__(self, t):
        if t <= self.begin:
            return self.start_value
        if t >= self.end:
            return self.end_value
        frac = (t - self.begin) / (self.end - self.begin)
        return self.start_value + frac * (self.end_value - self.start_value)

    def get_config(self):
        return {
            "start_value": self.start_value,
            "end_value": self.end_value,
            "begin": self.begin,
            "end": self.end,
            "unit": self.unit,
        }


def paper_schedules(epochs, gamma=0.75, lam=0.0, gamma_end=0.2, lam_begin=0.2, lam_end=0.6):
    """The paper's CIFAR-10 schedules scaled to `epochs`.

    With 500 epochs: gamma anneals linearly from `gamma` to 0 by epoch 100;
    lambda ramps from 0 at epoch 100 to `lam` at epoch 300. The fractions of
    the run are arguments.

    Returns:
        `(gamma_schedule, lam_schedule)`.
    """
    if not epochs > 0:
        raise ValueError(f"epochs must be positive. Received: epochs={epochs}")
    if not 0 <= lam_begin <= lam_end <= 1 or not 0 <= gamma_end <= 1:
        raise ValueError(
            "Schedule fractions must satisfy 0 <= lam_begin <= lam_end <= 1 and "
            f"0 <= gamma_end <= 1. Received: gamma_end={gamma_end}, "
            f"lam_begin={lam_begin}, lam_end={lam_end}"
        )
    return (
        Linear(gamma, 0.0, 0.0, gamma_end * epochs),
        Linear(0.0, lam, lam_begin * epochs, lam_end * epochs),
    )


def get(identifier):
    """A schedule from a schedule, a number, or a serialized config."""
    if isinstance(identifier, Schedule):
        return identifier
    if isinstance(identifier, (int, float)) and not isinstance(identifier, bool):
        return Constant(identifier)
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Schedule):
            return obj
        raise ValueError(
            f"The serialized object is a {type(obj).__name__}, not a Schedule. "
            f"Received: {identifier!r}"
        )
    raise ValueError(
        "Expected a Schedule, a number or a serialized schedule. "
        f"Received: {identifier!r}"
    )
