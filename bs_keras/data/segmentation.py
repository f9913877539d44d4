"""Input pipelines for semantic segmentation: Cityscapes and Fashion-MNIST canvases.

`get_segmentation_dataset(name)` returns a `SegmentationSource`; its `train()`
and `eval()` build batched `tf.data` pipelines of `(images, labels)`: float32
NHWC images normalized per channel with the dataset's mean/std, and int32
`(B, H, W)` label maps with classes in `[0, num_classes)` and `IGNORE_LABEL`
(255) for pixels that are not scored.

Training augmentation (PSPNet style): random scale in `scale_range` (image
bilinear, labels nearest), padding to at least `crop_size` (normalized image
with 0, i.e. the mean; labels with `IGNORE_LABEL`), a random `crop_size` crop
and a random horizontal flip, the same for image and labels. Evaluation uses
full images, optionally resized to `eval_size`.

Nothing here downloads. Cityscapes is prepared once by the TFDS builder
`cityscapes/semantic_segmentation` from the two archives the user put in
`manual_dir`.

Example:

```python
source = get_segmentation_dataset("cityscapes", manual_dir="~/archives", crop_size=713)
model.fit(source.train(8, seed=0, repeat=True), steps_per_epoch=371, epochs=200)
```
"""

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from bs_keras.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_dir, load_fashion_mnist
from bs_keras.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from bs_keras.data.source import DatasetNotFoundError, check_batch_size
from bs_keras.data.tfds_source import default_manual_dir, import_tfds, prepare_offline, tfds_builder

IGNORE_LABEL = 255

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
# Cityscapes labelIds of the 19 evaluated classes, in trainId order (official labels table).
CITYSCAPES_EVAL_LABEL_IDS = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
)  # fmt: skip
CITYSCAPES_ARCHIVES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/"
CITYSCAPES_TFDS_NAME = "cityscapes/semantic_segmentation"
CITYSCAPES_CROP_SIZE = 713
CITYSCAPES_SCALE_RANGE = (0.5, 2.0)

FASHION_CANVAS_SIZE = 64
FASHION_CANVAS_ITEM_SIZE = 28  # Fashion-MNIST items are 28x28
FASHION_CANVAS_MAX_ITEMS = 3
FASHION_CANVAS_TRAIN_EXAMPLES = 6000
FASHION_CANVAS_EVAL_EXAMPLES = 1000
# A pasted item's pixel is labelled with its class if brighter than this (of 255).
FASHION_CANVAS_THRESHOLD = 20
FASHION_CANVAS_CLASSES = ["background", *FASHION_MNIST_CLASSES]
FASHION_CANVAS_SCALE_RANGE = (0.75, 1.5)

SEGMENTATION_DATASETS = ("cityscapes", "fashion_canvas")

_CITYSCAPES_SHUFFLE_BUFFER = 64  # encoded PNG pairs (~2.5 MB each)
_AUTOTUNE = tf.data.AUTOTUNE


def cityscapes_label_map():
    """Lookup table from Cityscapes labelIds to trainIds.

    Returns:
        uint8 NumPy array of 256 entries: the 19 evaluated labelIds map to
        trainIds 0-18 (`CITYSCAPES_CLASSES` order), every other value
        (unlabeled, void classes, -1 stored as 255) to `IGNORE_LABEL`.
    """
    table = np.full(256, IGNORE_LABEL, np.uint8)
    table[list(CITYSCAPES_EVAL_LABEL_IDS)] = np.arange(len(CITYSCAPES_EVAL_LABEL_IDS))
    return table


@dataclasses.dataclass
class SegmentationInfo:
    """What a `SegmentationSource` yields.

    Attributes:
        name: dataset name.
        num_classes: number of scored classes; labels are in `[0, num_classes)`
            or `ignore_label`.
        class_names: class names in label order.
        ignore_label: label of pixels that are not scored (255).
        train_examples: images in the training split.
        eval_examples: images in the evaluation split.
        crop_size: `(H, W)` of the training crops.
        eval_size: `(H, W)` of the evaluation images.
        channels: image channels (1 or 3).
        mean: per-channel mean subtracted from the [0, 1] images.
        std: per-channel standard deviation the images are divided by.
    """

    name: str
    num_classes: int
    class_names: list
    ignore_label: int
    train_examples: int
    eval_examples: int
    crop_size: tuple
    eval_size: tuple
    channels: int
    mean: tuple
    std: tuple


