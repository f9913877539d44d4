"""Where the gated accuracy goes (issue 19 item 2): one change at a time against the sweep recipe.

Every row is the recipe `fashion_mnist_sweep` (`python train.py --recipe
fashion_mnist_sweep`: 500 SGD steps, batch-shaping + L0 with lambda 12; the
demo recipe when these rows were run, and the base of the 500-step sweep)
with one change, or a freeze-phase fine-tuning of its run `demo_s0`'s
`last.keras`:

- `freeze_gates`: backbone frozen, only the gates train (L0 at full weight);
- `freeze_backbone`: every ChannelGate frozen (their decisions fixed), the
  backbone trains;
- `freeze_backbone_hard`: as `freeze_backbone`, the frozen gates also
  deterministic in training (`logit > 0`, no sampling, no gate losses): the
  backbone trains on exactly the network that is evaluated;
- `freeze_none`: the same extra steps of ordinary training (budget match).

The phase rows then try the hard-gate phase (`--hard-gates-begin`) inside
the demo's own 500 steps, alone and with a compute budget.

The freeze rows train `--freeze-steps` steps (default 250: two epochs of
16,000 images) at the recipe's final settings (L0 weight lambda,
gamma 0) with SGD at lr `--freeze-lr` (default 0.01, constant), then evaluate on the
full test set. The train.py rows are ordinary run directories under
`--root`; a freeze row writes `<root>/<name>/report.json` too, so the
script is resumable: rows with a report.json are skipped. Wall time per
row goes into `<root>/diagnosis_ledger.json`; the table is written to
`--out` (`diagnosis.md`, `diagnosis.json`).

    python bench/diagnose.py --root ~/bs_keras_runs/diag --dry-run
    python bench/diagnose.py --root ~/bs_keras_runs/diag
    python bench/diagnose.py --root ~/bs_keras_runs/diag --only demo_s0,freeze_gates
    python bench/diagnose.py --root ~/bs_keras_runs/diag --report-only
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's bs_keras, not another installed one
    sys.path.insert(0, ROOT)
FREEZE_MODES = ("gates", "backbone", "backbone_hard", "none")
FREEZE_STEPS = 250
FREEZE_LR = 0.01

# (name, train.py flags after --recipe fashion_mnist_sweep, what the row changes). They
# run in this order, with the freeze rows right after demo_s0 (their
# source): when time is short the tail (second seeds, then the "maybe"
# settings) is what goes.
TRAIN_ROWS = (
    ("demo_s0", [], "the sweep recipe (BAS + L0, lambda 12; the demo until 2026-12-03)"),
    ("plain_s0", ["--plain"], "plain ResNet-20"),
    ("lam0_s0", ["--lam", "0"], "gated, BAS only (lambda 0)"),
    ("lam0_gamma0_s0", ["--lam", "0", "--gamma", "0"], "gated, no gate loss"),
    ("stop_gradient", ["--gate-stop-gradient"], "gate input gradient stopped"),
    ("lam_early_short", ["--lam-begin", "0", "--lam-end", "0.3"], "L0 ramp 0-30 % of the run"),
    ("lam_long", ["--lam-begin", "0.2", "--lam-end", "0.9"], "L0 ramp 20-90 % of the run"),
    ("l0_channels", ["--l0-weighting", "channels"], "L0 counts channels, not MACs"),
    ("temp1", ["--gate-temperature", "1.0"], "gate temperature 1.0"),
    ("bias1", ["--gate-init-bias", "1.0"], "gate initial bias 1.0"),
)
# The row whose recipe `python train.py` (recipe fashion_mnist_demo) trains:
# the README quotes its result.
DEMO_ROW = "target0p5_start_hard0p6_noise0"
FREEZE_ROWS = tuple(
    (f"freeze_{mode}", mode, what) for mode, what in (
        ("gates", "from demo_s0: backbone frozen, gates fine-tuned"),
        ("backbone", "from demo_s0: gates frozen, backbone fine-tuned"),
        ("backbone_hard", "from demo_s0: gates frozen and deterministic, backbone fine-tuned"),
        ("none", "from demo_s0: everything fine-tuned (budget match)"),
    )
)
# The hard-gate phase (train.py --hard-gates-begin), which the freeze rows
# suggested (freeze_backbone_hard): inside the demo's 500 steps, and with a
# compute budget, the candidates for the demo recipe.
PHASE_ROWS = (
    ("hard0p8", ["--hard-gates-begin", "0.8"], "hard-gate phase over the last 20 % of the run"),
    ("hard0p6", ["--hard-gates-begin", "0.6"], "hard-gate phase over the last 40 % (from the end of the L0 ramp)"),
    ("target0p5", ["--target-macs", "0.5"], "compute budget 0.5 instead of lambda 12"),
    ("target0p5_hard0p8", ["--target-macs", "0.5", "--hard-gates-begin", "0.8"],
     "compute budget 0.5 and the hard-gate phase over the last 20 %"),
    # The phase over the last 40 % left the gates at 0.73 of the MACs (they
    # still lag at the end of the L0 ramp): ramp earlier so they have closed.
    ("early_hard0p6", ["--lam-begin", "0.1", "--lam-end", "0.4", "--hard-gates-begin", "0.6"],
     "L0 ramp 10-40 %, hard-gate phase over the last 40 %"),
    ("target0p5_early_hard0p6", ["--target-macs", "0.5", "--lam-begin", "0.1", "--lam-end", "0.4",
                                 "--hard-gates-begin", "0.6"],
     "compute budget 0.5 over an L0 ramp 10-40 %, hard-gate phase over the last 40 %"),
    # The demo since 2026-12-05 (sixth session): the same with deterministic
    # straight-through gates (0.8433 / 0.8597 at 0.540 / 0.509, seeds 0 / 1).
    ("target0p5_early_hard0p6_noise0", ["--target-macs", "0.5", "--lam-begin", "0.1", "--lam-end", "0.4",
                                        "--hard-gates-begin", "0.6", "--gate-noise", "0"],
     "target0p5_early_hard0p6 with deterministic straight-through gates (--gate-noise 0)"),
    ("target0p5_start_hard0p6_noise0", ["--target-macs", "0.5", "--lam-begin", "0", "--lam-end", "0",
                                        "--hard-gates-begin", "0.6", "--gate-noise", "0", "--gate-init-bias", "1"],
     "target0p5_early_hard0p6_noise0 held at the target from step 0, the gates starting there (half of each "
     "layer open at logit +-1)"),
    # Second seeds of the demo candidates.
    ("target0p5_s1", ["--target-macs", "0.5", "--seed", "1"], "compute budget 0.5 instead of lambda 12, seed 1"),
    ("target0p5_early_hard0p6_s1", ["--target-macs", "0.5", "--lam-begin", "0.1", "--lam-end", "0.4",
                                    "--hard-gates-begin", "0.6", "--seed", "1"],
     "compute budget 0.5 over an L0 ramp 10-40 %, hard-gate phase over the last 40 %, seed 1"),
    ("demo_s1", ["--seed", "1"], "the sweep recipe, seed 1"),
)
TAIL_ROWS = (
    ("plain_s1", ["--plain", "--seed", "1"], "plain ResNet-20, seed 1"),
    ("lam0_s1", ["--lam", "0", "--seed", "1"], "gated, BAS only (lambda 0), seed 1"),
    ("lam0_gamma0_s1", ["--lam", "0", "--gamma", "0", "--seed", "1"], "gated, no gate loss, seed 1"),
    ("temp0p3", ["--gate-temperature", "0.3"], "gate temperature 0.3"),
    ("bias5", ["--gate-init-bias", "5.0"], "gate initial bias 5.0"),
)


def plan(root, freeze_steps=FREEZE_STEPS, freeze_lr=FREEZE_LR):
    """The rows: a list of dicts with `name`, `kind` ("train"/"freeze"), `argv` and `command`.

    `argv` is the argument list after the Python executable; `command`
    is the shell line recorded in the table.
    """
    rows = []

    def train(name, flags, what):
        run_dir = os.path.join(root, name)
        argv = ["train.py", "--recipe", "fashion_mnist_sweep", *flags, "--run-dir", run_dir]
        rows.append({"name": name, "kind": "train", "what": what, "run_dir": run_dir, "argv": argv,
                     "command": "python " + " ".join(argv)})

    train(*TRAIN_ROWS[0])
    source = os.path.join(root, "demo_s0", "last.keras")
    for name, mode, what in FREEZE_ROWS:
        run_dir = os.path.join(root, name)
        argv = ["bench/diagnose.py", "freeze", "--source", source, "--mode", mode,
                "--steps", str(freeze_steps), "--lr", f"{freeze_lr:g}", "--out-dir", run_dir]
        rows.append({"name": name, "kind": "freeze", "what": what, "run_dir": run_dir, "argv": argv,
                     "command": "python " + " ".join(argv), "needs": "demo_s0"})
    for row in TRAIN_ROWS[1:] + PHASE_ROWS + TAIL_ROWS:
        train(*row)
    return rows


def is_finished(run_dir):
    return os.path.exists(os.path.join(run_dir, "report.json"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join("runs", "diag"), help="directory of the rows' run directories")
    p.add_argument("--out", default=os.path.join("docs", "results"),
                   help="where diagnosis.md and diagnosis.json go")
    p.add_argument("--only", help="comma-separated row names to run (default: all)")
    p.add_argument("--curve", default=os.path.join(ROOT, "docs", "results", "summary.json"),
                   help="summary.json of the 500-step sweep: its BAS + L0 curve is the reference at each "
                   "row's MAC ratio (default: the published one)")
    p.add_argument("--freeze-steps", type=int, default=FREEZE_STEPS)
    p.add_argument("--freeze-lr", type=float, default=FREEZE_LR)
    p.add_argument("--dry-run", action="store_true", help="print the rows, their commands and state")
    p.add_argument("--report-only", action="store_true", help="write the table from the finished rows")
    args = p.parse_args(argv)
    if args.freeze_steps < 1:
        p.error("--freeze-steps must be a positive integer")
    if not args.freeze_lr > 0:
        p.error("--freeze-lr must be > 0")
    return args


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["freeze"]:
        return freeze_main(argv[1:])
    args = parse_args(argv)
    rows = plan(args.root, args.freeze_steps, args.freeze_lr)
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - {r["name"] for r in rows}
        if unknown:
            print(f"error: --only: unknown rows {sorted(unknown)}; choose from "
                  f"{', '.join(r['name'] for r in rows)}", file=sys.stderr)
            return 2
        rows = [r for r in rows if r["name"] in names]
    if args.dry_run:
        for r in rows:
            print(f"  [{'done' if is_finished(r['run_dir']) else 'todo'}] {r['name']}: {r['command']}")
        return 0
    if not args.report_only:
        rc = run_rows(rows, args.root)
        if rc:
            return rc
    write_table(plan(args.root, args.freeze_steps, args.freeze_lr), args.root, args.out, args.curve)
    return 0


def run_rows(rows, root):
    from bs_keras.report import write_json

    os.makedirs(root, exist_ok=True)
    ledger_path = os.path.join(root, "diagnosis_ledger.json")
    todo = [r for r in rows if not is_finished(r["run_dir"])]
    print(f"{len(rows)} rows, {len(rows) - len(todo)} finished, {len(todo)} to do (root {root})", flush=True)
    for i, r in enumerate(todo, 1):
        if is_finished(r["run_dir"]):  # another driver finished it meanwhile
            continue
        print(f"[{i}/{len(todo)}] {r['name']}", flush=True)
        with open(os.path.join(root, f"{r['name']}.log"), "a") as log:
            start = time.time()
            rc = subprocess.call([sys.executable, *r["argv"]], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            wall = time.time() - start
        if rc != 0:
            print(f"  {r['name']} failed (exit {rc}); see {os.path.join(root, r['name'] + '.log')}", file=sys.stderr)
            continue
        ledger = _read_json(ledger_path) or {"rows": {}}
        entry = ledger["rows"].get(r["name"], {"wall_seconds": 0.0, "sessions": 0})
        entry["wall_seconds"] += wall
        entry["sessions"] += 1
        entry["command"] = r["command"]
        ledger["rows"][r["name"]] = entry
        write_json(ledger_path, ledger)
        ev = _read_json(os.path.join(r["run_dir"], "report.json"))["evaluation"]
        print(f"  accuracy {ev['accuracy']:.4f}  MACs {ev.get('macs_ratio', 1.0):.3f}  wall {wall:.0f} s", flush=True)
    return 0


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def set_trainable(model, mode):
    """Freezes part of a gated model for `freeze_finetune`.

    Args:
        model: a functional model with `ChannelGate` layers.
        mode: "gates" (only the gates train: every other layer is frozen,
            its BatchNorms then use their moving statistics), "backbone"
            (every gate frozen: the rest trains), "backbone_hard" (as
            "backbone", and the gates use their deterministic `logit > 0`
            decisions in training too, adding no losses) or "none" (all
            train).

    Returns:
        The gate layers.
    """
    from bs_keras.gates import find_gates

    if mode not in FREEZE_MODES:
        raise ValueError(f"mode must be one of {FREEZE_MODES}. Received: mode={mode!r}")
    gates = find_gates(model)
    if not gates:
        raise ValueError(f"Model {model.name!r} has no ChannelGate layers: nothing to freeze.")
    model.trainable = True
    gate_ids = {id(g) for g in gates}
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if id(layer) in gate_ids:
            layer.trainable = not mode.startswith("backbone")
            if mode == "backbone_hard":
                layer.call = functools.partial(_hard_gate_call, layer)
        elif mode == "gates":
            if find_gates(layer) and layer is not model:  # a nested block holding gates
                set_trainable(layer, mode)
            else:
                layer.trainable = False
    return gates


def _hard_gate_call(gate, inputs, training=None):
    from bs_keras.gates import ChannelGate

    return ChannelGate.call(gate, inputs, training=False)


def freeze_finetune(model, mode, train_ds, steps, *, lr=FREEZE_LR, lam=12.0, l0_weighting="macs", momentum=0.9):
    """Fine-tunes part of a trained gated model for `steps` SGD steps.

    The objective is the same in every mode: crossentropy, the model's
    weight decay, and L0 at the constant weight `lam` (batch-shaping off, as
    at the end of the demo recipe); only the trained variables differ
    (`set_trainable`).

    Args:
        model: a trained functional classifier with `ChannelGate` layers
            (softmax output).
        mode: one of `FREEZE_MODES` (see `set_trainable`).
        train_ds: a dataset of `(images, labels)` batches with at least
            `steps` batches.
        steps: optimizer steps.
        lr: constant SGD (Nesterov) learning rate.
        lam: the L0 weight.
        l0_weighting: "macs" or "channels" (`bs_keras.configure_gate_losses`).

    Returns:
        A dict: `steps` (optimizer steps taken), `trainable_weights`,
        `frozen_weights`, `final_loss`.
    """
    import keras

    from bs_keras.gating import configure_gate_losses

    set_trainable(model, mode)
    configure_gate_losses(model, gamma=0.0, lam=lam, l0_weighting=l0_weighting)
    optimizer = keras.optimizers.SGD(lr, momentum=momentum, nesterov=True)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(train_ds.take(steps), epochs=1, verbose=2, shuffle=False)
    return {
        "steps": int(optimizer.iterations.numpy()),
        "trainable_weights": len(model.trainable_weights),
        "frozen_weights": len(model.non_trainable_weights),
        "final_loss": float(history.history["loss"][-1]),
    }


def freeze_main(argv):
    p = argparse.ArgumentParser(prog="diagnose.py freeze",
                                description="Fine-tune part of a finished gated run's model and evaluate it.")
    p.add_argument("--source", required=True, help="last.keras of a finished train.py run (its config.json "
                   "next to it gives the dataset, lambda and L0 weighting)")
    p.add_argument("--mode", required=True, choices=FREEZE_MODES)
    p.add_argument("--steps", type=int, default=FREEZE_STEPS)
    p.add_argument("--lr", type=float, default=FREEZE_LR)
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (the run's seed + 1000 + this)")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    config_path = os.path.join(os.path.dirname(os.path.abspath(args.source)), "config.json")
    if not os.path.isfile(args.source) or not os.path.isfile(config_path):
        p.error(f"--source {args.source}: give the last.keras of a finished train.py run "
                f"(with config.json next to it)")
    if args.steps < 1 or not args.lr > 0:
        p.error("--steps must be a positive integer and --lr > 0")

    import keras

    import bs_keras
    from bs_keras import data as data_lib
    from bs_keras import report as report_lib
    from bs_keras.recipes import Recipe

    bs_keras.register_custom_objects()

    recipe = Recipe.from_dict(_read_json(config_path)["recipe"])
    if not recipe.gated or recipe.target_macs is not None:
        p.error(f"--source {args.source}: needs a gated run with a fixed --lam")
    seed = recipe.seed + 1000 + args.seed
    keras.utils.set_random_seed(seed)
    source = data_lib.get_dataset(recipe.dataset, image_size=recipe.image_size,
                                  validation_split=recipe.validation_split, seed=recipe.seed)
    train_ds = source.train(recipe.batch_size, seed=seed, repeat=True)
    model = keras.saving.load_model(args.source, compile=False)
    start = time.time()
    info = freeze_finetune(model, args.mode, train_ds, args.steps, lr=args.lr, lam=recipe.lam,
                           l0_weighting=recipe.l0_weighting, momentum=recipe.momentum)
    wall = time.time() - start
    eval_ds = source.eval(recipe.batch_size)
    if recipe.limit_eval:
        eval_ds = eval_ds.take(max(1, recipe.limit_eval // recipe.batch_size))
    summary, per_sample = report_lib.evaluate_model(model, eval_ds)
    extra = {"freeze": {"source": args.source, "mode": args.mode, "lr": args.lr, "lam": recipe.lam,
                        "l0_weighting": recipe.l0_weighting, "seed": seed, "train_wall_seconds": wall, **info}}
    report_lib.write_report(summary, per_sample, args.out_dir, extra)
    print(report_lib.format_summary(summary))
    return 0


def _row_figures(row, root):
    report = _read_json(os.path.join(row["run_dir"], "report.json"))
    if report is None:
        return None
    ev = report["evaluation"]
    cats = ev.get("gate_categories") or {}
    ledger = (_read_json(os.path.join(root, "diagnosis_ledger.json")) or {"rows": {}})["rows"].get(row["name"], {})
    if row["kind"] == "freeze":
        steps = report["freeze"]["steps"]
        source = _read_json(os.path.join(os.path.dirname(report["freeze"]["source"]), "report.json"))
        if source is not None:
            steps = f"{_train_steps(source)} + {steps}"
    else:
        steps = _train_steps(report)
    return {
        "name": row["name"], "what": row["what"], "command": row["command"],
        "accuracy": ev["accuracy"], "macs_ratio": ev.get("macs_ratio", 1.0),
        "conditional": cats.get("conditional") if ev.get("gated") else None,
        "always_on": cats.get("always_on") if ev.get("gated") else None,
        "always_off": cats.get("always_off") if ev.get("gated") else None,
        "wall_seconds": ledger.get("wall_seconds"), "steps": steps,
        # Without a ledger entry (a row run outside the driver): fit time only.
        "fit_seconds": report.get("train_wall_seconds_this_session", (report.get("freeze") or {}).get("train_wall_seconds")),
    }


def _train_steps(report):
    r = report["recipe"]
    return report["epochs_completed"] * max(1, (r["limit_train"] or 60000) // r["batch_size"])


def _wall(f):
    if f["wall_seconds"] is not None:
        return f"{f['wall_seconds']:.0f}"
    return "–" if f["fit_seconds"] is None else f"{f['fit_seconds']:.0f} (fit only)"


def reference_curve(summary_path, family="bas_l0"):
    """`(macs_ratio, accuracy)` means of one family's configurations in a
    sweep's summary.json (`bench/report.py`), or None without the file."""
    summary = _read_json(summary_path) if summary_path else None
    if summary is None:
        return None
    return [(c["macs_ratio"]["mean"], c["accuracy"]["mean"]) for c in summary["configs"] if c["family"] == family]


