"""`GateLossScheduler`: assigns the gate-loss weights and logs the gate terms."""

import math

import keras

from bs_keras import gating, schedules
from bs_keras.macs import count_macs, gate_table


class GateLossScheduler(keras.callbacks.Callback):
    """Sets the batch-shaping weight gamma and the L0 weight lambda each step.

    Before every training batch the schedules are evaluated (at the
    fractional epoch, or the step) and each gate's loss coefficients are
    assigned `gamma * share` and `lam * share` (see `bs_keras.gating`). After
    every batch, and at the end of each epoch, it writes into the Keras logs
    (so the progress bar, `History`, CSVLogger and TensorBoard see them):

    - `gamma`, `lam`: the current weights;
    - `bs_loss`: the batch-shaping term (mean over all gates; NaN while
      gamma is 0, when the gates skip computing it);
    - `l0_loss`: the L0 term as weighted in the loss;
    - `gate_open_rate`: the fraction of open (sampled, hard) gates;
    - `cond_macs`, `cond_macs_ratio`: mean conditional MACs per sample of the
      training batches and their ratio to the ungated network.

    Training values are running means over the epoch, like Keras metrics.
    Put this callback before TensorBoard/CSVLogger in the callbacks list.

    Args:
        gamma: schedule (or number) for the batch-shaping weight.
        lam: schedule (or number) for the L0 weight.
        l0_weighting: "macs" or "channels" (as in `configure_gate_losses`).
    """

    def __init__(self, gamma, lam, l0_weighting="macs"):
        super().__init__()
        self.gamma = schedules.get(gamma)
        self.lam = schedules.get(lam)
        if l0_weighting not in gating.L0_WEIGHTINGS:
            raise ValueError(
                f"l0_weighting must be one of {gating.L0_WEIGHTINGS}. "
                f"Received: l0_weighting={l0_weighting!r}"
            )
        self.l0_weighting = l0_weighting
        self._epoch = 0
        self._step = 0
        self._steps_per_epoch = None
        self._last = None
        self._assigned = None
        self._train_logs = {}

    def on_train_begin(self, logs=None):
        gates, bs_share, l0_share = gating.gate_loss_shares(self.model, self.l0_weighting)
        self._gates = gates
        self._bs_share = bs_share
        self._l0_share = l0_share
        self._static_macs = count_macs(self.model)
        by_gate = {id(i.gate): i for i in gate_table(self.model)}
        self._gated_macs = [by_gate[id(g)].channels * by_gate[id(g)].macs_per_channel for g in gates]
        self._steps_per_epoch = self.params.get("steps") if self.params else None
        self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._train_logs = {}

    def _time(self, schedule, batch):
        if schedule.unit == "step":
            return self._step
        if self._steps_per_epoch:
            return self._epoch + batch / self._steps_per_epoch
        return float(self._epoch)

    def _value(self, name, schedule, batch):
        value = float(schedule(self._time(schedule, batch)))
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"The {name} schedule returned {value} at epoch {self._epoch}, "
                f"batch {batch}; loss weights must be finite and >= 0."
            )
        return value

    def on_train_batch_begin(self, batch, logs=None):
        gamma = self._value("gamma", self.gamma, batch)
        lam = self._value("lam", self.lam, batch)
        if self._assigned != (gamma, lam):
            gating.set_gate_loss_weights(self._gates, self._bs_share, self._l0_share, gamma, lam)
            self._assigned = (gamma, lam)

    def _gate_logs(self):
        values = [g.stats.values() for g in self._gates]
        if any(v is None for v in values):
            return {}
        bs = sum(s * v["batch_shaping"] for s, v in zip(self._bs_share, values))
        l0 = sum(s * v["l0"] for s, v in zip(self._l0_share, values))
        open_rate = sum(s * v["open_rate"] for s, v in zip(self._bs_share, values))
        saved = sum(m * (1.0 - v["open_rate"]) for m, v in zip(self._gated_macs, values))
        macs = self._static_macs - saved
        return {
            "bs_loss": bs,
            "l0_loss": l0,
            "gate_open_rate": open_rate,
            "cond_macs": macs,
            "cond_macs_ratio": macs / self._static_macs,
        }

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        gamma, lam = self._assigned
        self._train_logs = {"gamma": gamma, "lam": lam, **self._gate_logs()}
        if logs is not None:
            logs.update(self._train_logs)

    def on_epoch_end(self, epoch, logs=None):
        # Validation resets the gates' statistics: log what training saw.
        if logs is not None:
            logs.update(self._train_logs)

    def get_config(self):
        return {
            "gamma": keras.saving.serialize_keras_object(self.gamma),
            "lam": keras.saving.serialize_keras_object(self.lam),
            "l0_weighting": self.l0_weighting,
        }
