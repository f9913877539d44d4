"""TFDS image classification datasets, prepared offline (CIFAR-10 and the rest).

`tfds_image_source` reads any TFDS dataset with an image and a class-label
feature through `image_ops.image_source`. `prepare_offline` prepares a
builder from the archives the user put in `manual_dir` and refuses every
download TFDS would start, with a `DatasetNotFoundError` that names the
files to fetch.
"""

import os

from bs_keras.data.image_ops import image_source
from bs_keras.data.source import DEFAULT_MEAN, DEFAULT_STD, DatasetNotFoundError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


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


def tfds_image_source(name, data_dir, manual_dir, size, channels, validation_split, *,
                 mean=DEFAULT_MEAN, std=DEFAULT_STD, pad=None, how_to=None):
    """The `DataSource` of a TFDS image classification dataset, prepared offline if needed."""
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


def cifar10_source(data_dir, manual_dir, size, channels):
    """`get_dataset("cifar10")`: TFDS, from cifar-10-binary.tar.gz in `manual_dir`."""
    how_to = (
        "Get cifar-10-binary.tar.gz (the 'CIFAR-10 binary version', 162 MB) from "
        f"{CIFAR10_URL} and put it, unextracted, in manual_dir (bs_keras: manual_dir=..., "
        "train.py: --manual-dir); TFDS checks its sha256 and prepares the dataset in "
        "data_dir once. Or copy an already prepared TFDS data dir (cifar10/3.0.2) as data_dir."
    )
    return tfds_image_source(
        "cifar10", data_dir, manual_dir, size, channels, 0.0,
        mean=CIFAR10_MEAN, std=CIFAR10_STD, pad=4, how_to=how_to,
    )  # fmt: skip
