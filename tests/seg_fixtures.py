"""Writers of tiny Cityscapes archives in the real layout, for tests/test_segmentation_data.py."""

import io
import os
import zipfile

import numpy as np
from PIL import Image

CITYSCAPES_SHAPE = (1024, 2048)  # the TFDS builder's fixed image shape


def png_bytes(array):
    """PNG of a uint8 `(H, W)` (grayscale, mode L) or `(H, W, 3)` (RGB) array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_cityscapes_archives(manual_dir, splits):
    """`leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` as downloaded.

    Layout as in the originals: `leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`
    and `gtFine/<split>/<city>/<id>_gtFine_{labelIds,color,instanceIds}.png`
    plus `<id>_gtFine_polygons.json`, README and license.txt at the top.
    The builder reads only the left images and the labelIds; the color and
    instanceIds files hold other values, so reading them would show.

    Args:
        manual_dir: folder to write both archives to.
        splits: `{"train" | "val" | "test": [(image_id, rgb, label_ids)]}`,
            `image_id` like `"aachen_000000_000019"`, `rgb` uint8
            `(1024, 2048, 3)`, `label_ids` uint8 `(1024, 2048)` Cityscapes
            labelIds.

    Returns:
        The paths of the two archives.
    """
    os.makedirs(manual_dir, exist_ok=True)
    images_zip = os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip")
    labels_zip = os.path.join(manual_dir, "gtFine_trainvaltest.zip")
    with zipfile.ZipFile(images_zip, "w", zipfile.ZIP_STORED) as images, \
         zipfile.ZipFile(labels_zip, "w", zipfile.ZIP_STORED) as labels:  # fmt: skip
        for archive in (images, labels):
            archive.writestr("README", "The Cityscapes Dataset (test fixture)\n")
            archive.writestr("license.txt", "test fixture\n")
        for split, examples in splits.items():
            for image_id, rgb, label_ids in examples:
                city = image_id.split("_")[0]
                assert rgb.shape == (*CITYSCAPES_SHAPE, 3) and label_ids.shape == CITYSCAPES_SHAPE
                stem = f"{split}/{city}/{image_id}"
                images.writestr(f"leftImg8bit/{stem}_leftImg8bit.png", png_bytes(rgb))
                labels.writestr(f"gtFine/{stem}_gtFine_labelIds.png", png_bytes(label_ids))
                decoy = np.full(CITYSCAPES_SHAPE, 26, np.uint8)  # all "car"
                labels.writestr(f"gtFine/{stem}_gtFine_color.png", png_bytes(decoy))
                labels.writestr(f"gtFine/{stem}_gtFine_instanceIds.png", png_bytes(decoy))
                labels.writestr(f"gtFine/{stem}_gtFine_polygons.json", '{"objects": []}')
    return images_zip, labels_zip
