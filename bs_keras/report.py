"""Evaluation report of a (gated) classifier: accuracy, conditional MACs,
gate categories per layer, and the plots that go with them.

`evaluate_model(model, dataset)` runs the model once over the dataset with
deterministic gates and returns a JSON-ready dict plus per-sample arrays.
Per-example metadata of the evaluation set (`DatasetInfo.eval_metadata`)
joins the per-sample arrays; a difficulty `level` (`fashion_mnist_levels`)
also gives the summary a `per_level` table and `spearman_macs_level`.
"""

import json
import math
import os

import numpy as np

from bs_keras.gates import find_gates, record_gates
from bs_keras.io_utils import atomic_path
from bs_keras.macs import count_macs, gate_table, macs_from_masks, ungated_macs
from bs_keras.rank_correlation import spearman

CATEGORIES = ("always_on", "conditional", "always_off")


def _per_sample_loss(outputs, labels):
    outputs = np.asarray(outputs, np.float64)
    is_probs = np.all(outputs >= 0) and np.allclose(outputs.sum(-1), 1.0, atol=1e-3)
    if not is_probs:
        outputs = outputs - outputs.max(-1, keepdims=True)
        outputs = np.exp(outputs)
        outputs /= outputs.sum(-1, keepdims=True)
    p = outputs[np.arange(len(labels)), labels]
    return -np.log(np.clip(p, 1e-12, 1.0))


def _check_metadata(metadata):
    """The metadata as a dict of 1-D arrays of one length; ValueError if not."""
    arrays = {k: np.asarray(v) for k, v in (metadata or {}).items()}
    reserved = {"macs", "label", "prediction", "correct", "loss"} & set(arrays)
    if reserved:
        raise ValueError(f"eval metadata {sorted(reserved)} would overwrite the report's own per-sample "
                         "arrays; rename them.")
    lengths = {k: a.shape for k, a in arrays.items()}
    if any(a.ndim != 1 for a in arrays.values()) or len({a.shape for a in arrays.values()}) > 1:
        raise ValueError(f"eval metadata must be 1-D arrays of one length (one value per example); "
                         f"got shapes {lengths}.")
    if "level" in arrays and (arrays["level"].dtype.kind not in "iu" or arrays["level"].min(initial=0) < 0):
        raise ValueError(f"eval metadata 'level' must hold integers >= 0; got {arrays['level'].dtype}, "
                         f"min {arrays['level'].min(initial=0)}.")
    return arrays


