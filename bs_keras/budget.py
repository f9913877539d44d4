"""Train to a compute budget: the L0 weight as a Lagrange multiplier.

With a fixed λ the MACs a gated network ends at depend on λ, the run length
and the data. `MacBudget(target=0.5)` takes λ's place in
`GateLossScheduler`: training then solves "minimise the task loss subject to
a mean conditional MAC ratio of `target`". After every training step the
callback measures the MAC ratio the batch would execute at inference (gates
with `logit > 0`, relative to the ungated network: the `macs_ratio` of
`report.json`), and a PI controller sets the L0 weight to
`gain * excess + multiplier`. The multiplier (the Lagrange multiplier, the
integral part) grows by `rate * excess` per step, falls `unwind` times
faster when under budget, and never goes below 0; the weight itself may turn
negative, which reopens gates after an undershoot.

The target is switched in like the paper's λ ramp: no L0 pressure before
`begin`, then a target falling linearly from 1 at `begin` to `target` at
`end` (the controller tracks it, so gates close gradually instead of all at
once), then constant.

Why this controller (measured on Fashion-MNIST, docs/RESULTS.md): the gates
answer late (their logits start at 3 and must cross 0 before the inference
ratio moves), so dual ascent alone winds up and overshoots (target 0.5 ended
at 0.28 or 0.70 depending on its rate); a penalty on the excess alone settles
off target by an amount that depends on the run, the problem a fixed λ has.
The proportional part reacts at once and backs off near the target, the
integral part removes the remaining offset, and `unwind` stops it from
closing gates once under budget. The ratio is measured with the inference
gates, not the sampled ones, because a gate open with probability 0.3 costs
0.3 in training but nothing at inference.

Keep the ramp (`begin < end`) with block gates (`group_size="all"`): an
abrupt target makes the large initial weight shut whole branches for whole
batches at once, whose zero-variance BatchNormalization can turn the loss
NaN (seen in a tiny test model; `global_clipnorm` also prevents it).

With `max_loss_ratio` the L0 term is kept in proportion to the task: the
weight is clipped so that `|weight| * L0 <= max_loss_ratio * task_loss`
(both running means of the epoch, passed by the callback), and the
multiplier stops growing at that bound (no wind-up behind it). Without it
the controller can push the L0 term to 50x the task loss in a short run
whose gates answer slowly, and the gradient of the task no longer counts.

The weight lives in the gates' `l0_coef` weights (λ times each gate's share),
so a checkpoint holds it and `GateLossScheduler` restores it on resume.

Example:

```python
gamma, _ = bs_keras.paper_schedules(epochs=30)
budget = bs_keras.MacBudget(target=0.5, begin=6, end=18)     # epochs
model.fit(..., epochs=30, callbacks=[bs_keras.GateLossScheduler(gamma, budget)])
```
"""

import math

import keras

from bs_keras import schedules

MEASURES = ("inference", "expected")


