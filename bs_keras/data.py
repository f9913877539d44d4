"""Input pipelines: Fashion-MNIST, CIFAR-10, ImageNet, other TFDS image
classification datasets, and folders of images.

`get_dataset(name)` returns a `DataSource`; its `train()` and `eval()` build
batched `tf.data` pipelines of `(images, labels)`: float32 NHWC images
normalized per channel with the dataset's mean/std, and int32 labels.

Nothing here downloads. Fashion-MNIST is read from the IDX files of the
Debian package `dataset-fashion-mnist`; TFDS datasets are used when already
prepared in `data_dir`, or prepared from source archives the user put in
`manual_dir`. When the data is missing, `DatasetNotFoundError` says which
files are needed, where to put them and where to get them.

Example:

```python
source = get_dataset("cifar10", manual_dir="~/archives")
model.fit(source.train(128, seed=0), validation_data=source.eval(256), epochs=200)
```
"""

import dataclasses
import gzip
import math
import os
import re
import struct
import zlib

import numpy as np
import tensorflow as tf

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
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_MEAN, DEFAULT_STD = (0.5,), (0.5,)

BUILTIN_DATASETS = ("fashion_mnist", "fashion_mnist_levels", "cifar10", "imagenet2012")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGENET_URL = "https://image-net.org/download-images"
IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

