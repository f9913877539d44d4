"""The interface every classification input pipeline implements.

A `DataSource` wraps a dataset's two splits and builds the batched
`tf.data` pipelines of `(images, labels)` that training and evaluation read;
its `DatasetInfo` says what they yield. The modules beside this one each
make `DataSource`s for one kind of input (`fashion_mnist`, `levels`,
`tfds_source`, `imagenet`, `folder`), most through
`image_ops.image_source`; `bs_keras.data.get_dataset` picks one by name.
"""

import dataclasses

import numpy as np
import tensorflow as tf

# Per-channel statistics on the [0, 1] scale of datasets without their own.
DEFAULT_MEAN, DEFAULT_STD = (0.5,), (0.5,)

_AUTOTUNE = tf.data.AUTOTUNE


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither prepared nor are its source files present.

    The message names the missing files, where to put them and how to get
    them; bs_keras never downloads.
    """


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
        self._mean = tf.constant(per_channel(info.mean, channels), tf.float32)
        self._std = tf.constant(per_channel(info.std, channels), tf.float32)

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


def per_channel(values, channels):
    """`values` (mean or std) for `channels` channels: as is, repeated, or averaged."""
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