@keras.saving.register_keras_serializable(package="bs_keras")
class MacBudget(schedules.Schedule):
    """The L0 weight from a PI controller on the measured MAC ratio (see the module doc).

    Args:
        target: mean conditional MAC ratio to reach, in (0, 1], of the
            ungated network's MACs.
        begin: when the budget starts (in `unit`); λ is 0 before.
        end: when the target reaches `target` (falling linearly from 1 at
            `begin`); >= `begin`.
        rate: multiplier change per step per unit of excess ratio (the
            integral gain).
        gain: L0 weight per unit of excess ratio (the proportional gain).
        unwind: how many times faster the multiplier falls than it rises
            (under budget, so that it does not keep closing gates).
        max_multiplier: upper bound of λ.
        max_loss_ratio: if set, `|λ| * L0` stays at most this multiple of
            the running task loss (see the module doc); None: no bound.
        measure: the ratio the multiplier follows: "inference" (gates with
            `logit > 0`, as deployed) or "expected" (each gate weighted by
            its open probability, the quantity L0 penalises).
        unit: "epoch" (fractional epochs) or "step".

    Attributes:
        multiplier: the Lagrange multiplier (the integral part), >= 0.
        weight: the L0 weight in use, `gain * excess + multiplier`; negative
            while the network is under budget by more than
            `multiplier / gain`, which pushes gates back open.
    """

    def __init__(self, target, begin=0.0, end=0.0, rate=2.0, gain=100.0, unwind=10.0, max_multiplier=1000.0,
                 measure="inference", unit="epoch", max_loss_ratio=None):
        target = float(target)
        if not 0 < target <= 1:
            raise ValueError(
                "target is a mean conditional MAC ratio of the ungated network and must be "
                f"in (0, 1]. Received: target={target}"
            )
        self.target = target
        self.begin = schedules.check_value("begin", begin)
        self.end = schedules.check_value("end", end)
        if self.end < self.begin:
            raise ValueError(f"end must be >= begin. Received: begin={begin}, end={end}")
        if not (math.isfinite(float(rate)) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0. Received: rate={rate}")
        if not (math.isfinite(float(max_multiplier)) and max_multiplier > 0):
            raise ValueError(f"max_multiplier must be a finite number > 0. Received: max_multiplier={max_multiplier}")
        if not (math.isfinite(float(gain)) and gain >= 0):
            raise ValueError(f"gain must be a finite number >= 0. Received: gain={gain}")
        if not (math.isfinite(float(unwind)) and unwind >= 1):
            raise ValueError(f"unwind must be a finite number >= 1. Received: unwind={unwind}")
        self.rate = float(rate)
        self.gain = float(gain)
        self.unwind = float(unwind)
        self.max_multiplier = float(max_multiplier)
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}. Received: measure={measure!r}")
        self.measure = measure
        if max_loss_ratio is not None and not (math.isfinite(float(max_loss_ratio)) and max_loss_ratio > 0):
            raise ValueError(f"max_loss_ratio must be None or a finite number > 0. Received: {max_loss_ratio}")
        self.max_loss_ratio = None if max_loss_ratio is None else float(max_loss_ratio)
        self.unit = schedules.check_unit(unit)
        self.multiplier = 0.0
        self.weight = 0.0

    def target_at(self, t):
        """The target ratio at time `t`: 1 until `begin`, `target` from `end`."""
        if t >= self.end:
            return self.target
        if t <= self.begin:
            return 1.0
        return 1.0 + (t - self.begin) / (self.end - self.begin) * (self.target - 1.0)

    def __call__(self, t):
        return 0.0 if t < self.begin else self.weight

    def bound(self, task_loss=None, l0=None):
        """The largest |λ| allowed now: `max_multiplier`, or less with
        `max_loss_ratio` and the running task loss and L0 term."""
        bound = self.max_multiplier
        if self.max_loss_ratio is not None and task_loss is not None and l0 is not None:
            task_loss, l0 = float(task_loss), float(l0)
            if math.isfinite(task_loss) and math.isfinite(l0) and l0 > 0:
                bound = min(bound, self.max_loss_ratio * max(task_loss, 0.0) / l0)
        return bound

    def update(self, t, ratio, task_loss=None, l0=None):
        """One controller step after a training step at time `t` that measured `ratio`.

        Args:
            t: the time, in `unit`.
            ratio: the batch's measured MAC ratio (`measure`).
            task_loss, l0: running task loss and L0 term, for `max_loss_ratio`.

        Returns:
            The new L0 weight (`weight`).
        """
        if t >= self.begin:
            error = float(ratio) - self.target_at(t)
            rate = self.rate if error > 0 else self.rate * self.unwind
            bound = self.bound(task_loss, l0)
            self.multiplier = min(bound, max(0.0, self.multiplier + rate * error))
            self.weight = min(bound, max(-bound, self.gain * error + self.multiplier))
        return self.weight

    def restore(self, weight):
        """Resume at the L0 weight read back from the gates: the multiplier
        is its non-negative part; the proportional part follows the next error."""
        self.weight = float(weight)
        self.multiplier = max(0.0, self.weight)

    def get_config(self):
        return {
            "target": self.target,
            "begin": self.begin,
            "end": self.end,
            "rate": self.rate,
            "gain": self.gain,
            "unwind": self.unwind,
            "max_multiplier": self.max_multiplier,
            "measure": self.measure,
            "unit": self.unit,
            "max_loss_ratio": self.max_loss_ratio,
        }
