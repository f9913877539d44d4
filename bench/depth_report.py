"""Report of a depth sweep (`bench/tradeoff.py --budget depth`): deep gated
ResNets trained to a shallower plain ResNet's mean MACs, against plain
ResNets of several depths (the paper's headline comparison).

Runs of different depths are compared on ABSOLUTE mean MACs per test sample
(report.json's `mean_conditional_macs`, a plain network's static count, a
gated one's including its gates), not on MAC ratios: 0.32 of ResNet-56's
MACs is ResNet-20's cost. A run's `macs_ratio` stays its own (of its own
ungated network: what `--target-macs` aims at).

A configuration is dataset + model + gated or plain + width + MAC target +
distillation; its seeds are aggregated (`sweep_report.aggregate`). Each
gated configuration is compared with the plain configuration of its data set
whose mean MACs are closest to its own (the network whose cost it was
trained to), and with the plain curve over depth interpolated at its MACs
(None outside the plain MAC range).

`write_depth_report(paths, out_dir)` writes `tradeoff.png` (accuracy vs mean
MACs, one marker per depth, one panel per data set), `summary.json` and
`results.md`. `bench/report.py` writes it for a root whose runs differ in
model (`is_depth_sweep`).
"""

import os
import re

import sweep_report as sr
from bs_keras.report import save_figure

METRICS = ("accuracy", "mean_conditional_macs", "macs_ratio", "conditional", "spearman_macs_loss", "steps",
           "wall_seconds")
DEPTH_MARKERS = {20: "s", 32: "^", 44: "v", 56: "o", 110: "D"}
KIND_STYLE = {  # colour and legend label of each kind of configuration
    "plain": ("#252525", "plain (curve over depth)"),
    "gated": ("#e31a1c", "gated, batch-shaping + L0 at a MAC target"),
    "distilled": ("#6a3d9a", "gated + distillation"),
    "wide": ("#33a02c", "gated, wider"),
}


def model_depth(model):
    """The depth of a CIFAR/ImageNet ResNet model name (`resnet56` -> 56), else None."""
    match = re.fullmatch(r"resnet(\d+)", str(model))
    return int(match.group(1)) if match else None


def is_depth_sweep(runs):
    """Whether the runs (dicts of `sweep_report.load_run`) compare models of several depths."""
    return len({r["model"] for r in runs}) > 1


def kind(run):
    """plain, distilled, wide (gated, width multiplier above 1) or gated."""
    if not run["gated"]:
        return "plain"
    if run["distill"]:
        return "distilled"
    return "wide" if (run["width_multiplier"] or 1.0) > 1.0 else "gated"


def config_label(run):
    """Printable configuration, e.g. `gated ResNet-56 target=0.322 + distill self` (without the data set)."""
    depth = run["depth"]
    text = ("gated" if run["gated"] else "plain") + (f" ResNet-{depth}" if depth else f" {run['model']}")
    width = run["width_multiplier"] or 1.0
    if width != 1.0:
        text += f" width={width:g}"
    if run["gated"] and run["target_macs"] is not None:
        text += f" target={float(run['target_macs']):g}"
    if run["distill"]:
        text += f" + distill {run['distill']}"
    return text


def _prepare(run):
    """Sets the depth-sweep fields of a loaded run: depth, kind, own MAC ratios, config."""
    run["depth"] = model_depth(run["model"])
    run["kind"] = kind(run)
    run["macs_ratio"] = run["own_macs_ratio"]
    for which in ("correct", "wrong"):
        m = run[f"mean_macs_{which}"]
        run[f"macs_ratio_{which}"] = None if m is None else m / run["ungated_macs"]
    run["config"] = config_label(run)
    return run


def _order(run):
    return (str(run["dataset"]), run["gated"], run["depth"] or 0, run["width_multiplier"] or 1.0,
            run["distill"] or "", run["target_macs"] or 0.0)


def aggregate_configs(runs):
    """Per configuration (data set + `config_label`): seeds, runs and `aggregate` of each of METRICS."""
    groups = {}
    for r in sorted(runs, key=_order):
        groups.setdefault((r["dataset"], r["config"]), []).append(r)
    configs = []
    for (dataset, label), members in groups.items():
        first = members[0]
        c = {"config": label, "dataset": dataset, "kind": first["kind"], "model": first["model"],
             "depth": first["depth"], "gated": first["gated"], "width_multiplier": first["width_multiplier"],
             "target_macs": first["target_macs"], "distill": first["distill"]}  # fmt: skip
        configs.append({**c, **sr.seed_aggregates(members, METRICS)})
    return configs


