"""bench/folder_runs.py: Fashion-MNIST written as a class folder, and run
directories evaluated on every image of one."""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from bs_keras.data.fashion_mnist import load_fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("folder_runs", os.path.join(ROOT, "bench", "folder_runs.py"))
folder_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folder_runs)

def test_make_writes_a_random_draw_of_training_images_under_their_class_names(tmp_path):
    out = tmp_path / "folder"
    folder_runs.main(["make", str(out), "--train", "60", "--seed", "3"])
    (x, y), _ = load_fashion_mnist()  # the suite's synthetic IDX files (conftest)
    expected = np.sort(np.random.default_rng(3).permutation(len(y))[:60])
    found = {}
    for label, name in enumerate(folder_runs.CLASS_DIRS):
        for f in os.listdir(out / name):
            found[int(f[:5])] = (label, tf.io.decode_png(tf.io.read_file(str(out / name / f))).numpy()[..., 0])
    assert sorted(found) == expected.tolist()
    for i, (label, image) in found.items():
        assert label == y[i]
        np.testing.assert_array_equal(image, x[i])
    assert not (tmp_path / "folder.partial").exists()
    with pytest.raises(SystemExit, match="exists"):
        folder_runs.main(["make", str(out), "--train", "5"])


def test_eval_scores_every_image_of_the_folder(tmp_path, capsys):
    folder = tmp_path / "test"
    root = tmp_path / "src"
    # A small folder of 2 classes: its own images, so the numbers are checkable by hand.
    rng = np.random.default_rng(0)
    # Class b has 2 dark images: the rule below gets those 2 of 12 wrong.
    images = {"a": rng.integers(0, 60, (7, 8, 8, 1)),
              "b": np.concatenate([rng.integers(190, 255, (3, 8, 8, 1)), rng.integers(0, 60, (2, 8, 8, 1))])}
    for name, batch in images.items():
        os.makedirs(root / name)
        for i, image in enumerate(batch):
            tf.io.write_file(str(root / name / f"{i}.png"), tf.io.encode_png(image.astype("uint8")))
    os.replace(root, folder)
    # A "model" that says class 1 when the mean normalised pixel is above 0.1.
    inputs = keras.Input((8, 8, 1))
    mean = keras.layers.GlobalAveragePooling2D()(inputs)
    logits = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant([[-10.0, 10.0]]),
                                bias_initializer=keras.initializers.Constant([1.0, -1.0]))(mean)
    run = tmp_path / "run"
    os.makedirs(run)
    keras.Model(inputs, logits).save(str(run / "last.keras"))
    folder_runs.main(["eval", str(folder), str(run)])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["images"] == 12 and record["macs_ratio"] == 1.0 and record["conditional"] is None
    saved = json.loads((run / "test_folder.json").read_text())
    assert saved["accuracy"] == record["accuracy"]
    # By hand: the folder's normalisation, then the rule above.
    from bs_keras.data.source import DEFAULT_MEAN, DEFAULT_STD

    right = 0
    for label, batch in enumerate(images.values()):
        z = (batch / 255.0 - np.asarray(DEFAULT_MEAN)) / np.asarray(DEFAULT_STD)
        right += int(np.sum((z.mean(axis=(1, 2, 3)) * 20 - 2 > 0) == label))
    assert right == 10 and record["accuracy"] == pytest.approx(right / 12, abs=1e-4)
    with pytest.raises(SystemExit):
        folder_runs.main(["eval", str(folder), str(tmp_path / "nothing")])