_CACHE_LIMIT_BYTES = 2 << 30  # decoded datasets up to this size are cached in memory
_SHUFFLE_BUFFER_BYTES = 512 << 20
_IMAGENET_SHUFFLE_BUFFER = 10_000
_AUTOTUNE = tf.data.AUTOTUNE


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither prepared nor are its source files present.

    The message names the missing files, where to put them and how to get
    them; bs_keras never downloads.
    """


class BadImagesError(ValueError):
    """Files of an image folder that TensorFlow cannot decode.

    The message names every file and why; `bad` holds the `(path, reason)`
    pairs.
    """

    def __init__(self, message, bad=()):
        super().__init__(message)
        self.bad = list(bad)


@dataclasses.dataclass
class DatasetInfo:
    """What a `DataSource` yields.

    Attributes:
        name: dataset name, or the folder path.
        num_classes: number of classes; labels are in `[0, num_classes)`.
        image_shape: `(H, W, C)` of the preprocessed model input.
        train_examples: examples in the training split.
        eval_examples: examples in the evaluation split.
        class_names: class names in label order, or `None`.
        mean: per-channel mean subtracted from the [0, 1] images.
        std: per-channel standard deviation the images are divided by.
        bad_files: `(path, reason)` of the image-folder files left out
            because they cannot be decoded (`skip_bad_images=True`).
        eval_metadata: per-example arrays of the evaluation split, in
            `DataSource.eval()` order (e.g. `{"level": ...}` of
            `fashion_mnist_levels`), or `None`. The report writes them into
            `per_sample.npz`.
    """

    name: str
    num_classes: int
    image_shape: tuple
    train_examples: int
    eval_examples: int
    class_names: list | None
    mean: tuple = DEFAULT_MEAN
    std: tuple = DEFAULT_STD
    bad_files: tuple = ()
    eval_metadata: dict | None = dataclasses.field(default=None, repr=False)


class DataSource:
    """Training and evaluation `tf.data` pipelines for one dataset.

    Made by `get_dataset`. Both pipelines yield `(images, labels)` batches:
    float32 `(B, H, W, C)` images normalized with `info.mean`/`info.std`
    and int32 `(B,)` labels.
    """

    def __init__(self, info, *, train_split, eval_split, decode, preprocess, augment, cache,
                 shuffle_buffer, batched):
        # train_split(shuffle_files, seed) and eval_split() give (raw, label)
        # datasets; decode(raw) (per example, may be None) gives what is
        # cached; preprocess(x) and augment(x, seed) give float32 [0, 1]
        # images of info.image_shape, on batches if `batched` else per example.
        self.info = info
        self._train_split = train_split
        self._eval_split = eval_split
        self._decode = decode
        self._preprocess = preprocess
        self._augment = augment
        self._cache = cache
        self._shuffle_buffer = max(1, min(shuffle_buffer, info.train_examples))
        self._batched = batched
        channels = info.image_shape[-1]
        self._mean = tf.constant(_per_channel(info.mean, channels), tf.float32)
        self._std = tf.constant(_per_channel(info.std, channels), tf.float32)

    def __repr__(self):
        return f"<DataSource {self.info}>"

    def _decoded(self, ds):
        if self._decode is None:
            return ds
        return ds.map(lambda raw, label: (self._decode(raw), label), num_parallel_calls=_AUTOTUNE)

    def _batches(self, ds, batch_size, *, drop_remainder, augment=False, seed=None):
        def prepare(images, labels, seed=None):
            images = self._augment(images, seed) if augment else self._preprocess(images)
            return (images - self._mean) / self._std, tf.cast(labels, tf.int32)

        if self._batched:
            ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if augment:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            ds = tf.data.Dataset.zip(ds, seeds.batch(2, drop_remainder=True))
            ds = ds.map(lambda example, s: prepare(*example, s), num_parallel_calls=_AUTOTUNE)
        else:
            ds = ds.map(prepare, num_parallel_calls=_AUTOTUNE)
        if not self._batched:
            ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        return ds.prefetch(_AUTOTUNE)

    def train(self, batch_size, *, shuffle=True, augment=True, seed=None, repeat=False):
        """The training pipeline.

        Args:
            batch_size: examples per batch; the last partial batch is dropped.
            shuffle: shuffle the examples (reshuffled on every pass).
            augment: apply the dataset's training augmentation.
            seed: seed for the shuffle and the augmentation; `None` for a
                fresh random order and augmentation on every run.
            repeat: repeat forever (then pass `steps_per_epoch` to `fit`).

        Returns:
            A `tf.data.Dataset` of `(images, labels)` batches.
        """
        check_batch_size(batch_size)
        if not repeat and batch_size > self.info.train_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {self.info.train_examples} "
                f"training examples of {self.info.name!r}; every batch would be dropped."
            )
        ds = self._decoded(self._train_split(shuffle and not self._cache, seed))
        if self._cache:
            ds = ds.cache()
        if shuffle:
            ds = ds.shuffle(self._shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        return self._batches(ds, batch_size, drop_remainder=True, augment=augment, seed=seed)

    def eval(self, batch_size):
        """The evaluation pipeline: fixed order, no augmentation, all examples.

        Args:
            batch_size: examples per batch; the last batch may be smaller.

        Returns:
            A `tf.data.Dataset` of `(images, labels)` batches.
        """
        check_batch_size(batch_size)
        ds = self._decoded(self._eval_split())
        if self._cache:
            ds = ds.cache()
        return self._batches(ds, batch_size, drop_remainder=False)

    def raw_train_images(self, n):
        """The first `n` training images, preprocessed but not augmented.

        For calibration (e.g. quantization or gate statistics).

        Args:
            n: number of images; fewer if the training split is smaller.

        Returns:
            float32 NumPy array `(n, H, W, C)`, normalized like `train()`.
        """
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer. Received: n={n}")
        ds = self._decoded(self._train_split(False, None).take(int(n)))
        images = [x.numpy() for x, _ in self._batches(ds, 256, drop_remainder=False)]
        if not images:
            return np.zeros((0, *self.info.image_shape), np.float32)
        return np.concatenate(images)


def get_dataset(name, *, data_dir=None, manual_dir=None, image_size=None, validation_split=0.1,
                seed=0, channels=None, skip_bad_images=False):
    """Returns the `DataSource` for a dataset name or a folder of images.

    Names:

    - `"fashion_mnist"` (the default of the project): read from the IDX
      files in `/usr/share/datasets/fashion-mnist` (Debian package
      `dataset-fashion-mnist`; override with the `BS_KERAS_FASHION_MNIST_DIR`
      environment variable), else through TFDS. 28x28x1.
    - `"fashion_mnist_levels"`: the same IDX files (no TFDS fallback), a
      quarter of each split left clean (difficulty level 0) and a quarter
      each corrupted by Gaussian pixel noise of three increasing strengths
      (levels 1-3), fixed by a dataset seed (`bs_keras.levels_data`). The
      levels of the evaluation split are in `info.eval_metadata["level"]`.
    - `"cifar10"`: TFDS. Training: zero-pad 4, random 32x32 crop, random
      horizontal flip.
    - `"imagenet2012"`: TFDS from `manual_dir` holding
      `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`. Training:
      random resized crop (area 8-100%, aspect 3/4-4/3) and flip; evaluation:
      shorter side resized to `image_size * 256 / 224`, center crop.
    - any other TFDS image classification dataset (`"mnist"`,
      `"cifar100"`, ...): evaluated on "test" (else "validation", else the
      last `validation_split` of "train"); flip + pad/crop augmentation;
      normalized with mean 0.5 and std 0.5.
    - a folder with one subfolder of images (png/jpeg/bmp/gif) per class;
      `validation_split` of the images, picked with `seed`, are held out for
      evaluation. Files with another extension are ignored; every image is
      decoded once first, and files that cannot be (empty, truncated, text,
      TIFF, ...) stop it with one error naming them all, or are left out
      with `skip_bad_images=True` (listed in `info.bad_files`). A name that
      is also a TFDS name is read as the TFDS dataset unless it starts
      with `./`, `/` or `~`.

    TFDS datasets are used when prepared in `data_dir`; otherwise they are
    prepared once from source archives in `manual_dir` (default
    `<data_dir>/downloads/manual`). Nothing is downloaded.

    Args:
        name: dataset name or path of a folder of images.
        data_dir: TFDS data directory (default: TFDS's, `~/tensorflow_datasets`).
        manual_dir: directory with the downloaded source archives.
        image_size: model input size, int or `(height, width)`. Default: the
            dataset's own (224 for ImageNet; for a folder, the first image's).
        validation_split: fraction held out for evaluation, for folders and
            TFDS datasets without a test or validation split.
        seed: seed of the folder train/validation split.
        channels: 1 or 3 to convert the images; default: the dataset's own
            (for a folder, the first image's).
        skip_bad_images: for a folder, leave out the files that cannot be
            decoded instead of raising `BadImagesError`.

    Returns:
        A `DataSource`.

    Raises:
        DatasetNotFoundError: the data is not present locally.
        BadImagesError: a folder holds files that cannot be decoded.
        ValueError: unknown name or invalid arguments.
    """
    name = os.fspath(name)
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(
            f"validation_split must be in [0, 1). Received: validation_split={validation_split}"
        )
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None. Received: channels={channels}")
    size = _image_size(image_size)
    path = os.path.expanduser(name)
    explicit_path = name.startswith((".", os.sep, "~"))
    if explicit_path and os.path.isdir(path):
        return _folder_source(path, size, channels, validation_split, seed, skip_bad_images)
    if name == "fashion_mnist":
        return _fashion_mnist_source(data_dir, manual_dir, size, channels)
    if name == "fashion_mnist_levels":
        from bs_keras import levels_data  # builds on this module

        return levels_data.fashion_mnist_levels_source(size, channels)
    if name == "cifar10":
        return _cifar10_source(data_dir, manual_dir, size, channels)
    if name == "imagenet2012":
        return _imagenet_source(data_dir, manual_dir, size)
    tfds = import_tfds()
    tfds_names = set(tfds.list_builders(with_community_datasets=False))
    is_tfds = name.split("/")[0].split(":")[0] in tfds_names
    if os.path.isdir(path) and not is_tfds:
        return _folder_source(path, size, channels, validation_split, seed, skip_bad_images)
    if is_tfds and not explicit_path:
        return _tfds_source(name, data_dir, manual_dir, size, channels, validation_split)
    if explicit_path or os.sep in name:
        raise DatasetNotFoundError(
            f"No folder {path!r}. A folder dataset needs one subfolder of images per class, "
            "e.g. DIR/cat/001.png, DIR/dog/002.jpg."
        )
    raise ValueError(
        f"Unknown dataset {name!r}. Use one of the built-in datasets "
        f"{', '.join(BUILTIN_DATASETS)}, another TFDS image classification dataset "
        "(e.g. mnist, cifar100; see tfds.list_builders()), or the path of a folder with one "
        "subfolder of images per class."
    )


# --------------------------------------------------------------------------- IDX / Fashion-MNIST

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


def _fashion_mnist_source(data_dir, manual_dir, size, channels):
    directory = fashion_mnist_dir()
    have_idx = all(
        os.path.isfile(os.path.join(directory, f))
        for files in FASHION_MNIST_FILES.values() for f in files
    )  # fmt: skip
    if not have_idx and not os.environ.get(FASHION_MNIST_DIR_ENV):
        return _tfds_source(
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
    (e.g. the corrupted copies of `bs_keras.levels_data`).

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


# --------------------------------------------------------------------------- TFDS


def import_tfds():
    """The `tensorflow_datasets` module, imported on first use."""
    import tensorflow_datasets as tfds  # heavy; only the TFDS paths need it

    return tfds


def default_manual_dir(builder):
    """Where TFDS looks for manually downloaded archives of `builder`."""
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _missing_sources(builder, data_dir, manual_dir, url, how_to):
    """The message for a TFDS preparation that would need a download."""
    lines = [
        f"{builder.name} is not prepared in {data_dir} and bs_keras does not download "
        f"(TFDS asked for {url}).",
    ]
    wanted = [(u, i.filename) for u, i in sorted((builder.url_infos or {}).items()) if i.filename]
    if wanted:
        lines.append(f"Put these files, as downloaded, in {manual_dir} (manual_dir):")
        for u, filename in wanted:
            state = "present" if os.path.exists(os.path.join(manual_dir, filename)) else "MISSING"
            lines.append(f"  {filename}  [{state}]  from {u}")
    else:
        lines.append(f"Put the file(s) TFDS downloads from that address in {manual_dir}.")
    lines.append(
        how_to
        or f"Or prepare it on a machine with internet (tfds build {builder.name} --data_dir DIR) "
        "and copy DIR here as data_dir."
    )
    return "\n".join(lines)


def prepare_offline(builder, manual_dir, how_to=None):
    """Prepares `builder` from local files only, unless already prepared.

    TFDS takes a source archive from `manual_dir` when it is there under its
    registered name (it checks the archive's sha256), or from its download
    cache in `<data_dir>/downloads`. Any download it would start instead is
    refused with `DatasetNotFoundError`.
    """
    if builder.is_prepared():
        return
    tfds = import_tfds()
    manual_dir = os.path.expanduser(os.fspath(manual_dir or default_manual_dir(builder)))
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    data_dir = builder.data_dir  # TFDS points it at a temporary folder while preparing
    make_download_manager = builder._make_download_manager

    def make_offline_download_manager(*args, **kwargs):
        manager = make_download_manager(*args, **kwargs)

        def refuse_download(resource):
            raise DatasetNotFoundError(
                _missing_sources(builder, data_dir, manual_dir, resource.url, how_to)
            )

        manager._download = refuse_download
        return manager

    builder._make_download_manager = make_offline_download_manager
    try:
        builder.download_and_prepare(download_config=config)
    finally:
        del builder._make_download_manager


def tfds_builder(name, data_dir):
    """The TFDS builder of `name` under `data_dir` (never from GCS)."""
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
    return import_tfds().builder(name, data_dir=data_dir, try_gcs=False)


def _image_and_label_keys(builder):
    tfds = import_tfds()
    features = builder.info.features
    keys = builder.info.supervised_keys
    if (
        isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
        and isinstance(features[keys[0]], tfds.features.Image)
        and isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):  # fmt: skip
        return keys
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    label_keys = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not image_keys or not label_keys:
        raise ValueError(
            f"TFDS dataset {builder.name!r} has no image and class-label features "
            f"({features}); bs_keras needs an image classification dataset."
        )
    return image_keys[0], label_keys[0]


def _tfds_splits(builder, validation_split):
    splits = builder.info.splits
    if not splits:  # split names unknown (e.g. under tfds.testing.mock_data)
        return "train", "test"
    if "train" not in splits:
        raise ValueError(f"TFDS dataset {builder.name!r} has no 'train' split ({list(splits)}).")
    for eval_split in ("test", "validation"):
        if eval_split in splits:
            return "train", eval_split
    n = splits["train"].num_examples
    keep = n - max(1, round(n * validation_split))
    if validation_split <= 0 or keep < 1:
        raise ValueError(
            f"TFDS dataset {builder.name!r} has only a 'train' split; pass validation_split > 0 "
            "to hold out part of it for evaluation."
        )
    return f"train[:{keep}]", f"train[{keep}:]"


def _tfds_source(name, data_dir, manual_dir, size, channels, validation_split, *,
                 mean=DEFAULT_MEAN, std=DEFAULT_STD, pad=None, how_to=None):
    tfds = import_tfds()
    builder = tfds_builder(name, data_dir)
    image_key, label_key = _image_and_label_keys(builder)
    native_shape = tuple(builder.info.features[image_key].shape)
    if size is None and None in native_shape[:2]:
        raise ValueError(
            f"TFDS dataset {name!r} has images of varying sizes; pass image_size=..."
        )
    prepare_offline(builder, manual_dir, how_to)
    train_name, eval_name = _tfds_splits(builder, validation_split)

    def read(split, shuffle_files=False, seed=None):
        config = tfds.ReadConfig(try_autocache=False, shuffle_seed=seed)
        ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=config)
        return ds.map(lambda ex: (ex[image_key], ex[label_key]))

    def count(split):
        if builder.info.splits:
            return builder.info.splits[split].num_examples
        return int(read(split).cardinality())  # split sizes unknown, e.g. under mock_data

    label = builder.info.features[label_key]
    return image_source(
        name, lambda shuffle_files, seed: read(train_name, shuffle_files, seed),
        lambda: read(eval_name), count(train_name), count(eval_name),
        native_shape=native_shape, class_names=list(label.names), size=size,
        channels=channels, mean=mean, std=std, pad=pad,
    )  # fmt: skip


def _cifar10_source(data_dir, manual_dir, size, channels):
    how_to = (
        "Get cifar-10-binary.tar.gz (the 'CIFAR-10 binary version', 162 MB) from "
        f"{CIFAR10_URL} and put it, unextracted, in manual_dir (bs_keras: manual_dir=..., "
        "train.py: --manual-dir); TFDS checks its sha256 and prepares the dataset in "
        "data_dir once. Or copy an already prepared TFDS data dir (cifar10/3.0.2) as data_dir."
    )
    return _tfds_source(
        "cifar10", data_dir, manual_dir, size, channels, 0.0,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, pad=4, how_to=how_to,
    )  # fmt: skip


def _imagenet_source(data_dir, manual_dir, size):
    tfds = import_tfds()
    builder = tfds_builder("imagenet2012", data_dir)
    if not builder.is_prepared():
        manual_dir = os.path.expanduser(os.fspath(manual_dir or default_manual_dir(builder)))
        missing = [f for f in IMAGENET_ARCHIVES if not os.path.isfile(os.path.join(manual_dir, f))]
        if missing:
            raise DatasetNotFoundError(
                f"imagenet2012 is not prepared in {builder.data_dir} and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not in {manual_dir}. Put "
                "ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB), as "
                f"downloaded, in --manual-dir DIR (get_dataset('imagenet2012', manual_dir=DIR)); "
                f"get them after registering at {IMAGENET_URL}. ILSVRC2012_img_test.tar is "
                "optional and unused. TFDS prepares the dataset once (hours, ~150 GB in data_dir)."
            )
        prepare_offline(builder, manual_dir)
    if "validation" not in builder.info.splits or "train" not in builder.info.splits:
        raise DatasetNotFoundError(
            f"imagenet2012 in {builder.data_dir} lacks the train or validation split "
            f"(has {list(builder.info.splits)}); prepare it with both archives."
        )
    size = size or (224, 224)
    resize = round(min(size) * 256 / 224)
    skip_decoding = {"image": tfds.decode.SkipDecoding()}

    def read(split, shuffle_files=False, seed=None):
        config = tfds.ReadConfig(try_autocache=False, shuffle_seed=seed)
        return builder.as_dataset(
            split=split, shuffle_files=shuffle_files, read_config=config,
            decoders=skip_decoding, as_supervised=True,
        )  # fmt: skip

    labels = builder.info.features["label"]
    info = DatasetInfo(
        name="imagenet2012", num_classes=labels.num_classes, image_shape=(*size, 3),
        train_examples=builder.info.splits["train"].num_examples,
        eval_examples=builder.info.splits["validation"].num_examples,
        class_names=list(labels.names), mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    return DataSource(
        info,
        train_split=lambda shuffle_files, seed: read("train", shuffle_files, seed),
        eval_split=lambda: read("validation"),
        decode=None,
        preprocess=lambda jpeg: _resize_center_crop(jpeg, resize, size),
        augment=lambda jpeg, seed: _random_resized_crop_flip(jpeg, size, seed),
        cache=False,
        shuffle_buffer=_IMAGENET_SHUFFLE_BUFFER,
        batched=False,
    )


def _random_resized_crop_flip(jpeg, size, seed):
    """Inception-style crop: 8-100% of the area, aspect 3/4-4/3, then flip."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(jpeg),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, size, antialias=True) / 255.0
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), (*size, 3))


