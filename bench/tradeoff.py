"""Accuracy vs conditional MACs on Fashion-MNIST: the sweep behind docs/RESULTS.md.

Trains, with the same epochs, schedule shape, data and seeds, through
`train.py` (one subprocess per run, so every run starts clean):

- plain ResNet-20 at width multipliers 1.0, 0.75, 0.5, 0.35;
- gated ResNet-20, L0 only (gamma = 0), at each lambda;
- gated ResNet-20, batch-shaping + L0 (the paper), at the same lambdas;
- block-level gated ResNet-20 (one gate per residual branch,
  `--gate-granularity block`), batch-shaping + L0, at the block lambdas,
  with global gradient-norm clipping at 10 (without it they diverge);
- static pruning: the trained full-width plain run of the same seed,
  magnitude-pruned (|BN gamma|, same fraction in every block) to 60 % and
  40 % of its MACs, then retrained with the same 4-epoch recipe
  (`--prune-from`, `bs_keras/deploy/prune.py`): its total training is twice the
  others';
- gated from the same trained plain run (`--gate-from`, `bs_keras.add_gates`:
  its weights kept, every gate open at the start), fine-tuned with
  batch-shaping + L0 at each lambda with the same 4-epoch recipe: the fair
  opponent of static pruning (both start from trained weights);
- `bas_l0_hard` (not in the short sweep by default): batch-shaping + L0
  ending with the hard-gate phase over the last 20 % of the run
  (`--hard-gates-begin 0.8`: the gates train with their inference
  decisions, the backbone fine-tunes on the evaluated network).

Every run is a normal train.py run directory under `--root`
(`<family>_<knob>_s<seed>`); `bench/report.py` reads them. The sweep is
resumable: finished runs (with a report.json) are skipped, an interrupted
run resumes from its last completed epoch. Wall time per run (including
start-up and the final evaluation) goes into `<root>/sweep.json`.

Budget: 4 epochs of 16,000 images (each epoch a fresh random 16,000 of the
60,000 training images: 500 steps of batch 128), evaluated on the full
10,000-image test set; about an hour for the default sweep on 2 CPU cores.

    python bench/tradeoff.py                          # the default sweep
    python bench/tradeoff.py --budget long --root ~/bs_keras_runs/long --dry-run
    python bench/tradeoff.py --budget paper --data-dir ~/tensorflow_datasets   # CIFAR-10, GPU
    python bench/tradeoff.py --budget depth --root ~/bs_keras_runs/depth --dry-run   # deep gated vs shallow plain
    python bench/tradeoff.py --dry-run                # print the runs and their state
    python bench/tradeoff.py --families bas_l0 --seeds 0 --lams 10
    python bench/tradeoff.py --budget long --only l0_t0p55_s0,plain_half_w1_s1   # these, in this order
    python bench/report.py runs/tradeoff --out docs/results
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("plain", "l0", "bas_l0", "block", "pruned", "retrofit", "bas_l0_hard")
# bas_l0_hard: batch-shaping + L0 ending with the hard-gate phase from this
# fraction of the run (train.py --hard-gates-begin); not in the short sweep
# unless asked for (--families).
HARD_BEGIN = 0.8
SHORT_FAMILIES = tuple(f for f in FAMILIES if f != "bas_l0_hard")
WIDTHS = (1.0, 0.75, 0.5, 0.35)
LAMS = (8.0, 12.0, 20.0)
BLOCK_LAMS = (1.0, 3.0, 8.0)
# Block gates need gradient clipping: without it block_lam8 diverged (NaN in
# epoch 3). A gate that shuts a whole branch for a whole batch leaves the
# branch's last BN with zero batch variance, which amplifies its backward pass
# ~1/sqrt(eps). 10 is ~4x the measured global gradient norm of these runs.
BLOCK_CLIPNORM = 10.0
PRUNE_MACS = (0.6, 0.4)
SEEDS = (0, 1)
# Shared by every run: only the family's own knob and the seed differ.
COMMON = {"epochs": 4, "limit_train": 16000, "batch_size": 128, "lr": 0.1, "lr_schedule": "cosine",
          "weight_decay": 5e-4}


def _num(value):
    return f"{value:g}".replace(".", "p")


def plan(families=SHORT_FAMILIES, seeds=SEEDS, widths=WIDTHS, lams=LAMS, block_lams=BLOCK_LAMS, common=None,
         prune_macs=PRUNE_MACS, root=os.path.join("runs", "tradeoff")):
    """The runs of the sweep: a list of `(name, train.py flags)`."""
    common = {**COMMON, **(common or {})}
    base = ["--recipe", "fashion_mnist_sweep"]
    for key, value in common.items():
        base += [f"--{key.replace('_', '-')}", str(value)]
    runs = []
    for seed in seeds:
        for family in families:
            if family == "plain":
                for w in widths:
                    runs.append((f"plain_w{_num(w)}_s{seed}", base + ["--plain", "--width-multiplier", str(w)]))
            elif family in ("l0", "bas_l0"):
                for lam in lams:
                    gamma = ["--gamma", "0"] if family == "l0" else []
                    runs.append((f"{family}_lam{_num(lam)}_s{seed}", base + ["--lam", str(lam)] + gamma))
            elif family == "bas_l0_hard":
                for lam in lams:
                    runs.append((f"bas_l0_hard_lam{_num(lam)}_s{seed}",
                                 base + ["--lam", str(lam), "--hard-gates-begin", str(HARD_BEGIN)]))
            elif family == "block":
                for lam in block_lams:
                    runs.append((f"block_lam{_num(lam)}_s{seed}", base + [
                    "--lam", str(lam), "--gate-granularity", "block", "--clipnorm", str(BLOCK_CLIPNORM)]))
            elif family == "pruned":
                # Needs the full-width plain run of this seed (planned first).
                source = os.path.join(root, f"plain_w1_s{seed}", "last.keras")
                for m in prune_macs:
                    runs.append((f"pruned_p{_num(m)}_s{seed}",
                                 base + ["--plain", "--prune-from", source, "--prune-macs", str(m)]))
            elif family == "retrofit":
                # Needs the full-width plain run of this seed (planned first), like "pruned".
                source = os.path.join(root, f"plain_w1_s{seed}", "last.keras")
                for lam in lams:
                    runs.append((f"retrofit_lam{_num(lam)}_s{seed}", base + ["--lam", str(lam), "--gate-from", source]))
            else:
                raise ValueError(f"Unknown family {family!r}; choose from {', '.join(FAMILIES)}.")
    return [(name, flags + ["--seed", str(name_seed(name))]) for name, flags in runs]


# --budget long (issue 19): every run the same N optimizer steps on the full
# 60,000 images (6 epochs of 468 steps at batch 128: N = 2,808). Gated runs
# get a MAC target (`--target-macs`) instead of a lambda re-chosen for the
# length. Pruned and gated-from-plain runs start from a plain run of N/2
# steps and fine-tune N/2. Two seeds for the decisive configurations.
LONG_COMMON = {"epochs": 6, "limit_train": 60000, "batch_size": 128, "lr": 0.1, "lr_schedule": "cosine",
               "weight_decay": 5e-4}
LONG_WIDTHS = (1.0, 0.75, 0.5)
LONG_TARGETS = (0.75, 0.55, 0.35)
# The hard-gate phase at the decisive MAC target only (one seed).
LONG_HARD_TARGETS = (0.55,)
LONG_DECISIVE = {"plain_w0p75", "bas_l0_t0p55", "pruned_p0p6"}
# --budget paper: the same families and MAC targets with the paper's CIFAR-10
# protocol, recipe cifar10_resnet20_bas (500 epochs of the 50,000 training
# images at batch 256, SGD lr 0.1 divided by 10 at epochs 300/375/450, gamma
# 0.75 annealed to 0 by epoch 100, L0 from epoch 100 at full weight by epoch
# 300). N/2 = 250 epochs for the plain source of the pruned and gated-from
# runs, whose schedules then run over their 250 epochs. For a GPU machine.
PAPER_RECIPE = "cifar10_resnet20_bas"
PAPER_COMMON = {"epochs": 500}


def plan_long(families=FAMILIES, seeds=SEEDS, root=os.path.join("runs", "tradeoff_long"), *,
              recipe="fashion_mnist_sweep", common=None, extra=()):
    """The long-budget runs: `(name, train.py flags)`; see LONG_COMMON.

    `recipe`, `common` (flag values, `epochs` required) and `extra` (more
    flags for every run, e.g. `--data-dir`) make the paper protocol's plan
    (`plan_paper`)."""
    common = LONG_COMMON if common is None else common

    def flags_for(epochs):
        out = ["--recipe", recipe]
        for key, value in {**common, "epochs": epochs}.items():
            out += [f"--{key.replace('_', '-')}", str(value)]
        return out + list(extra)

    full, half = flags_for(common["epochs"]), flags_for(common["epochs"] // 2)
    configs = []  # (config name, flags, needs the plain N/2 source)
    if "plain" in families:
        configs += [(f"plain_w{_num(w)}", ["--plain", "--width-multiplier", str(w)], False) for w in LONG_WIDTHS]
    for family in ("l0", "bas_l0"):
        if family in families:
            gamma = ["--gamma", "0"] if family == "l0" else []
            configs += [(f"{family}_t{_num(t)}", ["--target-macs", str(t)] + gamma, False) for t in LONG_TARGETS]
    if "bas_l0_hard" in families:
        configs += [(f"bas_l0_hard_t{_num(t)}", ["--target-macs", str(t), "--hard-gates-begin", str(HARD_BEGIN)],
                     False) for t in LONG_HARD_TARGETS]
    if "pruned" in families:
        configs += [(f"pruned_p{_num(m)}", ["--plain", "--prune-macs", str(m)], True) for m in PRUNE_MACS]
    if "retrofit" in families:
        configs += [(f"retrofit_t{_num(t)}", ["--target-macs", str(t)], True) for t in LONG_TARGETS]
    runs = []
    for seed in seeds:
        if any(needs for _, _, needs in configs):
            runs.append((f"plain_half_w1_s{seed}", half + ["--plain"]))
        for config, flags, needs in configs:
            if seed != seeds[0] and config not in LONG_DECISIVE:
                continue
            source = []
            if needs:
                path = os.path.join(root, f"plain_half_w1_s{seed}", "last.keras")
                source = ["--prune-from", path] if config.startswith("pruned") else ["--gate-from", path]
            runs.append((f"{config}_s{seed}", (half if needs else full) + flags + source))
    # Decisive runs of the first seed first (with their plain N/2 source), so
    # that a sweep cut short still answers the main question; then the rest of
    # the first seed, then the other seeds.
    def priority(name):
        seed, config = name_seed(name), name.rsplit("_s", 1)[0]
        if seed != seeds[0]:
            return 2
        return 0 if config in LONG_DECISIVE or config == "plain_half_w1" else 1

    runs.sort(key=lambda run: priority(run[0]))
    return [(name, flags + ["--seed", str(name_seed(name))]) for name, flags in runs]


def plan_paper(families=FAMILIES, seeds=SEEDS, root=os.path.join("runs", "tradeoff_paper"), extra=()):
    """The long-budget plan with the paper's CIFAR-10 protocol (PAPER_RECIPE)."""
    return plan_long(families, seeds, root, recipe=PAPER_RECIPE, common=PAPER_COMMON, extra=extra)