class SegmentationSource:
    """Training and evaluation `tf.data` pipelines of one segmentation dataset.

    Made by `get_segmentation_dataset`. Both pipelines yield `(images, labels)`
    batches: float32 `(B, H, W, C)` images normalized with `info.mean` and
    `info.std`, int32 `(B, H, W)` labels.

    Args:
        info: a `SegmentationInfo`.
        train_split: `f(shuffle_files, seed)` giving a dataset of raw examples.
        eval_split: `f()` giving a dataset of raw examples, in a fixed order.
        decode: `f(*raw)` giving `(uint8 image (h, w, C), uint8 trainId
            labels (h, w))`; `None` when the splits already yield those.
        scale_range: `(min, max)` of the random training scale.
        shuffle_buffer: examples in the training shuffle buffer.
    """

    def __init__(self, info, *, train_split, eval_split, decode=None, scale_range=(1.0, 1.0),
                 shuffle_buffer=1024):
        self.info = info
        self._train_split = train_split
        self._eval_split = eval_split
        self._decode = decode
        self._scale_range = tuple(float(s) for s in scale_range)
        self._shuffle_buffer = max(1, min(int(shuffle_buffer), info.train_examples))
        self._mean = tf.constant(info.mean, tf.float32)
        self._std = tf.constant(info.std, tf.float32)

    def __repr__(self):
        return f"<SegmentationSource {self.info}>"

    def _decoded(self, ds):
        if self._decode is None:
            return ds
        return ds.map(self._decode, num_parallel_calls=_AUTOTUNE)

    def _normalize(self, image):
        return (tf.cast(image, tf.float32) / 255.0 - self._mean) / self._std

    def train(self, batch_size, *, seed=None, repeat=False):
        """The training pipeline: shuffled, scaled, padded, cropped and flipped.

        Args:
            batch_size: examples per batch; the last partial batch is dropped.
            seed: seed of the shuffle and the augmentation; `None` for a fresh
                random order and augmentation on every run.
            repeat: repeat forever (then pass `steps_per_epoch` to `fit`).

        Returns:
            A `tf.data.Dataset` of `(images, labels)` batches of
            `info.crop_size`.
        """
        check_batch_size(batch_size)
        if not repeat and batch_size > self.info.train_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {self.info.train_examples} "
                f"training examples of {self.info.name!r}; every batch would be dropped."
            )
        ds = self._train_split(True, seed)
        ds = ds.shuffle(self._shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = self._decoded(ds)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds.batch(2, drop_remainder=True))
        crop, scale_range, channels = self.info.crop_size, self._scale_range, self.info.channels

        def augment(example, seed):
            image, label, valid = _random_scale_pad_crop_flip(*example, seed, crop, scale_range)
            image = tf.where(valid[..., None], self._normalize(image), 0.0)  # pad: the mean
            label = tf.where(valid, label, tf.cast(IGNORE_LABEL, label.dtype))
            return (tf.ensure_shape(image, (*crop, channels)),
                    tf.ensure_shape(tf.cast(label, tf.int32), crop))  # fmt: skip

        ds = ds.map(augment, num_parallel_calls=_AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)

    def _eval_examples(self):
        # (image on the [0, 255] scale, uint8 or float32 if resized, labels) of eval_size.
        ds = self._decoded(self._eval_split())
        size = self.info.eval_size

        def resize(image, label):
            if tuple(image.shape[:2]) == tuple(size):
                return image, label
            image = tf.image.resize(tf.cast(image, tf.float32), size)  # bilinear
            label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
            return tf.clip_by_value(image, 0.0, 255.0), label

        return ds.map(resize, num_parallel_calls=_AUTOTUNE)

    def eval(self, batch_size):
        """The evaluation pipeline: full images, fixed order, no augmentation.

        Args:
            batch_size: examples per batch; the last batch may be smaller.

        Returns:
            A `tf.data.Dataset` of `(images, labels)` batches of `info.eval_size`.
        """
        check_batch_size(batch_size)
        ds = self._eval_examples().map(
            lambda image, label: (self._normalize(image), tf.cast(label, tf.int32)),
            num_parallel_calls=_AUTOTUNE,
        )
        return ds.batch(batch_size).prefetch(_AUTOTUNE)

    def raw_eval_images(self, n):
        """The first `n` evaluation images, not normalized (for plots).

        Args:
            n: number of images; fewer if the evaluation split is smaller.

        Returns:
            uint8 NumPy array `(n, H, W, C)` of `info.eval_size`.
        """
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer. Received: n={n}")
        images = [image.numpy() for image, _ in self._eval_examples().take(int(n))]
        if not images:
            return np.zeros((0, *self.info.eval_size, self.info.channels), np.uint8)
        return np.round(np.stack(images)).astype(np.uint8)