def _resize_center_crop(jpeg, resize, size):
    """Resizes the shorter side to `resize`, then takes the central `size` crop."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    image = tf.image.resize(image, new_shape, antialias=True) / 255.0
    top = (new_shape[0] - size[0]) // 2
    left = (new_shape[1] - size[1]) // 2
    image = image[top : top + size[0], left : left + size[1]]
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), (*size, 3))


# --------------------------------------------------------------------------- folders


def _scan_folder(root):
    classes = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )  # fmt: skip
    files, labels = [], []
    for label, class_name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, class_name),
                                                    followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [
                os.path.join(dirpath, f) for f in filenames
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            ]  # fmt: skip
        files += sorted(found)
        labels += [label] * len(found)
    if not files:
        raise DatasetNotFoundError(
            f"No images in {root!r}. A folder dataset needs one subfolder of images "
            f"({', '.join(IMAGE_EXTENSIONS)}) per class, e.g. "
            f"{os.path.join(root, 'cat', '001.png')}; found subfolders: {classes or 'none'}."
        )
    return classes, files, labels


def _read_image(path):  # any of png/jpeg/bmp/gif, 1-4 channels, any size
    return tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)


def find_bad_images(files):
    """The files among `files` that the folder pipeline cannot decode.

    Decodes every file once (in parallel, with the pipeline's own decoder),
    then looks again at the failures to say why.

    Args:
        files: image file paths.

    Returns:
        List of `(path, reason)`, in the order of `files`.
    """
    if not files:
        return []
    paths = tf.data.Dataset.from_tensor_slices(np.array(files))
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(len(files)), paths)
    ds = ds.map(lambda i, path: (i, tf.shape(_read_image(path))), num_parallel_calls=_AUTOTUNE,
                deterministic=False)  # fmt: skip
    decoded = np.zeros(len(files), bool)
    for index, _ in ds.ignore_errors().batch(4096).as_numpy_iterator():
        decoded[index] = True
    bad = []
    for i in np.flatnonzero(~decoded):
        reason = _image_problem(files[i])
        if reason is not None:  # None: decodes now (changed since)
            bad.append((files[i], reason))
    return bad


_OTHER_FORMATS = ((b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"8BPS", "Photoshop PSD"),
                  (b"%PDF", "PDF"), (b"RIFF", "RIFF (not WebP)"))  # fmt: skip


def _image_problem(path):
    """Why `path` cannot be decoded as an image, or None if it can."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not head:
        return "empty file (0 bytes)"
    try:
        _read_image(path)
        return None
    except tf.errors.OpError as e:
        message = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\].*", "", e.message, flags=re.S).strip()
    if not message.startswith("Unknown image file format"):
        return f"corrupt or truncated ({message})"
    readable = "JPEG, PNG, GIF, BMP or WebP"
    for magic, kind in _OTHER_FORMATS:
        if head.startswith(magic):
            return f"a {kind} file, not {readable}; convert it"
    if head[4:8] == b"ftyp":
        return f"a {head[8:12].decode('ascii', 'replace')} (HEIF/MP4-family) file, not {readable}; convert it"
    try:
        if b"\0" not in head:
            head.decode("utf-8")
            return "a text file, not an image"
    except UnicodeDecodeError:
        pass
    return f"not {readable} data (unknown format)"