# --budget depth: the paper's headline comparison, a deep gated ResNet
# trained so that its *mean* MACs equal a shallower plain ResNet's, against
# that plain ResNet (the paper: gated ResNet-32/56/110 vs plain ResNet-20/
# 32/56 on CIFAR-10). The protocol of --budget long (LONG_COMMON) with each
# recipe's defaults (warm-up, zero-init residual, ...) for every run, plain
# included. `--target-macs` is a ratio of the ungated network of the run's
# own depth (bs_keras.budget, report.json's `macs_ratio`), so a gated
# ResNet-N at ResNet-20's cost trains to MACs(ResNet-20) / MACs(ResNet-N)
# (`depth_targets`). Families (run names `<family>_r<depth>..._s<seed>`):
# plain ResNets, gated ResNets at the reference's MACs, the decisive gated
# depth with distillation (DEPTH_DISTILL), the decisive pair on
# fashion_mnist_levels, and a 2x-wide gated ResNet-20 at a quarter of its MACs.
DEPTH_FAMILIES = ("plain", "gated", "distill", "levels", "wide")
# The distillation of the `distill` family: the mode chosen by measurement is set here only.
DEPTH_DISTILL = ("--distill", "self")
DEPTH_REFERENCE = 20  # every gated run trains to this plain depth's MACs
DEPTH_DECISIVE = 56  # the gated depth of the decisive comparison (two seeds, with and without distillation)
DEPTH_PLAIN = (20, 32, 56)
DEPTH_GATED = (32, 56)
DEPTH_WIDE = (2.0, 0.25)  # width multiplier and MAC target of the `wide` gated ResNet-20
DEPTH_INPUT_SHAPE = (28, 28, 1)  # Fashion-MNIST
LEVELS_RECIPE = "fashion_mnist_levels_sweep"
# --budget depth-paper: the depth plan with the paper's CIFAR-10 protocol (PAPER_RECIPE).
DEPTH_PAPER_PLAIN = (20, 32, 56, 110)
DEPTH_PAPER_GATED = (32, 56, 110)
DEPTH_PAPER_INPUT_SHAPE = (32, 32, 3)
DEPTH_PAPER_FAMILIES = tuple(f for f in DEPTH_FAMILIES if f != "levels")  # no CIFAR-10 with difficulty levels


