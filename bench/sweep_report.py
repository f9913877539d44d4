"""Cross-run report of an accuracy / conditional-MACs trade-off sweep.

Reads run directories written by `train.py` (each given directly, or as the
subfolders of a sweep root):

- `config.json`: `{"recipe": {...}, "runtime": {...}}`;
- `report.json`: the recipe, `train_wall_seconds_this_session` and the
  `evaluation` summary of `bs_keras.report.evaluate_model`;
- `per_sample.npz`: per test sample `macs`, `label`, `prediction`,
  `correct`, `loss`;
- `<root>/sweep.json` (optional, from the sweep driver):
  `{"runs": {"<run name>": {"wall_seconds": ...}}}`. Its wall time is used
  when present, else the report's `train_wall_seconds_this_session`.

A run directory without `report.json` is unfinished and listed as missing.

Each run belongs to a family: `plain` (not gated), `pruned` (not gated,
started from a magnitude-pruned plain model: `prune_from`), `block` (gated,
`gate_granularity == "block"`), `retrofit` (gated from a trained plain
model: `gate_from`), `l0` (gated, channel gates, `gamma == 0`) or `bas_l0`
(gated, channel gates, batch-shaping + L0). A configuration is
a family plus its knob (`width_multiplier` for plain, `prune_macs` for
pruned, `lam` otherwise);
its seeds are aggregated.

MAC ratios are relative to the ungated full-width network (the
`ungated_macs` of a run with `width_multiplier == 1`), so that narrower
plain networks fall below 1.

`write_sweep_report(paths, out_dir)` writes into `out_dir`:
`tradeoff.png`, `gate_categories.png`, `difficulty.png`, `summary.json`
and `results.md`.
"""

import json
import math
import os

import numpy as np

from bs_keras.rank_correlation import average_ranks, spearman  # noqa: F401 (sweep_report.spearman)
from bs_keras.report import save_figure, write_json, write_text

FAMILIES = ("plain", "pruned", "l0", "bas_l0", "bas_l0_hard", "block", "retrofit")
# Gated channel families compared with the plain and pruned curves (claim 1a).
GATED_CHANNEL_FAMILIES = ("bas_l0", "l0", "bas_l0_hard", "retrofit")
KNOBS = {"plain": ("width_multiplier", "width"), "pruned": ("prune_macs", "macs")}
FAMILY_LABELS = {
    "plain": "plain (width multiplier)",
    "l0": "L0 only (gamma = 0)",
    "bas_l0": "batch-shaping + L0",
    "bas_l0_hard": "batch-shaping + L0, hard-gate phase",
    "block": "block gates",
    "pruned": "magnitude-pruned plain, fine-tuned",
    "retrofit": "gated from trained plain, fine-tuned",
}
FAMILY_STYLE = {
    "plain": {"color": "#252525", "marker": "s"},
    "l0": {"color": "#1f78b4", "marker": "^"},
    "bas_l0": {"color": "#e31a1c", "marker": "o"},
    "bas_l0_hard": {"color": "#b15928", "marker": "*"},
    "block": {"color": "#33a02c", "marker": "D"},
    "pruned": {"color": "#6a3d9a", "marker": "v"},
    "retrofit": {"color": "#ff7f00", "marker": "P"},
}
# Same colours as bs_keras.report.plot_report.
CATEGORY_COLORS = {"always_on": "#2b8cbe", "conditional": "#fdae61", "always_off": "#bdbdbd"}
CATEGORY_LABELS = {"always_on": "always on", "conditional": "conditional", "always_off": "always off"}
CATEGORIES = ("always_on", "conditional", "always_off")
STD_NOTE = "std is the sample standard deviation (ddof=1) over seeds when n > 1, and 0 when n = 1"
RUN_METRICS = (
    "accuracy", "macs_ratio", "conditional", "always_on", "always_off",
    "spearman_macs_loss", "macs_ratio_correct", "macs_ratio_wrong", "wall_seconds", "total_steps",
)  # fmt: skip


class SweepError(ValueError):
    """A problem with the report's inputs; printed without a traceback."""


# ------------------------------------------------------------ pure numbers


def run_family(recipe):
    """Family of a run from its recipe dict: plain, pruned, block, retrofit, l0,
    bas_l0 or bas_l0_hard (batch-shaping + L0 ending with a hard-gate phase,
    `hard_gates_begin`)."""
    if not recipe.get("gated", True):
        return "pruned" if recipe.get("prune_from") else "plain"
    if recipe.get("gate_from"):
        return "retrofit"
    if (recipe.get("gate_granularity") or "channel") == "block":
        return "block"
    if float(recipe.get("gamma", 0.0)) == 0.0:
        return "l0"
    return "bas_l0" if recipe.get("hard_gates_begin") is None else "bas_l0_hard"


def config_knob(family, recipe):
    """`(knob_name, value)`: width_multiplier (plain), prune_macs (pruned),
    target_macs (gated runs trained to a compute budget), else lam."""
    if family not in KNOBS and recipe.get("target_macs") is not None:
        return "target_macs", float(recipe["target_macs"])
    name = KNOBS.get(family, ("lam",))[0]
    return name, float(recipe.get(name) if recipe.get(name) is not None else (1.0 if family == "plain" else 0.0))


KNOB_LABELS = {"width_multiplier": "width", "prune_macs": "macs", "target_macs": "target", "lam": "lam"}


def config_key(family, knob, knob_name=None):
    """Printable configuration name, e.g. `bas_l0 lam=10` or `bas_l0 target=0.55`."""
    knob_name = knob_name or KNOBS.get(family, ("lam",))[0]
    return f"{family} {KNOB_LABELS[knob_name]}={knob:g}"


