"""The run directory: its settings, checkpoints and resume, in one place.

`prepare_run_dir` creates it or checks that it holds this run;
`RunCheckpoint` writes its checkpoints after every epoch, atomically;
`resume_states` reads what a resume can start from, `resume` loads it into
the model (going back an epoch past damaged files) and rewrites damaged
`.keras` files; `completed_report` is the report of a run already done.
"""

import errno
import json
import os
import re
import shutil
import zipfile
import zlib

import keras

from bs_keras import recipes
from bs_keras import report as report_lib
from bs_keras.distillation import unwrap
from bs_keras.io_utils import atomic_path
from bs_keras.run_lock import LOCK_NAME
from bs_keras.training.errors import RunError


def prepare_run_dir(run_dir, recipe, runtime, overwrite=False):
    """Creates the run directory or checks that it holds this same run.

    Returns the saved state (None for a fresh run).
    """
    config_path = os.path.join(run_dir, "config.json")
    if overwrite and os.path.exists(run_dir):
        for entry in os.listdir(run_dir):  # all but the lock this run holds
            if entry != LOCK_NAME:
                _remove_path(os.path.join(run_dir, entry))
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise RunError(
                f"{config_path} is damaged ({type(e).__name__}: {e}); it records the run's settings, "
                "so the run cannot be resumed. Restore it from a backup, or pass --overwrite to start "
                "the run again."
            ) from e
        saved_recipe = recipes.upgrade(saved.get("recipe", {}))
        if saved_recipe != recipe.to_dict():
            diff = sorted(
                k for k in set(saved_recipe) | set(recipe.to_dict())
                if saved_recipe.get(k) != recipe.to_dict().get(k)
            )
            raise RunError(
                f"{run_dir} holds a run with different settings ({', '.join(diff)}). "
                "Resume it with the same flags, choose another --run-dir, or pass --overwrite."
            )
        states, _ = resume_states(run_dir)
        return states[0] if states else None
    # Non-chief workers of a multi-worker run write <run>/worker-N/, possibly
    # before the chief gets here.
    if os.path.exists(run_dir) and [
        e for e in os.listdir(run_dir) if not re.fullmatch(r"worker-\d+", e) and e != LOCK_NAME
    ]:
        raise RunError(
            f"{run_dir} exists and is not a bs_keras run directory (no config.json). "
            "Choose another --run-dir or pass --overwrite."
        )
    os.makedirs(run_dir, exist_ok=True)
    report_lib.write_json(config_path, {"recipe": recipe.to_dict(), "runtime": runtime})
    return None


def _remove_path(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


STATE_FILES = ("state.json", "previous.json")  # the last completed epoch, the one before


def _read_state(path):
    with open(path) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int) or state["epoch"] < 1 \
            or not isinstance(state.get("weights"), str):
        raise ValueError("not a resume state (epoch, weights)")
    return state


def load_state(run_dir):
    """The `state/state.json` that `RunCheckpoint` wrote in `run_dir`, or None.

    Raises:
        ValueError: the file is damaged (the message names it).
    """
    path = os.path.join(run_dir, "state", "state.json")
    if not os.path.exists(path):
        return None
    try:
        return _read_state(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}).") from e


def resume_states(run_dir):
    """The resume states saved in `run_dir`, newest first, and the damaged files.

    Returns:
        `(states, damaged)`: the readable ones of `state/state.json` and
        `state/previous.json` (dicts with `epoch` and `weights`, the weights
        file present), and `(path, reason)` for each state or weights file
        that is unreadable or missing.
    """
    states, damaged = [], []
    for name in STATE_FILES:
        path = os.path.join(run_dir, "state", name)
        if not os.path.exists(path):
            continue
        try:
            state = _read_state(path)
        except (OSError, ValueError) as e:
            damaged.append((path, f"{type(e).__name__}: {e}"))
            continue
        weights = os.path.join(run_dir, "state", state["weights"])
        if not os.path.isfile(weights):
            damaged.append((weights, f"missing (named by {name})"))
        elif all(s["epoch"] != state["epoch"] for s in states):
            states.append(state)
    return states, damaged


