"""Calibration images: preprocessed float32 batches shaped like the model input.

Used for int8 quantization (representative dataset), for compaction (gate
categories) and for the parity table. A source is one of:

- a dataset name (`fashion_mnist`, `cifar10`, `imagenet2012`, any TFDS image
  classification name): the first training images through
  `bs_keras.data.get_dataset(name).raw_train_images(n)`, resized and converted
  to the model's input size and channels, normalized with that dataset's
  mean/std exactly as in training; a segmentation name (`cityscapes`,
  `fashion_canvas`): training crops of the model's input size from
  `bs_keras.data.get_segmentation_dataset(name)` (seed 0), as in training;
- a folder of images (png/jpeg/bmp/gif, searched recursively, sorted by
  path): decoded, converted to the model's channels, resized (bilinear,
  antialiased) to the model's input size, scaled to [0, 1] and normalized with
  mean 0.5 and std 0.5, as `bs_keras.data` does for image folders;
- a `.npy` file of already preprocessed float images `(N, H, W, C)`.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from bs_keras import data as bs_data


def _model_image_shape(input_shape):
    shape = tuple(input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise ValueError(
            "Calibration needs a model with an NHWC image input of 1 or 3 channels. "
            f"Received input shape {tuple(input_shape)}."
        )
    return shape


def _check_batch(images, shape, source):
    expected = tuple(shape)
    if images.ndim != 4 or any(e is not None and e != d for e, d in zip(expected, images.shape[1:])):
        dims = ", ".join("None" if d is None else str(d) for d in expected)
        raise ValueError(
            f"Calibration images from {source!r} have shape {images.shape}; the model expects "
            f"(N, {dims})."
        )
    if not np.all(np.isfinite(images)):
        raise ValueError(f"Calibration images from {source!r} contain NaN or infinite values.")
    return images


def _from_npy(path, shape, n):
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"Cannot read {path!r} as a NumPy array: {e}") from e
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"{path!r} holds {images.dtype} values; the .npy calibration file must hold "
            "preprocessed (normalized) float images, not raw pixels."
        )
    images = np.asarray(images[:n], np.float32)
    return _check_batch(images, shape, path)


def _image_files(root):
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [
            os.path.join(dirpath, f)
            for f in filenames
            if f.lower().endswith(bs_data.IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return sorted(files)


def _decode(path, size, channels):
    image = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False)
    have = int(image.shape[-1])
    if channels == 1:
        image = image[..., :1] if have <= 2 else tf.image.rgb_to_grayscale(image[..., :3])
    else:
        image = tf.image.grayscale_to_rgb(image[..., :1]) if have <= 2 else image[..., :3]
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        image = tf.image.resize(image, size, antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return image.numpy()


def _from_folder(root, shape, n):
    files = _image_files(root)
    if not files:
        raise FileNotFoundError(
            f"No images ({', '.join(bs_data.IMAGE_EXTENSIONS)}) under {root!r}."
        )
    height, width, channels = shape
    size = None if height is None or width is None else (height, width)
    images = []
    for path in files[:n]:
        try:
            images.append(_decode(path, size, channels))
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"Cannot decode image {path!r}: {e.message}") from e
    if size is None and len({im.shape for im in images}) > 1:
        raise ValueError(
            f"The images under {root!r} differ in size and the model takes any size; "
            "resize them first."
        )
    # (0.5,) broadcasts over the channels.
    mean = np.asarray(bs_data.DEFAULT_MEAN, np.float32)
    std = np.asarray(bs_data.DEFAULT_STD, np.float32)
    batch = np.stack(images).astype(np.float32) / 255.0
    return _check_batch((batch - mean) / std, shape, root), bs_data.DEFAULT_MEAN, bs_data.DEFAULT_STD


def _from_segmentation_dataset(name, shape, n, data_dir=None, manual_dir=None):
    """Training crops of the model's input size, as the model saw them in
    training (scale, crop and flip from seed 0), normalized likewise."""
    height, width, channels = shape
    if height is None or width is None:
        raise ValueError(f"Calibration from {name!r} needs a model with a fixed input size (the crop size).")
    canvas = {"canvas_size": max(height, width)} if name == "fashion_canvas" else {}  # canvases as large as the input
    source = bs_data.get_segmentation_dataset(name, data_dir=data_dir, manual_dir=manual_dir,
                                              crop_size=(height, width), **canvas)
    if source.info.channels != channels:
        raise ValueError(f"{name!r} images have {source.info.channels} channels; the model takes {channels}.")
    batch = min(n, source.info.train_examples, 32)
    batches = source.train(batch, seed=0).take(-(-n // batch))
    images = np.concatenate([images.numpy() for images, _ in batches])[:n]
    return _check_batch(images, shape, name), source.info.mean, source.info.std


def _from_dataset(name, shape, n, data_dir=None, manual_dir=None):
    if name in bs_data.SEGMENTATION_DATASETS:
        return _from_segmentation_dataset(name, shape, n, data_dir=data_dir, manual_dir=manual_dir)
    height, width, channels = shape
    size = None if height is None or width is None else (height, width)
    source = bs_data.get_dataset(
        name, data_dir=data_dir, manual_dir=manual_dir, image_size=size, channels=channels
    )
    images = source.raw_train_images(n).astype(np.float32)
    return _check_batch(images, shape, name), source.info.mean, source.info.std


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration images and the normalization they went through.

    Attributes:
        images: float32 `(N, H, W, C)` preprocessed images.
        mean, std: the per-channel statistics (of [0, 1] pixels) the images
            were normalized with: the dataset's own for a dataset name, 0.5
            for a folder; `None` for a `.npy` file (preprocessed elsewhere).
    """

    images: np.ndarray
    mean: tuple | None = None
    std: tuple | None = None


def load_calibration(source, input_shape, n=256, data_dir=None, manual_dir=None):
    """Preprocessed float32 calibration images for a model input.

    `read_calibration` with the same arguments also says how they were normalized.

    Args:
        source: dataset name, folder of images or `.npy` file (see module doc).
        input_shape: the model input shape, `(H, W, C)` or `(None, H, W, C)`.
        n: at most this many images.
        data_dir: TFDS data directory for dataset names.
        manual_dir: directory with source archives for dataset names.

    Returns:
        float32 array `(min(n, available), H, W, C)`.

    Raises:
        FileNotFoundError: a path that does not exist, a folder without images,
            or a dataset that is not available locally.
        ValueError: unusable data (wrong shape, raw integer pixels in a .npy).
    """
    return read_calibration(source, input_shape, n, data_dir=data_dir, manual_dir=manual_dir).images


def read_calibration(source, input_shape, n=256, data_dir=None, manual_dir=None):
    """`load_calibration`'s images with their normalization, as a `Calibration`."""
    if int(n) < 1:
        raise ValueError(f"The number of calibration samples must be positive. Received: {n}")
    shape = _model_image_shape(input_shape)
    source = os.fspath(source)
    path = os.path.expanduser(source)
    if source.lower().endswith(".npy"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Calibration file {source!r} does not exist.")
        found = Calibration(_from_npy(path, shape, int(n)))
    elif os.path.isdir(path):
        found = Calibration(*_from_folder(path, shape, int(n)))
    elif source.startswith((".", os.sep, "~")) or os.sep in source:
        raise FileNotFoundError(
            f"Calibration source {source!r} is neither a folder of images nor a .npy file."
        )
    else:
        found = Calibration(*_from_dataset(source, shape, int(n), data_dir=data_dir, manual_dir=manual_dir))
    if len(found.images) == 0:
        raise ValueError(f"Calibration source {source!r} gave no images.")
    return found
