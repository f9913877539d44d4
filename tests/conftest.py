"""Test setup: Keras on TensorFlow, quiet TF logs (set before any import),
a synthetic Fashion-MNIST for the whole session, and the `offline` fixture
for modules that must never touch the network."""

import os
import socket

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NETWORK_ATTEMPTS = []

FASHION_MNIST_DIR_ENV = "BS_KERAS_FASHION_MNIST_DIR"  # bs_keras.data reads it


@pytest.fixture(scope="session", autouse=True)
def fashion_mnist_dir(tmp_path_factory):
    """A generated Fashion-MNIST folder (the four IDX .gz files of the Debian
    package, tests/data_fixtures.synthetic_fashion_mnist) in
    $BS_KERAS_FASHION_MNIST_DIR for every test and the subprocesses they
    start (train.py, python -m bs_keras.cli.*), so the suite needs neither
    the package dataset-fashion-mnist nor the network, and no assertion sees
    real-data accuracy. Tests of the real files read
    bs_keras.data.FASHION_MNIST_DIR directly and skip when it is missing."""
    from data_fixtures import synthetic_fashion_mnist, write_fashion_mnist

    directory = tmp_path_factory.mktemp("fashion_mnist")
    (x_train, y_train), (x_test, y_test) = synthetic_fashion_mnist()
    write_fashion_mnist(directory, x_train, y_train, x_test, y_test)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FASHION_MNIST_DIR_ENV, str(directory))
        yield directory


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


@pytest.fixture(scope="session")
def tiny_gated_run(tmp_path_factory, fashion_mnist_dir):
    """A finished 2-epoch gated train.py run (tests/shared_runs.py), made
    once per session for the tests that only read it."""
    import shared_runs

    return shared_runs.once(shared_runs.session_root(tmp_path_factory), "tiny_gated", shared_runs.GATED_ARGS,
                            env=shared_runs.quiet_default_env())


@pytest.fixture(scope="session")
def tiny_plain_run(tmp_path_factory, fashion_mnist_dir):
    """A finished 1-epoch plain train.py run, made once per session."""
    import shared_runs

    return shared_runs.once(shared_runs.session_root(tmp_path_factory), "tiny_plain", shared_runs.PLAIN_ARGS)


def pytest_collection_modifyitems(config, items):
    """The tests marked slow first (in their files' order): pytest-xdist hands
    tests out in this order, so the long ones start early and the short ones
    fill in the end, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