def knob_label(rows):
    """Column header for the knob of gated `rows` (dicts with `knob_name`): lam, target or knob."""
    names = {r["knob_name"] for r in rows}
    return KNOB_LABELS[names.pop()] if len(names) == 1 else "knob"


def _source_run_dir(recipe):
    """The run directory a pruned / gated-from run started from (its .keras's folder), or None."""
    source = recipe.get("prune_from") or recipe.get("gate_from")
    return os.path.dirname(os.path.realpath(source)) if source else None


def optimizer_steps(report, recipe):
    """Optimizer steps of one run: report.json's `optimizer_steps`, else
    epochs x (limit_train // batch_size) when the recipe fixes the epoch size
    (runs before the field existed), else None."""
    steps = report.get("optimizer_steps")
    if steps is not None:
        return int(steps)
    epochs, limit, batch = report.get("epochs_completed"), recipe.get("limit_train"), recipe.get("batch_size")
    if epochs is not None and limit and batch:
        return int(epochs) * (int(limit) // int(batch))
    return None


def _run_steps(run_dir, report, recipe):
    """`(steps, source_steps, total_steps)`: this run's optimizer steps, those
    of the run its weights came from (prune_from / gate_from, when that run
    directory has a report.json), and their sum (None when unknown)."""
    steps = optimizer_steps(report, recipe)
    source_dir = _source_run_dir(recipe)
    if source_dir is None:
        return steps, 0, steps
    try:
        source_report = _read_json(os.path.join(source_dir, "report.json"))
    except (OSError, ValueError):
        return steps, None, None
    source_recipe = dict(source_report.get("recipe") or {})
    source_steps = optimizer_steps(source_report, source_recipe)
    total = None if steps is None or source_steps is None else steps + source_steps
    return steps, source_steps, total


def interpolate(points, x):
    """Piecewise-linear curve through `(x, y)` points, evaluated at `x`.

    Points are sorted by x; points sharing an x are averaged. Returns None
    when `x` is outside the points' x range (no extrapolation).
    """
    if not points or x is None or not math.isfinite(x):
        return None
    by_x = {}
    for px, py in points:
        by_x.setdefault(float(px), []).append(float(py))
    xs = sorted(by_x)
    ys = [sum(by_x[v]) / len(by_x[v]) for v in xs]
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            t = (x - xs[i]) / (xs[i + 1] - xs[i])
            return ys[i] + t * (ys[i + 1] - ys[i])
    return ys[0]  # a single point, hit exactly


def aggregate(values):
    """`{mean, std, min, max, n}` of the finite values (None when there are none).

    std: ddof=1 when n > 1, else 0.
    """
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))])
    if len(v) == 0:
        return None
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(len(v)),
    }


def gate_category_fractions(layers):
    """Per-layer and overall fractions of always-on / conditional / always-off gates.

    Args:
        layers: the `layers` list of an evaluation summary (gate counts).

    Returns:
        `{"layers": [{name, gates, always_on, conditional, always_off}],
        "total": {always_on, conditional, always_off}}` with fractions of
        gates; `total` is None without gates.
    """
    out = []
    sums = dict.fromkeys(CATEGORIES, 0)
    total_gates = 0
    for layer in layers:
        gates = int(layer["gates"])
        row = {"name": layer["name"], "gates": gates}
        for k in CATEGORIES:
            row[k] = layer[k] / gates if gates else math.nan
            sums[k] += layer[k]
        total_gates += gates
        out.append(row)
    total = {k: sums[k] / total_gates for k in CATEGORIES} if total_gates else None
    return {"layers": out, "total": total}


# ------------------------------------------------------------- loading


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _is_run_dir(path):
    return os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, "report.json"))


def _sweep_wall_seconds(root):
    path = os.path.join(root, "sweep.json")
    if not os.path.isfile(path):
        return {}, None
    try:
        runs = _read_json(path).get("runs", {}) or {}
    except (OSError, ValueError, AttributeError) as e:
        return {}, f"{path} is unreadable ({e}); using the reports' wall times"
    return runs, None


def find_run_dirs(paths):
    """Run directories under `paths` (each a run directory or a sweep root).

    Returns:
        `(run_dirs, listed_only, warnings)`: run directory paths (sorted per
        root), `(name, root)` of runs that the root's sweep.json names but
        that have no directory yet, and warning strings.

    Raises:
        SweepError: a path does not exist, or holds no run directories.
    """
    if not paths:
        raise SweepError("give at least one run directory or sweep root")
    run_dirs, listed_only, warnings = [], [], []
    for path in paths:
        if not os.path.exists(path):
            raise SweepError(f"{path} does not exist")
        if not os.path.isdir(path):
            raise SweepError(f"{path} is not a directory")
        if _is_run_dir(path):
            run_dirs.append(path)
            continue
        found = sorted(
            os.path.join(path, e) for e in os.listdir(path) if _is_run_dir(os.path.join(path, e))
        )
        sweep_runs, warning = _sweep_wall_seconds(path)
        if warning:
            warnings.append(warning)
        names = {os.path.basename(d) for d in found}
        listed_only += [(n, path) for n in sorted(sweep_runs) if n not in names]
        if not found and not sweep_runs:
            raise SweepError(
                f"{path} holds no run directories (no subfolder with config.json or report.json, "
                "and no sweep.json); give a run directory written by train.py or a folder of them"
            )
        run_dirs += found
    unique, seen = [], set()
    for d in run_dirs:
        real = os.path.realpath(d)
        if real not in seen:
            seen.add(real)
            unique.append(d)
    return unique, listed_only, warnings


