"""Tests of bs_keras.data on real and tiny generated datasets, fully offline.

The real TFDS cifar10 and imagenet2012 builders prepare tiny archives written
in the original formats (tests/data_fixtures.py). Every test runs with Python
sockets disabled and fails if anything tried to connect.
"""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bs_keras import data
from bs_keras.data import fashion_mnist, imagenet
from data_fixtures import (
    CIFAR10_ARCHIVE,
    CIFAR10_NAMES,
    CIFAR10_URL,
    imagenet_synsets,
    imagenet_validation_synsets,
    write_cifar10_archive,
    write_fashion_mnist,
    write_idx,
    write_image_folder,
    write_imagenet_manual_dir,
)

REAL_FASHION_MNIST = all(
    os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, f))
    for files in data.FASHION_MNIST_FILES.values() for f in files
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("offline")
tfds.disable_progress_bar()


def unnormalize(images, info):
    """Normalized float images back to uint8 (exact for undistorted pixels)."""
    images = np.asarray(images) * np.array(info.std) + np.array(info.mean)
    return np.round(images * 255).astype(np.int64)


def batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def find_window(output, image, pad):
    """The `(dy, dx, flipped)` with `output == (flip of) zero-padded image[dy:, dx:]`."""
    h, w = image.shape[:2]
    padded = np.pad(image.astype(np.int64), [(pad, pad), (pad, pad), (0, 0)])
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if np.array_equal(output, window[:, ::-1] if flipped else window):
                    hits.append((dy, dx, flipped))
    assert len(hits) == 1, f"expected exactly one matching window, found {hits}"
    return hits[0]


def check_pad_crop_flip(source, originals, pad, samples):
    """Augmented outputs are shifted windows of the padded originals, ~50% flipped."""
    assert len(originals) == source.info.train_examples
    ds = source.train(len(originals), shuffle=False, augment=True, seed=5, repeat=True)
    images, labels = batches(ds.take(samples // len(originals)))
    assert images.dtype == np.float32 and images.shape[1:] == source.info.image_shape
    windows = [
        find_window(out, originals[i % len(originals)], pad)
        for i, out in enumerate(unnormalize(images, source.info))
    ]
    flips = np.mean([f for _, _, f in windows])
    assert 0.35 < flips < 0.65, flips
    offsets = {(dy, dx) for dy, dx, _ in windows}
    assert len(offsets) > (2 * pad + 1) ** 2 // 2  # the crop position varies
    assert {dy for dy, _ in offsets} == set(range(2 * pad + 1))


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.fixture(scope="module")
def real_fashion_mnist():
    if not REAL_FASHION_MNIST:
        pytest.skip(f"dataset-fashion-mnist is not installed ({data.FASHION_MNIST_DIR}); apt-get install dataset-fashion-mnist")
    return data.load_fashion_mnist(data.FASHION_MNIST_DIR)


def test_real_fashion_mnist_idx_files(real_fashion_mnist):
    (x_train, y_train), (x_test, y_test) = real_fashion_mnist
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and x_test.dtype == np.uint8
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    assert x_train.min() == 0 and x_train.max() == 255
    # The normalization constants are this training set's statistics.
    assert abs(x_train.mean() / 255 - data.FASHION_MNIST_MEAN[0]) < 5e-4
    assert abs(x_train.std() / 255 - data.FASHION_MNIST_STD[0]) < 5e-4


def test_real_fashion_mnist_source(real_fashion_mnist, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    (_, _), (x_test, y_test) = real_fashion_mnist
    source = data.get_dataset("fashion_mnist")
    info = source.info
    assert (info.num_classes, info.image_shape) == (10, (28, 28, 1))
    assert (info.train_examples, info.eval_examples) == (60000, 10000)
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    x, y = next(iter(source.eval(500)))
    expected = (x_test[:500, :, :, None] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), y_test[:500])
    assert y.dtype == tf.int32
    calibration = source.raw_train_images(2000)
    assert calibration.shape == (2000, 28, 28, 1) and calibration.dtype == np.float32
    assert abs(calibration.mean()) < 0.05 and abs(calibration.std() - 1) < 0.05
    x, y = next(iter(source.train(64, seed=0)))
    assert x.shape == (64, 28, 28, 1) and x.dtype == tf.float32 and y.shape == (64,)


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab", labels)  # uncompressed works too
    out = data.read_idx(tmp_path / "img.gz", data.IDX_IMAGES_MAGIC)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "lab", data.IDX_LABELS_MAGIC), labels)