def evaluate_model(model, dataset, max_batches=None, metadata=None):
    """Accuracy, per-sample conditional MACs and gate statistics.

    Args:
        model: a functional Keras classifier, gated or not.
        dataset: iterable of `(images, labels)` batches.
        max_batches: stop after this many batches.
        metadata: per-example 1-D arrays in `dataset` order (e.g.
            `DatasetInfo.eval_metadata`), at least as long as the evaluated
            examples; their first `num_samples` values join the per-sample
            arrays. An integer `level` array also gives the summary
            `per_level` (see `per_level_table`, with gate categories per
            level for gated models) and `spearman_macs_level`.

    Returns:
        `(summary, per_sample)`: a JSON-ready dict and a dict of arrays
        (`macs`, `label`, `prediction`, `correct`, `loss`, and the metadata).
    """
    metadata = _check_metadata(metadata)
    levels = metadata.get("level")
    gates = find_gates(model)
    static = count_macs(model)
    table = gate_table(model) if gates else []
    ungated = ungated_macs(model, static)
    open_sums = {i.gate.name: np.zeros(i.gate.num_gates) for i in table}
    level_open_sums = {}  # level -> {gate name: per-gate open counts}
    rows = {k: [] for k in ("macs", "label", "prediction", "correct", "loss")}
    n = 0
    for b, (x, y) in enumerate(dataset):
        if max_batches is not None and b >= max_batches:
            break
        with record_gates() as record:
            out = np.asarray(model(x, training=False))
        y = np.asarray(y).astype(np.int64).reshape(-1)
        masks = {info.gate.name: np.asarray(record[info.gate][0]) for info in table}
        for name, mask in masks.items():
            open_sums[name] += mask.sum(axis=0)
        if levels is not None and table:
            batch_levels = levels[n : n + len(y)]
            if len(batch_levels) == len(y):  # else: too short, raised below
                for level in np.unique(batch_levels):
                    sums = level_open_sums.setdefault(int(level), {k: 0.0 for k in masks})
                    for name, mask in masks.items():
                        sums[name] = sums[name] + mask[batch_levels == level].sum(axis=0)
        macs = macs_from_masks(static, table, masks, len(y))
        pred = out.argmax(-1)
        rows["macs"].append(macs)
        rows["label"].append(y)
        rows["prediction"].append(pred)
        rows["correct"].append(pred == y)
        rows["loss"].append(_per_sample_loss(out, y))
        n += len(y)
    if n == 0:
        raise ValueError("The evaluation dataset is empty.")
    per_sample = {k: np.concatenate(v) for k, v in rows.items()}
    for key, values in metadata.items():
        if len(values) < n:
            raise ValueError(f"eval metadata {key!r} has {len(values)} values for the {n} evaluated "
                             "examples; it must hold one per example of the evaluation set, in its order.")
        per_sample[key] = values[:n]
    layers = []
    for info in table:
        freq = open_sums[info.gate.name] / n
        layers.append(
            {
                "name": info.gate.name,
                "gates": int(info.gate.num_gates),
                "channels": int(info.channels),
                "open_rate": float(freq.mean()),
                "always_on": int(np.sum(freq == 1.0)),
                "conditional": int(np.sum((freq > 0) & (freq < 1))),
                "always_off": int(np.sum(freq == 0.0)),
                "macs_per_channel": float(info.macs_per_channel),
            }
        )
    mean_macs = float(per_sample["macs"].mean())
    total_gates = sum(l["gates"] for l in layers)
    summary = {
        "num_samples": int(n),
        "accuracy": float(per_sample["correct"].mean()),
        "mean_loss": float(per_sample["loss"].mean()),
        "static_macs": int(static),
        "ungated_macs": int(ungated),
        "mean_conditional_macs": mean_macs,
        "macs_ratio": mean_macs / ungated,
        "min_conditional_macs": float(per_sample["macs"].min()),
        "max_conditional_macs": float(per_sample["macs"].max()),
        "gated": bool(gates),
        "gate_categories": {
            k: (sum(l[k] for l in layers) / total_gates if total_gates else math.nan)
            for k in ("always_on", "conditional", "always_off")
        },
        "layers": layers,
    }
    if levels is not None:
        per_level = per_level_table(per_sample, ungated)
        for row in per_level:
            if table:
                sums = level_open_sums[row["level"]]
                row["gate_categories"] = gate_categories(
                    [sums[i.gate.name] / row["count"] for i in table]
                )  # fmt: skip
        rho = spearman(per_sample["macs"], per_sample["level"])
        summary["per_level"] = per_level
        summary["spearman_macs_level"] = None if math.isnan(rho) else rho
    return summary, per_sample


def gate_categories(open_rates):
    """Fractions of gates always on, conditional and always off.

    Args:
        open_rates: per layer, the open frequency of each gate over a set
            of samples.

    Returns:
        `{"always_on", "conditional", "always_off"}` fractions of all gates
        (nan without gates).
    """
    freq = np.concatenate([np.asarray(f, np.float64).reshape(-1) for f in open_rates] or [np.zeros(0)])
    if not len(freq):
        return {k: math.nan for k in CATEGORIES}
    return {
        "always_on": float(np.mean(freq == 1.0)),
        "conditional": float(np.mean((freq > 0) & (freq < 1))),
        "always_off": float(np.mean(freq == 0.0)),
    }


def per_level_table(per_sample, ungated):
    """Accuracy, conditional MACs and loss of each difficulty level.

    Args:
        per_sample: dict of per-sample arrays with `level`, `correct`,
            `macs` and `loss` (as in `per_sample.npz`).
        ungated: MACs of the ungated network (the MAC ratio's denominator).

    Returns:
        One dict per level present, in level order: `level`, `count`,
        `accuracy`, `mean_conditional_macs`, `macs_ratio`, `mean_loss`.
    """
    missing = [k for k in ("level", "correct", "macs", "loss") if k not in per_sample]
    if missing:
        raise ValueError(f"per-level numbers need the per-sample arrays {missing}; "
                         "evaluate on a data set with levels (e.g. fashion_mnist_levels).")
    level = np.asarray(per_sample["level"]).astype(np.int64)
    rows = []
    for value in np.unique(level):
        pick = level == value
        macs = float(np.mean(per_sample["macs"][pick]))
        rows.append({
            "level": int(value),
            "count": int(pick.sum()),
            "accuracy": float(np.mean(per_sample["correct"][pick])),
            "mean_conditional_macs": macs,
            "macs_ratio": macs / ungated,
            "mean_loss": float(np.mean(per_sample["loss"][pick])),
        })  # fmt: skip
    return rows


