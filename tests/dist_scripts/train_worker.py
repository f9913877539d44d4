"""Runs `bs_keras.cli.train.main` for one worker of a multi-worker test.

    python train_worker.py [train.py flags...]

Same as `python train.py ...`, except: if `BS_KERAS_TEST_WAIT_FOR` names a
file, `training.prepare_run_dir` first waits (up to 120 s) for it to exist.
tests/test_distribute.py sets it for the non-chief worker to the chief's
`config.json`, so that the chief always creates the run directory first.
This only sequences the two processes: without it they race to create the
run directory, which `test_chief_accepts_a_run_dir_holding_worker_subdirs`
covers on its own.
"""

import os
import sys
import time

from bs_keras import training
from bs_keras.cli import train

_wait_for = os.environ.get("BS_KERAS_TEST_WAIT_FOR")
if _wait_for:
    _prepare = training.prepare_run_dir

    def _prepare_after_chief(*args, **kwargs):
        deadline = time.monotonic() + 120
        while not os.path.exists(_wait_for) and time.monotonic() < deadline:
            time.sleep(0.1)
        return _prepare(*args, **kwargs)

    training.prepare_run_dir = _prepare_after_chief

if __name__ == "__main__":
    sys.exit(train.main())