@functools.lru_cache(maxsize=None)
def plain_macs(depth, input_shape, width_multiplier=1.0):
    """MACs per sample of a plain CIFAR ResNet-`depth` with 10 classes (`bs_keras.count_macs`)."""
    import bs_keras

    model = bs_keras.cifar_resnet(depth, num_classes=10, input_shape=tuple(input_shape), gated=False,
                                  width_multiplier=width_multiplier)
    return bs_keras.count_macs(model)


def depth_targets(depths, input_shape=DEPTH_INPUT_SHAPE, reference=DEPTH_REFERENCE):
    """`{depth: --target-macs}` of gated ResNet-`depth`s at plain ResNet-`reference`'s MACs (3 decimals)."""
    ref = plain_macs(reference, tuple(input_shape))
    return {d: round(ref / plain_macs(d, tuple(input_shape)), 3) for d in depths}


def describe_depth_targets(depths, input_shape=DEPTH_INPUT_SHAPE, reference=DEPTH_REFERENCE):
    """The MAC counts and targets behind a depth plan, as printed lines."""
    shape = "x".join(str(v) for v in input_shape)
    lines = [f"MAC targets (plain ResNets on {shape} inputs, bs_keras.count_macs):"]
    targets = depth_targets(depths, input_shape, reference)
    for d in sorted({reference, *depths}):
        macs = plain_macs(d, tuple(input_shape))
        target = f"; gated at ResNet-{reference}'s MACs: --target-macs {targets[d]:g}" if d in targets else ""
        lines.append(f"  ResNet-{d}: {macs / 1e6:.2f} M MACs{target}")
    return lines


