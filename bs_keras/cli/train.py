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
import fractions
import os
import sys

from bs_keras import recipes
from bs_keras.cli.args import number, positive_int
from bs_keras.cli.tf_startup import import_tensorflow


def _shown(value):
    """A default as help text shows it: 2 for 2.0, 2/3 for 0.666..."""
    if isinstance(value, float) and len(f"{value:g}") > 6:
        return str(fractions.Fraction(value).limit_denominator(1000))
    return f"{value:g}" if isinstance(value, float) else str(value)


_TYPES = {float: number, int: positive_int, str: None, "int": int}


def add_recipe_flags(groups):
    """Adds a flag per `Recipe` field made with `recipes.flag`, into `groups[spec["group"]]`.

    Every such flag defaults to None (the recipe's value stands); its dest is
    the field name, its type, choices and help come from the field.
    """
    exclusive = {}
    for field, spec in recipes.flag_fields():
        group = groups[spec["group"]]
        if spec["exclusive"]:
            key = (spec["group"], spec["exclusive"])
            group = exclusive[key] = exclusive.get(key) or group.add_mutually_exclusive_group()
        if field.type is bool:
            if spec["switches"]:
                if len(spec["switches"]) > 1:
                    group = group.add_mutually_exclusive_group()
                for name, (value, text) in spec["switches"].items():
                    group.add_argument(name, dest=field.name, action="store_true" if value else "store_false",
                                       default=None, help=text)
            else:
                group.add_argument(recipes.flag_name(field.name), action=argparse.BooleanOptionalAction,
                                   default=None, help=spec["help"])
            continue
        text = spec["help"]
        if text and field.default is not dataclasses.MISSING:
            text = text.format(default=_shown(field.default))
        group.add_argument(recipes.flag_name(field.name), type=_TYPES[spec["type"] or field.type],
                           choices=spec["choices"], help=text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="named recipe to start from (see --list-recipes)")
    p.add_argument("--list-recipes", action="store_true", help="print the recipes and exit")
    groups = {None: p, **{name: p.add_argument_group(name) for name in ("model", "training", "distillation")}}
    add_recipe_flags(groups)
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folders: leave out (and list) the files that cannot be decoded instead of stopping")
    p.add_argument("--data-dir", help="TFDS data directory")
    p.add_argument("--manual-dir", help="directory with manually downloaded archives (ImageNet, Cityscapes)")
    p.add_argument("--run-dir", help="run directory (default runs/<recipe>)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
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


def resolve_recipe(args):
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
    return recipe.replace(**{f.name: getattr(args, f.name) for f, _ in recipes.flag_fields()}).validate()


def main(argv=None):
    parser, args = parse_args(argv)
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