def compare_with_plain(configs):
    """Each gated configuration against the plain ones of its data set at the same absolute MACs.

    Each row: config, dataset, n, `macs` and `accuracy` (means), the plain
    configuration with the closest mean MACs (`plain_config`, `plain_n`,
    `plain_macs`, `plain_accuracy`, `difference` = gated - plain,
    `macs_vs_plain` = gated MACs / plain MACs), and the plain curve over
    depth interpolated at the gated MACs (`plain_curve_accuracy`,
    `difference_vs_curve`; None outside the plain MAC range).
    """
    rows = []
    for c in configs:
        if not c["gated"]:
            continue
        plain = [p for p in configs if not p["gated"] and p["dataset"] == c["dataset"]]
        macs, acc = sr._mean(c["mean_conditional_macs"]), sr._mean(c["accuracy"])
        row = {"config": c["config"], "dataset": c["dataset"], "n": c["n"], "macs": macs, "accuracy": acc,
               "accuracy_std": c["accuracy"]["std"], "plain_config": None, "plain_n": None, "plain_macs": None,
               "plain_accuracy": None, "plain_accuracy_std": None, "difference": None, "macs_vs_plain": None}
        if plain:
            match = min(plain, key=lambda p: abs(sr._mean(p["mean_conditional_macs"]) - macs))
            pm, pa = sr._mean(match["mean_conditional_macs"]), sr._mean(match["accuracy"])
            row.update(plain_config=match["config"], plain_n=match["n"], plain_macs=pm, plain_accuracy=pa,
                       plain_accuracy_std=match["accuracy"]["std"], difference=acc - pa, macs_vs_plain=macs / pm)
        curve = sr.interpolate([(sr._mean(p["mean_conditional_macs"]), sr._mean(p["accuracy"])) for p in plain], macs)
        row["plain_curve_accuracy"] = curve
        row["difference_vs_curve"] = None if curve is None else acc - curve
        rows.append(row)
    return rows


def summarize_depth(paths, loaded=None):
    """Loads the runs (or takes `loaded`, from `sweep_report.load_runs(paths)`)
    and computes everything but the plot: `(summary, runs)`, the runs with
    their per-sample arrays."""
    loaded = loaded or sr.load_runs(paths)
    runs = sorted((_prepare(r) for r in loaded["runs"]), key=lambda r: (*_order(r), r["seed"] or 0, r["name"]))
    configs = aggregate_configs(runs)
    warnings = list(loaded["warnings"]) + sr.differing_fields(runs, ("epochs", "limit_train"))
    summary = {
        "kind": "depth",
        "inputs": [str(p) for p in paths],
        "std": sr.STD_NOTE,
        "runs": [{k: v for k, v in r.items() if k != "per_sample"} for r in runs],
        "missing": loaded["missing"],
        "configs": configs,
        "comparison": compare_with_plain(configs),
        "warnings": warnings,
    }
    return summary, runs


# -------------------------------------------------------------- plot


def plot_depth(runs, configs, path):
    """Accuracy vs mean MACs per sample: a panel per data set, plain configurations
    joined over depth, gated ones as points; the marker is the depth, the colour the kind."""
    from matplotlib.lines import Line2D

    plt = sr._plt()
    datasets = sorted({c["dataset"] for c in configs}, key=lambda d: (d != "fashion_mnist", str(d)))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        members = [c for c in configs if c["dataset"] == dataset]
        plain = sorted((c for c in members if not c["gated"]), key=lambda c: sr._mean(c["mean_conditional_macs"]))
        if plain:
            ax.plot([sr._mean(c["mean_conditional_macs"]) / 1e6 for c in plain],
                    [sr._mean(c["accuracy"]) for c in plain], color=KIND_STYLE["plain"][0], lw=1.3, zorder=1)
        for r in runs:
            if r["dataset"] == dataset:
                ax.scatter(r["mean_conditional_macs"] / 1e6, r["accuracy"], s=14, alpha=0.25, linewidths=0,
                           color=KIND_STYLE[r["kind"]][0], marker=DEPTH_MARKERS.get(r["depth"], "X"))  # fmt: skip
        for c in members:
            x, y = sr._mean(c["mean_conditional_macs"]) / 1e6, sr._mean(c["accuracy"])
            acc = c["accuracy"]
            color = KIND_STYLE[c["kind"]][0]
            ax.errorbar([x], [y], yerr=[[y - acc["min"]], [acc["max"] - y]], color=color, capsize=3, ms=7,
                        marker=DEPTH_MARKERS.get(c["depth"], "X"), zorder=2)  # fmt: skip
            label = f"R{c['depth']}" if c["depth"] else c["model"]
            if c["gated"]:
                label += f" t={float(c['target_macs']):g}" if c["target_macs"] is not None else ""
                label += f" w={c['width_multiplier']:g}" if c["kind"] == "wide" else ""
                label += f" + distill {c['distill']}" if c["distill"] else ""
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
        ax.set_xlabel("mean MACs per test sample (M)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{dataset}: accuracy vs MACs (mean over seeds; bars: min-max)", fontsize=10)
        ax.grid(alpha=0.3)
    kinds = [k for k in KIND_STYLE if any(c["kind"] == k for c in configs)]
    depths = sorted({c["depth"] for c in configs if c["depth"]})
    handles = [Line2D([], [], color=KIND_STYLE[k][0], lw=1.3 if k == "plain" else 0, marker="o",
                      label=KIND_STYLE[k][1]) for k in kinds]  # fmt: skip
    handles += [Line2D([], [], color="0.4", lw=0, marker=DEPTH_MARKERS.get(d, "X"), label=f"ResNet-{d}")
                for d in depths]  # fmt: skip
    axes[0, 0].legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# -------------------------------------------------------------- text


