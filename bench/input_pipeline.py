"""Is the input pipeline the bottleneck of a ResNet-20 training step?

For Fashion-MNIST (the real Debian IDX files) and a CIFAR-10-shaped source
(50,000 random 32x32x3 uint8 images through the same cached decode +
pad-4/crop/flip + normalize code path the TFDS cifar10 source uses after its
first epoch), in one run:

1. the pipeline alone: batches per second when nothing else runs;
2. `model.fit` of a gated ResNet-20 fed by the pipeline vs by one constant
   in-memory batch, in alternating rounds (each fit runs a warm-up epoch and
   a timed epoch on one iterator, as in training). A step-time ratio near
   1.00 means the pipeline keeps up with training;
3. the start-up cost of a new epoch's iterator (shuffle-buffer fill), which
   training pays once an epoch.

The last line is `ratio <worst fit-with-pipeline / fit-without ratio>`.

    python bench/input_pipeline.py [--steps 40] [--rounds 3] [--batch-size 128]
"""

import argparse
import statistics
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed fit")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per dataset")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1 or args.batch_size < 2:
        parser.error("--steps >= 2, --rounds >= 1 and --batch-size >= 2 are required")

    import keras
    import tensorflow as tf

    import bs_keras
    from bs_keras import data
    from bs_keras.models import cifar_resnet

    def cifar_shaped():
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(50000, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=(50000,)).astype(np.int64)
        xt, yt = x[:1000], y[:1000]
        return data.image_source(
            "cifar10_shaped", lambda shuffle_files, seed: tf.data.Dataset.from_tensor_slices((x, y)),
            lambda: tf.data.Dataset.from_tensor_slices((xt, yt)), len(x), len(xt),
            native_shape=(32, 32, 3), class_names=[str(i) for i in range(10)], size=None,
            channels=None, mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD, pad=4,
        )

    sources = {"fashion_mnist": data.get_dataset("fashion_mnist"), "cifar10_shaped": cifar_shaped()}
    worst = 0.0
    for name, source in sources.items():
        info = source.info
        pipeline = source.train(args.batch_size, seed=0, repeat=True)
        it = iter(pipeline)
        for _ in range(info.train_examples // args.batch_size + 5):  # fill the cache
            next(it)
        t0 = time.perf_counter()
        n = 200
        for _ in range(n):
            next(it)
        alone = n / (time.perf_counter() - t0)

        model = cifar_resnet(20, num_classes=info.num_classes, input_shape=info.image_shape, seed=0)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
        cb = bs_keras.GateLossScheduler(0.0, 0.1)
        batch = next(it)
        feeds = {"pipeline": pipeline, "constant": tf.data.Dataset.from_tensors(batch).repeat()}
        t0 = time.perf_counter()
        next(iter(pipeline))
        startup = time.perf_counter() - t0

        class EpochTimer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.last = (time.perf_counter() - self.t0) / args.steps

        times = {k: [] for k in feeds}
        for r in range(args.rounds):
            for k in (list(feeds) if r % 2 else list(feeds)[::-1]):
                timer = EpochTimer()
                model.fit(feeds[k], epochs=2, steps_per_epoch=args.steps, verbose=0, callbacks=[cb, timer])
                times[k].append(timer.last)
        step = {k: statistics.median(v) for k, v in times.items()}
        ratio = step["pipeline"] / step["constant"]
        worst = max(worst, ratio)
        print(
            f"{name:<15} pipeline alone {alone:7.1f} batches/s ({alone * args.batch_size:8.0f} img/s); "
            f"train step {step['constant'] * 1e3:6.1f} ms constant batch, "
            f"{step['pipeline'] * 1e3:6.1f} ms fed by the pipeline; "
            f"pipeline/step speed {alone * step['constant']:5.1f}x; step ratio {ratio:.3f}; "
            f"new-epoch start-up {startup:.2f} s"
        )
    print(f"ratio {worst:.3f}")


if __name__ == "__main__":
    main()