def test_idx_wrong_magic_names_the_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(4, np.uint8))  # labels
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*0x00000801.*0x00000803"):
        data.read_idx(path, data.IDX_IMAGES_MAGIC)
    path.write_bytes(gzip.compress(b"GIF89a not an idx file"))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not an IDX file"):
        data.read_idx(path)


def test_idx_truncated_names_the_file(tmp_path):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.ones((20, 28, 28), np.uint8))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # cut gzip stream
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: corrupt or truncated"):
        data.read_idx(path)
    raw = gzip.decompress(whole)
    path.write_bytes(gzip.compress(raw[:-100]))  # valid gzip, short payload
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: truncated.*\(20, 28, 28\)"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(raw + b"\0"))
    with pytest.raises(ValueError, match="trailing bytes"):
        data.read_idx(path)


def tiny_fashion(directory, n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    x_train = rng.integers(1, 256, (n_train, 28, 28), dtype=np.uint8)  # nonzero: padding shows
    x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_train = np.arange(n_train, dtype=np.uint8) % 10
    y_test = (np.arange(n_test, dtype=np.uint8) * 3) % 10
    write_fashion_mnist(directory, x_train, y_train, x_test, y_test)
    return (x_train, y_train), (x_test, y_test)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    tiny_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz has 5 images.*4 labels"):
        data.load_fashion_mnist(tmp_path)


def test_fashion_mnist_from_env_dir_round_trip_and_augmentation(tmp_path, monkeypatch):
    (x_train, y_train), (x_test, y_test) = tiny_fashion(tmp_path)
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    source = data.get_dataset("fashion_mnist")
    assert (source.info.train_examples, source.info.eval_examples) == (12, 5)
    x, y = batches(source.eval(2))  # batches of 2, 2, 1
    np.testing.assert_array_equal(unnormalize(x, source.info)[..., 0], x_test)
    np.testing.assert_array_equal(y, y_test)
    x, y = batches(source.train(4, shuffle=False, augment=False))
    np.testing.assert_array_equal(unnormalize(x, source.info)[..., 0], x_train)
    np.testing.assert_array_equal(y, y_train)
    x, y = batches(source.train(5, seed=1))
    assert x.shape == (10, 28, 28, 1)  # drop_remainder: 2 full batches of 12
    check_pad_crop_flip(source, x_train[..., None], pad=2, samples=240)


def test_fashion_mnist_env_dir_without_files(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("fashion_mnist")
    message = str(e.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_DIR_ENV, raising=False)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", str(tmp_path / "no_debian_package"))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("fashion_mnist", data_dir=tmp_path / "tfds")
    message = str(e.value)
    assert "train-images-idx3-ubyte.gz  [MISSING]" in message
    assert "apt-get install dataset-fashion-mnist" in message
    with tfds.testing.mock_data(num_examples=10):
        source = data.get_dataset("fashion_mnist")
        assert source.info.image_shape == (28, 28, 1) and source.info.num_classes == 10
        assert source.info.class_names == data.FASHION_MNIST_CLASSES
        assert source.info.mean == data.FASHION_MNIST_MEAN
        x, y = next(iter(source.train(4, seed=0)))
        assert x.shape == (4, 28, 28, 1) and y.dtype == tf.int32


# --------------------------------------------------------------------------- cifar10 (real)


def cifar_images(n, start):
    rng = np.random.default_rng(start)
    return rng.integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)  # nonzero: padding shows


@pytest.fixture(scope="module")
def tiny_cifar10(tmp_path_factory):
    """A tiny cifar-10-binary.tar.gz in manual_dir, prepared by the real TFDS builder.

    TFDS takes the archive from manual_dir because cifar10's registered URL
    info names the file `cifar-10-binary.tar.gz`, and verifies its sha256;
    the only thing faked is that registry entry (a tiny archive cannot have
    the real checksum).
    """
    root = tmp_path_factory.mktemp("cifar10")
    train = [(cifar_images(4, i), (np.arange(4) + 2 * i) % 10) for i in range(5)]
    test = (cifar_images(6, 99), np.array([9, 8, 7, 0, 1, 2]))
    manual_dir = root / "manual"
    manual_dir.mkdir()
    archive = write_cifar10_archive(manual_dir / CIFAR10_ARCHIVE, train, test)
    info = tfds.download.checksums.compute_url_info(archive)
    info = tfds.download.checksums.UrlInfo(info.size, info.checksum, CIFAR10_ARCHIVE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfds.builder_cls("cifar10"), "url_infos", {CIFAR10_URL: info})
        source = data.get_dataset("cifar10", data_dir=root / "data", manual_dir=manual_dir)
    images = np.concatenate([x for x, _ in train])
    labels = np.concatenate([y for _, y in train])
    return source, root, (images, labels), test


def by_content(images, labels):
    return {np.asarray(x, np.uint8).tobytes(): int(y) for x, y in zip(images, labels)}


def test_cifar10_real_builder_round_trip(tiny_cifar10):
    source, root, (x_train, y_train), (x_test, y_test) = tiny_cifar10
    info = source.info
    assert info.name == "cifar10" and info.class_names == CIFAR10_NAMES
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    assert (info.train_examples, info.eval_examples) == (20, 6)
    assert info.mean == data.CIFAR10_MEAN and info.std == data.CIFAR10_STD
    x, y = batches(source.eval(4))
    assert x.dtype == np.float32 and y.dtype == np.int32 and len(x) == 6
    assert by_content(unnormalize(x, info), y) == by_content(x_test, y_test)
    x, y = batches(source.train(5, shuffle=False, augment=False))
    assert by_content(unnormalize(x, info), y) == by_content(x_train, y_train)
    assert (root / "data" / "cifar10" / "3.0.2" / "dataset_info.json").exists()
    # Prepared now: no manual_dir needed any more.
    again = data.get_dataset("cifar10", data_dir=root / "data")
    np.testing.assert_array_equal(again.raw_train_images(20), source.raw_train_images(20))


def test_cifar10_augmentation_is_pad4_crop_flip(tiny_cifar10):
    source = tiny_cifar10[0]
    x, _ = batches(source.train(20, shuffle=False, augment=False))
    check_pad_crop_flip(source, unnormalize(x, source.info), pad=4, samples=400)


def test_cifar10_train_pipeline_seeding(tiny_cifar10):
    source = tiny_cifar10[0]
    x, y = batches(source.train(8, seed=3))
    assert x.shape == (16, 32, 32, 3) and y.shape == (16,)
    x2, y2 = batches(source.train(8, seed=3))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = batches(source.train(8, seed=4))
    assert not np.array_equal(x, x3)
    ds = source.train(8, seed=3)
    first, second = batches(ds)[0], batches(ds)[0]  # reshuffled/re-augmented each pass
    assert not np.array_equal(first, second)


def test_cifar10_archive_with_wrong_checksum_is_rejected(tmp_path):
    """The manual_dir route is the real one: TFDS checks the archive's sha256."""
    write_cifar10_archive(
        tmp_path / CIFAR10_ARCHIVE, [(cifar_images(1, i), [0]) for i in range(5)],
        (cifar_images(1, 9), [0]),
    )  # fmt: skip
    with pytest.raises(tfds.download.download_manager.NonMatchingChecksumError):
        data.get_dataset("cifar10", data_dir=tmp_path / "data", manual_dir=tmp_path)


def test_cifar10_missing_archive(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("cifar10", data_dir=tmp_path / "data")
    message = str(e.value)
    manual = os.path.join(str(tmp_path / "data"), "downloads", "manual")
    assert f"cifar-10-binary.tar.gz  [MISSING]" in message and manual in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert os.path.join("cifar10", "3.0.2") in message and "incomplete" not in message
    assert not (tmp_path / "data" / "cifar10" / "3.0.2").exists()


# --------------------------------------------------------------------------- imagenet2012 (real)

COLORS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.uint8)


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    synsets = imagenet_synsets()[:3]
    train = {
        s: [np.full((30 + 10 * i, 40, 3), COLORS[k]) for i in range(2)]
        for k, s in enumerate(synsets)
    }  # fmt: skip
    val = [np.full((36, 48, 3), COLORS[k]) for k in range(3)]
    # Red | green | blue columns, edges on JPEG chroma-block borders. Resizing the
    # shorter side to 37 and center-cropping 32 keeps original columns 27-69:
    # green only; a squashed resize or an off-center crop would show red/blue.
    stripes = np.zeros((48, 96, 3), np.uint8)
    stripes[:, :16, 0] = stripes[:, 16:80, 1] = stripes[:, 80:, 2] = 255
    val.append(stripes)
    write_imagenet_manual_dir(root / "manual", train, val)
    source = data.get_dataset(
        "imagenet2012", data_dir=root / "data", manual_dir=root / "manual", image_size=32
    )
    return source, synsets


def color_index(image):
    """Which of COLORS a (near) constant image has."""
    return int(np.argmin(np.abs(COLORS[:, None, None] / 255 - image[None]).mean(axis=(1, 2, 3))))


def test_imagenet2012_real_builder(tiny_imagenet):
    source, synsets = tiny_imagenet
    info = source.info
    all_synsets = imagenet_synsets()
    assert (info.num_classes, info.image_shape) == (1000, (32, 32, 3))
    assert (info.train_examples, info.eval_examples) == (6, 4)
    assert info.class_names == all_synsets
    # Validation labels: TFDS pairs the sorted file names with validation_labels.txt.
    expected = [all_synsets.index(s) for s in imagenet_validation_synsets()[:4]]
    x, y = batches(source.eval(3))
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
    pixels = np.asarray(x) * info.std + info.mean
    assert pixels.min() > -0.02 and pixels.max() < 1.02
    assert sorted(y.tolist()) == sorted(expected)
    for image, label in zip(pixels, y):
        k = expected.index(label)
        if k < 3:
            assert color_index(image) == k
        else:  # center crop of the striped image: the green middle only
            assert image[..., 1].mean() > 0.85 and image[..., [0, 2]].max() < 0.35
    x, y = batches(source.train(3, seed=0))
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    pixels = np.asarray(x) * info.std + info.mean
    assert pixels.min() > -0.02 and pixels.max() < 1.02
    for image, label in zip(pixels, y):
        assert all_synsets[label] == synsets[color_index(image)]
    calibration = source.raw_train_images(4)
    assert calibration.shape == (4, 32, 32, 3) and calibration.dtype == np.float32


def test_imagenet2012_random_resized_crop():
    """Crops of a horizontal gradient: their value span is their width fraction."""
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (48, 1, 3))
    encoded = tf.io.encode_jpeg(gradient.astype(np.uint8), quality=100)
    crops = [
        imagenet._random_resized_crop_flip(encoded, (16, 16), tf.constant([s, 0], tf.int64)).numpy()
        for s in range(40)
    ]  # fmt: skip
    assert all(c.shape == (16, 16, 3) for c in crops)
    spans = [float(c[:, :, 0].max() - c[:, :, 0].min()) for c in crops]
    assert len({round(s, 1) for s in spans}) > 5  # crops of different widths
    assert min(spans) > 0.12  # area >= 8% with aspect <= 4/3: width >= 21%
    flipped = sum(c[0, 0, 0] > c[0, -1, 0] for c in crops)
    assert 8 < flipped < 32