def _m(macs):
    return sr._f(None if macs is None else macs / 1e6, 2)


def format_markdown(summary):
    """results.md: run table, configurations and the gated-vs-plain comparison."""
    f, pm = sr._f, sr._pm
    out = ["# Depth sweep results", "",
           "Runs of different depths are compared on absolute mean MACs per test sample (M; a gated "
           "network's include its gates). MAC ratio = mean MACs / the run's own ungated network's (what "
           f"`--target-macs` aims at). Aggregates: mean ± std over seeds; {summary['std']}.", "",
           "## Runs", ""]  # fmt: skip
    out.append(sr._table(
        ["run", "dataset", "model", "gated", "distilled", "width", "target", "seed", "accuracy", "mean MACs (M)",
         "MAC ratio", "conditional", "steps", "wall s"],
        [[r["name"], r["dataset"], r["model"], "gated" if r["gated"] else "plain", r["distill"] or "–",
          f"{r['width_multiplier'] or 1.0:g}", f(r["target_macs"]), r["seed"], f(r["accuracy"], 4),
          _m(r["mean_conditional_macs"]), f(r["macs_ratio"]), f(r["conditional"]), sr._steps(r["steps"]),
          f(r["wall_seconds"], 0)] for r in summary["runs"]],
    ))  # fmt: skip
    out += ["", "conditional: fraction of the gates that are open for some test samples and closed for others.", ""]
    if summary["missing"]:
        out += ["Missing runs: " + "; ".join(f"{m['name']}: {m['reason']}" for m in summary["missing"]), ""]
    out += ["## Configurations (mean ± std over seeds)", ""]
    out.append(sr._table(
        ["config", "dataset", "n", "seeds", "accuracy", "mean MACs (M)", "MAC ratio", "conditional", "wall s"],
        [[c["config"], c["dataset"], c["n"], ",".join(str(s) for s in c["seeds"]), pm(c["accuracy"], 4),
          _m(sr._mean(c["mean_conditional_macs"])), pm(c["macs_ratio"]), pm(c["conditional"]), pm(c["wall_seconds"], 0)]
         for c in summary["configs"]],
    ))  # fmt: skip
    out += ["", "## Gated vs plain at the same MACs", "",
            "closest plain: the plain configuration of the data set with the nearest mean MACs (the network "
            "whose cost the gated one was trained to); plain curve: the plain configurations over depth, "
            "linearly interpolated in MACs (– outside their range). Differences: gated − plain, of the means.", ""]
    rows = [[r["config"], r["dataset"], r["n"], _m(r["macs"]), f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
             r["plain_config"] or "–", _m(r["plain_macs"]),
             "–" if r["plain_accuracy"] is None else f"{r['plain_accuracy']:.4f} ± {r['plain_accuracy_std']:.4f}",
             f(r["difference"], 4), f(r["macs_vs_plain"]), f(r["plain_curve_accuracy"], 4),
             f(r["difference_vs_curve"], 4)] for r in summary["comparison"]]  # fmt: skip
    out.append(sr._table(["config", "dataset", "n", "MACs (M)", "accuracy", "closest plain", "its MACs (M)",
                          "its accuracy", "gated − plain", "MACs / plain's", "plain curve at same MACs",
                          "gated − curve"], rows) if rows else "No gated runs.")  # fmt: skip
    if summary["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(out) + "\n"


def write_depth_report(paths, out_dir, log=print, loaded=None):
    """Writes tradeoff.png, summary.json and results.md into `out_dir`; returns the summary.

    `loaded`: `sweep_report.load_runs(paths)` when the caller has it already.

    Raises:
        sweep_report.SweepError: bad inputs (message says what to fix).
    """
    summary, runs = summarize_depth(paths, loaded)
    os.makedirs(out_dir, exist_ok=True)
    summary["plots"] = [os.path.basename(plot_depth(runs, summary["configs"], os.path.join(out_dir, "tradeoff.png")))]
    return sr.write_summary(out_dir, summary, format_markdown(summary), log)
