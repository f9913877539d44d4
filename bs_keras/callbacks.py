"""Training callbacks.

`GateLossScheduler` assigns the gate-loss weights and logs the gate terms;
`StopOnNaN`, `GateTensorBoard` and `RunCSVLogger` serve a training run
(`bs_keras.training`). The checkpoints of a run directory and its resume
live together in `bs_keras.training.run_dir`; their old names here
(`RunCheckpoint`, `resume_states`, ...) still work.
"""

import csv
import math
import os

import keras
import numpy as np
import tensorflow as tf

from bs_keras import gating, schedules
from bs_keras.budget import MacBudget
from bs_keras.distillation import unwrap
from bs_keras.gates import find_gates
from bs_keras.io_utils import atomic_path
from bs_keras.macs import count_macs, gate_table, ungated_macs


class GateLossScheduler(keras.callbacks.Callback):
    """Sets the batch-shaping weight gamma and the L0 weight lambda each step.

    Before every training batch the schedules are evaluated (at the
    fractional epoch, or the step) and each gate's loss coefficients are
    assigned `gamma * share` and `lam * share` (see `bs_keras.gating`). After
    every batch, and at the end of each epoch, it writes into the Keras logs
    (so the progress bar, `History`, CSVLogger and TensorBoard see them):

    - `gamma`, `lam`: the current weights;
    - `bs_loss`: the batch-shaping term (mean over all gates and the steps
      that computed it; absent while gamma is 0, when the gates skip it);
    - `l0_loss`: the L0 term as weighted in the loss;
    - `gate_open_rate`: the fraction of open (sampled, hard) gates;
    - `cond_macs`, `cond_macs_ratio`: mean conditional MACs per sample of the
      training batches (sampled gates) and their ratio to the static count;
    - `hard_macs_ratio`: the same with the inference gates (`logit > 0`),
      relative to the ungated network (what `report.json` calls
      `macs_ratio`);
    - with a `MacBudget` as `lam`: `mac_target`, the budget's current target
      (`lam` is then the L0 weight the budget set), and `l0_task_ratio_max`,
      the epoch's largest `|lam| * l0_loss / task loss` (what
      `MacBudget(max_loss_ratio=...)` bounds);
    - with `hard`: `hard_gates`, 1 in the hard-gate phase.

    Training values are running means over the epoch, like Keras metrics.
    Put this callback before TensorBoard/CSVLogger in the callbacks list.

    Args:
        gamma: schedule (or number) for the batch-shaping weight.
        lam: schedule (or number) for the L0 weight, or a
            `bs_keras.MacBudget`: λ then follows a target MAC ratio (its
            multiplier is updated after every step from the measured
            `hard_macs_ratio` of the batch, and restored from the gates'
            weights when training resumes).
        l0_weighting: "macs" or "channels" (as in `configure_gate_losses`).
        hard: optional schedule (or number) for the hard-gate phase: while
            it is > 0 the gates train with their inference decisions
            (`logit > 0`, no sampling, the gate MLP frozen in inference
            mode) and both loss weights are 0, so the backbone fine-tunes on
            exactly the network that is evaluated; e.g.
            `Linear(0, 1, 3.2, 3.2)` for the last 20 % of 4 epochs. A
            `MacBudget` holds still meanwhile.
    """

    def __init__(self, gamma, lam, l0_weighting="macs", hard=None):
        super().__init__()
        self.gamma = schedules.get(gamma)
        self.lam = schedules.get(lam)
        self.hard = None if hard is None else schedules.get(hard)
        if l0_weighting not in gating.L0_WEIGHTINGS:
            raise ValueError(
                f"l0_weighting must be one of {gating.L0_WEIGHTINGS}. "
                f"Received: l0_weighting={l0_weighting!r}"
            )
        self.l0_weighting = l0_weighting
        self._budget = self.lam if isinstance(self.lam, MacBudget) else None
        self._epoch = 0
        self._step = 0
        self._batch = 0
        self._steps_per_epoch = None
        self._last = None
        self._assigned = None
        self._hard = None
        self._train_logs = {}
        self._l0_ratio_max = 0.0

    def on_train_begin(self, logs=None):
        net = unwrap(self.model)  # a Distiller trains its student
        gates, bs_share, l0_share = gating.gate_loss_shares(net, self.l0_weighting)
        self._gates = gates
        self._bs_share = bs_share
        self._l0_share = l0_share
        self._static_macs = count_macs(net)
        by_gate = {id(i.gate): i for i in gate_table(net)}
        self._gated_macs = [by_gate[id(g)].channels * by_gate[id(g)].macs_per_channel for g in gates]
        self._ungated_macs = ungated_macs(net, self._static_macs)
        self._steps_per_epoch = self.params.get("steps") if self.params else None
        self._step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._previous = [None] * len(gates)
        if self._budget is not None:
            # The multiplier is in the weights: l0_coef = lam * share, shares sum to 1.
            self._budget.restore(sum(float(keras.ops.convert_to_numpy(g.l0_coef)) for g in gates))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._train_logs = {}
        self._l0_ratio_max = 0.0
        self._previous = [None] * len(self._gates)  # fit resets the gates' stats now

    def _time(self, schedule, batch):
        if schedule.unit == "step":
            return self._step
        if self._steps_per_epoch:
            return self._epoch + batch / self._steps_per_epoch
        return float(self._epoch)

    def _value(self, name, schedule, batch):
        value = float(schedule(self._time(schedule, batch)))
        # A MacBudget's L0 weight turns negative to reopen gates when under budget.
        if not math.isfinite(value) or (value < 0 and schedule is not self._budget):
            raise ValueError(
                f"The {name} schedule returned {value} at epoch {self._epoch}, "
                f"batch {batch}; loss weights must be finite and >= 0."
            )
        return value

    def on_train_batch_begin(self, batch, logs=None):
        hard = self.hard is not None and self._value("hard", self.hard, batch) > 0
        if hard != self._hard:
            gating.set_hard_training(self._gates, hard)
            self._hard = hard
        if hard:
            gamma = lam = 0.0
        else:
            gamma = self._value("gamma", self.gamma, batch)
            lam = self._value("lam", self.lam, batch)
        if self._assigned != (gamma, lam):
            gating.set_gate_loss_weights(self._gates, self._bs_share, self._l0_share, gamma, lam)
            self._assigned = (gamma, lam)

    def _ratio(self, open_rates):
        """MAC ratio to the ungated network for per-gate open rates."""
        saved = sum(m * (1.0 - h) for m, h in zip(self._gated_macs, open_rates))
        return (self._static_macs - saved) / self._ungated_macs

    def _batch_ratio(self, totals, measure):
        """The last batch's MAC ratio from the change of the running sums:
        "inference" (gates with logit > 0: `hard_macs_ratio`) or "expected"
        (each gate weighted by its open probability, the L0 term)."""
        column = 4 if measure == "inference" else 2
        rates = []
        for i, now in enumerate(totals):
            before = self._previous[i]
            if before is None:  # the epoch's first step (Keras resets the stats)
                before = 0.0 * now
            steps = now[-1] - before[-1]
            rates.append((now[column] - before[column]) / steps if steps > 0 else 1.0)
            self._previous[i] = now
        return self._ratio(rates)

    @staticmethod
    def _task_loss(logs, gate_logs, gamma, lam):
        """The running task loss: a `task_loss` metric (train.py compiles one),
        else Keras' total `loss` less the gate losses' terms at the current
        weights (approximate while they change within the epoch; weight decay
        stays in)."""
        if "task_loss" in logs:
            return float(keras.ops.convert_to_numpy(logs["task_loss"]))
        if "loss" not in logs:
            return None
        total = float(keras.ops.convert_to_numpy(logs["loss"]))
        return total - lam * gate_logs.get("l0_loss", 0.0) - gamma * gate_logs.get("bs_loss", 0.0)

    def _gate_logs(self, totals):
        values = [g.stats.values(t) for g, t in zip(self._gates, totals)]
        if any(v is None for v in values):
            return {}
        l0 = sum(s * v["l0"] for s, v in zip(self._l0_share, values))
        open_rate = sum(s * v["open_rate"] for s, v in zip(self._bs_share, values))
        saved = sum(m * (1.0 - v["open_rate"]) for m, v in zip(self._gated_macs, values))
        macs = self._static_macs - saved
        logs = {"hard_macs_ratio": self._ratio([v["hard_open_rate"] for v in values])}
        if self._budget is not None:
            logs["mac_target"] = self._budget.target_at(self._time(self._budget, self._batch))
        if all(v["batch_shaping"] is not None for v in values):
            logs["bs_loss"] = sum(s * v["batch_shaping"] for s, v in zip(self._bs_share, values))
        return {
            **logs,
            "l0_loss": l0,
            "gate_open_rate": open_rate,
            "cond_macs": macs,
            "cond_macs_ratio": macs / self._static_macs,
        }

    def on_train_batch_end(self, batch, logs=None):
        self._batch = batch
        totals = [g.stats.totals() for g in self._gates]
        gamma, lam = self._assigned  # what this batch used
        gate_logs = self._gate_logs(totals)
        if self._budget is not None and not self._hard:
            t = self._time(self._budget, batch)
            task_loss = self._task_loss(logs or {}, gate_logs, gamma, lam)
            self._budget.update(t, self._batch_ratio(totals, self._budget.measure), task_loss=task_loss,
                                l0=gate_logs.get("l0_loss"))
            # Assigned now, not at the next batch: a checkpoint after this
            # step then holds the current multiplier (restored on resume).
            new_lam = self._value("lam", self._budget, batch)
            if new_lam != lam:
                gating.set_gate_loss_weights(self._gates, self._bs_share, self._l0_share, gamma, new_lam)
                self._assigned = (gamma, new_lam)
            if task_loss and task_loss > 0 and "l0_loss" in gate_logs:
                ratio = abs(new_lam) * gate_logs["l0_loss"] / task_loss
                self._l0_ratio_max = max(self._l0_ratio_max, ratio)
        self._step += 1
        self._train_logs = {"gamma": gamma, "lam": lam, **gate_logs}
        if self._budget is not None:
            # The largest |lambda| * L0 / task loss of the epoch's steps (the bound's quantity).
            self._train_logs["l0_task_ratio_max"] = self._l0_ratio_max
        if self.hard is not None:
            self._train_logs["hard_gates"] = float(self._hard)
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
            "hard": None if self.hard is None else keras.saving.serialize_keras_object(self.hard),
        }


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss and records where (`bad`).

    `keras.callbacks.TerminateOnNaN` also stops, but records nothing: here
    `RunCheckpoint` reads `bad` to skip saving the NaN epoch, and `train` to
    name the epoch and batch and exit with code 3.
    """

    def __init__(self):
        super().__init__()
        self.bad = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad = (self._epoch, batch, float(loss))
            self.model.stop_training = True


class GateTensorBoard(keras.callbacks.Callback):
    """Per-layer gate open rates as TensorBoard histograms and scalars.

    Args:
        log_dir: the TensorBoard directory; writes into its `gates/`.
    """

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "gates"))
        self._rates = None

    def on_train_batch_end(self, batch, logs=None):
        values = [g.stats.values() for g in find_gates(unwrap(self.model))]
        if all(v is not None for v in values):
            self._rates = [v["open_rate"] for v in values]

    def on_epoch_end(self, epoch, logs=None):
        if self._rates is None:
            return
        with self.writer.as_default(step=epoch):
            tf.summary.histogram("open_rate_per_layer", np.asarray(self._rates))
            for gate, rate in zip(find_gates(unwrap(self.model)), self._rates):
                tf.summary.scalar(f"open_rate/{gate.name}", rate)
        self.writer.flush()


class RunCSVLogger(keras.callbacks.Callback):
    """Appends one row of epoch logs per epoch to a CSV file, across resumes.

    Like `keras.callbacks.CSVLogger(path, append=True)`, but the columns
    follow the logs: a log entry absent in an epoch (`bs_loss` once gamma
    is 0) is an empty cell, and one that first appears in a later epoch or
    a resumed run adds a column (the file is rewritten, atomically, with the
    wider header). Keras' logger fixes its columns at its first epoch.
    Rows of the epochs a resumed run trains again (it went back to an
    earlier checkpoint) are dropped at its first epoch.

    Args:
        filename: the CSV file; rows are appended to an existing one.
    """

    def __init__(self, filename):
        super().__init__()
        self.filename = os.fspath(filename)
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch:
            return
        self._first_epoch = False
        header, rows = self._read()

        def before(row):
            try:
                return int(float(row.get("epoch") or "")) < epoch
            except ValueError:
                return False

        kept = [row for row in rows if before(row)]
        if header is not None and len(kept) < len(rows):
            with atomic_path(self.filename) as tmp:
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=header, restval="", extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(kept)

    def _read(self):
        if not os.path.exists(self.filename) or not os.path.getsize(self.filename):
            return None, []
        with open(self.filename, newline="") as f:
            reader = csv.DictReader(f)
            return reader.fieldnames, list(reader)

    @staticmethod
    def _cell(value):
        if isinstance(value, str):
            return value
        array = np.asarray(value)
        return float(array) if array.ndim == 0 else str(array.tolist())

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: self._cell(v) for k, v in (logs or {}).items()}}
        header, rows = self._read()
        if header is not None and set(row) <= set(header):
            with open(self.filename, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header, restval="").writerow(row)
            return
        fields = ["epoch"] + sorted(set(header or []) - {"epoch"} | set(row) - {"epoch"})
        with atomic_path(self.filename) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields, restval="")
                writer.writeheader()
                writer.writerows(rows + [row])


# Moved to bs_keras.training.run_dir (the run directory: checkpoints and
# resume together); imported on first use, since that package imports this one.
_MOVED_TO_RUN_DIR = ("STATE_FILES", "CheckpointWriteError", "RunCheckpoint", "keras_file_problem", "load_state",
                     "resume_states")


def __getattr__(name):
    if name in _MOVED_TO_RUN_DIR:
        from bs_keras.training import run_dir

        return getattr(run_dir, name)
    raise AttributeError(f"module 'bs_keras.callbacks' has no attribute {name!r}")