def test_imagenet2012_missing_archives(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("imagenet2012", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    message = str(e.value)
    assert "ILSVRC2012_img_train.tar is not in" in message
    assert "ILSVRC2012_img_val.tar" in message and "--manual-dir" in message
    assert str(tmp_path / "manual") in message and "image-net.org" in message


# --------------------------------------------------------------------------- generic TFDS


@pytest.mark.parametrize(
    "name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar100", (32, 32, 3), 100)]
)
def test_generic_tfds_dataset_with_mock_data(name, shape, classes):
    with tfds.testing.mock_data(num_examples=12):
        source = data.get_dataset(name)
        info = source.info
        assert (info.num_classes, info.image_shape) == (classes, shape)
        assert (info.train_examples, info.eval_examples) == (12, 12)
        assert len(info.class_names) == classes
        x, y = next(iter(source.train(4, seed=0)))
        assert x.shape == (4, *shape) and x.dtype == tf.float32 and y.dtype == tf.int32
        assert -1.0 <= x.numpy().min() and x.numpy().max() <= 1.0  # mean 0.5, std 0.5
        x, y = batches(source.eval(5))
        assert x.shape == (12, *shape) and -1 <= x.min() and x.max() <= 1
        assert y.min() >= 0 and y.max() < classes
        resized = data.get_dataset(name, image_size=16, channels=3)
        assert resized.info.image_shape == (16, 16, 3)
        assert next(iter(resized.train(4)))[0].shape == (4, 16, 16, 3)


