"""Lines that native code (TensorFlow's C++, LiteRT) writes to file descriptor 2.

They bypass `sys.stderr`, so Python's logging and warnings filters cannot hold
them back. `filtered_stderr(shown)` catches descriptor 2 for a block and then
writes the lines `shown` keeps; `litert_info_hidden()` uses it to drop LiteRT's
start-up INFO lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.")
unless the user asked for TensorFlow's full log (`TF_CPP_MIN_LOG_LEVEL=0`, which
the command lines' `--verbose` sets).
"""

import contextlib
import os
import sys
import tempfile

LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
LITERT_INFO = "INFO: "  # LiteRT's own log prefix (it writes no time or source)


@contextlib.contextmanager
def filtered_stderr(shown):
    """Inside the block file descriptor 2 goes to a temporary file; on leaving
    it, the lines for which `shown(line)` is true are written to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+", errors="replace") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            sys.stderr.writelines(line for line in caught if shown(line))
            sys.stderr.flush()


def litert_info_hidden():
    """A context that drops LiteRT's INFO lines, unless TF_CPP_MIN_LOG_LEVEL is 0."""
    if os.environ.get(LEVEL_VAR, "").strip() == "0":
        return contextlib.nullcontext()
    return filtered_stderr(lambda line: not line.startswith(LITERT_INFO))
