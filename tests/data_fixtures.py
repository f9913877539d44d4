"""Writers of tiny datasets in the real on-disk formats (tests/test_data.py, the
session-wide synthetic Fashion-MNIST of tests/conftest.py)."""

import gzip
import io
import os
import struct
import tarfile

import numpy as np
import tensorflow as tf

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def write_idx(path, array, magic=None):
    """Writes `array` as an IDX file (gzip-compressed if `path` ends in .gz)."""
    array = np.asarray(array, np.uint8)
    magic = magic if magic is not None else 0x0800 | array.ndim
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return path


def write_fashion_mnist(directory, x_train, y_train, x_test, y_test):
    """The four Fashion-MNIST `.gz` IDX files, as in the Debian package."""
    os.makedirs(directory, exist_ok=True)
    for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), x)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), y)
    return directory


def _add(tar, name, data):
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def cifar10_records(images, labels):
    """CIFAR-10 binary records: 1 label byte, then 3072 bytes R, G, B planes (CHW)."""
    images = np.asarray(images, np.uint8)
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([np.asarray(labels, np.uint8)[:, None], chw], axis=1).tobytes()


def write_cifar10_archive(path, train_batches, test, names=CIFAR10_NAMES):
    """`cifar-10-binary.tar.gz` with data_batch_1..5.bin, test_batch.bin, batches.meta.txt.

    Args:
        train_batches: five `(images NHWC uint8, labels)` pairs.
        test: one `(images, labels)` pair.
    """
    assert len(train_batches) == 5
    with tarfile.open(path, "w:gz") as tar:
        for i, (images, labels) in enumerate(train_batches, 1):
            _add(tar, f"cifar-10-batches-bin/data_batch_{i}.bin", cifar10_records(images, labels))
        _add(tar, "cifar-10-batches-bin/test_batch.bin", cifar10_records(*test))
        _add(tar, "cifar-10-batches-bin/batches.meta.txt", ("\n".join(names) + "\n\n").encode())
    return path


def tfds_text(relative_path):
    """Lines of a text file shipped in the TFDS wheel."""
    import tensorflow_datasets as tfds

    with open(tfds.core.tfds_path(relative_path)) as f:
        return f.read().split()


def imagenet_synsets():
    """The 1000 synset ids in TFDS label order."""
    return tfds_text("datasets/imagenet2012/labels.txt")


def imagenet_validation_synsets():
    """Synset of each validation image, in the sorted order of the image names."""
    return tfds_text("datasets/imagenet2012/validation_labels.txt")


def jpeg(image, quality=95):
    return tf.io.encode_jpeg(np.asarray(image, np.uint8), quality=quality).numpy()


def write_imagenet_manual_dir(directory, train, val):
    """ILSVRC2012_img_train.tar (one `<synset>.tar` of JPEGs per class) and _val.tar.

    Args:
        train: `{synset: [image, ...]}`; images are uint8 HxWx3 arrays.
        val: list of images, stored as ILSVRC2012_val_00000001.JPEG, ...
    """
    os.makedirs(directory, exist_ok=True)
    with tarfile.open(os.path.join(directory, "ILSVRC2012_img_train.tar"), "w") as tar:
        for synset, images in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i, image in enumerate(images):
                    _add(class_tar, f"{synset}_{i}.JPEG", jpeg(image))
            _add(tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(os.path.join(directory, "ILSVRC2012_img_val.tar"), "w") as tar:
        for i, image in enumerate(val, 1):
            _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(image))
    return directory


def write_image_folder(root, classes, ext="png"):
    """`root/<class>/<i>.<ext>` for `classes = {name: [uint8 HxWxC image, ...]}`."""
    for name, images in classes.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, image in enumerate(images):
            image = np.asarray(image, np.uint8)
            if ext == "png":
                data = tf.io.encode_png(image).numpy()
            elif ext in ("jpg", "jpeg"):
                data = jpeg(image)
            else:
                raise ValueError(ext)
            with open(os.path.join(root, name, f"{i:03d}.{ext}"), "wb") as f:
                f.write(data)
    return root


def synthetic_fashion_mnist(n_train=2000, n_test=500, seed=0):
    """Small, learnable stand-in for Fashion-MNIST: 28x28 uint8, 10 classes.

    Each class is a bright shape of its own (a box whose size, position and
    aspect depend on the class, with a class-dependent stripe pattern) on a
    black background with a few faint pixels; brightness, offset and pixel
    noise vary per image. Background stays 0 or faint (<= 15, under the
    fashion_canvas threshold), the object is >= 60: like the real images,
    which start at 0 and have bright items.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]

    def images(labels):
        out = np.zeros((len(labels), 28, 28), np.uint8)
        for i, c in enumerate(labels):
            c = int(c)
            height, width = 16 + 2 * (c % 5), 14 + 3 * (c // 5) + 2 * (c % 3)
            top = 2 + (c * 7) % (26 - height) + rng.integers(-1, 2)
            left = 2 + (c * 5) % (26 - width) + rng.integers(-1, 2)
            top, left = int(np.clip(top, 0, 28 - height)), int(np.clip(left, 0, 28 - width))
            box = (yy >= top) & (yy < top + height) & (xx >= left) & (xx < left + width)
            stripes = ((yy + xx * (c % 2)) // (1 + c % 4)) % 2 == 0
            value = rng.integers(150, 256) * np.where(stripes, 1.0, 0.55)
            value = value + rng.normal(0, 12, (28, 28))
            image = np.where(box, np.clip(value, 60, 255), 0)
            faint = rng.random((28, 28)) < 0.03
            image = np.where(~box & faint, rng.integers(1, 16, (28, 28)), image)
            out[i] = image.astype(np.uint8)
        return out

    y_train = np.arange(n_train) % 10
    rng.shuffle(y_train)
    y_test = np.arange(n_test) % 10
    rng.shuffle(y_test)
    return (images(y_train), y_train.astype(np.uint8)), (images(y_test), y_test.astype(np.uint8))