def plan_depth(families=DEPTH_FAMILIES, seeds=SEEDS, *, recipe="fashion_mnist_sweep", common=None, extra=(),
               input_shape=DEPTH_INPUT_SHAPE, plain_depths=DEPTH_PLAIN, gated_depths=DEPTH_GATED,
               levels_recipe=LEVELS_RECIPE):
    """The depth-comparison runs: `(name, train.py flags)`; see DEPTH_FAMILIES.

    Order: the decisive comparison (plain ResNet-DEPTH_REFERENCE, gated
    ResNet-DEPTH_DECISIVE at its MACs without and with distillation) of each
    seed, first seed first; then, first seed only, the other plain and gated
    depths, the levels pair and the wide run. `recipe`, `common`, `extra`
    (as in `plan_long`), `input_shape` (of the MAC targets) and the depths
    make the paper protocol's plan (`plan_depth_paper`); `levels_recipe`
    None leaves the levels family out (asking for it is then an error)."""
    if "levels" in families and levels_recipe is None:
        raise ValueError("this depth plan has no levels recipe: drop the levels family")
    common = LONG_COMMON if common is None else common
    targets = depth_targets(sorted({*gated_depths, DEPTH_DECISIVE}), input_shape)

    def base(name):
        out = ["--recipe", name]
        for key, value in common.items():
            out += [f"--{key.replace('_', '-')}", str(value)]
        return out + list(extra)

    ref = DEPTH_REFERENCE

    def plain(depth):
        return ["--plain", "--model", f"resnet{depth}"]

    def gated(depth):
        return ["--model", f"resnet{depth}", "--target-macs", str(targets[depth])]

    decisive, rest = [], []  # (name stem, flags)
    if "plain" in families:
        decisive.append((f"plain_r{ref}", base(recipe) + plain(ref)))
        rest += [(f"plain_r{d}", base(recipe) + plain(d)) for d in plain_depths if d != ref]
    if "gated" in families:
        decisive.append((f"gated_r{DEPTH_DECISIVE}_at_r{ref}", base(recipe) + gated(DEPTH_DECISIVE)))
        rest += [(f"gated_r{d}_at_r{ref}", base(recipe) + gated(d)) for d in gated_depths if d != DEPTH_DECISIVE]
    if "distill" in families:
        decisive.append((f"distill_r{DEPTH_DECISIVE}_at_r{ref}",
                         base(recipe) + gated(DEPTH_DECISIVE) + list(DEPTH_DISTILL)))
    if "levels" in families:
        rest += [(f"levels_plain_r{ref}", base(levels_recipe) + plain(ref)),
                 (f"levels_gated_r{DEPTH_DECISIVE}_at_r{ref}", base(levels_recipe) + gated(DEPTH_DECISIVE))]
    if "wide" in families:
        width, target = DEPTH_WIDE
        rest.append((f"gated_r{ref}_w{_num(width)}_t{_num(target)}", base(recipe) + [
            "--model", f"resnet{ref}", "--width-multiplier", str(width), "--target-macs", str(target)]))
    runs = [(f"{stem}_s{seed}", flags) for seed in seeds for stem, flags in decisive]
    runs += [(f"{stem}_s{seeds[0]}", flags) for stem, flags in rest]
    return [(name, flags + ["--seed", str(name_seed(name))]) for name, flags in runs]