def keras_file_problem(path):
    """Why the `.keras` file at `path` cannot be loaded (missing, not a zip,
    truncated, a bad CRC, members missing), or None if it looks intact."""
    if not os.path.exists(path):
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as e:
        return f"{type(e).__name__}: {e}"
    if bad is not None:
        return f"member {bad} fails its CRC check"
    missing = {"config.json", "model.weights.h5"} - names
    if missing:
        return f"{', '.join(sorted(missing))} missing from the archive"
    return None


def _json_writer(data):
    def write(path):
        with open(path, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full).

    The message names the file and says that the previous checkpoint is
    intact; the atomic writes left it untouched. `errno` is the failed
    write's.
    """

    def __init__(self, message, error_number=None):
        super().__init__(message)
        self.errno = error_number


class RunCheckpoint(keras.callbacks.Callback):
    """Saves a run directory's checkpoints after every completed epoch.

    Each write is atomic and they come in this order: `last.keras`,
    `best.keras` (when `monitor` improved), the resume state
    (`state/epoch-N.weights.h5`: weights and optimizer),
    `state/previous.json` (the state of the epoch before, whose weights file
    is kept too) and `state/state.json` (epoch, best value) that points at
    the new weights. A crash at any moment leaves a consistent state: the
    newest `state.json` and the files it names; if those are damaged later,
    `previous.json` is a second resume point (`resume_states`). A write that
    fails (e.g. the disk is full) raises `CheckpointWriteError` and leaves
    the files of the previous epoch as they were.

    Args:
        run_dir: the run directory.
        nan_guard: a `StopOnNaN`; nothing is saved once it has fired.
        monitor: the log entry whose maximum selects `best.keras`.
        first_best_epoch: the first epoch (1-based) that may become
            `best.keras`: a gated run's epochs before its L0 ramp has ended
            (gates still open) are not candidates (`best_candidate_from`).
        write: False on non-chief workers (they track, but do not save).
        state: the resume state training continues from (default: the
            run directory's `state/state.json`, if any).
    """

    def __init__(self, run_dir, nan_guard, monitor="val_accuracy", first_best_epoch=1, write=True, state=None):
        super().__init__()
        if int(first_best_epoch) != first_best_epoch or first_best_epoch < 1:
            raise ValueError(f"first_best_epoch must be an integer >= 1. Received: {first_best_epoch!r}")
        self.run_dir = run_dir
        self.nan_guard = nan_guard
        self.monitor = monitor
        self.first_best_epoch = int(first_best_epoch)
        self.write = write
        state = dict(state) if state else load_state(run_dir)
        self.state = state or {"epoch": 0, "best": None, "best_epoch": None}

    def _write(self, path, write):
        try:
            with atomic_path(path) as tmp:
                write(tmp)
        except OSError as e:
            if isinstance(e, CheckpointWriteError):
                raise
            full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
            why = f"{e.strerror or e}{' (the disk is full)' if full else ''}"
            kept = (
                f"the checkpoint of epoch {self.state['epoch']} is intact, and rerunning the same "
                "command resumes from it" if self.state.get("weights") else
                "no epoch was saved yet, so rerunning the same command starts the run again"
            )  # fmt: skip
            fix = "Free some space" if full else "Fix this"
            raise CheckpointWriteError(
                f"Could not write {path}: {why}. {fix}; {kept} ({self.run_dir}).", e.errno
            ) from e

    def _save(self, name):
        # The deployable model: a Distiller's student (its state files keep the wrapper's).
        self._write(os.path.join(self.run_dir, name), unwrap(self.model).save)

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_guard.bad is not None:
            return
        logs = logs or {}
        value = logs.get(self.monitor)
        improved = (epoch + 1 >= self.first_best_epoch and value is not None
                    and (self.state["best"] is None or value > self.state["best"]))  # fmt: skip
        if not self.write:
            return
        previous = dict(self.state) if self.state.get("weights") else None
        self._save("last.keras")
        if improved:
            self._save("best.keras")
        state_dir = os.path.join(self.run_dir, "state")
        os.makedirs(state_dir, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        self._write(os.path.join(state_dir, name), self.model.save_weights)
        if previous is not None:
            self._write(os.path.join(state_dir, STATE_FILES[1]), _json_writer(previous))
        state = {**self.state, "epoch": epoch + 1, "weights": name, "monitor": self.monitor}
        if improved:
            state.update(best=float(value), best_epoch=epoch + 1)
        self._write(os.path.join(state_dir, STATE_FILES[0]), _json_writer(state))
        self.state = state
        keep = {name, previous["weights"] if previous else None}
        for old in os.listdir(state_dir):
            if old.endswith(".weights.h5") and old not in keep:
                os.remove(os.path.join(state_dir, old))


def damaged_models(run_dir, state):
    """`(path, reason)` of the run's `last.keras` / `best.keras` that cannot be loaded."""
    if not state:
        return []
    names = ["last.keras"] + (["best.keras"] if state.get("best") is not None else [])
    paths = [os.path.join(run_dir, name) for name in names]
    return [(path, problem) for path in paths if (problem := keras_file_problem(path))]


def cannot_resume(run_dir, damaged):
    files = "; ".join(f"{path} ({reason})" for path, reason in damaged)
    return RunError(
        f"Cannot resume {run_dir}: damaged checkpoint files: {files}. No intact resume "
        "checkpoint is left. Restore the files from a backup, or pass --overwrite to start the "
        "run again (this deletes the run directory)."
    )


def restore_checkpoint(model, run_dir, states, damaged, log=print):
    """Loads the newest intact resume state of `run_dir` into `model`.

    Tries `state/state.json`'s weights, then `state/previous.json`'s (the
    epoch before), and logs which files were damaged.

    Args:
        model: the built, compiled model.
        run_dir: the run directory.
        states, damaged: from `resume_states(run_dir)`.

    Returns:
        The state loaded.

    Raises:
        RunError: no state loads; the message names every damaged file.
    """
    damaged = list(damaged)
    for state in states:
        path = os.path.join(run_dir, "state", state["weights"])
        try:
            model.load_weights(path)
        except Exception as e:  # noqa: BLE001 (truncated h5, wrong variables, ...: the file's problem)
            damaged.append((path, f"{type(e).__name__}: {e}"))
            continue
        if damaged:
            files = "; ".join(f"{p} ({r})" for p, r in damaged)
            log(f"Damaged checkpoint files: {files}. Going back to the intact checkpoint of epoch {state['epoch']}.")
        return state
    raise cannot_resume(run_dir, damaged)


def repair_models(model, run_dir, state, damaged, epochs, log):
    """Rewrites a damaged last.keras (or best.keras of this epoch) from the
    restored model; returns the state to continue from.

    `damaged`: `(path, reason)` of the damaged `.keras` files (`damaged_models`).
    """
    for path, problem in damaged:
        if os.path.basename(path) == "last.keras" or state.get("best_epoch") == state["epoch"]:
            with atomic_path(path) as tmp:
                unwrap(model).save(tmp)
            log(f"{path} was damaged ({problem}); rewrote it from the checkpoint of epoch {state['epoch']}.")
            continue
        later = (
            "it will hold the best of the epochs trained from now on" if state["epoch"] < epochs else
            "use last.keras, or pass --overwrite to train the run again"
        )  # fmt: skip
        log(f"{path} is damaged ({problem}) and the weights of its epoch {state.get('best_epoch')} are "
            f"not kept elsewhere: {later}.")
        state = {**state, "best": None, "best_epoch": None}
    return state


def resume(model, run_dir, states, damaged, epochs, strategy, log=print):
    """Continues a run: the newest intact state loaded into `model`.

    Loads the state under `strategy` (`restore_checkpoint`), then rewrites
    the run's damaged `.keras` files from it (`repair_models`).

    Args:
        model: the built, compiled model.
        run_dir: the run directory.
        states, damaged: from `resume_states(run_dir)`; `states` not empty.
        epochs: the run's epochs.
        strategy: the `tf.distribute` strategy the model was built under.
        log: where the progress lines go.

    Returns:
        The state training continues from.
    """
    with strategy.scope():
        state = restore_checkpoint(model, run_dir, states, damaged, log)
        log(f"Resuming {run_dir} after epoch {state['epoch']} of {epochs}.")
    return repair_models(model, run_dir, state, damaged_models(run_dir, state), epochs, log)


def completed_report(run_dir, epochs, state):
    """The report of a run that trained all its `epochs` and whose `.keras`
    files are intact, or None (the run has more to do)."""
    path = os.path.join(run_dir, "report.json")
    if (state["epoch"] if state else 0) < epochs or not os.path.exists(path) or damaged_models(run_dir, state):
        return None
    with open(path) as f:
        return json.load(f)
