"""Input pipelines: Fashion-MNIST, CIFAR-10, ImageNet, other TFDS image
classification datasets, and folders of images.

`get_dataset(name)` returns a `DataSource`; its `train()` and `eval()` build
batched `tf.data` pipelines of `(images, labels)`: float32 NHWC images
normalized per channel with the dataset's mean/std, and int32 labels.

Nothing here downloads. Fashion-MNIST is read from the IDX files of the
Debian package `dataset-fashion-mnist`; TFDS datasets are used when already
prepared in `data_dir`, or prepared from source archives the user put in
`manual_dir`. When the data is missing, `DatasetNotFoundError` says which
files are needed, where to put them and where to get them.

Example:

```python
source = get_dataset("cifar10", manual_dir="~/archives")
model.fit(source.train(128, seed=0), validation_data=source.eval(256), epochs=200)
```

The package holds one module per kind of input behind one interface:
`source` (`DataSource`, `DatasetInfo`), `image_ops` (the uint8 image
pipeline), `fashion_mnist` (IDX files), `levels` (Fashion-MNIST with
difficulty levels), `tfds_source` (TFDS, CIFAR-10), `imagenet`, `folder`
(image folders) and `segmentation` (`get_segmentation_dataset`: Cityscapes,
Fashion-MNIST canvases). `get_dataset` below picks the module for a name;
the public names of all of them are importable from `bs_keras.data`.
"""

import os

from bs_keras.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_DIR_ENV,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    fashion_mnist_arrays_source,
    fashion_mnist_dir,
    fashion_mnist_source,
    load_fashion_mnist,
    read_idx,
)
from bs_keras.data.folder import IMAGE_EXTENSIONS, BadImagesError, find_bad_images, folder_source
from bs_keras.data.image_ops import check_image_size, image_source
from bs_keras.data.imagenet import IMAGENET_ARCHIVES, IMAGENET_MEAN, IMAGENET_STD, IMAGENET_URL, imagenet_source
from bs_keras.data.levels import fashion_mnist_levels_source
from bs_keras.data.segmentation import (
    IGNORE_LABEL,
    SEGMENTATION_DATASETS,
    SegmentationInfo,
    SegmentationSource,
    get_segmentation_dataset,
)
from bs_keras.data.source import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    DataSource,
    DatasetInfo,
    DatasetNotFoundError,
    check_batch_size,
)
from bs_keras.data.tfds_source import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    cifar10_source,
    default_manual_dir,
    import_tfds,
    prepare_offline,
    tfds_builder,
    tfds_image_source,
)

BUILTIN_DATASETS = ("fashion_mnist", "fashion_mnist_levels", "cifar10", "imagenet2012")


def get_dataset(name, *, data_dir=None, manual_dir=None, image_size=None, validation_split=0.1,
                seed=0, channels=None, skip_bad_images=False):
    """Returns the `DataSource` for a dataset name or a folder of images.

    Names:

    - `"fashion_mnist"` (the default of the project): read from the IDX
      files in `/usr/share/datasets/fashion-mnist` (Debian package
      `dataset-fashion-mnist`; override with the `BS_KERAS_FASHION_MNIST_DIR`
      environment variable), else through TFDS. 28x28x1.
    - `"fashion_mnist_levels"`: the same IDX files (no TFDS fallback), a
      quarter of each split left clean (difficulty level 0) and a quarter
      each corrupted by Gaussian pixel noise of three increasing strengths
      (levels 1-3), fixed by a dataset seed (`bs_keras.data.levels`). The
      levels of the evaluation split are in `info.eval_metadata["level"]`.
    - `"cifar10"`: TFDS. Training: zero-pad 4, random 32x32 crop, random
      horizontal flip.
    - `"imagenet2012"`: TFDS from `manual_dir` holding
      `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`. Training:
      random resized crop (area 8-100%, aspect 3/4-4/3) and flip; evaluation:
      shorter side resized to `image_size * 256 / 224`, center crop.
    - any other TFDS image classification dataset (`"mnist"`,
      `"cifar100"`, ...): evaluated on "test" (else "validation", else the
      last `validation_split` of "train"); flip + pad/crop augmentation;
      normalized with mean 0.5 and std 0.5.
    - a folder with one subfolder of images (png/jpeg/bmp/gif) per class;
      `validation_split` of the images, picked with `seed`, are held out for
      evaluation. Files with another extension are ignored; every image is
      decoded once first, and files that cannot be (empty, truncated, text,
      TIFF, ...) stop it with one error naming them all, or are left out
      with `skip_bad_images=True` (listed in `info.bad_files`). A name that
      is also a TFDS name is read as the TFDS dataset unless it starts
      with `./`, `/` or `~`.

    TFDS datasets are used when prepared in `data_dir`; otherwise they are
    prepared once from source archives in `manual_dir` (default
    `<data_dir>/downloads/manual`). Nothing is downloaded.

    Args:
        name: dataset name or path of a folder of images.
        data_dir: TFDS data directory (default: TFDS's, `~/tensorflow_datasets`).
        manual_dir: directory with the downloaded source archives.
        image_size: model input size, int or `(height, width)`. Default: the
            dataset's own (224 for ImageNet; for a folder, the first image's).
        validation_split: fraction held out for evaluation, for folders and
            TFDS datasets without a test or validation split.
        seed: seed of the folder train/validation split.
        channels: 1 or 3 to convert the images; default: the dataset's own
            (for a folder, the first image's).
        skip_bad_images: for a folder, leave out the files that cannot be
            decoded instead of raising `BadImagesError`.

    Returns:
        A `DataSource`.

    Raises:
        DatasetNotFoundError: the data is not present locally.
        BadImagesError: a folder holds files that cannot be decoded.
        ValueError: unknown name or invalid arguments.
    """
    name = os.fspath(name)
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(
            f"validation_split must be in [0, 1). Received: validation_split={validation_split}"
        )
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None. Received: channels={channels}")
    size = check_image_size(image_size)
    path = os.path.expanduser(name)
    explicit_path = name.startswith((".", os.sep, "~"))
    if explicit_path and os.path.isdir(path):
        return folder_source(path, size, channels, validation_split, seed, skip_bad_images)
    if name == "fashion_mnist":
        return fashion_mnist_source(data_dir, manual_dir, size, channels)
    if name == "fashion_mnist_levels":
        return fashion_mnist_levels_source(size, channels)
    if name == "cifar10":
        return cifar10_source(data_dir, manual_dir, size, channels)
    if name == "imagenet2012":
        return imagenet_source(data_dir, manual_dir, size)
    tfds = import_tfds()
    tfds_names = set(tfds.list_builders(with_community_datasets=False))
    is_tfds = name.split("/")[0].split(":")[0] in tfds_names
    if os.path.isdir(path) and not is_tfds:
        return folder_source(path, size, channels, validation_split, seed, skip_bad_images)
    if is_tfds and not explicit_path:
        return tfds_image_source(name, data_dir, manual_dir, size, channels, validation_split)
    if explicit_path or os.sep in name:
        raise DatasetNotFoundError(
            f"No folder {path!r}. A folder dataset needs one subfolder of images per class, "
            "e.g. DIR/cat/001.png, DIR/dog/002.jpg."
        )
    raise ValueError(
        f"Unknown dataset {name!r}. Use one of the built-in datasets "
        f"{', '.join(BUILTIN_DATASETS)}, another TFDS image classification dataset "
        "(e.g. mnist, cifar100; see tfds.list_builders()), or the path of a folder with one "
        "subfolder of images per class."
    )
