#!/usr/bin/env python
"""Accuracy and conditional MACs per difficulty level (fashion_mnist_levels).

    python bench/difficulty.py ~/bs_keras_runs/levels/plain_s0 \\
        ~/bs_keras_runs/levels/l0_s0 ~/bs_keras_runs/levels/bas_l0_s0 --out docs/results/levels

Each argument is a run directory of train.py trained (or evaluated, with
`train.py --evaluate`) on `--dataset fashion_mnist_levels`, whose
per_sample.npz holds the difficulty `level` of every test image (0 clean,
1-3 increasing pixel noise, bs_keras.data.levels). Writes into --out:

- difficulty.md: per run, accuracy and mean conditional MAC ratio (of the
  ungated network) per level, Spearman(MACs, level) and the fraction of
  conditional gates (overall, and per level when report.json has it);
- difficulty_levels.png: MAC ratio vs level (one line per gated run) and
  error rate vs level (every run, plain included);
- difficulty.json: the same numbers.

The per-level numbers are recomputed from per_sample.npz; the family (plain,
l0, bas_l0, ...) comes from the run's recipe, as in bench/report.py.
"""

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_OUT = os.path.join("docs", "results", "levels")


class DifficultyError(ValueError):
    """A problem with the inputs; printed without a traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories trained on fashion_mnist_levels")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    return p, p.parse_args(argv)


def load_level_run(run_dir):
    """Per-level numbers of one run directory.

    Returns:
        dict with `name`, `family`, `gated`, `levels` (the rows of
        `bs_keras.report.per_level_table`, plus `error` and, where
        report.json has it, `conditional`), `spearman_macs_level`,
        `accuracy`, `macs_ratio` and `conditional` (fraction of gates,
        None for plain runs).

    Raises:
        DifficultyError: no such directory, no report.json or
            per_sample.npz, or no `level` array in per_sample.npz.
    """
    import json

    import numpy as np

    from bs_keras.rank_correlation import spearman
    from bs_keras.report import per_level_table
    from sweep_report import run_family

    name = os.path.basename(os.path.normpath(run_dir))
    if not os.path.isdir(run_dir):
        raise DifficultyError(f"{run_dir} is not a directory; give run directories written by train.py.")
    report_path, npz_path = os.path.join(run_dir, "report.json"), os.path.join(run_dir, "per_sample.npz")
    for path in (report_path, npz_path):
        if not os.path.isfile(path):
            raise DifficultyError(f"{run_dir}: no {os.path.basename(path)}; the run is unfinished "
                                  "(finish it by rerunning the same train.py command).")
    with open(report_path) as f:
        report = json.load(f)
    ev = report.get("evaluation") or {}
    if "ungated_macs" not in ev:
        raise DifficultyError(f"{report_path} has no classification evaluation.")
    with np.load(npz_path, allow_pickle=False) as data:
        per_sample = {k: np.asarray(data[k]) for k in data.files}
    if "level" not in per_sample:
        dataset = (report.get("recipe") or {}).get("dataset") or report.get("dataset") or "?"
        raise DifficultyError(
            f"{run_dir}: per_sample.npz has no difficulty 'level' (the run's dataset is {dataset!r}). "
            "Train on --dataset fashion_mnist_levels, or evaluate its model there: "
            "python train.py --evaluate --model-path RUN/best.keras --dataset fashion_mnist_levels "
            "--run-dir OUT_DIR, then pass OUT_DIR."
        )
    levels = per_level_table(per_sample, float(ev["ungated_macs"]))
    report_levels = {row["level"]: row for row in ev.get("per_level") or []}
    for row in levels:
        row["error"] = 1.0 - row["accuracy"]
        cats = report_levels.get(row["level"], {}).get("gate_categories")
        row["conditional"] = cats["conditional"] if cats else None
    rho = spearman(per_sample["macs"], per_sample["level"])
    gated = bool(ev.get("gated"))
    recipe = report.get("recipe") or {}
    return {
        "name": name,
        "path": run_dir,
        "family": run_family(recipe) if recipe else ("bas_l0" if gated else "plain"),
        "gated": gated,
        "dataset": recipe.get("dataset") or report.get("dataset"),
        "num_samples": int(len(per_sample["level"])),
        "accuracy": float(np.mean(per_sample["correct"])),
        "macs_ratio": float(np.mean(per_sample["macs"]) / float(ev["ungated_macs"])),
        "spearman_macs_level": None if math.isnan(rho) else rho,
        "conditional": float(ev["gate_categories"]["conditional"]) if gated else None,
        "levels": levels,
    }


def _f(value, fmt="{:.3f}"):
    return "–" if value is None else fmt.format(value)


def markdown(runs):
    """The tables of difficulty.md."""
    levels = sorted({row["level"] for run in runs for row in run["levels"]})

    def at(run, level, key):
        row = next((r for r in run["levels"] if r["level"] == level), None)
        return None if row is None else row[key]

    head = (["run", "family"] + [f"acc L{l}" for l in levels] + [f"MACs L{l}" for l in levels]
            + ["Spearman(MACs, level)", "conditional gates"])  # fmt: skip
    lines = [
        "Accuracy and mean conditional MAC ratio (of the ungated network) per difficulty level "
        "(0 clean, 1-3 increasing pixel noise) on the fashion_mnist_levels test set.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for run in runs:
        cells = [run["name"], run["family"]]
        cells += [_f(at(run, l, "accuracy"), "{:.4f}") for l in levels]
        cells += [_f(at(run, l, "macs_ratio"), "{:.1%}") for l in levels]
        cells += [_f(run["spearman_macs_level"]), _f(run["conditional"], "{:.1%}")]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {l: at(runs[0], l, "count") for l in levels}
    lines += ["", "Samples per level: " + ", ".join(f"L{l} {counts[l]}" for l in levels) + "."]
    per_level_cond = [r for r in runs if r["gated"] and any(row["conditional"] is not None for row in r["levels"])]
    if per_level_cond:
        head = ["run"] + [f"conditional L{l}" for l in levels]
        lines += ["", "Fraction of gates conditional within each level's samples (neither always on nor "
                  "always off over that level):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for run in per_level_cond:
            cells = [run["name"]] + [_f(at(run, l, "conditional"), "{:.1%}") for l in levels]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs, path):
    """difficulty_levels.png: MAC ratio vs level (gated runs), error rate vs level (all runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bs_keras.report import save_figure
    from sweep_report import FAMILY_STYLE

    fig, (ax_macs, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        style = FAMILY_STYLE.get(run["family"], {"color": None, "marker": "o"})
        x = [row["level"] for row in run["levels"]]
        kwargs = {"color": style["color"], "marker": style["marker"], "label": f"{run['name']} ({run['family']})"}
        if run["gated"]:
            ax_macs.plot(x, [row["macs_ratio"] for row in run["levels"]], **kwargs)
        ax_err.plot(x, [row["error"] for row in run["levels"]], **kwargs)
    levels = sorted({row["level"] for run in runs for row in run["levels"]})
    for ax, ylabel, title in ((ax_macs, "mean conditional MACs / ungated", "MACs per level (gated runs)"),
                              (ax_err, "error rate", "Error rate per level")):  # fmt: skip
        ax.set_xticks(levels)
        ax.set_xlabel("difficulty level (0 clean, 1-3 more pixel noise)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def write_difficulty_report(run_dirs, out_dir=DEFAULT_OUT):
    """Writes difficulty.md, difficulty_levels.png and difficulty.json; returns the markdown."""
    from bs_keras.report import write_json, write_text

    if not run_dirs:
        raise DifficultyError("give at least one run directory")
    runs = [load_level_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        raise DifficultyError(f"two run directories share a name ({', '.join(names)}); rename one.")
    os.makedirs(out_dir, exist_ok=True)
    text = markdown(runs)
    write_text(os.path.join(out_dir, "difficulty.md"), text)
    plot(runs, os.path.join(out_dir, "difficulty_levels.png"))
    write_json(os.path.join(out_dir, "difficulty.json"), {"runs": runs}, allow_nan=False)
    return text


def main(argv=None):
    _, args = parse_args(argv)
    try:
        print(write_difficulty_report(args.runs, args.out), end="")
        return 0
    except (DifficultyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
