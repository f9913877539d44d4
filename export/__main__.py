"""`python -m export MODEL.keras --out DIR ...` (see `bs_keras.cli.export`)."""

import sys

from bs_keras.cli.export import main

sys.exit(main(prog="python -m export"))