def _finite_or_none(x):
    return float(x) if x is not None and math.isfinite(float(x)) else None


def load_run(run_dir, name=None):
    """One finished run as a dict (see `summary.json`'s `runs`), or a
    `{"name", "path", "reason"}` dict for an unfinished/unusable one
    (with key `missing`)."""
    name = name or os.path.basename(os.path.normpath(run_dir))
    report_path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(report_path):
        return {"missing": True, "name": name, "path": run_dir, "reason": "no report.json (unfinished)"}
    try:
        report = _read_json(report_path)
    except (OSError, ValueError) as e:
        return {"missing": True, "name": name, "path": run_dir, "reason": f"unreadable report.json ({e})"}
    recipe = dict(report.get("recipe") or {})
    config_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(config_path):
        try:
            recipe = {**recipe, **(_read_json(config_path).get("recipe") or {})}
        except (OSError, ValueError):
            pass
    ev = report.get("evaluation") or {}
    if "accuracy" not in ev or "mean_conditional_macs" not in ev:
        return {"missing": True, "name": name, "path": run_dir,
                "reason": "report.json has no classification evaluation"}  # fmt: skip
    family = run_family(recipe)
    knob_name, knob = config_knob(family, recipe)
    cats = gate_category_fractions(ev.get("layers") or [])
    total = cats["total"] if ev.get("gated") else None
    run = {
        "name": name,
        "path": run_dir,
        "family": family,
        "knob_name": knob_name,
        "knob": knob,
        "config": config_key(family, knob, knob_name),
        "seed": recipe.get("seed"),
        "gated": bool(ev.get("gated")),
        "gamma": recipe.get("gamma"),
        "lam": recipe.get("lam"),
        "width_multiplier": recipe.get("width_multiplier"),
        # Distillation: "self", "from" (a trained teacher, distill_from) or None.
        "distill": recipe.get("distill") or ("from" if recipe.get("distill_from") else None),
        "gate_granularity": (recipe.get("gate_granularity") or "channel") if recipe.get("gated", True) else None,
        "dataset": recipe.get("dataset"),
        "model": recipe.get("model"),
        "epochs": recipe.get("epochs"),
        "epochs_completed": report.get("epochs_completed"),
        "limit_train": recipe.get("limit_train"),
        "target_macs": recipe.get("target_macs"),
        "steps": None,  # optimizer steps of this run; total_steps adds its source run's
        "source_steps": None,
        "total_steps": None,
        "source_dir": None,  # the run directory its weights came from (pruned / gated-from runs)
        "source_only": False,  # set by load_sweep
        "num_samples": ev.get("num_samples"),
        "accuracy": float(ev["accuracy"]),
        "mean_loss": _finite_or_none(ev.get("mean_loss")),
        "mean_conditional_macs": float(ev["mean_conditional_macs"]),
        "ungated_macs": float(ev["ungated_macs"]),
        "own_macs_ratio": float(ev["macs_ratio"]),
        "macs_ratio": None,  # set once the reference is known
        "conditional": total["conditional"] if total else None,
        "always_on": total["always_on"] if total else None,
        "always_off": total["always_off"] if total else None,
        "layers": cats["layers"] if total else [],
        "spearman_macs_loss": None,
        "mean_macs_correct": None,
        "mean_macs_wrong": None,
        "macs_ratio_correct": None,
        "macs_ratio_wrong": None,
        "num_wrong": None,
        "wall_seconds": _finite_or_none(report.get("train_wall_seconds_this_session")),
        "wall_seconds_source": "report.json",
        "per_sample": None,
    }
    run["steps"], run["source_steps"], run["total_steps"] = _run_steps(run_dir, report, recipe)
    run["source_dir"] = _source_run_dir(recipe)
    npz = os.path.join(run_dir, "per_sample.npz")
    per_sample = None
    if os.path.isfile(npz):
        try:
            with np.load(npz, allow_pickle=False) as data:
                per_sample = {k: np.asarray(data[k]) for k in ("macs", "label", "correct", "loss")}
        except (OSError, ValueError, KeyError):
            per_sample = None  # unreadable or incomplete: no per-sample numbers
    if per_sample is not None:
        run["per_sample"] = per_sample
        macs = per_sample["macs"].astype(np.float64)
        correct = per_sample["correct"].astype(bool)
        rho = spearman(macs, per_sample["loss"])
        run["spearman_macs_loss"] = None if math.isnan(rho) else rho
        run["mean_macs_correct"] = float(macs[correct].mean()) if correct.any() else None
        run["mean_macs_wrong"] = float(macs[~correct].mean()) if (~correct).any() else None
        run["num_wrong"] = int((~correct).sum())
    return run


def reference_macs(runs):
    """MACs of the ungated full-width network: `(macs, source, warning)`.

    The largest `ungated_macs` among unpruned runs with `width_multiplier == 1`; when
    there is none, None (each run's own ratio is used) and a warning.
    """
    # Pruned runs have width 1 but a smaller static count: they are not the reference.
    full = [r for r in runs if r["width_multiplier"] is not None and float(r["width_multiplier"]) == 1.0
            and r["family"] != "pruned"]
    if not full:
        return None, "own", (
            "no run has width_multiplier 1, so MAC ratios are relative to each run's own "
            "ungated network (narrow plain runs then sit at 1.0)"
        )
    values = sorted({r["ungated_macs"] for r in full})
    warning = None
    if len(values) > 1:
        warning = f"width-1 runs disagree on the ungated MACs ({values}); using the largest"
    return values[-1], "ungated_macs of the width_multiplier=1 runs", warning


