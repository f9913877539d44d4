"""ImageNet (ILSVRC 2012) through TFDS, from the two archives in `manual_dir`.

JPEGs stay encoded until the per-example crop: Inception-style random
resized crop and flip for training, resize and center crop for evaluation.
"""

import os

import tensorflow as tf

from bs_keras.data.source import DataSource, DatasetInfo, DatasetNotFoundError
from bs_keras.data.tfds_source import default_manual_dir, import_tfds, prepare_offline, tfds_builder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_URL = "https://image-net.org/download-images"
IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_IMAGENET_SHUFFLE_BUFFER = 10_000


def imagenet_source(data_dir, manual_dir, size):
    """`get_dataset("imagenet2012")`: TFDS, prepared once from the two archives in `manual_dir`."""
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
