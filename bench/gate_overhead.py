"""Training-step time of gated vs plain CIFAR ResNet-20 (batch 128), one run.

Three models are timed in rotation in one process (these machines drift):
the plain ResNet and the gated one in both phases of the paper's schedule,

- phase A (first 20% of the epochs): batch-shaping on (gamma > 0), lambda 0;
- phase B (the rest): gamma annealed to 0 (the gates skip batch-shaping),
  L0 on.

Each step is a full `train_on_batch` (forward, gate losses, backward, SGD
update) plus `GateLossScheduler`'s per-batch work. Prints the median step
times, the ratio of each phase, and on the last line `ratio <value>`: the
gated/plain ratio of a whole run with the paper's schedule
(0.2 * phase A + 0.8 * phase B, over the plain step).

    python bench/gate_overhead.py [--steps 30] [--batch-size 128] [--depth 20]
"""

import argparse

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--phase-a", type=float, default=0.2, help="fraction of the run with gamma > 0")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 2 or args.warmup < 1 or not 0 <= args.phase_a <= 1:
        parser.error("--steps >= 1, --warmup >= 1, --batch-size >= 2 and 0 <= --phase-a <= 1 are required")

    import keras

    from bs_keras.models import cifar_resnet
    from step_timing import median_step_ms, scheduled_step

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))

    def compiled(gated):
        model = cifar_resnet(args.depth, gated=gated, seed=0)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
        )
        return model

    plain = compiled(False)
    total = args.steps + args.warmup
    steps = {
        "plain": lambda i, x, y: plain.train_on_batch(x, y, return_dict=True),
        "gated_A": scheduled_step(compiled(True), 0.75, 0.0, total),
        "gated_B": scheduled_step(compiled(True), 0.0, 0.1, total),
    }
    med = median_step_ms(steps, x, y, args.warmup, args.steps)
    a, b, p = med["gated_A"], med["gated_B"], med["plain"]
    print(f"ResNet-{args.depth}, batch {args.batch_size}, {args.steps} steps per model in rotation")
    print(f"plain step median           {p:.1f} ms")
    print(f"gated, batch-shaping on (A) {a:.1f} ms  ratio {a / p:.3f}")
    print(f"gated, gamma = 0 (B)        {b:.1f} ms  ratio {b / p:.3f}")
    overall = (args.phase_a * a + (1 - args.phase_a) * b) / p
    print(f"whole run, {args.phase_a:.0%} in phase A:")
    print(f"ratio {overall:.3f}")


if __name__ == "__main__":
    main()
