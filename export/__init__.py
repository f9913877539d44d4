"""The export command line, a thin shell over `bs_keras.deploy`.

`python -m export MODEL.keras --out DIR ...` runs `bs_keras.cli.export`
(installed as `bs-keras-export`). The transforms themselves (compaction,
pruning, conditional execution, SavedModel / TFLite, parity) live in
`bs_keras.deploy`; `export.compact_model` and the other names listed there
are re-exported here for scripts written against this package. They load
on first use, so `python -m export --help` does not import TensorFlow.
"""

import bs_keras.deploy as _deploy


def __getattr__(name):
    if name == "__all__" or name in _deploy.__all__:
        return getattr(_deploy, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
