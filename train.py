#!/usr/bin/env python
"""Train a channel-gated ResNet with batch-shaping, or evaluate a saved one.

`python train.py --help` lists the flags; the same command is installed as
`bs-keras-train`. The code is `bs_keras.cli.train`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bs_keras.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
