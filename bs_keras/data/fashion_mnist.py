"""Fashion-MNIST from the IDX files of the Debian package `dataset-fashion-mnist`.

`read_idx` reads the IDX format (the MNIST files); `load_fashion_mnist`
the four files as arrays; `fashion_mnist_arrays_source` puts arrays of that
shape through the project's Fashion-MNIST pipeline (also used by
`bs_keras.data.levels`). Without the IDX files `fashion_mnist_source`
falls back to TFDS.
"""

import gzip
import math
import os
import struct
import zlib

import numpy as np
import tensorflow as tf

from bs_keras.data.image_ops import image_source
from bs_keras.data.source import DatasetNotFoundError
from bs_keras.data.tfds_source import tfds_image_source

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "BS_KERAS_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

# Per-channel statistics on the [0, 1] scale.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path, expected_magic=None):
    """Reads an IDX file (the MNIST format), gzip-compressed if named `*.gz`.

    Args:
        path: file path.
        expected_magic: e.g. `IDX_IMAGES_MAGIC` (0x00000803, 3-D uint8) or
            `IDX_LABELS_MAGIC` (0x00000801, 1-D uint8); `None` accepts any.

    Returns:
        NumPy array with the dimensions stored in the header.

    Raises:
        ValueError: the file is corrupt, truncated, has trailing bytes or
            another magic number. The message names the file.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated file ({e}).") from e
    if len(data) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(data)} bytes, no header).")
    (magic,) = struct.unpack(">I", data[:4])
    dtype_code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{magic:08X}).")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: IDX magic number 0x{magic:08X}, expected 0x{expected_magic:08X}."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes).")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: its header promises shape {dims} ({expected} bytes), "
            f"the file has {len(data)} bytes."
        )
    array = np.frombuffer(data, dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def fashion_mnist_dir():
    """The folder searched for the Fashion-MNIST IDX files.

    `$BS_KERAS_FASHION_MNIST_DIR` if set, else `/usr/share/datasets/fashion-mnist`.
    """
    return os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR


def load_fashion_mnist(directory=None):
    """Reads the four Fashion-MNIST IDX `.gz` files of `directory`.

    Args:
        directory: folder with `train-images-idx3-ubyte.gz`,
            `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and
            `t10k-labels-idx1-ubyte.gz`; default `fashion_mnist_dir()`.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, uint8 arrays with images
        `(N, 28, 28)` and labels `(N,)`, like `keras.datasets`.

    Raises:
        DatasetNotFoundError: a file is missing.
        ValueError: a file is corrupt, or images and labels disagree.
    """
    directory = os.fspath(directory or fashion_mnist_dir())
    missing = [
        f for files in FASHION_MNIST_FILES.values() for f in files
        if not os.path.isfile(os.path.join(directory, f))
    ]  # fmt: skip
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST: {', '.join(missing)} not found in {directory}. "
            + _FASHION_MNIST_HOW_TO
        )
    splits = []
    for image_file, label_file in FASHION_MNIST_FILES.values():
        image_path = os.path.join(directory, image_file)
        label_path = os.path.join(directory, label_file)
        images = read_idx(image_path, IDX_IMAGES_MAGIC)
        labels = read_idx(label_path, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(
                f"{image_path} has {len(images)} images but {label_path} has "
                f"{len(labels)} labels."
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{label_path}: label {labels.max()} is not in [0, 10).")
        splits.append((images, labels))
    return tuple(splits)


_FASHION_MNIST_HOW_TO = (
    "Install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    f"or set {FASHION_MNIST_DIR_ENV} to a folder with the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz, from https://github.com/zalandoresearch/fashion-mnist)."
)


def fashion_mnist_source(data_dir, manual_dir, size, channels):
    """`get_dataset("fashion_mnist")`: the IDX files, else TFDS (unless the env variable names a folder)."""
    directory = fashion_mnist_dir()
    have_idx = all(
        os.path.isfile(os.path.join(directory, f))
        for files in FASHION_MNIST_FILES.values() for f in files
    )  # fmt: skip
    if not have_idx and not os.environ.get(FASHION_MNIST_DIR_ENV):
        return tfds_image_source(
            "fashion_mnist", data_dir, manual_dir, size, channels, 0.0,
            mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, pad=2,
            how_to=_FASHION_MNIST_HOW_TO + " Or put the original downloads in manual_dir "
            "(TFDS checks their sha256; the Debian package's recompressed files differ).",
        )  # fmt: skip
    return fashion_mnist_arrays_source("fashion_mnist", *load_fashion_mnist(directory), size, channels)


def fashion_mnist_arrays_source(name, train, test, size=None, channels=None):
    """A `DataSource` over Fashion-MNIST-style arrays, with its pipeline.

    The preprocessing, augmentation (pad 2, crop, flip), normalization and
    caching of `get_dataset("fashion_mnist")`, for images already in memory
    (e.g. the corrupted copies of `bs_keras.data.levels`).

    Args:
        name: the `info.name`.
        train: `(images, labels)`, uint8 `(N, 28, 28)` and `(N,)`.
        test: the same for the evaluation split, used in order.
        size: model input size `(height, width)`, or `None` for 28x28.
        channels: 1 or 3, or `None` for 1.

    Returns:
        A `DataSource`.
    """
    (x_train, y_train), (x_test, y_test) = train, test

    def train_split(shuffle_files, seed):
        return tf.data.Dataset.from_tensor_slices((x_train[..., None], y_train))

    def eval_split():
        return tf.data.Dataset.from_tensor_slices((x_test[..., None], y_test))

    return image_source(
        name, train_split, eval_split, len(x_train), len(x_test),
        native_shape=(*x_train.shape[1:], 1), class_names=list(FASHION_MNIST_CLASSES),
        size=size, channels=channels, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, pad=2,
    )  # fmt: skip