def plan_depth_paper(families=DEPTH_PAPER_FAMILIES, seeds=SEEDS, extra=()):
    """The depth plan with the paper's CIFAR-10 protocol (PAPER_RECIPE): plain
    ResNet-20/32/56/110, gated ResNet-32/56/110 at ResNet-20's MACs on 32x32x3."""
    return plan_depth(families, seeds, recipe=PAPER_RECIPE, common=PAPER_COMMON, extra=extra,
                      input_shape=DEPTH_PAPER_INPUT_SHAPE, plain_depths=DEPTH_PAPER_PLAIN,
                      gated_depths=DEPTH_PAPER_GATED, levels_recipe=None)


# Default root (under runs/) and the families of each plan (--families).
ROOTS = {"short": "tradeoff", "long": "tradeoff_long", "paper": "tradeoff_paper", "depth": "tradeoff_depth",
         "depth-paper": "tradeoff_depth_paper"}
BUDGET_FAMILIES = {"depth": DEPTH_FAMILIES, "depth-paper": DEPTH_PAPER_FAMILIES}


def name_seed(name):
    return int(name.rsplit("_s", 1)[1])


def is_finished(run_dir):
    return os.path.exists(os.path.join(run_dir, "report.json"))


def _locked_by_other(run_dir):
    """Whether a live process holds the run directory's lock (another driver
    on the same root is training it)."""
    from bs_keras.run_lock import RunLock, RunLockedError

    if not os.path.isdir(run_dir):
        return False
    try:
        RunLock(run_dir, log=lambda message: None).acquire().release()
    except RunLockedError:
        return True
    return False


