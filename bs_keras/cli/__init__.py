"""Command lines: `bs-keras-train` (`train.py`) and `bs-keras-export` (`python -m export`)."""
