"""Test setup: Keras on TensorFlow, quiet TF logs (set before any import),
and the `offline` fixture for modules that must never touch the network."""

import os
import socket

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NETWORK_ATTEMPTS = []


@pytest.fixture(scope="module")
def no_network():
    """Any Python-level network use raises, and is recorded."""

    def refuse(*args, **kwargs):
        NETWORK_ATTEMPTS.append(args)
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture
def offline(no_network):
    """Use with `pytestmark = pytest.mark.usefixtures("offline")`: sockets
    refuse to connect for the module, and a test fails if it tried."""
    NETWORK_ATTEMPTS.clear()
    yield
    assert NETWORK_ATTEMPTS == [], "the test tried to reach the network"
