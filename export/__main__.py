"""`python -m export MODEL.keras --out DIR ...` (see `bs_keras.cli.export`)."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bs_keras.cli.export import main  # noqa: E402

sys.exit(main(prog="python -m export"))