def get_segmentation_dataset(name, *, data_dir=None, manual_dir=None, crop_size=None,
                             eval_size=None, scale_range=None, seed=0, limit_train=None,
                             limit_eval=None, canvas_size=None):
    """Returns the `SegmentationSource` of a dataset.

    Names:

    - `"cityscapes"`: TFDS `cityscapes/semantic_segmentation`, prepared once
      from `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` in
      `manual_dir`. Trains on "train" (2975 images), evaluates on
      "validation" (500); 1024x2048 RGB; labelIds mapped to the 19 trainIds.
      Defaults: `crop_size=713`, `scale_range=(0.5, 2.0)`.
    - `"fashion_canvas"`: 64x64 grayscale canvases with 1-3 Fashion-MNIST
      items each (see `make_fashion_canvases`); 11 classes, 0 = background.
      6000 training canvases from the Fashion-MNIST train split, 1000
      evaluation canvases from its test split, generated from `seed`.
      Defaults: `crop_size=64`, `scale_range=(0.75, 1.5)`. `canvas_size`
      makes larger canvases (same items, more room: e.g. 256 for a
      segmentation network whose latency means something); the crop and
      evaluation size then default to it.

    Args:
        name: `"cityscapes"` or `"fashion_canvas"`.
        data_dir: TFDS data directory (default: TFDS's, `~/tensorflow_datasets`).
        manual_dir: directory with the Cityscapes archives (default
            `<data_dir>/downloads/manual`).
        crop_size: training crop, int or `(height, width)`; `None` for the
            dataset's default.
        eval_size: `(height, width)` the evaluation images and labels are
            resized to (labels nearest); `None` keeps the native size.
        scale_range: `(min, max)` random training scale; `None` for the
            dataset's default.
        seed: seed of the generated canvases (fashion_canvas).
        limit_train: use at most this many training images.
        limit_eval: use at most this many evaluation images.
        canvas_size: fashion_canvas: canvas height and width (default 64).

    Returns:
        A `SegmentationSource`.

    Raises:
        DatasetNotFoundError: the data is not present locally.
        ValueError: unknown name or invalid arguments.
    """
    crop_size = _size(crop_size, "crop_size")
    eval_size = _size(eval_size, "eval_size")
    if scale_range is not None:
        scale_range = tuple(float(s) for s in scale_range)
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(
                f"scale_range must be (min, max) with 0 < min <= max. "
                f"Received: scale_range={scale_range}"
            )
    for arg, value in (("limit_train", limit_train), ("limit_eval", limit_eval)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{arg} must be a positive integer or None. Received: {arg}={value}")
    if canvas_size is not None and (name != "fashion_canvas" or int(canvas_size) != canvas_size
                                    or canvas_size < FASHION_CANVAS_ITEM_SIZE):
        raise ValueError(f"canvas_size applies to fashion_canvas and must be an integer >= "
                         f"{FASHION_CANVAS_ITEM_SIZE} (the items' size). Received: canvas_size={canvas_size} "
                         f"for {name!r}")
    if name == "cityscapes":
        crop_size = crop_size or _size(CITYSCAPES_CROP_SIZE, "crop_size")
        return _cityscapes_source(data_dir, manual_dir, crop_size, eval_size,
                                  scale_range or CITYSCAPES_SCALE_RANGE, limit_train,
                                  limit_eval)  # fmt: skip
    if name == "fashion_canvas":
        return _fashion_canvas_source(crop_size, eval_size,
                                      scale_range or FASHION_CANVAS_SCALE_RANGE, seed,
                                      limit_train, limit_eval,
                                      int(canvas_size or FASHION_CANVAS_SIZE))  # fmt: skip
    raise ValueError(
        f"Unknown segmentation dataset {name!r}. Use one of: "
        f"{', '.join(repr(n) for n in SEGMENTATION_DATASETS)}."
    )


# --------------------------------------------------------------------------- augmentation


def _random_scale_pad_crop_flip(image, label, seed, crop_size, scale_range):
    """Random scale, pad, crop and flip of one image and its label map.

    The scale `s ~ U(scale_range)` gives the scaled size `round(s * (h, w))`;
    it is padded at the bottom and right to at least `crop_size`, and the
    crop offset is uniform over the padded image; the crop is flipped with
    probability 1/2. See `_scale_pad_crop`.

    Args:
        image: `(h, w, C)` image, any real dtype.
        label: `(h, w)` integer labels.
        seed: int `[2]` seed of the stateless random ops.
        crop_size: `(H, W)` of the output.
        scale_range: `(min, max)` of the scale.
    """
    scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    scale = tf.random.stateless_uniform([], scale_seed, scale_range[0], scale_range[1])
    size = tf.shape(label)[:2]
    scaled = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 1)
    room = tf.maximum(scaled, crop_size) - crop_size + 1
    offset = tf.cast(tf.random.stateless_uniform([2], crop_seed) * tf.cast(room, tf.float32),
                     tf.int32)  # fmt: skip
    offset = tf.minimum(offset, room - 1)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return _scale_pad_crop(image, label, scaled, offset, flip, crop_size)