def write_table(rows, root, out, curve_path=None):
    """Writes `diagnosis.md` and `diagnosis.json` from the finished rows.

    `curve_path`: the 500-step sweep's summary.json; each gated row is then
    compared with its batch-shaping + L0 curve (fixed lambdas, mean of
    seeds) interpolated at the row's MAC ratio, since one-change rows end at
    different ratios.
    """
    from bs_keras.report import write_json, write_text
    from sweep_report import interpolate

    done = [f for f in (_row_figures(r, root) for r in rows) if f is not None]
    missing = [r["name"] for r in rows if not is_finished(r["run_dir"])]
    curve = reference_curve(curve_path)
    for f in done:
        ref = interpolate(curve, f["macs_ratio"]) if curve and f["conditional"] is not None else None
        f["curve_accuracy_at_same_macs"] = ref
        f["difference_vs_curve"] = None if ref is None else f["accuracy"] - ref

    def num(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = [
        "# Where the gated accuracy goes (issue 19 item 2)",
        "",
        "Generated by `bench/diagnose.py`. Every row is the recipe fashion_mnist_sweep (500 SGD steps, "
        "batch-shaping + L0, lambda 12; the demo recipe when the rows were run) with one change, or a "
        "freeze-phase fine-tuning of its run demo_s0. "
        "Full 10,000-image test set, deterministic gates.",
        "",
        "Wall: seconds of the whole row (start-up, training, evaluation) on a 2-core machine shared with other "
        "jobs; \"fit only\": the row ran outside the driver, its training time from report.json.",
        "",
        "Curve: the 500-step sweep's batch-shaping + L0 runs (lambda 8/12/20, mean of two seeds, "
        + (f"`{curve_path}`" if curve else "not given") + ") interpolated at the row's MAC ratio; "
        "difference = row - curve (– outside the curve's range or for ungated rows).",
        "",
        "| row | change | accuracy | MAC ratio | curve at same MACs | difference | conditional | always on | "
        "always off | steps | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in done:
        lines.append(
            f"| {f['name']} | {f['what']} | {f['accuracy']:.4f} | {f['macs_ratio']:.3f} | "
            f"{num(f['curve_accuracy_at_same_macs'], '.4f')} | {num(f['difference_vs_curve'], '+.4f')} | "
            f"{num(f['conditional'], '.3f')} | {num(f['always_on'], '.3f')} | {num(f['always_off'], '.3f')} | "
            f"{f['steps']} | {_wall(f)} |"
        )
    lines += ["", "Commands:", "", "```sh"] + [f"{f['command']}  # {f['name']}" for f in done] + ["```", ""]
    if missing:
        lines += [f"Not run: {', '.join(missing)}.", ""]
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "diagnosis.md"), "\n".join(lines))
    write_json(os.path.join(out, "diagnosis.json"), {"rows": done, "not_run": missing})
    print(f"Wrote {os.path.join(out, 'diagnosis.md')} ({len(done)} rows, {len(missing)} not run)")


if __name__ == "__main__":
    sys.exit(main())