def load_runs(paths):
    """The finished runs under `paths` as `load_run` reads them, with the
    sweep.json wall times: `{"runs", "missing", "warnings"}`; MAC ratios are
    not set yet (`load_sweep` sets them for a trade-off sweep).

    Raises:
        SweepError: bad paths, or no finished run.
    """
    run_dirs, listed_only, warnings = find_run_dirs(paths)
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    dup = {n for n in names if names.count(n) > 1}
    runs, missing = [], []
    ledgers = {}  # root -> its sweep.json runs, read once
    for d, n in zip(run_dirs, names):
        if n in dup:
            n = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n)
        run = load_run(d, n)
        if run.get("missing"):
            missing.append({k: run[k] for k in ("name", "path", "reason")})
            continue
        root = os.path.dirname(os.path.normpath(d))
        if root not in ledgers:
            ledgers[root] = _sweep_wall_seconds(root)[0]
        entry = ledgers[root].get(os.path.basename(os.path.normpath(d))) or {}
        wall = _finite_or_none(entry.get("wall_seconds")) if isinstance(entry, dict) else None
        if wall is not None:
            run["wall_seconds"], run["wall_seconds_source"] = wall, "sweep.json"
        runs.append(run)
    for name, root in listed_only:
        missing.append({"name": name, "path": os.path.join(root, name), "reason": "in sweep.json, no run directory"})
    if not runs:
        detail = "; ".join(f"{m['name']}: {m['reason']}" for m in missing)
        raise SweepError(f"no finished run (with report.json) in {', '.join(paths)}" + (f" ({detail})" if detail else ""))
    return {"runs": runs, "missing": missing, "warnings": warnings}


def differing_fields(runs, fields):
    """Warnings for the `fields` whose value is not the same in every run."""
    out = []
    for field in fields:
        values = sorted({str(r[field]) for r in runs})
        if len(values) > 1:
            out.append(f"runs differ in {field}: {', '.join(values)}")
    return out


def load_sweep(paths, loaded=None):
    """All runs under `paths`: `{"runs", "missing", "reference_macs", "warnings", ...}`.

    `loaded`: `load_runs(paths)` when the caller has it already.

    Raises:
        SweepError: bad paths, or no finished run.
    """
    loaded = loaded or load_runs(paths)
    runs, missing, warnings = loaded["runs"], loaded["missing"], list(loaded["warnings"])
    ref, source, warning = reference_macs(runs)
    if warning:
        warnings.append(warning)
    for r in runs:
        base = ref if ref is not None else r["ungated_macs"]
        r["macs_ratio"] = r["mean_conditional_macs"] / base
        for which in ("correct", "wrong"):
            m = r[f"mean_macs_{which}"]
            r[f"macs_ratio_{which}"] = None if m is None else m / base
    mark_source_only(runs, warnings)
    warnings += differing_fields(runs, ("dataset", "model", "epochs", "limit_train"))
    order = {f: i for i, f in enumerate(FAMILIES)}
    runs.sort(key=lambda r: (order[r["family"]], r["knob_name"], r["knob"], r["seed"] if r["seed"] is not None else -1, r["name"]))
    return {"runs": runs, "missing": missing, "reference_macs": ref, "reference_macs_source": source,
            "warnings": warnings}  # fmt: skip


def mark_source_only(runs, warnings):
    """Sets `source_only` on the runs that only serve as the start of others
    at a smaller budget (the plain N/2 runs of `--budget long`): the source of
    a pruned / gated-from run whose total steps are below the sweep's most
    common total. They stay in the run table but not in the configurations
    and curves, where they would be averaged with full-budget runs."""
    totals = [r["total_steps"] for r in runs if r["total_steps"] is not None]
    if not totals:
        return
    budget = max(sorted(set(totals)), key=totals.count)
    # realpath: the report may read the sweep through a symlink.
    sources = {os.path.realpath(r["source_dir"]) for r in runs if r["source_dir"]}
    for r in runs:
        if (os.path.realpath(r["path"]) in sources and r["total_steps"] is not None
                and r["total_steps"] < budget):
            r["source_only"] = True
            warnings.append(f"{r['name']}: the start of other runs, trained {r['total_steps']:,} of the sweep's "
                            f"{budget:,} steps; listed with the runs, left out of the configurations and curves")


# ----------------------------------------------------------- aggregation


def aggregate_configs(runs):
    """Per configuration (family + knob): seeds and `aggregate` of each metric."""
    groups = {}
    for r in runs:
        groups.setdefault((r["family"], r["knob_name"], r["knob"]), []).append(r)
    order = {f: i for i, f in enumerate(FAMILIES)}
    configs = []
    for (family, knob_name, knob), members in sorted(groups.items(),
                                                     key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])):
        c = {"config": config_key(family, knob, knob_name), "family": family, "knob_name": knob_name, "knob": knob}
        configs.append({**c, **seed_aggregates(members, RUN_METRICS)})
    return configs


def seed_aggregates(members, metrics):
    """A configuration's `seeds`, `runs` (names), `n` and the `aggregate` of each of `metrics` over its runs."""
    out = {"seeds": sorted(m["seed"] for m in members if m["seed"] is not None),
           "runs": [m["name"] for m in members], "n": len(members)}  # fmt: skip
    for metric in metrics:
        out[metric] = aggregate(m[metric] for m in members)
    return out