def _scale_pad_crop(image, label, scaled_size, offset, flip, crop_size):
    """Resize to `scaled_size`, pad at the bottom/right, crop at `offset`, flip if `flip`.

    Only the crop is resampled (gathers of the bilinear and nearest source
    pixels), so the cost does not grow with the scale. The result equals
    `tf.image.resize` of the whole image (bilinear, half-pixel centers, no
    antialiasing) and of the labels (nearest), then padding and cropping.

    Returns:
        `(image, label, valid)`: float32 `(H, W, C)` image (0 where padded),
        `(H, W)` labels of `label`'s dtype (unchanged source values; the
        caller marks padding) and the bool `(H, W)` mask of pixels inside
        the scaled image.
    """
    rows = _sample_axis(tf.shape(label)[0], scaled_size[0], offset[0], crop_size[0])
    cols = _sample_axis(tf.shape(label)[1], scaled_size[1], offset[1], crop_size[1])
    cols = tf.cond(flip, lambda: [tf.reverse(c, [0]) for c in cols], lambda: list(cols))
    (r0, r1, fr, rn, rv), (c0, c1, fc, cn, cv) = rows, cols
    image = tf.cast(image, tf.float32)
    top, bottom = tf.gather(image, r0), tf.gather(image, r1)
    image = top + (bottom - top) * fr[:, None, None]
    left, right = tf.gather(image, c0, axis=1), tf.gather(image, c1, axis=1)
    image = left + (right - left) * fc[None, :, None]
    label = tf.gather(tf.gather(label, rn), cn, axis=1)
    valid = tf.logical_and(rv[:, None], cv[None, :])
    return tf.where(valid[..., None], image, 0.0), label, valid


def _sample_axis(length, scaled, offset, crop):
    """Source positions of output pixels `offset + [0, crop)` of an axis scaled to `scaled`.

    Returns:
        `(lower, upper, fraction, nearest, valid)`: bilinear neighbours and
        weight, the nearest neighbour (as `tf.image.resize`) and whether the
        pixel is inside the scaled image (else padding).
    """
    position = offset + tf.range(crop)
    ratio = tf.cast(length, tf.float32) / tf.cast(scaled, tf.float32)
    center = (tf.cast(position, tf.float32) + 0.5) * ratio
    last = tf.cast(length - 1, tf.float32)
    coord = tf.clip_by_value(center - 0.5, 0.0, last)
    lower = tf.floor(coord)
    upper = tf.minimum(lower + 1.0, last)
    nearest = tf.clip_by_value(tf.floor(center), 0.0, last)
    valid = position < scaled
    return (tf.cast(lower, tf.int32), tf.cast(upper, tf.int32), coord - lower,
            tf.cast(nearest, tf.int32), valid)  # fmt: skip


# --------------------------------------------------------------------------- Cityscapes