def _csv(text, convert):
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="directory of the run directories (default runs/tradeoff, or "
                   "runs/tradeoff_<budget> with another --budget, '-' as '_')")
    p.add_argument("--budget", choices=tuple(ROOTS), default="short",
                   help="short: 500 steps per run (the default sweep); long: 2,808 steps per run on the full "
                   "training set, gated runs at MAC targets, pruned/gated-from-plain runs from a plain half run; "
                   "paper: the long plan with the paper's CIFAR-10 protocol (500 epochs, recipe "
                   f"{PAPER_RECIPE}; needs CIFAR-10 and a GPU); depth: deep gated ResNets trained to a plain "
                   "ResNet-20's MACs against plain ResNets of several depths (the paper's headline comparison, "
                   "the long budget's steps); depth-paper: the depth plan with the paper's CIFAR-10 protocol, "
                   "ResNet-110 included")
    p.add_argument("--data-dir", help="TFDS data directory (passed to every train.py run)")
    p.add_argument("--manual-dir", help="directory of the downloaded archives (passed to every train.py run)")
    p.add_argument("--families", type=lambda t: _csv(t, str),
                   help=f"comma-separated subset of {','.join(FAMILIES)} (default: all; --budget short: "
                   f"all but bas_l0_hard); --budget depth: of {','.join(DEPTH_FAMILIES)} (default: all; "
                   "depth-paper: all but levels)")
    p.add_argument("--seeds", type=lambda t: _csv(t, int), default=SEEDS)
    short = p.add_argument_group("--budget short only (the other plans are fixed)")
    short.add_argument("--widths", type=lambda t: _csv(t, float))
    short.add_argument("--lams", type=lambda t: _csv(t, float))
    short.add_argument("--block-lams", type=lambda t: _csv(t, float))
    short.add_argument("--prune-macs", type=lambda t: _csv(t, float), help="MAC fractions of the pruned baselines")
    short.add_argument("--epochs", type=int)
    short.add_argument("--limit-train", type=int)
    short.add_argument("--limit-eval", type=int, help="evaluate on fewer test images (quick checks only)")
    short.add_argument("--dataset", help="another dataset than Fashion-MNIST (same recipe otherwise)")
    p.add_argument("--only", type=lambda t: _csv(t, str),
                   help="comma-separated run names (as --dry-run lists them) to run, in this order")
    p.add_argument("--dry-run", action="store_true", help="print the runs and whether they are done")
    args = p.parse_args(argv)
    known = BUDGET_FAMILIES.get(args.budget, FAMILIES)
    if args.families is None:
        args.families = SHORT_FAMILIES if args.budget == "short" else known
    defaults = {"widths": WIDTHS, "lams": LAMS, "block_lams": BLOCK_LAMS, "prune_macs": PRUNE_MACS,
                "epochs": COMMON["epochs"], "limit_train": COMMON["limit_train"], "limit_eval": None, "dataset": None}
    given = [k for k in defaults if getattr(args, k) is not None]
    if args.budget != "short" and given:
        p.error(f"--budget {args.budget} runs a fixed plan; "
                f"{', '.join('--' + k.replace('_', '-') for k in given)} apply to --budget short only")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = set(args.families) - set(known)
    if bad:
        p.error(f"--families: unknown {sorted(bad)}; choose from {', '.join(known)}")
    if args.epochs < 1 or args.limit_train < 128:
        p.error("--epochs must be >= 1 and --limit-train >= 128 (one batch)")
    return args


