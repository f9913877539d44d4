"""Folders of images, one subfolder per class.

Every image is decoded once first: files that cannot be are named all at
once (`BadImagesError`) or left out (`skip_bad_images`). A seeded share of
the files is held out for evaluation.
"""

import os
import re

import numpy as np
import tensorflow as tf

from bs_keras.data.image_ops import image_source
from bs_keras.data.source import DEFAULT_MEAN, DEFAULT_STD, DatasetNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

_AUTOTUNE = tf.data.AUTOTUNE


class BadImagesError(ValueError):
    """Files of an image folder that TensorFlow cannot decode.

    The message names every file and why; `bad` holds the `(path, reason)`
    pairs.
    """

    def __init__(self, message, bad=()):
        super().__init__(message)
        self.bad = list(bad)


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


def folder_source(root, size, channels, validation_split, seed, skip_bad_images=False):
    """The `DataSource` of a folder with one subfolder of images per class."""
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