def _cityscapes_how_to(manual_dir):
    return (
        f"Register at {CITYSCAPES_URL} and download leftImg8bit_trainvaltest.zip (11 GB) and "
        "gtFine_trainvaltest.zip (241 MB) from its download page; put both, unextracted, in "
        f"{manual_dir} (train.py: --manual-dir DIR; "
        "get_segmentation_dataset('cityscapes', manual_dir=DIR)). TFDS prepares the dataset "
        "once in data_dir (about 11 GB)."
    )


def _cityscapes_source(data_dir, manual_dir, crop_size, eval_size, scale_range, limit_train,
                       limit_eval):
    tfds = import_tfds()
    builder = tfds_builder(CITYSCAPES_TFDS_NAME, data_dir)
    if not builder.is_prepared():
        manual_dir = os.path.expanduser(
            os.fspath(manual_dir or default_manual_dir(builder))
        )  # fmt: skip
        missing = [
            f for f in CITYSCAPES_ARCHIVES if not os.path.isfile(os.path.join(manual_dir, f))
        ]  # fmt: skip
        if missing:
            raise DatasetNotFoundError(
                f"cityscapes is not prepared in {builder.data_dir} and {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not in {manual_dir}. "
                + _cityscapes_how_to(manual_dir)
            )
        prepare_offline(builder, manual_dir, _cityscapes_how_to(manual_dir))
    splits = builder.info.splits
    if "train" not in splits or "validation" not in splits:
        raise DatasetNotFoundError(
            f"cityscapes in {builder.data_dir} lacks the train or validation split "
            f"(has {list(splits)}); prepare it again from both archives."
        )
    train_name = "train" if limit_train is None else f"train[:{int(limit_train)}]"
    eval_name = "validation" if limit_eval is None else f"validation[:{int(limit_eval)}]"
    skip = {"image_left": tfds.decode.SkipDecoding(),
            "segmentation_label": tfds.decode.SkipDecoding()}  # fmt: skip

    def read(split, shuffle_files=False, seed=None):
        config = tfds.ReadConfig(try_autocache=False, shuffle_seed=seed)
        ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=config,
                                decoders=skip)  # fmt: skip
        return ds.map(lambda ex: (ex["image_left"], ex["segmentation_label"]))

    label_map = tf.constant(cityscapes_label_map())
    native = tuple(builder.info.features["image_left"].shape[:2])

    def decode(png, label_png):
        image = tf.ensure_shape(tf.io.decode_png(png, channels=3), (*native, 3))
        label_ids = tf.io.decode_png(label_png, channels=1)[..., 0]
        label = tf.gather(label_map, tf.cast(label_ids, tf.int32))
        return image, tf.ensure_shape(label, native)

    info = SegmentationInfo(
        name="cityscapes", num_classes=len(CITYSCAPES_CLASSES),
        class_names=list(CITYSCAPES_CLASSES), ignore_label=IGNORE_LABEL,
        train_examples=splits[train_name].num_examples,
        eval_examples=splits[eval_name].num_examples, crop_size=crop_size,
        eval_size=eval_size or native, channels=3, mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )  # fmt: skip
    return SegmentationSource(
        info,
        train_split=lambda shuffle_files, seed: read(train_name, shuffle_files, seed),
        eval_split=lambda: read(eval_name),
        decode=decode,
        scale_range=scale_range,
        shuffle_buffer=_CITYSCAPES_SHUFFLE_BUFFER,
    )


# --------------------------------------------------------------------------- Fashion-MNIST canvases