def format_summary(summary):
    """A few lines for the terminal."""
    lines = [
        f"accuracy            {summary['accuracy']:.4f} on {summary['num_samples']} samples",
        f"mean MACs / sample  {summary['mean_conditional_macs'] / 1e6:.2f} M "
        f"({summary['macs_ratio']:.1%} of the ungated {summary['ungated_macs'] / 1e6:.2f} M; "
        f"range {summary['min_conditional_macs'] / 1e6:.2f}-{summary['max_conditional_macs'] / 1e6:.2f} M)",
    ]
    if summary["gated"]:
        c = summary["gate_categories"]
        lines.append(
            f"gates               {c['always_on']:.0%} always on, {c['conditional']:.0%} conditional, "
            f"{c['always_off']:.0%} always off"
        )
        for layer in summary["layers"]:
            lines.append(
                f"  {layer['name']:<22} open {layer['open_rate']:.2f}  on/cond/off "
                f"{layer['always_on']}/{layer['conditional']}/{layer['always_off']}"
            )
    if summary.get("per_level"):
        rho = summary.get("spearman_macs_level")
        lines.append(f"per level           Spearman(MACs, level) {'n/a' if rho is None else f'{rho:.3f}'}")
        for row in summary["per_level"]:
            line = (f"  level {row['level']:<3} {row['count']:>6} samples  accuracy {row['accuracy']:.4f}  "
                    f"MACs {row['macs_ratio']:.1%}  loss {row['mean_loss']:.3f}")
            if "gate_categories" in row:
                line += f"  conditional gates {row['gate_categories']['conditional']:.0%}"
            lines.append(line)
    return "\n".join(lines)


def write_text(path, text):
    """Writes a text file atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, data, allow_nan=True):
    """Writes JSON atomically (temp file, then rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=allow_nan) + "\n")


def write_report(summary, per_sample, out_dir, extra=None):
    """Writes report.json, per_sample.npz and the two PNG plots."""
    os.makedirs(out_dir, exist_ok=True)
    report = {**(extra or {}), "evaluation": summary}
    write_json(os.path.join(out_dir, "report.json"), report)
    with atomic_path(os.path.join(out_dir, "per_sample.npz")) as tmp:
        np.savez_compressed(tmp, **per_sample)
    plot_report(summary, per_sample, out_dir)
    return report


def plot_report(summary, per_sample, out_dir):
    """gate_categories.png (stacked bars per layer) and macs_histogram.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if summary["layers"]:
        layers = summary["layers"]
        names = [l["name"].replace("_gate", "") for l in layers]
        on = np.array([l["always_on"] for l in layers], float)
        cond = np.array([l["conditional"] for l in layers], float)
        off = np.array([l["always_off"] for l in layers], float)
        total = on + cond + off
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 4))
        idx = np.arange(len(names))
        ax.bar(idx, on / total, label="always on", color="#2b8cbe")
        ax.bar(idx, cond / total, bottom=on / total, label="conditional", color="#fdae61")
        ax.bar(idx, off / total, bottom=(on + cond) / total, label="always off", color="#bdbdbd")
        ax.set_xticks(idx)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("fraction of gates")
        ax.set_title("Gate categories per layer (evaluation set)")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        paths.append(save_figure(fig, os.path.join(out_dir, "gate_categories.png")))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    macs = per_sample["macs"] / 1e6
    correct = per_sample["correct"].astype(bool)
    bins = np.linspace(macs.min(), macs.max() + 1e-9, 40) if macs.max() > macs.min() else 10
    ax.hist([macs[correct], macs[~correct]], bins=bins, stacked=True, label=["correct", "wrong"],
            color=["#1a9641", "#d7191c"])
    ax.axvline(summary["ungated_macs"] / 1e6, color="k", ls="--", lw=1, label="ungated")
    ax.set_xlabel("MACs per sample (M)")
    ax.set_ylabel("samples")
    ax.set_title(f"Conditional MACs, mean {summary['macs_ratio']:.1%} of ungated")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, os.path.join(out_dir, "macs_histogram.png")))
    plt.close(fig)
    return paths


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path
