"""Learning-rate schedules of the recipes, with a linear warm-up for each.

`learning_rate(schedule, lr, total_steps, ...)` builds the Keras
`LearningRateSchedule` a recipe names. Cosine uses Keras' own warm-up
(`CosineDecay(warmup_target=..., warmup_steps=...)`: 0 -> lr over the
warm-up, then the cosine over the remaining steps); the others are wrapped
in `WarmUp`, which ramps linearly to the schedule's value at the end of the
warm-up and leaves the schedule untouched after it (step drops stay at their
fractions of the run).

Why: lr 0.1 breaks CIFAR-style ResNet-56 and ResNet-110 in their first steps
(He et al., 2016, warm ResNet-110 up at 0.01); measured figures in
docs/RESULTS.md.
"""

import keras

SCHEDULES = ("step", "cosine", "constant", "poly")


@keras.saving.register_keras_serializable(package="bs_keras")
class WarmUp(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up in front of another schedule.

    `lr(step) = schedule(warmup_steps) * step / warmup_steps` for
    `step < warmup_steps`, then `schedule(step)`.

    Args:
        schedule: a `LearningRateSchedule` or a number (a constant rate).
        warmup_steps: optimizer steps of the warm-up, >= 1.

    Example:

    ```python
    drops = keras.optimizers.schedules.PiecewiseConstantDecay([1000, 1500], [0.1, 0.01, 0.001])
    optimizer = keras.optimizers.SGD(WarmUp(drops, warmup_steps=40), momentum=0.9)
    ```
    """

    def __init__(self, schedule, warmup_steps):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            schedule = float(schedule)
            if not schedule > 0:
                raise ValueError(f"schedule must be a LearningRateSchedule or a rate > 0. Received: {schedule}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive integer. Received: warmup_steps={warmup_steps}")
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)

    def _inner(self, step):
        if isinstance(self.schedule, float):
            return keras.ops.convert_to_tensor(self.schedule, "float32")
        return keras.ops.cast(self.schedule(step), "float32")

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = float(self.warmup_steps)
        ramp = self._inner(keras.ops.convert_to_tensor(warm)) * step / warm
        return keras.ops.where(step < warm, ramp, self._inner(step))

    def get_config(self):
        inner = self.schedule
        if not isinstance(inner, float):
            inner = keras.optimizers.schedules.serialize(inner)
        return {"schedule": inner, "warmup_steps": self.warmup_steps}


def learning_rate(schedule, lr, total_steps, warmup_steps=0, decay_at=(0.5, 0.75), decay_factor=0.1):
    """The learning rate (a schedule, or a number for "constant" without warm-up).

    Args:
        schedule: "step" (`lr * decay_factor**k` after the k-th fraction of
            `decay_at`), "cosine" (to 0), "poly" (power 0.9, to 0) or
            "constant".
        lr: the peak rate.
        total_steps: optimizer steps of the whole run.
        warmup_steps: linear warm-up from 0 over these first steps (0: none).
        decay_at, decay_factor: the step schedule's drops.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}. Received: schedule={schedule!r}")
    total = max(1, int(total_steps))
    warmup = int(warmup_steps)
    if schedule == "cosine":
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, max(1, total - warmup), warmup_target=lr, warmup_steps=warmup
            )
        return keras.optimizers.schedules.CosineDecay(lr, total)
    if schedule == "constant":
        base = lr
    elif schedule == "step":
        bounds = sorted({max(1, int(round(f * total))) for f in decay_at if 0 < f < 1})
        values = [lr * decay_factor**i for i in range(len(bounds) + 1)]
        base = keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    else:
        base = keras.optimizers.schedules.PolynomialDecay(lr, total, 0.0, power=0.9)
    return WarmUp(base, warmup) if warmup else base
