"""Test setup: Keras on TensorFlow, quiet TF logs (set before any import)."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