def _bad_images_message(root, bad, total, problem=None):
    lines = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    if problem is None:
        return (
            f"{len(bad)} of the {total} image files in {root!r} cannot be decoded:\n{lines}\n"
            "Delete or replace them, or leave them out with --skip-bad-images "
            "(get_dataset(..., skip_bad_images=True))."
        )
    return (
        f"{root!r}: {problem} once its {len(bad)} undecodable image files are left out:\n{lines}\n"
        "Replace them with images, or add more images."
    )


def _folder_source(root, size, channels, validation_split, seed, skip_bad_images=False):
    classes, files, labels = _scan_folder(root)
    bad = find_bad_images(files)
    if bad and not skip_bad_images:
        raise BadImagesError(_bad_images_message(root, bad, len(files)), bad)
    bad_paths = {path for path, _ in bad}
    good = np.array([f not in bad_paths for f in files])
    if not good.any():
        raise BadImagesError(_bad_images_message(root, bad, len(files), "no images are left"), bad)
    first = _read_image(files[int(np.argmax(good))])
    size = size or tuple(first.shape[:2])
    channels = channels or (1 if first.shape[-1] <= 2 else 3)
    n = len(files)
    n_eval = round(n * validation_split)
    if validation_split > 0:
        n_eval = max(1, n_eval)
    if n_eval >= n:
        raise ValueError(
            f"validation_split={validation_split} leaves no training images of the {n} in {root!r}."
        )
    # The split is drawn over all files, then the bad ones are left out: a
    # good image stays on its side of the split whether or not others are bad.
    order = np.random.default_rng(seed).permutation(n)
    eval_idx, train_idx = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    eval_idx, train_idx = eval_idx[good[eval_idx]], train_idx[good[train_idx]]
    if not len(train_idx) or (validation_split > 0 and not len(eval_idx)):
        split_name = "training" if not len(train_idx) else "evaluation"
        problem = f"no {split_name} images are left (validation_split={validation_split})"
        raise BadImagesError(_bad_images_message(root, bad, n, problem), bad)
    files, labels = np.array(files), np.array(labels, np.int32)

    def split(idx):
        return tf.data.Dataset.from_tensor_slices((files[idx], labels[idx]))

    source = image_source(
        os.fspath(root), lambda shuffle_files, seed: split(train_idx), lambda: split(eval_idx),
        len(train_idx), len(eval_idx), native_shape=(None, None, None), class_names=classes,
        size=size, channels=channels, mean=DEFAULT_MEAN, std=DEFAULT_STD, pad=None,
        read=_read_image,
    )  # fmt: skip
    source.info.bad_files = tuple(bad)
    return source


