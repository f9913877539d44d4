"""uint8 image datasets and the image operations of their pipelines.

`image_source` turns splits of uint8 images (arrays, TFDS records or files)
into a `DataSource`: decoded once and cached if they fit in memory,
preprocessed and augmented (zero-pad, random crop, flip) on whole batches.
Fashion-MNIST, TFDS datasets and image folders all go through it.
"""

import math

import tensorflow as tf

from bs_keras.data.source import DataSource, DatasetInfo, per_channel

_CACHE_LIMIT_BYTES = 2 << 30  # decoded datasets up to this size are cached in memory
_SHUFFLE_BUFFER_BYTES = 512 << 20


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
        class_names=class_names, mean=per_channel(mean, channels),
        std=per_channel(std, channels),
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


def check_image_size(image_size):
    """`image_size` (an int or `(height, width)`) as a `(height, width)` tuple, or None."""
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