def make_fashion_canvases(images, labels, count, *, size=FASHION_CANVAS_SIZE,
                          max_items=FASHION_CANVAS_MAX_ITEMS, seed=0, return_items=False):
    """Segmentation canvases made of pasted Fashion-MNIST items.

    Each canvas gets 1 to `max_items` items (uniform), each a random image of
    `images` at a random position (overlaps allowed), pasted in order. An
    item's pixels brighter than `FASHION_CANVAS_THRESHOLD` replace the canvas
    pixel and set its label to the item's class + 1; its fainter pixels only
    brighten background pixels (maximum). So a pixel is labelled (> 0)
    exactly where it is brighter than the threshold, with the class of the
    top-most item bright there.

    Args:
        images: uint8 `(N, h, w)` item images.
        labels: `(N,)` item classes.
        count: number of canvases.
        size: canvas height and width.
        max_items: most items per canvas.
        seed: seed (or seed sequence) of `np.random.default_rng`.
        return_items: also return the placements.

    Returns:
        `(canvases, label_maps)`, uint8 `(count, size, size)` each; with
        `return_items`, also a list per canvas of `(index, top, left)` items.
    """
    images = np.asarray(images, np.uint8)
    labels = np.asarray(labels)
    h, w = images.shape[1:3]
    if size < max(h, w):
        raise ValueError(f"size={size} is smaller than the {h}x{w} items.")
    rng = np.random.default_rng(seed)
    per_canvas = rng.integers(1, max_items + 1, count)
    total = int(per_canvas.sum())
    picks = rng.integers(0, len(images), total)
    tops = rng.integers(0, size - h + 1, total)
    lefts = rng.integers(0, size - w + 1, total)
    canvases = np.zeros((count, size, size), np.uint8)
    label_maps = np.zeros((count, size, size), np.uint8)
    items = []
    k = 0
    for i, n in enumerate(per_canvas):
        placed = []
        for index, top, left in zip(picks[k : k + n], tops[k : k + n], lefts[k : k + n]):
            item = images[index]
            canvas = canvases[i, top : top + h, left : left + w]
            label = label_maps[i, top : top + h, left : left + w]
            bright = item > FASHION_CANVAS_THRESHOLD
            canvas[bright] = item[bright]
            label[bright] = labels[index] + 1
            background = label == 0
            canvas[background] = np.maximum(canvas[background], item[background])
            placed.append((int(index), int(top), int(left)))
        items.append(placed)
        k += n
    if return_items:
        return canvases, label_maps, items
    return canvases, label_maps


@functools.lru_cache(maxsize=1)
def _fashion_mnist(directory):
    splits = load_fashion_mnist(directory)
    for array in (*splits[0], *splits[1]):
        array.setflags(write=False)
    return splits


@functools.lru_cache(maxsize=2)
def _fashion_canvas_arrays(directory, seed, train_count, eval_count, size=FASHION_CANVAS_SIZE):
    (x_train, y_train), (x_test, y_test) = _fashion_mnist(directory)
    train = make_fashion_canvases(x_train, y_train, train_count, size=size, seed=[seed, 0])
    test = make_fashion_canvases(x_test, y_test, eval_count, size=size, seed=[seed, 1])
    for array in (*train, *test):
        array.setflags(write=False)
    return train, test


def _fashion_canvas_source(crop_size, eval_size, scale_range, seed, limit_train, limit_eval, canvas_size):
    train_count = min(int(limit_train or FASHION_CANVAS_TRAIN_EXAMPLES),
                      FASHION_CANVAS_TRAIN_EXAMPLES)  # fmt: skip
    eval_count = min(int(limit_eval or FASHION_CANVAS_EVAL_EXAMPLES),
                     FASHION_CANVAS_EVAL_EXAMPLES)  # fmt: skip
    (x_train, y_train), (x_eval, y_eval) = _fashion_canvas_arrays(
        fashion_mnist_dir(), int(seed), train_count, eval_count, canvas_size
    )
    # Mean and std of the [0, 1] pixels from the histogram of their uint8 values (exact, no float copy).
    counts = np.bincount(x_train.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255.0
    mean = float(counts @ values / counts.sum())
    std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    size = (canvas_size, canvas_size)
    info = SegmentationInfo(
        name="fashion_canvas", num_classes=len(FASHION_CANVAS_CLASSES),
        class_names=list(FASHION_CANVAS_CLASSES), ignore_label=IGNORE_LABEL,
        train_examples=train_count, eval_examples=eval_count, crop_size=crop_size or size,
        eval_size=eval_size or size, channels=1, mean=(mean,), std=(std,),
    )  # fmt: skip

    def split(x, y):
        return tf.data.Dataset.from_tensor_slices((x[..., None], y))

    return SegmentationSource(
        info,
        train_split=lambda shuffle_files, seed: split(x_train, y_train),
        eval_split=lambda: split(x_eval, y_eval),
        scale_range=scale_range,
        shuffle_buffer=train_count,
    )


def _size(value, arg):
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        value = (value, value)
    size = tuple(int(s) for s in value)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{arg} must be an int or (height, width). Received: {arg}={value}")
    return size
