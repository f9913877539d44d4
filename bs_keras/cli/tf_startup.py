"""TensorFlow's start-up, without its C++ log unless asked for.

Importing TensorFlow 2.21 on a CPU-only machine prints, before absl logging
is initialised and so whatever TF_CPP_MIN_LOG_LEVEL says:

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.

(here twice), then on the first device
lookup `E0000 ... cuda_platform.cc:52] failed call to cuInit: ...`. The
command lines start TensorFlow through `import_tensorflow`, which holds back
those lines: the C-level stderr (file descriptor 2) goes to a temporary file
while TensorFlow is imported and lists its devices, and what it caught is
then written to stderr except TensorFlow's log records below the minimum
level (and absl's banner). Anything else printed meanwhile, a Python warning
say, still shows; after the start-up stderr is untouched.
"""

import os
import re
import sys

from bs_keras import native_log

LEVEL_VAR = native_log.LEVEL_VAR
DEFAULTED_VAR = "BS_KERAS_TF_LOG_LEVEL_DEFAULTED"
ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# An absl log record: severity, MMDD, time, thread, file:line].
LOG_RECORD = re.compile(r"([IWEF])\d{4} \S+\s+\d+ \S+:\d+\] ")
SEVERITIES = "IWEF"


def import_tensorflow(verbose=False):
    """Imports TensorFlow and finds its devices, showing its start-up log only
    as far as asked for.

    `verbose`: show all of it (as `TF_CPP_MIN_LOG_LEVEL=0` does). Otherwise a
    TF_CPP_MIN_LOG_LEVEL set by the user is the minimum level of the start-up
    records shown too (TensorFlow ignores it for the first ones); unset, the
    start-up shows none, and later records from level 2 (errors) on, as
    TF_CPP_MIN_LOG_LEVEL=2.
    """
    if "tensorflow" in sys.modules:  # called from Python after TensorFlow started
        return
    if verbose:
        # TensorFlow's default made explicit: LiteRT's INFO lines show too
        # (bs_keras.native_log), and child processes log alike.
        os.environ.setdefault(LEVEL_VAR, "0")
        _start()
        return
    try:
        level = int(os.environ[LEVEL_VAR])
    except (KeyError, ValueError):
        level = 3
    if DEFAULTED_VAR in os.environ and os.environ[DEFAULTED_VAR] == os.environ.get(LEVEL_VAR):
        level = 3  # set by a parent's import_tensorflow, not by the user
    if LEVEL_VAR not in os.environ:
        # Marked as ours, so that a child process (a sweep's train.py)
        # inheriting it does not take it for the user's choice.
        os.environ[LEVEL_VAR] = os.environ[DEFAULTED_VAR] = "2"
    with _stderr_filtered(level):
        _start()


def _start():
    import tensorflow as tf

    tf.config.list_physical_devices()  # CUDA's initialisation logs here


def _shown(line, level):
    if line.rstrip("\n") == ABSL_BANNER:
        return level < 1
    record = LOG_RECORD.match(line)
    return record is None or SEVERITIES.index(record.group(1)) >= level


def _stderr_filtered(level):
    """File descriptor 2 caught inside the block; the lines `_shown` at `level` are written on leaving it."""
    return native_log.filtered_stderr(lambda line: _shown(line, level))