# --------------------------------------------------------------------------- shared image helpers


def image_source(name, train_split, eval_split, train_examples, eval_examples, *, native_shape,
                 class_names, size, channels, mean, std, pad, read=None):
    """A `DataSource` for uint8 images, cached once decoded if they fit in memory.

    Preprocessing and augmentation run on whole batches (much cheaper than
    per-example maps for small images).
    """
    size = tuple(size or native_shape[:2])
    channels = channels or native_shape[-1] or 3
    shape = (*size, channels)
    if pad is None:
        pad = max(1, min(size) // 8)

    def decode(raw):
        image = read(raw) if read is not None else raw
        image = _resize_uint8(_to_channels(image, channels), size)
        return tf.ensure_shape(image, shape)

    image_bytes = math.prod(shape)
    info = DatasetInfo(
        name=name, num_classes=len(class_names), image_shape=shape,
        train_examples=int(train_examples), eval_examples=int(eval_examples),
        class_names=class_names, mean=_per_channel(mean, channels),
        std=_per_channel(std, channels),
    )  # fmt: skip
    return DataSource(
        info,
        train_split=train_split,
        eval_split=eval_split,
        decode=None if read is None and tuple(native_shape) == shape else decode,
        preprocess=_to_unit_float,
        augment=lambda images, seed: _pad_crop_flip(_to_unit_float(images), pad, seed),
        cache=(train_examples + eval_examples) * image_bytes <= _CACHE_LIMIT_BYTES,
        shuffle_buffer=max(1024, _SHUFFLE_BUFFER_BYTES // image_bytes),
        batched=True,
    )


def _to_unit_float(images):
    return tf.cast(images, tf.float32) / 255.0


def _pad_crop_flip(images, pad, seed):
    """Zero-pads a batch by `pad`, crops each image back at a random offset, flips half.

    The random window of image i starts at `(dy_i, dx_i)`, uniform in
    `[0, 2 * pad]`; one gather per axis does the crop (and the flip, by
    reversing the column indices).
    """
    _, height, width, _ = images.shape
    offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    batch = tf.shape(images)[0]
    offsets = tf.random.stateless_uniform([batch, 2], offset_seed, 0, 2 * pad + 1, tf.int32)
    flips = tf.random.stateless_uniform([batch, 1], flip_seed, 0, 2, tf.int32) > 0
    rows = offsets[:, :1] + tf.range(height)[None]
    cols = offsets[:, 1:] + tf.range(width)[None]
    cols = tf.where(flips, tf.reverse(cols, [1]), cols)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])  # zeros: black
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def _to_channels(image, channels):
    """A uint8 image with 1-4 channels (gray, gray+alpha, RGB, RGBA) to 1 or 3."""

    def gray():
        return image[..., :1]

    def rgb_to_gray():
        return tf.image.rgb_to_grayscale(image[..., :3])

    def gray_to_rgb():
        return tf.image.grayscale_to_rgb(image[..., :1])

    def rgb():
        return image[..., :3]

    have = image.shape[-1]
    if have == channels:
        return image
    low, high = (gray, rgb_to_gray) if channels == 1 else (gray_to_rgb, rgb)
    if have is not None:
        return low() if have <= 2 else high()
    out = tf.cond(tf.shape(image)[-1] <= 2, low, high)
    return tf.ensure_shape(out, (None, None, channels))


def _resize_uint8(image, size):
    """Bilinear (antialiased) resize of a uint8 image; a no-op at the same size."""

    def resized():
        out = tf.image.resize(image, size, antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    static = tuple(image.shape[:2])
    if static == tuple(size):
        return image
    if None not in static:
        return resized()
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
    return tf.cond(same, lambda: image, resized)


def _image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(
            f"image_size must be an int or (height, width). Received: image_size={image_size}"
        )
    return size


def _per_channel(values, channels):
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    return (sum(values) / len(values),) * channels


def check_batch_size(batch_size):
    """Raises a ValueError unless `batch_size` is a positive integer."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer. Received: batch_size={batch_size}"
        )
