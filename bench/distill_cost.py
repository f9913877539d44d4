"""Training-step time of each distillation mode against the gated network
without distillation, measured side by side in one process.

Models (CIFAR-style ResNet, Fashion-MNIST-sized inputs 28x28x1, batch 128),
timed in rotation so that the machine's drift hits all of them alike:

- `none`: the gated network alone (the reference);
- `self`: `Distiller(student, "self")`, the gates-open teacher as a
  stop-gradient target (one extra forward pass);
- `sandwich`: `Distiller(student, "self", train_teacher=True)`, the teacher
  also learns from the labels (an extra forward and backward pass);
- `external`: `Distiller(student, teacher)` with a frozen plain network of the
  teacher depth (`--teacher-depth`, default the student's) in inference mode.

Each step is a full `train_on_batch` with `GateLossScheduler`'s per-batch
work (batch-shaping off, L0 on: the phase most of a run is in). Prints the
median step time of each and its ratio to `none`.

    python bench/distill_cost.py [--steps 20] [--depth 20] [--teacher-depth 56]
"""

import argparse

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--teacher-depth", type=int, default=None, help="depth of the external teacher")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1 or args.batch_size < 2:
        parser.error("--steps >= 1, --warmup >= 1 and --batch-size >= 2 are required")

    import keras

    import bs_keras
    from step_timing import median_step_ms, scheduled_step

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))

    def student():
        return bs_keras.cifar_resnet(args.depth, input_shape=(28, 28, 1), seed=0)

    def step_fn(model):
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
        return scheduled_step(model, 0.0, 0.1, args.steps + args.warmup)

    teacher = bs_keras.cifar_resnet(args.teacher_depth or args.depth, input_shape=(28, 28, 1), gated=False)
    steps = {
        "none": step_fn(student()),
        "self": step_fn(bs_keras.Distiller(student(), "self")),
        "sandwich": step_fn(bs_keras.Distiller(student(), "self", train_teacher=True)),
        "external": step_fn(bs_keras.Distiller(student(), teacher)),
    }
    med = median_step_ms(steps, x, y, args.warmup, args.steps)
    names = list(steps)
    print(f"gated ResNet-{args.depth}, batch {args.batch_size}, {args.steps} steps per model in rotation; "
          f"external teacher: plain ResNet-{args.teacher_depth or args.depth}")
    for name in names:
        print(f"{name:<9} step median {med[name]:8.1f} ms  ratio {med[name] / med['none']:.3f}")


if __name__ == "__main__":
    main()