def test_generic_tfds_variable_image_size_needs_image_size(tmp_path):
    with pytest.raises(ValueError, match="varying sizes; pass image_size"):
        data.get_dataset("oxford_flowers102", data_dir=tmp_path)


def test_generic_tfds_not_prepared_lists_the_files(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset("mnist", data_dir=tmp_path)
    message = str(e.value)
    for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert f"{f}  [MISSING]" in message
    assert "tfds build mnist" in message


def test_unknown_name():
    with pytest.raises(ValueError) as e:
        data.get_dataset("no_such_dataset")
    message = str(e.value)
    for word in ("fashion_mnist", "cifar10", "imagenet2012", "folder"):
        assert word in message


# --------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    sizes = [(20, 24), (31, 17), (12, 40), (24, 20), (20, 24)]
    classes = {
        name: [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]
        for name in ("dog", "cat", "fish")
    }  # fmt: skip
    write_image_folder(root, {**classes, "cat": classes["cat"][:3]})
    write_image_folder(root, {"cat": classes["cat"][3:]}, ext="jpg")  # cat/000.jpg, cat/001.jpg
    return root


def test_folder_classes_sizes_and_split(mixed_folder):
    source = data.get_dataset(str(mixed_folder), validation_split=0.2, seed=0)
    info = source.info
    assert info.class_names == ["cat", "dog", "fish"] and info.num_classes == 3
    assert info.image_shape == (24, 20, 3)  # first image found: cat/000.jpg
    assert (info.train_examples, info.eval_examples) == (12, 3)
    x_eval, y_eval = batches(source.eval(2))
    x_train, y_train = batches(source.train(4, shuffle=False, augment=False))
    assert x_eval.shape == (3, 24, 20, 3) and x_train.shape == (12, 24, 20, 3)
    np.testing.assert_array_equal(np.bincount(np.concatenate([y_eval, y_train])), [5, 5, 5])
    x, _ = next(iter(source.train(4, seed=0)))
    assert x.shape == (4, 24, 20, 3) and x.dtype == tf.float32
    assert -1 <= x.numpy().min() and x.numpy().max() <= 1
    # Same seed: same split; another seed: another split.
    again = batches(data.get_dataset(str(mixed_folder), validation_split=0.2, seed=0).eval(8))
    np.testing.assert_array_equal(again[0], x_eval)
    other = batches(data.get_dataset(str(mixed_folder), validation_split=0.2, seed=1).eval(8))
    assert not np.array_equal(other[0], x_eval)
    resized = data.get_dataset(str(mixed_folder), image_size=16, validation_split=0.4)
    assert resized.info.image_shape == (16, 16, 3)
    assert (resized.info.train_examples, resized.info.eval_examples) == (9, 6)
    assert batches(resized.eval(4))[0].shape == (6, 16, 16, 3)


def test_grayscale_folder_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    classes = {c: [rng.integers(0, 256, (9, 7, 1), dtype=np.uint8) for _ in range(4)] for c in "ab"}
    write_image_folder(tmp_path, classes)
    source = data.get_dataset(str(tmp_path), validation_split=0.25, seed=3)
    assert source.info.image_shape == (9, 7, 1) and source.info.class_names == ["a", "b"]
    x_eval, y_eval = batches(source.eval(10))
    x_train, y_train = batches(source.train(6, shuffle=False, augment=False))
    got = by_content(unnormalize(np.concatenate([x_eval, x_train]), source.info),
                     np.concatenate([y_eval, y_train]))  # fmt: skip
    want = by_content([im for c in "ab" for im in classes[c]], [0] * 4 + [1] * 4)
    assert got == want
    rgb = data.get_dataset(str(tmp_path), channels=3)
    assert rgb.info.image_shape == (9, 7, 3)
    assert batches(rgb.eval(10))[0].shape[-1] == 3


def test_folder_gif_and_bmp(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    for name, fmt in (("a", "GIF"), ("b", "BMP")):
        (tmp_path / name).mkdir()
        for i in range(2):
            pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            image_module.fromarray(pixels).save(tmp_path / name / f"{i}.{fmt.lower()}", fmt)
    source = data.get_dataset(str(tmp_path), validation_split=0.25)
    assert source.info.image_shape == (6, 8, 3)
    x, y = batches(source.eval(4))
    assert x.shape == (1, 6, 8, 3)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="No folder"):
        data.get_dataset(str(tmp_path / "does_not_exist"))
    with pytest.raises(data.DatasetNotFoundError, match="No images in"):
        data.get_dataset(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(data.DatasetNotFoundError, match=r"found subfolders: \['cat'\]"):
        data.get_dataset(str(tmp_path))


def test_invalid_arguments(tmp_path):
    write_image_folder(tmp_path, {"a": [np.zeros((4, 4, 3), np.uint8)] * 2})
    with pytest.raises(ValueError, match="validation_split"):
        data.get_dataset(str(tmp_path), validation_split=1.0)
    with pytest.raises(ValueError, match="channels"):
        data.get_dataset(str(tmp_path), channels=2)
    source = data.get_dataset(str(tmp_path), validation_split=0.5)
    with pytest.raises(ValueError, match="batch_size=2 is larger than the 1 training examples"):
        source.train(2)
    assert source.train(2, repeat=True).element_spec[0].shape == (2, 4, 4, 3)
