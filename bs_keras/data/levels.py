"""Fashion-MNIST with a difficulty level per image, known by construction.

`get_dataset("fashion_mnist_levels")` reads the real Fashion-MNIST arrays
and gives every image of both splits a level in {0, 1, 2, 3}: level 0 is
the clean image, levels 1-3 add Gaussian pixel noise of the fixed standard
deviations `NOISE_SIGMAS` (on the 0-255 scale), rounded and clipped back to
uint8. A fixed permutation gives each level a quarter of each split.

Everything depends only on the split, the image index and `DATASET_SEED`:
not on the run's seed, nor on the order tf.data reads the images in. The
corruption is done once, in NumPy, before the pipeline of
`bs_keras.data.fashion_mnist.fashion_mnist_arrays_source` (augmentation, normalization,
caching as for `"fashion_mnist"`). The evaluation split keeps its order, and
its levels are in `info.eval_metadata["level"]`, so the report can break
accuracy and conditional MACs down by level.

Example:

```python
source = get_dataset("fashion_mnist_levels")
levels = source.info.eval_metadata["level"]  # int32, in source.eval() order
```
"""

import numpy as np

from bs_keras.data.fashion_mnist import fashion_mnist_arrays_source, load_fashion_mnist

NAME = "fashion_mnist_levels"
NUM_LEVELS = 4
# Standard deviation of the added pixel noise per level, 0-255 scale. The
# plain sweep network (fashion_mnist_levels_sweep --plain, seed 0) errs on
# 19 / 22 / 28 / 37% of the test images of levels 0-3; sigmas 50/100/150
# gave 17 / 18 / 22 / 26%, too close at level 1 (docs/results/levels).
NOISE_SIGMAS = (0.0, 80.0, 160.0, 240.0)
DATASET_SEED = 20200
SPLITS = ("train", "test")
_CHUNK = 4096  # images corrupted per generator: bounds the float memory


def assign_levels(n, split, seed=DATASET_SEED):
    """The difficulty level of each image of a split: balanced, fixed.

    Args:
        n: number of images in the split.
        split: `"train"` or `"test"` (each has its own permutation).
        seed: dataset seed.

    Returns:
        int32 array `(n,)` in `[0, NUM_LEVELS)`; the counts of two levels
        differ by at most one.
    """
    order = np.random.default_rng([seed, _split_id(split), 0]).permutation(n)
    levels = np.empty(n, np.int32)
    levels[order] = np.arange(n) % NUM_LEVELS
    return levels


def corrupt(images, levels, split, seed=DATASET_SEED):
    """The images with the noise of their levels added (level 0 unchanged).

    Image i's noise is drawn from a generator seeded with `(seed, split,
    i // 4096)`, so it depends on the split and the index only.

    Args:
        images: uint8 array `(N, H, W)`.
        levels: int array `(N,)` in `[0, NUM_LEVELS)`.
        split: `"train"` or `"test"`.
        seed: dataset seed.

    Returns:
        uint8 array like `images`.
    """
    images = np.asarray(images)
    levels = np.asarray(levels)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"corrupt() takes uint8 images of shape (N, H, W); got {images.dtype} {images.shape}."
        )
    if levels.shape != images.shape[:1] or levels.min(initial=0) < 0 or levels.max(initial=0) >= NUM_LEVELS:
        raise ValueError(
            f"levels must be {len(images)} integers in [0, {NUM_LEVELS}) (one per image); "
            f"got shape {levels.shape}, range {levels.min(initial=0)}..{levels.max(initial=0)}."
        )
    sigmas = np.asarray(NOISE_SIGMAS, np.float32)
    out = images.copy()
    for start in range(0, len(images), _CHUNK):
        rng = np.random.default_rng([seed, _split_id(split), 1, start // _CHUNK])
        block = images[start : start + _CHUNK]
        noise = rng.standard_normal(block.shape, dtype=np.float32)
        sigma = sigmas[levels[start : start + _CHUNK]][:, None, None]
        noisy = np.clip(np.rint(block + sigma * noise), 0, 255).astype(np.uint8)
        clean = levels[start : start + _CHUNK] == 0
        out[start : start + _CHUNK] = np.where(clean[:, None, None], block, noisy)
    return out


def fashion_mnist_levels_arrays(directory=None, seed=DATASET_SEED):
    """The corrupted Fashion-MNIST splits and their levels.

    Args:
        directory: folder of the four IDX files (default
            `bs_keras.data.fashion_mnist_dir()`).
        seed: dataset seed.

    Returns:
        `{"train": (images, labels, levels), "test": (...)}`: uint8 images
        `(N, 28, 28)`, uint8 labels and int32 levels, in the files' order.

    Raises:
        DatasetNotFoundError: an IDX file is missing.
    """
    out = {}
    for split, (images, labels) in zip(SPLITS, load_fashion_mnist(directory)):
        levels = assign_levels(len(images), split, seed)
        out[split] = (corrupt(images, levels, split, seed), labels, levels)
    return out


def fashion_mnist_levels_source(size=None, channels=None):
    """The `DataSource` of `get_dataset("fashion_mnist_levels")`.

    Args:
        size: model input size `(height, width)`, or `None` for 28x28.
        channels: 1 or 3, or `None` for 1.

    Returns:
        A `DataSource` whose `info.eval_metadata["level"]` holds the level
        of each evaluation example, in `eval()` order.
    """
    arrays = fashion_mnist_levels_arrays()
    (x_train, y_train, _), (x_test, y_test, test_levels) = arrays["train"], arrays["test"]
    source = fashion_mnist_arrays_source(NAME, (x_train, y_train), (x_test, y_test), size, channels)
    source.info.eval_metadata = {"level": test_levels}
    return source


def _split_id(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}. Received: split={split!r}")
    return SPLITS.index(split)