def main(argv=None):
    args = parse_args(argv)
    from bs_keras.cli.tf_startup import import_tensorflow

    import_tensorflow()  # without TensorFlow's start-up log
    from bs_keras.report import write_json

    if args.root is None:
        args.root = os.path.join("runs", ROOTS[args.budget])
    common = {"epochs": args.epochs, "limit_train": args.limit_train}
    if args.limit_eval:
        common["limit_eval"] = args.limit_eval
    if args.dataset:
        common["dataset"] = args.dataset
    paths = []
    for flag in ("data_dir", "manual_dir"):
        if getattr(args, flag):
            paths += [f"--{flag.replace('_', '-')}", os.path.abspath(os.path.expanduser(getattr(args, flag)))]
    families = [f for f in args.families if f != "block"]
    if args.budget == "long":
        runs = plan_long(families, args.seeds, root=args.root, extra=paths)
    elif args.budget == "paper":
        runs = plan_paper(families, args.seeds, root=args.root, extra=paths)
    elif args.budget == "depth":
        runs = plan_depth(args.families, args.seeds, extra=paths)
    elif args.budget == "depth-paper":
        runs = plan_depth_paper(args.families, args.seeds, extra=paths)
    else:
        runs = plan(args.families, args.seeds, args.widths, args.lams, args.block_lams, common,
                    prune_macs=args.prune_macs, root=args.root)
        runs = [(name, flags + paths) for name, flags in runs]
    if args.only:
        by_name = dict(runs)
        unknown = [n for n in args.only if n not in by_name]
        if unknown:
            print(f"error: --only: no run named {', '.join(unknown)} in this plan; "
                  f"--dry-run lists them", file=sys.stderr)
            return 2
        runs = [(n, by_name[n]) for n in args.only]
    os.makedirs(args.root, exist_ok=True)
    ledger_path = os.path.join(args.root, "sweep.json")
    ledger = {"runs": {}}
    if os.path.exists(ledger_path):
        with open(ledger_path) as f:
            ledger = json.load(f)
    todo = [(n, f) for n, f in runs if not is_finished(os.path.join(args.root, n))]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to do (root {args.root})")
    if args.budget == "depth":
        print("\n".join(describe_depth_targets(DEPTH_GATED)))
    elif args.budget == "depth-paper":
        print("\n".join(describe_depth_targets(DEPTH_PAPER_GATED, DEPTH_PAPER_INPUT_SHAPE)))
    if args.dry_run:
        for name, flags in runs:
            state = "done" if is_finished(os.path.join(args.root, name)) else "todo"
            print(f"  [{state}] {name}: python train.py {' '.join(flags)}")
        return 0
    sweep_start = time.time()
    for i, (name, flags) in enumerate(todo, 1):
        run_dir = os.path.join(args.root, name)
        if is_finished(run_dir) or _locked_by_other(run_dir):
            print(f"[{i}/{len(todo)}] {name}: finished or running in another driver; skipped", flush=True)
            continue
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--run-dir", run_dir]
        print(f"[{i}/{len(todo)}] {name} (elapsed {time.time() - sweep_start:.0f} s)", flush=True)
        with open(os.path.join(args.root, f"{name}.log"), "a") as log:
            start = time.time()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            wall = time.time() - start
        if rc != 0:
            print(f"  {name} failed (exit {rc}); see {os.path.join(args.root, name + '.log')}", file=sys.stderr)
            return rc
        if os.path.exists(ledger_path):  # another driver may have written meanwhile
            with open(ledger_path) as f:
                ledger = json.load(f)
        entry = ledger["runs"].get(name, {"wall_seconds": 0.0, "sessions": 0})
        entry["wall_seconds"] += wall
        entry["sessions"] += 1
        entry["command"] = "python train.py " + " ".join(flags + ["--run-dir", run_dir])
        ledger["runs"][name] = entry
        write_json(ledger_path, ledger)
        with open(os.path.join(run_dir, "report.json")) as f:
            ev = json.load(f)["evaluation"]
        print(f"  accuracy {ev['accuracy']:.4f}  MACs {ev['macs_ratio']:.1%}  wall {wall:.0f} s", flush=True)
    print(f"Sweep done in {time.time() - sweep_start:.0f} s. Next: python bench/report.py {args.root} --out docs/results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