def _mean(stat):
    return None if stat is None else stat["mean"]


def _curve(configs, family):
    return [(_mean(c["macs_ratio"]), _mean(c["accuracy"])) for c in configs if c["family"] == family]


def claim_1a(configs):
    """Gated configs vs the plain width curve at the same MAC ratio.

    Returns `{"plain_range": [lo, hi] or None, "pruned_range": ..., and a
    list per family of GATED_CHANNEL_FAMILIES}`;
    each row: config, lam, macs_ratio, accuracy (means),
    `plain_accuracy_at_same_macs` (None outside the plain range) and
    `difference` (gated - plain).
    """
    plain = _curve(configs, "plain")
    pruned = _curve(configs, "pruned")
    out = {"plain_range": [min(p[0] for p in plain), max(p[0] for p in plain)] if plain else None,
           "pruned_range": [min(p[0] for p in pruned), max(p[0] for p in pruned)] if pruned else None}
    for family in GATED_CHANNEL_FAMILIES:
        rows = []
        for c in configs:
            if c["family"] != family:
                continue
            x, acc = _mean(c["macs_ratio"]), _mean(c["accuracy"])
            ref = interpolate(plain, x)
            ref_pruned = interpolate(pruned, x) if pruned else None
            rows.append({"config": c["config"], "knob_name": c["knob_name"], "knob": c["knob"], "n": c["n"],
                         "macs_ratio": x, "accuracy": acc,
                         "plain_accuracy_at_same_macs": ref,
                         "difference": None if ref is None else acc - ref,
                         "pruned_accuracy_at_same_macs": ref_pruned,
                         "difference_vs_pruned": None if ref_pruned is None else acc - ref_pruned})  # fmt: skip
        out[family] = rows
    return out


def claim_1b(configs):
    """Block-gate configs vs the channel (bas_l0) curve at the same MAC ratio.

    Each row: config, lam, macs_ratio, accuracy (block means),
    `bas_l0_accuracy_at_same_macs` and `difference` (channel - block).
    """
    curve = _curve(configs, "bas_l0")
    rows = []
    for c in configs:
        if c["family"] != "block":
            continue
        x, acc = _mean(c["macs_ratio"]), _mean(c["accuracy"])
        ref = interpolate(curve, x)
        rows.append({"config": c["config"], "knob_name": c["knob_name"], "knob": c["knob"], "n": c["n"],
                     "macs_ratio": x, "accuracy": acc,
                     "bas_l0_accuracy_at_same_macs": ref,
                     "difference_channel_minus_block": None if ref is None else ref - acc})  # fmt: skip
    return rows


def claim_2(configs):
    """Conditional-gate fraction, L0 only vs BAS + L0, at each knob (lam or
    MAC target) run in both.

    Each row: knob_name, knob, `l0` and `bas_l0` aggregates (mean, std, ...)
    and `difference` (bas_l0 mean - l0 mean).
    """
    by = {(c["family"], c["knob_name"], c["knob"]): c for c in configs}
    rows = []
    for name, knob in sorted({(c["knob_name"], c["knob"]) for c in configs if c["family"] == "l0"}):
        if ("bas_l0", name, knob) not in by:
            continue
        l0, bas = by[("l0", name, knob)]["conditional"], by[("bas_l0", name, knob)]["conditional"]
        diff = None if l0 is None or bas is None else bas["mean"] - l0["mean"]
        rows.append({"knob_name": name, "knob": knob, "l0": l0, "bas_l0": bas, "difference": diff})
    return rows


def claim_3(runs):
    """Per gated run: Spearman rho(MACs, loss) and MACs of wrong vs correct samples."""
    rows = []
    for r in runs:
        if not r["gated"]:
            continue
        c, w = r["macs_ratio_correct"], r["macs_ratio_wrong"]
        rows.append({"run": r["name"], "family": r["family"], "knob_name": r["knob_name"], "knob": r["knob"],
                     "seed": r["seed"],
                     "spearman_macs_loss": r["spearman_macs_loss"], "macs_ratio_correct": c,
                     "macs_ratio_wrong": w, "num_wrong": r["num_wrong"],
                     "difference_wrong_minus_correct": None if c is None or w is None else w - c})  # fmt: skip
    return rows


def demo_choice(configs, max_macs):
    """The bas_l0 config with the best mean accuracy at mean MAC ratio <= `max_macs` (or None)."""
    ok = [c for c in configs if c["family"] == "bas_l0" and _mean(c["macs_ratio"]) is not None
          and _mean(c["macs_ratio"]) <= max_macs]  # fmt: skip
    if not ok:
        return None
    best = max(ok, key=lambda c: (_mean(c["accuracy"]), -c["knob"]))
    return {"config": best["config"], "knob_name": best["knob_name"], "knob": best["knob"], "accuracy": _mean(best["accuracy"]),
            "macs_ratio": _mean(best["macs_ratio"]), "n": best["n"], "max_macs": max_macs}  # fmt: skip


def pick_difficulty_run(runs, name=None, max_macs=0.6):
    """The gated run for `difficulty.png` (with per-sample data), or None.

    `name` picks it explicitly; else the most accurate bas_l0 run with MAC
    ratio <= `max_macs`, else the most accurate gated run.

    Raises:
        SweepError: `name` is unknown, not gated or has no per_sample.npz.
    """
    if name is not None:
        match = [r for r in runs if r["name"] == name or os.path.normpath(r["path"]) == os.path.normpath(name)]
        if not match:
            raise SweepError(f"--difficulty-run {name!r} is not a finished run; runs: {', '.join(r['name'] for r in runs)}")
        run = match[0]
        if not run["gated"]:
            raise SweepError(f"--difficulty-run {name!r} is a plain (ungated) run; choose a gated one")
        if run["per_sample"] is None:
            raise SweepError(f"--difficulty-run {name!r} has no per_sample.npz")
        return run
    usable = [r for r in runs if r["gated"] and r["per_sample"] is not None]
    pool = [r for r in usable if r["family"] == "bas_l0" and r["macs_ratio"] <= max_macs] or usable
    if not pool:
        return None
    return max(pool, key=lambda r: (r["accuracy"], -r["macs_ratio"]))


