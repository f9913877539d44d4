"""Training-step time of gated vs plain CIFAR ResNet-20 (batch 128), one run.

The two models are timed alternately in one process (these machines drift),
each step a full `train_on_batch` (forward, losses, backward, SGD update); the
gated model's step includes `GateLossScheduler`'s per-batch work. Prints the
medians and, on the last line, `ratio <gated/plain>`.

    python bench/gate_overhead.py [--steps 30] [--batch-size 128] [--depth 20]
"""

import argparse
import statistics
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=20)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 2 or args.warmup < 1:
        parser.error("--steps >= 1, --warmup >= 1 and --batch-size >= 2 are required")

    import keras

    import bs_keras
    from bs_keras.models import cifar_resnet

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))

    def compiled(gated):
        model = cifar_resnet(args.depth, gated=gated, seed=0, lam=0.1)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
        )
        return model

    plain, gated = compiled(False), compiled(True)
    cb = bs_keras.GateLossScheduler(*bs_keras.paper_schedules(10, lam=0.1))
    cb.set_model(gated)
    cb.set_params({"steps": args.steps + args.warmup, "epochs": 1})
    cb.on_train_begin()
    cb.on_epoch_begin(0)

    def gated_step(i):
        cb.on_train_batch_begin(i)
        logs = gated.train_on_batch(x, y, return_dict=True)
        cb.on_train_batch_end(i, logs)

    def plain_step(i):
        plain.train_on_batch(x, y, return_dict=True)

    for i in range(args.warmup):
        plain_step(i)
        gated_step(i)
    times = {"plain": [], "gated": []}
    for i in range(args.steps):
        order = [("plain", plain_step), ("gated", gated_step)]
        if i % 2:
            order.reverse()
        for name, step in order:
            t0 = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"ResNet-{args.depth}, batch {args.batch_size}, {args.steps} alternating steps")
    print(f"plain step median {med['plain']:.1f} ms")
    print(f"gated step median {med['gated']:.1f} ms")
    print(f"ratio {med['gated'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
