"""Train a channel-gated ResNet with batch-shaping, or evaluate a saved one.

    bs-keras-train                                   # gated ResNet-20 on Fashion-MNIST
    bs-keras-train --dataset cifar10 --epochs 50     # paper recipe, shorter
    bs-keras-train --recipe imagenet_resnet50_bas --manual-dir ~/imagenet
    bs-keras-train --dataset path/to/images          # one subfolder per class
    bs-keras-train --dataset cityscapes --manual-dir ~/cityscapes   # gated PSPNet
    bs-keras-train --gate-from runs/plain/best.keras                # gate a trained model, fine-tune
    bs-keras-train --evaluate --model-path runs/fashion_mnist_demo/best.keras

Rerunning the same command resumes an interrupted run from its last
completed epoch. `--list-recipes` shows the named recipes.
"""

import argparse
import dataclasses
import os
import sys

from bs_keras.cli.args import number, positive_int
from bs_keras.cli.tf_startup import import_tensorflow


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="named recipe to start from (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    p.add_argument("--dataset", help="fashion_mnist (default), fashion_mnist_levels (difficulty levels 0-3), "
                   "cifar10, imagenet2012, cityscapes, any TFDS image-classification name, or a folder "
                   "with one subfolder per class")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: leave out (and list) the files that cannot be decoded instead of stopping")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--manual-dir", help="directory with manually downloaded archives (ImageNet, Cityscapes)")
    p.add_argument("--run-dir", help="run directory (default runs/<recipe>)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="resnet20/32/44/56/110 (CIFAR-style) or resnet18/34/50 (ImageNet-style)")
    gated = g.add_mutually_exclusive_group()
    gated.add_argument("--gated", dest="gated", action="store_true", default=None, help="gated model (default)")
    gated.add_argument("--plain", dest="gated", action="store_false", help="ungated baseline")
    g.add_argument("--width-multiplier", type=number)
    g.add_argument("--group-size", type=positive_int, help="channels switched by one gate (default 1)")
    g.add_argument("--gate-granularity", choices=("channel", "block"),
                   help="channel: per-channel gates (default, the paper); block: one gate per residual "
                   "branch (the coarse ConvNet-AIG-style baseline)")
    g.add_argument("--gate-stop-gradient", action="store_true", default=None,
                   help="stop the gradient at each gate's input: the gates learn from the pooled block input "
                   "without moving the backbone (neither L0 nor the task loss reach it through the gate)")
    g.add_argument("--gate-temperature", type=number,
                   help="binary-concrete temperature of the gates in training (default 2/3)")
    g.add_argument("--gate-init-bias", type=number,
                   help="initial bias of the gate logits (default 1.0 with --target-macs, else 3.0; positive: "
                   "gates start open)")
    g.add_argument("--image-size", type=positive_int, help="resize images to this square size")
    g.add_argument("--crop-size", type=positive_int, help="segmentation training crop (default 713 for Cityscapes)")
    g.add_argument("--aux-weight", type=number, help="segmentation auxiliary-head loss weight (default 0.4)")
    g.add_argument("--init-from", help="segmentation: copy backbone weights from this ImageNet ResNet-50 .keras")
    g.add_argument("--prune-from", help="static-pruning baseline: a trained plain .keras to magnitude-prune "
                   "(|BN gamma|, same fraction per block) and fine-tune; needs --plain and --prune-macs")
    g.add_argument("--prune-macs", type=number, help="MACs of the pruned model as a fraction of the source's")
    g.add_argument("--gate-from", help="fine-tune a gated copy of this trained classifier (.keras with residual "
                   "blocks: a train.py run's best.keras, a saved keras.applications ResNet, ...); the recipe's "
                   "schedules run over the fine-tuning epochs")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int)
    t.add_argument("--batch-size", type=positive_int, help="global batch size")
    t.add_argument("--lr", type=number, help="peak learning rate")
    t.add_argument("--lr-schedule", help="step, cosine, poly or constant")
    t.add_argument("--warmup", type=number,
                   help="linear learning-rate warm-up over this fraction of the run, any schedule "
                   "(default: the recipe's, e.g. 0.02; 0 for none)")
    t.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="start the last BN scale of each residual branch at 0 (Goyal et al. 2017; default: "
                   "on for ResNet-56 and deeper and in the ImageNet recipes, off otherwise)")
    t.add_argument("--optimizer", help="sgd or adam")
    t.add_argument("--weight-decay", type=number, help="SGD-style weight decay (not on gates)")
    t.add_argument("--clipnorm", type=number, help="clip the global gradient norm to this (default off)")
    t.add_argument("--gamma", type=number, help="batch-shaping weight at the start (annealed to 0)")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--lam", type=number, help="target L0 weight (ramped up)")
    budget.add_argument("--target-macs", type=number,
                        help="train to a compute budget instead of a fixed --lam: the mean conditional MAC "
                        "ratio (of the ungated network) to end at, in (0, 1]; the L0 weight becomes a "
                        "multiplier driven to it (bs_keras.MacBudget)")
    t.add_argument("--gamma-end", type=number, help="fraction of the run by which gamma reaches 0 (default 0.2)")
    t.add_argument("--lam-begin", type=number, help="fraction of the run where the L0 ramp starts (default 0.2)")
    t.add_argument("--lam-end", type=number,
                   help="fraction of the run where the L0 weight reaches --lam (default 0.6)")
    t.add_argument("--hard-gates-begin", type=number,
                   help="end the run with a hard-gate phase from this fraction of it on (>= --lam-end): the "
                   "gates train with their inference decisions (logit > 0) and no gate losses, so the backbone "
                   "fine-tunes on the network that is evaluated (default: no phase)")
    t.add_argument("--budget-rate", type=number,
                   help="--target-macs: integral gain, the multiplier's change per step per unit excess (default 2)")
    t.add_argument("--budget-gain", type=number,
                   help="--target-macs: proportional gain, L0 weight per unit excess (default 100)")
    t.add_argument("--budget-max", type=number, help="--target-macs: the multiplier's upper bound")
    t.add_argument("--budget-unwind", type=number,
                   help="--target-macs: how many times faster the multiplier falls than it rises (default 10)")
    t.add_argument("--budget-loss-ratio", type=number,
                   help="--target-macs: keep the L0 term at most this multiple of the running task loss "
                   "(default 10; 0: no bound)")
    t.add_argument("--budget-measure", choices=("inference", "expected"),
                   help="--target-macs: the ratio the multiplier follows (logit > 0 gates, or open probabilities)")
    t.add_argument("--prior-a", type=number, help="Beta prior parameter a (default 0.6)")
    t.add_argument("--prior-b", type=number, help="Beta prior parameter b (default 0.4)")
    t.add_argument("--l0-weighting", help="macs (default) or channels")
    t.add_argument("--seed", type=int)
    t.add_argument("--validation-split", type=number, help="held-out fraction for image folders")
    t.add_argument("--limit-train", type=positive_int, help="use only this many training examples an epoch")
    t.add_argument("--limit-eval", type=positive_int, help="evaluate on only this many examples")
    d = p.add_argument_group("distillation")
    d.add_argument("--distill", choices=("self",),
                   help="self: in each step the network with every gate open teaches the gated one")
    d.add_argument("--distill-from", help="a trained classifier (.keras, e.g. a plain run's best.keras) as teacher")
    d.add_argument("--distill-alpha", type=number, help="weight of the distillation term (default 1)")
    d.add_argument("--distill-temperature", type=number, help="softening temperature T (default 4)")
    d.add_argument("--distill-train-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="--distill self: the full network also learns from the labels (sandwich rule, the "
                   "default) or, with --no-distill-train-teacher, is only a stop-gradient target")
    r = p.add_argument_group("runtime")
    r.add_argument("--strategy", default="auto", help="auto, cpu, mirrored, multi_worker or tpu")
    r.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (gates and losses stay float32)")
    r.add_argument("--jit-compile", action="store_true", help="XLA (slower on CPU; opt-in)")
    r.add_argument("--verbose", action="store_true",
                   help="show TensorFlow's C++ start-up log (CPU instructions, oneDNN, CUDA), hidden unless "
                   "TF_CPP_MIN_LOG_LEVEL is set")
    e = p.add_argument_group("evaluation")
    e.add_argument("--evaluate", action="store_true", help="evaluate --model-path instead of training")
    e.add_argument("--model-path", help=".keras model to evaluate")
    return p, p.parse_args(argv)


RECIPE_FLAGS = (
    "dataset", "model", "gated", "width_multiplier", "group_size", "gate_granularity", "gate_stop_gradient",
    "gate_temperature", "gate_init_bias", "gamma_end", "lam_begin", "lam_end", "hard_gates_begin",
    "image_size", "epochs", "batch_size",
    "lr", "lr_schedule", "optimizer", "weight_decay", "clipnorm", "gamma", "lam", "prior_a", "prior_b",
    "warmup", "zero_init_residual", "budget_loss_ratio",
    "target_macs", "budget_rate", "budget_gain", "budget_max", "budget_unwind", "budget_measure",
    "l0_weighting", "seed", "validation_split", "limit_train", "limit_eval", "crop_size", "aux_weight",
    "init_from", "prune_from", "prune_macs", "gate_from",
    "distill", "distill_from", "distill_alpha", "distill_temperature", "distill_train_teacher",
)


def resolve_recipe(args):
    from bs_keras import recipes

    if args.recipe:
        recipe = recipes.get_recipe(args.recipe)
    else:
        recipe = recipes.default_recipe_for(args.dataset or "fashion_mnist")
    if args.lam is not None and recipe.target_macs is not None:
        # --lam on a recipe that carries a budget: a fixed lambda instead.
        recipe = dataclasses.replace(recipe, target_macs=None)
    if args.gated is False:
        # --plain on a recipe with gate-only settings (the demo's budget and
        # hard-gate phase): a plain model has no gates to set. Given as flags
        # too, they are still refused.
        recipe = dataclasses.replace(recipe, target_macs=None, hard_gates_begin=None)
    return recipe.replace(**{k: getattr(args, k) for k in RECIPE_FLAGS}).validate()


def main(argv=None):
    parser, args = parse_args(argv)
    from bs_keras import recipes

    if args.list_recipes:
        for name, recipe in sorted(recipes.RECIPES.items()):
            print(f"{name:<24} {recipe.description}")
        return 0
    import_tensorflow(verbose=args.verbose)
    from bs_keras import training

    try:
        if args.evaluate:
            if not args.model_path:
                parser.error("--evaluate needs --model-path")
            if not args.dataset:
                parser.error("--evaluate needs --dataset (the data to evaluate on)")
            training.evaluate(
                args.model_path, args.dataset, args.run_dir, data_dir=args.data_dir,
                manual_dir=args.manual_dir, batch_size=args.batch_size or 128,
                image_size=args.image_size, limit_eval=args.limit_eval,
                skip_bad_images=args.skip_bad_images,
            )
            return 0
        recipe = resolve_recipe(args)
        run_dir = args.run_dir or os.path.join("runs", recipe.name)
        training.train(
            recipe, run_dir, data_dir=args.data_dir, manual_dir=args.manual_dir,
            strategy=args.strategy, mixed_precision=args.mixed_precision,
            jit_compile=args.jit_compile, overwrite=args.overwrite,
            skip_bad_images=args.skip_bad_images,
        )
        return 0
    except (ValueError, training.RunError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