# -------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(runs, configs, path, reference_note="", max_macs=None):
    """Accuracy vs mean conditional MAC ratio for every family."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if max_macs is not None:
        ax.axvline(max_macs, color="0.6", ls=":", lw=1, label=f"MAC budget {max_macs:g}")
    for family in FAMILIES:
        members = [c for c in configs if c["family"] == family]
        if not members:
            continue
        style = FAMILY_STYLE[family]
        seeds = [r for r in runs if r["family"] == family]
        ax.scatter([r["macs_ratio"] for r in seeds], [r["accuracy"] for r in seeds], s=14, alpha=0.25,
                   color=style["color"], marker=style["marker"], linewidths=0)  # fmt: skip
        members = sorted(members, key=lambda c: c["knob"])
        x = np.array([c["macs_ratio"]["mean"] for c in members])
        y = np.array([c["accuracy"]["mean"] for c in members])
        xerr = np.array([[c["macs_ratio"]["mean"] - c["macs_ratio"]["min"] for c in members],
                         [c["macs_ratio"]["max"] - c["macs_ratio"]["mean"] for c in members]])  # fmt: skip
        yerr = np.array([[c["accuracy"]["mean"] - c["accuracy"]["min"] for c in members],
                         [c["accuracy"]["max"] - c["accuracy"]["mean"] for c in members]])  # fmt: skip
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, color=style["color"], marker=style["marker"], ms=6,
                    capsize=3, lw=1.3, label=FAMILY_LABELS[family])  # fmt: skip
        for c, xi, yi in zip(members, x, y):
            text = {"width_multiplier": "w", "prune_macs": "p", "target_macs": "t"}.get(c["knob_name"], "λ") \
                + f"={c['knob']:g}"
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=style["color"])  # fmt: skip
    ax.set_xlabel("mean conditional MACs / ungated full-width MACs" + reference_note)
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs conditional MACs (mean over seeds; bars: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def gate_category_pairs(runs):
    """`[(knob, l0_run, bas_l0_run)]` for each knob (lam or MAC target) run in
    both families, smallest seed of each."""

    def first(family, knob):
        pool = [r for r in runs if r["family"] == family and (r["knob_name"], r["knob"]) == knob and r["layers"]]
        return min(pool, key=lambda r: (r["seed"] if r["seed"] is not None else 0, r["name"])) if pool else None

    pairs = []
    for knob in sorted({(r["knob_name"], r["knob"]) for r in runs if r["family"] == "l0"}):
        a, b = first("l0", knob), first("bas_l0", knob)
        if a is not None and b is not None:
            pairs.append((knob[1], a, b))
    return pairs


def plot_gate_categories(pairs, path):
    """Per-layer stacked gate categories, L0 only (left) vs BAS + L0 (right), one row per lam."""
    plt = _plt()
    n_layers = max(len(r["layers"]) for _, a, b in pairs for r in (a, b))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(max(9, 0.5 * n_layers * 2), 3.2 * len(pairs)),
                             squeeze=False, sharey=True)  # fmt: skip
    for row, (lam, *pair) in enumerate(pairs):
        for col, run in enumerate(pair):
            ax = axes[row, col]
            layers = run["layers"]
            idx = np.arange(len(layers))
            bottom = np.zeros(len(layers))
            for k in CATEGORIES:
                v = np.array([l[k] for l in layers])
                ax.bar(idx, v, bottom=bottom, color=CATEGORY_COLORS[k], label=CATEGORY_LABELS[k])
                bottom += v
            ax.set_xticks(idx)
            ax.set_xticklabels([l["name"].replace("_gate", "") for l in layers], rotation=60, ha="right", fontsize=7)
            ax.set_ylim(0, 1)
            title = "L0 only" if run["family"] == "l0" else "BAS + L0"
            knob = ("target" if run["knob_name"] == "target_macs" else "λ") + f"={lam:g}"
            ax.set_title(f"{title}, {knob} (seed {run['seed']}): {run['conditional']:.0%} conditional",
                         fontsize=9)  # fmt: skip
            if col == 0:
                ax.set_ylabel("fraction of gates")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.06 / len(pairs), 1, 1))
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_difficulty(run, path):
    """MACs per sample split correct/wrong (left) and per class (right) for one gated run."""
    plt = _plt()
    ps = run["per_sample"]
    ratio = ps["macs"].astype(np.float64) * (run["macs_ratio"] / run["mean_conditional_macs"])
    correct = ps["correct"].astype(bool)
    labels = ps["label"].astype(np.int64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lo, hi = float(ratio.min()), float(ratio.max())
    bins = np.linspace(lo, hi + 1e-9, 30) if hi > lo else 10
    for mask, name, color in ((correct, "correct", "#1a9641"), (~correct, "wrong", "#d7191c")):
        if mask.any():
            left.hist(ratio[mask], bins=bins, weights=np.full(mask.sum(), 1.0 / mask.sum()), histtype="stepfilled",
                      alpha=0.45, color=color, label=f"{name} (n={mask.sum()}, mean {ratio[mask].mean():.3f})")
    left.set_xlabel("MACs per sample / ungated full-width MACs")
    left.set_ylabel("fraction of the group's samples")
    rho = run["spearman_macs_loss"]
    left.set_title(f"{run['name']}: acc {run['accuracy']:.3f}, Spearman(MACs, loss) "
                   + ("n/a" if rho is None else f"{rho:.2f}"), fontsize=9)  # fmt: skip
    left.legend(fontsize=8)
    classes = np.unique(labels)
    right.boxplot([ratio[labels == c] for c in classes], showfliers=False)
    right.plot(np.arange(1, len(classes) + 1), [ratio[labels == c].mean() for c in classes], "k^", ms=5,
               label="mean")  # fmt: skip
    right.set_xticks(np.arange(1, len(classes) + 1))
    right.set_xticklabels([str(c) for c in classes])
    right.set_xlabel("true class")
    right.set_ylabel("MACs per sample / ungated full-width MACs")
    right.set_title("MACs per class (box: quartiles, whiskers 1.5 IQR)", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# -------------------------------------------------------------- text


def _f(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _steps(x):
    return "–" if x is None else f"{x:,}"


def _macs_text(macs):
    return f"{macs / 1e6:.2f} M" if macs >= 1e5 else f"{macs:g}"


def _pm(stat, digits=3):
    if stat is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(summary):
    """results.md: run table, per-config table and the claims."""
    out = ["# Trade-off sweep results", ""]
    ref = summary["reference_macs"]
    out.append(
        "MAC ratio = mean conditional MACs per test sample / "
        + (f"{_macs_text(ref)} MACs of the ungated full-width network." if ref else "each run's own ungated MACs.")
    )
    out.append(f"Aggregates: mean ± std over seeds; {STD_NOTE}.")
    out.append("")
    out += ["## Runs", ""]
    out.append(_table(
        ["run", "family", "knob", "seed", "accuracy", "MAC ratio", "conditional", "always on", "always off",
         "rho(MACs, loss)", "MACs correct", "MACs wrong", "steps", "total steps", "wall s"],
        [[r["name"], r["family"], f"{r['knob_name']}={r['knob']:g}", r["seed"], _f(r["accuracy"], 4),
          _f(r["macs_ratio"]), _f(r["conditional"]), _f(r["always_on"]), _f(r["always_off"]),
          _f(r["spearman_macs_loss"]), _f(r["macs_ratio_correct"]), _f(r["macs_ratio_wrong"]),
          _steps(r["steps"]), _steps(r["total_steps"]), _f(r["wall_seconds"], 0)] for r in summary["runs"]],
    ))  # fmt: skip
    out += ["", "MACs correct / wrong: mean MAC ratio of correctly / wrongly classified test samples. "
            "steps: this run's optimizer steps; total steps adds those of the run its weights came from "
            "(pruned and gated-from-plain runs).", ""]
    if summary["missing"]:
        out += ["Missing runs: " + "; ".join(f"{m['name']}: {m['reason']}" for m in summary["missing"]), ""]
    out += ["## Configurations (mean ± std over seeds)", ""]
    out.append(_table(
        ["config", "n", "seeds", "accuracy", "MAC ratio", "conditional", "always on", "always off",
         "rho(MACs, loss)", "wall s"],
        [[c["config"], c["n"], ",".join(str(s) for s in c["seeds"]), _pm(c["accuracy"], 4), _pm(c["macs_ratio"]),
          _pm(c["conditional"]), _pm(c["always_on"]), _pm(c["always_off"]), _pm(c["spearman_macs_loss"]),
          _pm(c["wall_seconds"], 0)] for c in summary["configs"]],
    ))  # fmt: skip
    claims = summary["claims"]
    out += ["", "## Claims", ""]
    c1 = claims["1a"]
    rng = c1["plain_range"]
    out += ["### 1a. Gated vs plain width curve at the same MAC ratio", ""]
    out.append("Plain curve: the plain configurations' mean points, linearly interpolated "
               + (f"over MAC ratios {rng[0]:.3f}-{rng[1]:.3f}" if rng else "(no plain runs)")
               + "; – outside that range. difference = gated - plain.")  # fmt: skip
    out.append("")
    rows = [[r["config"], r["n"], _f(r["macs_ratio"]), _f(r["accuracy"], 4), _f(r["plain_accuracy_at_same_macs"], 4),
             _f(r["difference"], 4), _f(r.get("pruned_accuracy_at_same_macs"), 4), _f(r.get("difference_vs_pruned"), 4)]
            for fam in GATED_CHANNEL_FAMILIES for r in c1.get(fam, [])]  # fmt: skip
    out.append(_table(["config", "n", "MAC ratio", "accuracy", "plain at same MACs", "difference",
                       "pruned at same MACs", "difference vs pruned"], rows) if rows
               else "No gated channel configurations.")  # fmt: skip
    prng = c1.get("pruned_range")
    if prng:
        out += ["", f"Pruned curve (magnitude-pruned full-width plain model, fine-tuned): MAC ratios "
                f"{prng[0]:.3f}-{prng[1]:.3f}."]
    out += ["", "### 1b. Channel (BAS + L0) vs block gates at the same MAC ratio", ""]
    rows = [[r["config"], r["n"], _f(r["macs_ratio"]), _f(r["accuracy"], 4), _f(r["bas_l0_accuracy_at_same_macs"], 4),
             _f(r["difference_channel_minus_block"], 4)] for r in claims["1b"]]  # fmt: skip
    out.append(_table(["config", "n", "MAC ratio", "block accuracy", "channel at same MACs",
                       "channel - block"], rows) if rows else "No block-gate runs.")  # fmt: skip
    out += ["", "### 2. Conditional gates: L0 only vs BAS + L0 (fraction of gates, mean ± std)", ""]
    rows = [[f"{r['knob']:g}", _pm(r["l0"]), _pm(r["bas_l0"]), _f(r["difference"])] for r in claims["2"]]
    out.append(_table([knob_label(claims["2"]), "L0 only", "BAS + L0", "BAS+L0 - L0"], rows) if rows
               else "No lam or MAC target was run with both L0 only and BAS + L0.")  # fmt: skip
    out += ["", "### 3. Harder samples get more compute (per gated run)", ""]
    rows = [[r["run"], r["family"], f"{r['knob']:g}", r["seed"], _f(r["spearman_macs_loss"]),
             _f(r["macs_ratio_correct"]), _f(r["macs_ratio_wrong"]), _f(r["difference_wrong_minus_correct"]),
             r["num_wrong"] if r["num_wrong"] is not None else "–"] for r in claims["3"]]  # fmt: skip
    out.append(_table(["run", "family", knob_label(claims["3"]) if claims["3"] else "lam", "seed",
                       "Spearman rho(MACs, loss)", "MACs correct", "MACs wrong",
                       "wrong - correct", "n wrong"], rows) if rows else "No gated runs.")  # fmt: skip
    out += ["", "### Demo choice", ""]
    d = claims["demo"]
    if d:
        out.append(f"bas_l0 with the best mean accuracy at MAC ratio <= {d['max_macs']:g}: "
                   f"**{KNOB_LABELS[d['knob_name']]} = {d['knob']:g}** (accuracy {d['accuracy']:.4f}, MAC ratio {d['macs_ratio']:.3f}, "
                   f"n = {d['n']}).")  # fmt: skip
    else:
        out.append(f"No bas_l0 configuration has a mean MAC ratio <= {summary['max_macs']:g}.")
    if summary["difficulty_run"]:
        out += ["", f"difficulty.png shows run `{summary['difficulty_run']}`."]
    if summary["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------- entry


def _json_ready(x):
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def summarize(paths, difficulty_run=None, max_macs=0.6, loaded=None):
    """Loads the runs (or takes `loaded`, from `load_runs(paths)`) and computes everything but the plots.

    Returns:
        `(summary, runs, difficulty)`: the JSON-ready summary (without
        `plots`), the run dicts with per-sample arrays (without the
        `source_only` ones), and the run chosen
        for `difficulty.png` (or None).
    """
    sweep = load_sweep(paths, loaded)
    runs = [r for r in sweep["runs"] if not r["source_only"]]
    configs = aggregate_configs(runs)
    difficulty = pick_difficulty_run(runs, difficulty_run, max_macs)
    summary = {
        "inputs": [str(p) for p in paths],
        "max_macs": max_macs,
        "reference_macs": sweep["reference_macs"],
        "reference_macs_source": sweep["reference_macs_source"],
        "std": STD_NOTE,
        "runs": [{k: v for k, v in r.items() if k != "per_sample"} for r in sweep["runs"]],
        "missing": sweep["missing"],
        "configs": configs,
        "claims": {
            "1a": claim_1a(configs),
            "1b": claim_1b(configs),
            "2": claim_2(configs),
            "3": claim_3(runs),
            "demo": demo_choice(configs, max_macs),
        },
        "difficulty_run": difficulty["name"] if difficulty else None,
        "warnings": sweep["warnings"],
    }
    return summary, runs, difficulty


def write_sweep_report(paths, out_dir, difficulty_run=None, max_macs=0.6, log=print, loaded=None):
    """Writes the plots, summary.json and results.md into `out_dir`; returns the summary.

    `loaded`: `load_runs(paths)` when the caller has it already.

    Raises:
        SweepError: bad inputs (message says what to fix).
    """
    if not (max_macs > 0):
        raise SweepError(f"--max-macs must be a positive number, got {max_macs}")
    summary, runs, difficulty = summarize(paths, difficulty_run, max_macs, loaded)
    os.makedirs(out_dir, exist_ok=True)
    plots = []
    note = "" if summary["reference_macs"] else " (own)"
    plots.append(plot_tradeoff(runs, summary["configs"], os.path.join(out_dir, "tradeoff.png"), note, max_macs))
    pairs = gate_category_pairs(runs)
    if pairs:
        plots.append(plot_gate_categories(pairs, os.path.join(out_dir, "gate_categories.png")))
    else:
        summary["warnings"].append("gate_categories.png not written: no lam was run with both L0 only and BAS + L0")
    if difficulty is not None:
        plots.append(plot_difficulty(difficulty, os.path.join(out_dir, "difficulty.png")))
    else:
        summary["warnings"].append("difficulty.png not written: no gated run with per_sample.npz")
    summary["plots"] = [os.path.basename(p) for p in plots]
    return write_summary(out_dir, summary, format_markdown(summary), log)


def write_summary(out_dir, summary, text, log=print):
    """Writes summary.json and results.md (`text`, also logged) next to the plots; returns `summary`."""
    write_json(os.path.join(out_dir, "summary.json"), _json_ready(summary), allow_nan=False)
    write_text(os.path.join(out_dir, "results.md"), text)
    log(text)
    log(f"Wrote {', '.join(summary['plots'] + ['summary.json', 'results.md'])} to {out_dir}")
    return summary
