#!/usr/bin/env python
"""Train a channel-gated ResNet with batch-shaping, or evaluate a saved one.

`python train.py --help` lists the flags; the same command is installed as
`bs-keras-train`. The code is `bs_keras.cli.train`.
"""

import sys

from bs_keras.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
