"""Runs `bs_keras.cli.train.main` as a child process of a test, with explicit
synchronisation points instead of sleeps.

    python train_child.py [train.py flags...]

Same as `python train.py ...`, plus two hooks set by environment variables:

- `BS_KERAS_TEST_WAIT_FOR=FILE`: `prepare_run_dir` first waits (up
  to 120 s) for FILE to exist. tests/test_distribute.py sets it for the
  non-chief worker to the chief's `config.json`, so that the chief always
  creates the run directory first (without it the two race, which
  `test_chief_accepts_a_run_dir_holding_worker_subdirs` covers on its own).
- `BS_KERAS_TEST_PAUSE=EPOCH:BATCH:DIR`: training stops at the start of
  batch BATCH of epoch EPOCH (both 0-based; the checkpoint of every earlier
  epoch is written by then), creates `DIR/paused` (holding the pid) and
  waits until `DIR/resume` exists. The test waits for `paused` with
  `wait_for_file` (bounded), does what it needs at that point (kill -9 the
  child, start a second run, ...) and creates `resume` to let it go on. A
  child left paused for 300 s fails rather than hangs.
"""

import os
import sys
import time

import keras

from bs_keras.training import run as training_run
from bs_keras.cli import train

PAUSE_LIMIT_S = 300


def wait_for_file(path, timeout, proc=None):
    """Waits until `path` exists; False after `timeout` s or once `proc` (a
    `subprocess.Popen`) has ended without creating it."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return os.path.exists(path)
        time.sleep(0.02)
    return True


class PauseAt(keras.callbacks.Callback):
    """Blocks training at (epoch, batch) until the test lets it go on."""

    def __init__(self, epoch, batch, directory):
        super().__init__()
        self.at = (epoch, batch)
        self.directory = directory
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._epoch, batch) != self.at:
            return
        tmp = os.path.join(self.directory, f".paused.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(self.directory, "paused"))
        if not wait_for_file(os.path.join(self.directory, "resume"), PAUSE_LIMIT_S):
            raise RuntimeError(f"train_child: nobody resumed the run paused at {self.at} in {PAUSE_LIMIT_S} s")


def _install_hooks():
    wait_for = os.environ.get("BS_KERAS_TEST_WAIT_FOR")
    if wait_for:
        prepare = training_run.prepare_run_dir

        def prepare_after(*args, **kwargs):
            wait_for_file(wait_for, 120)
            return prepare(*args, **kwargs)

        training_run.prepare_run_dir = prepare_after  # the name `train` calls

    pause = os.environ.get("BS_KERAS_TEST_PAUSE")
    if pause:
        epoch, batch, directory = pause.split(":", 2)
        fit = keras.Model.fit

        def fit_with_pause(self, *args, callbacks=None, **kwargs):
            callbacks = [*(callbacks or []), PauseAt(int(epoch), int(batch), directory)]
            return fit(self, *args, callbacks=callbacks, **kwargs)

        keras.Model.fit = fit_with_pause


if __name__ == "__main__":
    _install_hooks()
    sys.exit(train.main())
