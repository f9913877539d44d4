"""Tests of bs_keras.data.segmentation, fully offline.

The real TFDS cityscapes builder prepares tiny archives in the original layout
(tests/seg_fixtures.py); fashion_canvas is built from the installed
Fashion-MNIST. Every test runs with Python sockets disabled and fails if
anything tried to connect.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bs_keras import data
from bs_keras.data import segmentation as sd
from seg_fixtures import CITYSCAPES_SHAPE, write_cityscapes_archives

pytestmark = pytest.mark.usefixtures("offline")
tfds.disable_progress_bar()

# The official Cityscapes labels table (cityscapesscripts/helpers/labels.py): name, id, trainId.
OFFICIAL_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8),
    ("terrain", 22, 9), ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12),
    ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15), ("caravan", 29, 255),
    ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
]  # fmt: skip


def official_train_id(label_id):
    """trainId of a labelId (uint8 as stored in the PNG; -1 reads as 255)."""
    for _, id_, train_id in OFFICIAL_LABELS:
        if id_ % 256 == label_id:
            return train_id % 256  # -1 (license plate) is not evaluated: 255
    return 255


def unnormalize(images, info):
    """Normalized float images back to the [0, 255] scale (float)."""
    return (np.asarray(images) * np.array(info.std) + np.array(info.mean)) * 255.0


def batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def uniform_3x3(labels):
    """Pixels (not on the border) whose 3x3 neighbourhood has a single label."""
    h, w = labels.shape
    center = labels[1:-1, 1:-1]
    same = np.ones_like(center, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= labels[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] == center
    return np.pad(same, 1)


# --------------------------------------------------------------------------- label map


def test_cityscapes_label_map_matches_the_official_table():
    table = sd.cityscapes_label_map()
    assert table.dtype == np.uint8 and table.shape == (256,)
    for name, label_id, train_id in OFFICIAL_LABELS:
        expected = 255 if train_id in (255, -1) else train_id
        assert table[label_id % 256] == expected, (name, label_id)
        if 0 <= train_id < 255:
            assert sd.CITYSCAPES_CLASSES[train_id] == name
    assert np.all(table[34:] == 255)  # unused values, including -1 stored as 255
    assert sorted(table[table != 255].tolist()) == list(range(19))  # each trainId once
    assert len(sd.CITYSCAPES_CLASSES) == 19


# --------------------------------------------------------------------------- Cityscapes (TFDS)

BLOCK = 256
ALL_IDS = list(range(34)) + [255]  # 255: the license plate id -1 as stored in uint8
PALETTE = np.random.default_rng(7).integers(0, 256, (256, 3)).astype(np.uint8)


def block_example(ids):
    """A 1024x2048 labelIds map of 4x8 blocks of `ids` and an image colored PALETTE[labelId]."""
    grid = np.asarray(ids, np.uint8).reshape(4, 8)
    label_ids = np.kron(grid, np.ones((BLOCK, BLOCK), np.uint8))
    assert label_ids.shape == CITYSCAPES_SHAPE
    return PALETTE[label_ids], label_ids


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    rng = np.random.default_rng(0)
    ids = [rng.permutation(ALL_IDS)[:32] for _ in range(4)]
    ids[2] = np.array(ALL_IDS[:32])  # the two validation images hold all 35 values
    ids[3] = np.array(ALL_IDS[32:] + ALL_IDS[:29])
    train = [block_example(i) for i in ids[:2]]
    val = [block_example(i) for i in ids[2:]]
    write_cityscapes_archives(root / "manual", {
        "train": [("aachen_000000_000019", *train[0]), ("bochum_000000_000313", *train[1])],
        "val": [("frankfurt_000000_000294", *val[0]), ("munster_000001_000019", *val[1])],
        "test": [("berlin_000000_000019", *block_example(ids[0]))],
    })  # fmt: skip
    source = sd.get_segmentation_dataset(
        "cityscapes", data_dir=root / "data", manual_dir=root / "manual", crop_size=128
    )
    return source, train, val, root


def test_cityscapes_real_builder_eval_labels(cityscapes):
    source, _, val, _ = cityscapes
    info = source.info
    assert (info.num_classes, info.class_names) == (19, sd.CITYSCAPES_CLASSES)
    assert (info.train_examples, info.eval_examples) == (2, 2)
    assert (info.eval_size, info.crop_size, info.channels) == (CITYSCAPES_SHAPE, (128, 128), 3)
    assert (info.mean, info.std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    lut = np.array([official_train_id(i) for i in range(256)])
    images, labels = batches(source.eval(1))
    assert images.shape == (2, *CITYSCAPES_SHAPE, 3) and images.dtype == np.float32
    assert labels.shape == (2, *CITYSCAPES_SHAPE) and labels.dtype == np.int32
    outputs = {}
    for image, label in zip(images, labels):
        k = next(k for k, (_, ids) in enumerate(val) if np.array_equal(label, lut[ids]))
        outputs[k] = label
        np.testing.assert_allclose(unnormalize(image, info), val[k][0], atol=1e-3)
    assert sorted(outputs) == [0, 1]
    # Spot checks: road -> 0, car -> 13, person -> 11, unlabeled -> 255, -1 -> 255.
    for label_id, train_id in ((7, 0), (26, 13), (24, 11), (0, 255), (255, 255), (29, 255)):
        for k, (_, ids) in enumerate(val):
            assert np.all(outputs[k][ids == label_id] == train_id), label_id
    raw = source.raw_eval_images(1)
    assert raw.dtype == np.uint8 and raw.shape == (1, *CITYSCAPES_SHAPE, 3)
    assert any(np.array_equal(raw[0], rgb) for rgb, _ in val)


def test_cityscapes_eval_size_and_limits(cityscapes):
    _, _, val, root = cityscapes
    source = sd.get_segmentation_dataset(
        "cityscapes", data_dir=root / "data", eval_size=(256, 512), limit_train=1, limit_eval=1
    )  # prepared already: no manual_dir needed
    assert (source.info.train_examples, source.info.eval_examples) == (1, 1)
    assert source.info.crop_size == (713, 713)
    lut = sd.cityscapes_label_map()
    images, labels = batches(source.eval(4))
    assert images.shape == (1, 256, 512, 3) and labels.shape == (1, 256, 512)
    # Nearest neighbour at 1/4: source pixels 4i + 2.
    k = next(k for k, (_, ids) in enumerate(val) if np.array_equal(labels[0], lut[ids][2::4, 2::4]))
    raw = source.raw_eval_images(1)
    assert raw.shape == (1, 256, 512, 3) and raw.dtype == np.uint8
    np.testing.assert_allclose(unnormalize(images, source.info), raw, atol=0.51)
    # Bilinear: block interiors keep their color (blocks are 64x64 here).
    blocks = PALETTE[val[k][1][2::4, 2::4]].reshape(4, 64, 8, 64, 3).transpose(0, 2, 1, 3, 4)
    np.testing.assert_array_equal(
        raw[0].reshape(4, 64, 8, 64, 3).transpose(0, 2, 1, 3, 4)[..., 1:-1, 1:-1, :],
        blocks[..., 1:-1, 1:-1, :],
    )
    assert len(list(source.train(1, seed=0))) == 1


def test_cityscapes_train_pipeline(cityscapes):
    source, train, _, _ = cityscapes
    info = source.info
    images, labels = batches(source.train(2, seed=1, repeat=True).take(6))
    assert images.shape == (12, 128, 128, 3) and images.dtype == np.float32
    assert labels.shape == (12, 128, 128) and labels.dtype == np.int32
    assert set(np.unique(labels)) <= set(range(19)) | {255}
    pixels = unnormalize(images, info)
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    # Aligned: inside a block the image has the block's color and the label its trainId.
    color_of_train_id = {
        official_train_id(i): PALETTE[i] for i in ALL_IDS if official_train_id(i) != 255
    }  # fmt: skip
    checked = 0
    for image, label in zip(pixels, labels):
        inside = uniform_3x3(label) & (label != 255)
        expected = np.array([color_of_train_id[t] for t in label[inside]]).reshape(-1, 3)
        np.testing.assert_allclose(image[inside], expected, atol=0.01)
        checked += inside.sum()
    assert checked > 0.3 * labels.size
    again, again_labels = batches(source.train(2, seed=1, repeat=True).take(6))
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, labels)
    other, _ = batches(source.train(2, seed=2, repeat=True).take(6))
    assert not np.array_equal(other, images)
    with pytest.raises(ValueError, match="batch_size=3"):
        source.train(3)


def test_cityscapes_missing_archives(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(data.DatasetNotFoundError) as e:
        sd.get_segmentation_dataset("cityscapes", data_dir=tmp_path / "data", manual_dir=manual)
    message = str(e.value)
    assert "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip are not in" in message
    assert str(manual) in message and "--manual-dir" in message
    assert "https://www.cityscapes-dataset.com/" in message and "egister" in message
    (manual / "leftImg8bit_trainvaltest.zip").write_bytes(b"")
    with pytest.raises(data.DatasetNotFoundError, match="gtFine_trainvaltest.zip is not in"):
        sd.get_segmentation_dataset("cityscapes", data_dir=tmp_path / "data", manual_dir=manual)
    assert not (tmp_path / "data" / "cityscapes" / "semantic_segmentation" / "1.0.0").exists()


@pytest.mark.heavy  # whole-program run, >= ~30 s: make test-all / CI only
@pytest.mark.slow  # a PSPNet-50 trained 1 step, evaluated on a 1024x2048 image, exported: ~1 min
def test_cityscapes_train_then_conditional_export_as_the_readme_shows(cityscapes, tmp_path, capsys):
    """The README's Cityscapes commands on the generated archives: train.py
    --dataset cityscapes --manual-dir, then the conditional export calibrated
    on the same data (training crops of the model's input size)."""
    import json

    from bs_keras.cli import export as export_cli
    from bs_keras.cli import train as train_cli
    from bs_keras.deploy.calibration import read_calibration

    _, _, _, root = cityscapes
    where = ["--manual-dir", str(root / "manual"), "--data-dir", str(root / "data")]
    run = tmp_path / "run"
    assert train_cli.main(["--dataset", "cityscapes", *where, "--crop-size", "64", "--width-multiplier", "0.25",
                           "--batch-size", "2", "--epochs", "1", "--limit-eval", "1", "--run-dir", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    evaluation = report["evaluation"]
    assert report["optimizer_steps"] == 1 and evaluation["num_images"] == 1
    assert 0 < evaluation["macs_ratio"] <= 1 and 0 <= evaluation["mean_iou"] <= 1
    out = tmp_path / "exported"
    assert export_cli.main([str(run / "best.keras"), "--out", str(out), "--mode", "conditional",
                            "--calibration", "cityscapes", *where, "--latency-runs", "0"]) == 0
    log = capsys.readouterr().out
    assert "calibration 2 images from 'cityscapes'" in log and "not exported: aux" in log
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    sm = rows["saved_model"]
    assert sm["pixel_agreement"] == 1.0 and sm["miou"] == 1.0 and sm["gate_agreement"] == 1.0
    assert sm["top1_agreement"] is None
    summary = json.loads((out / "export.json").read_text())
    assert summary["input"]["shape"] == [1, 64, 64, 3]
    assert summary["input"]["preprocessing"]["mean"] == pytest.approx(list(data.IMAGENET_MEAN))
    assert summary["signatures"]["serving_default"]["outputs"] == ["seg"]
    # The calibration images are training crops: pixels in [0, 1] after undoing the normalization.
    found = read_calibration("cityscapes", (64, 64, 3), 8, data_dir=root / "data", manual_dir=root / "manual")
    assert found.images.shape == (2, 64, 64, 3)  # the 2 training images
    pixels = found.images * np.asarray(found.std) + np.asarray(found.mean)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.05


# --------------------------------------------------------------------------- augmentation


def test_scale_pad_crop_equals_resize_pad_crop_flip():
    """The gather-based crop equals tf.image.resize of the whole image, padded and cropped."""
    rng = np.random.default_rng(0)
    for _ in range(15):
        h, w = rng.integers(5, 80, 2)
        image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        label = rng.integers(0, 19, (h, w)).astype(np.uint8)
        scale = rng.uniform(0.3, 2.5)
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        crop = tuple(int(c) for c in rng.integers(4, 80, 2))
        ph, pw = max(sh, crop[0]), max(sw, crop[1])
        oy, ox = rng.integers(0, ph - crop[0] + 1), rng.integers(0, pw - crop[1] + 1)
        flip = bool(rng.integers(2))
        out, out_label, valid = sd._scale_pad_crop(
            tf.constant(image), tf.constant(label), tf.constant([sh, sw]),
            tf.constant([oy, ox]), tf.constant(flip), crop,
        )  # fmt: skip
        ref = tf.image.resize(tf.cast(image, tf.float32), (sh, sw)).numpy()
        ref_label = tf.image.resize(label[..., None], (sh, sw), method="nearest").numpy()[..., 0]
        ref = np.pad(ref, [(0, ph - sh), (0, pw - sw), (0, 0)])
        ref_label = np.pad(ref_label, [(0, ph - sh), (0, pw - sw)], constant_values=255)
        window = np.s_[oy : oy + crop[0], ox : ox + crop[1]]
        ref, ref_label = ref[window], ref_label[window]
        if flip:
            ref, ref_label = ref[:, ::-1], ref_label[:, ::-1]
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-3)
        np.testing.assert_array_equal(np.where(valid, out_label, 255), ref_label)
        np.testing.assert_array_equal(valid.numpy(), ref_label != 255)


def test_train_augmentation_keeps_image_and_label_aligned():
    """Label-coded blocks through train(): scales vary, padding is 0/255, ~half flipped."""
    h, w = 40, 60
    grid = np.arange(12).reshape(3, 4)
    label = np.kron(grid, np.ones((14, 15), np.uint8))[:h, :w].astype(np.uint8)
    colors = np.linspace(20, 235, 12)[:, None] * [1.0, 0.5, 0.25] + [0, 60, 120]
    colors = colors.round().astype(np.uint8)
    image = colors[label]
    info = sd.SegmentationInfo(
        name="blocks", num_classes=12, class_names=[str(i) for i in range(12)], ignore_label=255,
        train_examples=1, eval_examples=1, crop_size=(48, 64), eval_size=(h, w), channels=3,
        mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3),
    )  # fmt: skip

    def split(*args):
        return tf.data.Dataset.from_tensor_slices((image[None], label[None]))

    source = sd.SegmentationSource(info, train_split=split, eval_split=split,
                                   scale_range=(0.5, 2.0))  # fmt: skip
    images, labels = batches(source.train(8, seed=3, repeat=True).take(10))
    assert images.shape == (80, 48, 64, 3) and labels.shape == (80, 48, 64)
    pixels = unnormalize(images, info)
    areas, flips, padded = set(), 0, 0
    for out, out_label, normalized in zip(pixels, labels, images):
        valid = out_label != 255
        rows, cols = valid.any(axis=1), valid.any(axis=0)
        assert np.array_equal(valid, rows[:, None] & cols[None, :])  # a rectangle
        assert rows[0] and np.all(np.diff(rows.astype(int)) <= 0)  # padding at the bottom
        assert cols[0] or cols[-1]  # at the right, or the left when flipped
        assert np.all(normalized[~valid] == 0.0)  # padded with the mean
        padded += (~valid).any()
        areas.add(int(valid.sum()))
        inside = uniform_3x3(out_label) & valid
        np.testing.assert_allclose(out[inside], colors[out_label[inside]], atol=0.01)
        assert inside.sum() > 0.3 * valid.sum()
        # Blocks ascend left to right; reversed order means flipped.
        ids = out_label[inside]
        columns = np.nonzero(inside)[1]
        if len(np.unique(ids % 4)) > 1:
            flips += np.corrcoef(ids % 4, columns)[0, 1] < 0
    assert 10 < padded < 80 and len(areas) > 20
    assert 20 < flips < 60


# --------------------------------------------------------------------------- fashion_canvas


@pytest.fixture(scope="module")
def fashion_mnist():
    directory = data.fashion_mnist_dir()
    if not all(os.path.isfile(os.path.join(directory, f))
               for files in data.FASHION_MNIST_FILES.values() for f in files):  # fmt: skip
        pytest.skip(f"dataset-fashion-mnist is not installed ({directory})")
    return data.load_fashion_mnist(directory)


def reference_canvas(images, labels, items, size):
    """Per pixel: the top-most item brighter than the threshold wins; else the faint maximum."""
    canvas = np.zeros((size, size), np.uint8)
    label_map = np.zeros((size, size), np.uint8)
    for y in range(size):
        for x in range(size):
            faint = 0
            for index, top, left in items:
                if top <= y < top + 28 and left <= x < left + 28:
                    value = images[index][y - top, x - left]
                    if value > sd.FASHION_CANVAS_THRESHOLD:
                        canvas[y, x], label_map[y, x] = value, labels[index] + 1
                    else:
                        faint = max(faint, value)
            if label_map[y, x] == 0:
                canvas[y, x] = faint
    return canvas, label_map


def test_fashion_canvases_labels_match_pixels(fashion_mnist):
    (x_train, y_train), _ = fashion_mnist
    canvases, label_maps, items = sd.make_fashion_canvases(
        x_train, y_train, 400, seed=5, return_items=True
    )
    assert canvases.shape == label_maps.shape == (400, 64, 64) and canvases.dtype == np.uint8
    assert {len(i) for i in items} == {1, 2, 3}
    # Labelled exactly where brighter than the threshold.
    np.testing.assert_array_equal(label_maps > 0, canvases > sd.FASHION_CANVAS_THRESHOLD)
    for k in range(6):
        ref_canvas, ref_labels = reference_canvas(x_train, y_train, items[k], 64)
        np.testing.assert_array_equal(canvases[k], ref_canvas)
        np.testing.assert_array_equal(label_maps[k], ref_labels)
    # Every labelled pixel carries the class of an item covering it.
    for k in range(100):
        for y, x in zip(*np.nonzero(label_maps[k])):
            covering = {
                y_train[i] + 1 for i, t, l in items[k] if t <= y < t + 28 and l <= x < l + 28
            }  # fmt: skip
            assert label_maps[k, y, x] in covering
    again = sd.make_fashion_canvases(x_train, y_train, 400, seed=5)
    np.testing.assert_array_equal(again[0], canvases)
    other = sd.make_fashion_canvases(x_train, y_train, 400, seed=6)
    assert not np.array_equal(other[0], canvases)


def test_fashion_canvases_of_another_size(fashion_mnist):
    """--canvas-size: larger canvases of the same items; crop and evaluation
    size follow; mean/std (from a histogram) equal NumPy's on the pixels."""
    (x_train, y_train), (x_test, y_test) = fashion_mnist
    source = sd.get_segmentation_dataset("fashion_canvas", canvas_size=96, limit_train=200, limit_eval=20,
                                         scale_range=(1.0, 1.0))
    info = source.info
    assert (info.crop_size, info.eval_size) == ((96, 96), (96, 96))
    train_canvases, _ = sd.make_fashion_canvases(x_train, y_train, 200, size=96, seed=[0, 0])
    np.testing.assert_allclose(info.mean[0], train_canvases.mean() / 255, rtol=1e-9)
    np.testing.assert_allclose(info.std[0], train_canvases.std() / 255, rtol=1e-9)
    eval_canvases, eval_labels = sd.make_fashion_canvases(x_test, y_test, 20, size=96, seed=[0, 1])
    images, labels = batches(source.eval(10))
    assert images.shape == (20, 96, 96, 1)
    np.testing.assert_array_equal(labels, eval_labels)
    np.testing.assert_allclose(unnormalize(images, info)[..., 0], eval_canvases, atol=1e-3)
    for bad in (27, 96.5):
        with pytest.raises(ValueError, match="canvas_size applies to fashion_canvas and must be an integer >= 28"):
            sd.get_segmentation_dataset("fashion_canvas", canvas_size=bad)
    with pytest.raises(ValueError, match="canvas_size applies to fashion_canvas"):
        sd.get_segmentation_dataset("cityscapes", canvas_size=128)


def test_fashion_canvas_source(fashion_mnist):
    (x_train, y_train), (x_test, y_test) = fashion_mnist
    source = sd.get_segmentation_dataset("fashion_canvas", scale_range=(1.0, 1.0))
    info = source.info
    assert info.class_names == ["background", *data.FASHION_MNIST_CLASSES]
    assert (info.num_classes, info.channels, info.crop_size, info.eval_size) == (
        11, 1, (64, 64), (64, 64))  # fmt: skip
    assert (info.train_examples, info.eval_examples) == (6000, 1000)
    train_canvases, train_labels = sd.make_fashion_canvases(x_train, y_train, 6000, seed=[0, 0])
    np.testing.assert_allclose(info.mean[0], train_canvases.mean() / 255, rtol=1e-6)
    np.testing.assert_allclose(info.std[0], train_canvases.std() / 255, rtol=1e-6)
    # Class histogram: all classes present, background most of the canvas.
    counts = np.bincount(train_labels.ravel(), minlength=11) / train_labels.size
    assert 0.5 < counts[0] < 0.9
    assert np.all(counts[1:] > 0.25 * counts[1:].mean())
    # Evaluation: canvases from the Fashion-MNIST test split, in order.
    eval_canvases, eval_labels = sd.make_fashion_canvases(x_test, y_test, 1000, seed=[0, 1])
    images, labels = batches(source.eval(500))
    assert images.shape == (1000, 64, 64, 1) and labels.shape == (1000, 64, 64)
    np.testing.assert_allclose(unnormalize(images, info)[..., 0], eval_canvases, atol=1e-3)
    np.testing.assert_array_equal(labels, eval_labels)
    np.testing.assert_array_equal(source.raw_eval_images(3)[..., 0], eval_canvases[:3])
    # Training at scale 1: the training canvases, some flipped, none from the test split.
    images, labels = batches(source.train(100, seed=0).take(2))
    keys = {c.tobytes(): i for i, c in enumerate(train_canvases)}
    flipped = 0
    for image, label in zip(np.round(unnormalize(images, info)[..., 0]).astype(np.uint8), labels):
        if image.tobytes() in keys:
            k = keys[image.tobytes()]
        else:
            k, flipped = keys[image[:, ::-1].tobytes()], flipped + 1
            label = label[:, ::-1]
        np.testing.assert_array_equal(label, train_labels[k])
    assert 60 < flipped < 140
    test_keys = {c.tobytes() for c in eval_canvases}
    assert not any(c.tobytes() in test_keys for c in train_canvases[:1000])


def test_fashion_canvas_defaults_and_seed(fashion_mnist):
    source = sd.get_segmentation_dataset("fashion_canvas", seed=1, limit_train=50, limit_eval=20)
    assert (source.info.train_examples, source.info.eval_examples) == (50, 20)
    assert source.info.crop_size == (64, 64)
    images, labels = batches(source.train(25, seed=0))
    assert images.shape == (50, 64, 64, 1) and set(np.unique(labels)) <= set(range(11)) | {255}
    assert (labels == 255).any()  # scales < 1 pad (default scale_range (0.75, 1.5))
    seed0 = sd.get_segmentation_dataset("fashion_canvas", seed=0, limit_eval=20)
    assert not np.array_equal(seed0.raw_eval_images(20), source.raw_eval_images(20))
    cropped = sd.get_segmentation_dataset("fashion_canvas", crop_size=32, limit_train=8)
    x, y = next(iter(cropped.train(8, seed=0)))
    assert x.shape == (8, 32, 32, 1) and y.shape == (8, 32, 32)


def test_unknown_name_and_invalid_arguments():
    with pytest.raises(ValueError, match="'cityscapes', 'fashion_canvas'"):
        sd.get_segmentation_dataset("ade20k")
    with pytest.raises(ValueError, match="scale_range"):
        sd.get_segmentation_dataset("fashion_canvas", scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        sd.get_segmentation_dataset("fashion_canvas", crop_size=(0, 4))
    with pytest.raises(ValueError, match="limit_train"):
        sd.get_segmentation_dataset("fashion_canvas", limit_train=0)
