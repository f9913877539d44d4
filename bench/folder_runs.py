#!/usr/bin/env python
"""Short runs on a user-style image folder, measured on 10,000 test images.

    python bench/folder_runs.py make /tmp/folder --train 5000           # 10 class folders of PNGs
    python bench/folder_runs.py make /tmp/folder_test --test            # the 10,000 test images
    python train.py --dataset /tmp/folder --epochs 4 --run-dir R/plain_s0 --plain
    python bench/folder_runs.py eval /tmp/folder_test R/plain_s0 R/gated_s0 ...

`make` writes Fashion-MNIST images (the Debian package's IDX files) as PNGs
into one subfolder per class (the same ten names in every folder, so a model
trained on one such folder reads another). `--train N` takes N training
images drawn at random (`numpy.random.default_rng(--seed).permutation`,
the first N; the folder of issue 26 is `--train 5000 --seed 0`), `--test`
the 10,000 test images. Files are named by their index in the IDX file. The
folder is written under a temporary name and renamed.

`eval` evaluates each run directory's last.keras (what report.json
describes) on every image of the test folder, with inference gates, and
prints one JSON line per run: accuracy, MAC ratio of the ungated network,
the fraction of conditional gates. It writes `test_folder.json` into the
run directory. The folder's own held-out split (10 %: 500 images of 5,000)
has a standard error of ~2 points at these accuracies; 10,000 images, 0.4.
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Fashion-MNIST's labels 0-9 as folder names (train.py numbers the sorted names).
CLASS_DIRS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def make_folder(out, train=None, test=False, seed=0):
    import numpy as np
    import tensorflow as tf

    from bs_keras.data.fashion_mnist import load_fashion_mnist

    if os.path.exists(out):
        raise SystemExit(f"{out} exists; remove it or pick another path.")
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    if test:
        x, y, names = x_test, y_test, range(len(y_test))
    else:
        idx = np.sort(np.random.default_rng(seed).permutation(len(y_train))[:train])
        x, y, names = x_train[idx], y_train[idx], idx
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASS_DIRS:
        os.makedirs(os.path.join(tmp, name))
    for i, image, label in zip(names, x, y):
        path = os.path.join(tmp, CLASS_DIRS[int(label)], f"{i:05d}.png")
        tf.io.write_file(path, tf.io.encode_png(image[..., None].astype(np.uint8)))
    os.replace(tmp, out)
    print(f"{out}: {len(y)} images, {np.bincount(y, minlength=10).tolist()} per class")


def evaluate_runs(folder, runs, batch_size=500):
    import keras

    from bs_keras.data.folder import folder_source
    from bs_keras.report import evaluate_model

    source = folder_source(folder, None, None, 0.0, 0)  # every image, none held out
    # train() drops a last partial batch: take single images, then rebatch them all.
    data = source.train(1, shuffle=False, augment=False).unbatch().batch(batch_size)
    for run in runs:
        model = keras.models.load_model(os.path.join(run, "last.keras"))
        summary, _ = evaluate_model(model, data)
        if not summary.get("gated"):
            summary.pop("gate_categories", None)
        record = {
            "run": os.path.basename(run.rstrip("/")), "images": int(summary["num_samples"]),
            "accuracy": round(float(summary["accuracy"]), 4),
            "macs_ratio": round(float(summary.get("macs_ratio", 1.0)), 4),
            "conditional": (summary.get("gate_categories") or {}).get("conditional"),  # None: plain
        }
        tmp = os.path.join(run, "test_folder.json.partial")
        with open(tmp, "w") as f:
            json.dump({**record, "folder": os.path.abspath(folder)}, f)
        os.replace(tmp, os.path.join(run, "test_folder.json"))
        print(json.dumps(record), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write Fashion-MNIST images as a folder of PNGs")
    m.add_argument("out")
    which = m.add_mutually_exclusive_group(required=True)
    which.add_argument("--train", type=int, help="the first N training images")
    which.add_argument("--test", action="store_true", help="the 10,000 test images")
    m.add_argument("--seed", type=int, default=0, help="--train: the draw (default 0)")
    e = sub.add_parser("eval", help="evaluate run directories' last.keras on every image of a folder")
    e.add_argument("folder")
    e.add_argument("runs", nargs="+")
    args = p.parse_args(argv)
    if args.command == "make":
        if args.train is not None and not 0 < args.train <= 60000:
            p.error("--train takes 1 to 60000 images")
        make_folder(args.out, args.train, args.test, args.seed)
    else:
        missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "last.keras"))]
        if missing:
            p.error(f"no last.keras in {', '.join(missing)}: pass run directories written by train.py")
        evaluate_runs(args.folder, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
