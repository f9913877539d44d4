"""bench/report.py / bench/sweep_report.py on tiny fabricated run directories.

The fabricated sweep uses an ungated full-width network of 1000 MACs, so
MAC ratios are the MAC counts / 1000 and every expected number below is
computable by hand.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import report as report_cli
import sweep_report as sr

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
FULL = 1000.0


def _recipe(gated, gamma, lam, width, seed, granularity, prune=None):
    r = {"dataset": "fashion_mnist", "model": "resnet20", "gated": gated, "gamma": gamma, "lam": lam,
         "width_multiplier": width, "seed": seed, "epochs": 3, "limit_train": 16000}  # fmt: skip
    if granularity is not None:
        r["gate_granularity"] = granularity
    if prune is not None:
        r["prune_from"], r["prune_macs"] = "runs/plain_w1_s0/last.keras", prune
    return r


def make_run(root, name, *, gated=True, gamma=0.75, lam=1.0, width=1.0, seed=0, granularity=None,
             accuracy=0.9, macs=500.0, ungated=FULL, counts=((7, 2, 1),), per_sample=None, wall=50.0,
             finished=True, prune=None):  # fmt: skip
    """A run directory as train.py writes it. counts: (on, cond, off) per gate layer."""
    d = pathlib.Path(root) / name
    d.mkdir(parents=True)
    recipe = _recipe(gated, gamma, lam, width, seed, granularity, prune)
    (d / "config.json").write_text(json.dumps({"recipe": recipe, "runtime": {"strategy": "cpu"}}))
    if not finished:
        return d
    layers = [
        {"name": f"stage1_block{i + 1}_gate", "gates": sum(c), "channels": sum(c), "open_rate": 0.5,
         "always_on": c[0], "conditional": c[1], "always_off": c[2], "macs_per_channel": 10.0}
        for i, c in enumerate(counts if gated else ())
    ]  # fmt: skip
    total = sum(l["gates"] for l in layers)
    cats = {k: (sum(l[k] for l in layers) / total if total else math.nan) for k in sr.CATEGORIES}
    evaluation = {
        "num_samples": 4, "accuracy": accuracy, "mean_loss": 0.5, "static_macs": int(ungated),
        "ungated_macs": int(ungated), "mean_conditional_macs": macs, "macs_ratio": macs / ungated,
        "min_conditional_macs": macs, "max_conditional_macs": macs, "gated": gated,
        "gate_categories": cats, "layers": layers,
    }  # fmt: skip
    report = {"recipe": recipe, "epochs_completed": 3, "train_wall_seconds_this_session": wall,
              "best": {"epoch": 3}, "evaluation": evaluation}  # fmt: skip
    (d / "report.json").write_text(json.dumps(report))  # NaN for plain runs, as json.dump writes it
    if per_sample is None:
        per_sample = {"macs": np.full(4, macs), "correct": np.array([1, 1, 1, 0], bool),
                      "loss": np.array([0.1, 0.2, 0.3, 2.0])}  # fmt: skip
    n = len(per_sample["macs"])
    arrays = {"label": np.arange(n) % 2, "prediction": np.zeros(n, np.int64), **per_sample}
    np.savez_compressed(d / "per_sample.npz", **arrays)
    return d


# bas_lam1_s0's per-sample data: MAC ranks tie in pairs.
BAS1_SAMPLES = {"macs": np.array([400.0, 400.0, 600.0, 600.0]), "correct": np.array([1, 1, 0, 1], bool),
                "loss": np.array([0.1, 0.2, 2.0, 0.5])}  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep") / "tradeoff"
    make_run(root, "plain_w0.5_s0", gated=False, width=0.5, accuracy=0.80, macs=250, ungated=250)
    make_run(root, "plain_w1_s0", gated=False, width=1.0, accuracy=0.90, macs=1000)
    make_run(root, "plain_w1_s1", gated=False, width=1.0, seed=1, accuracy=0.92, macs=1000)
    make_run(root, "bas_lam1_s0", lam=1, accuracy=0.88, macs=500, counts=[(2, 1, 1), (3, 3, 0)],
             per_sample=BAS1_SAMPLES)  # fmt: skip
    make_run(root, "bas_lam1_s1", lam=1, seed=1, accuracy=0.86, macs=700, counts=[(4, 6, 0)])
    make_run(root, "bas_lam10_s0", lam=10, accuracy=0.70, macs=200, counts=[(2, 5, 3)])
    make_run(root, "l0_lam1_s0", gamma=0.0, lam=1, accuracy=0.82, macs=400, counts=[(8, 1, 1)])
    make_run(root, "l0_lam1_s1", gamma=0.0, lam=1, seed=1, accuracy=0.80, macs=420, counts=[(6, 3, 1)])
    make_run(root, "l0_lam10_s0", gamma=0.0, lam=10, accuracy=0.60, macs=150, counts=[(2, 2, 6)])
    make_run(root, "block_lam1_s0", lam=1, granularity="block", accuracy=0.75, macs=350, counts=[(1, 1, 1)])
    make_run(root, "bas_lam3_s0", lam=3, finished=False)
    make_run(root, "pruned_p0.6_s0", gated=False, prune=0.6, accuracy=0.85, macs=600, ungated=600)
    make_run(root, "pruned_p0.3_s0", gated=False, prune=0.3, accuracy=0.78, macs=300, ungated=300)
    (root / "sweep.json").write_text(json.dumps(
        {"runs": {"bas_lam1_s0": {"wall_seconds": 123.0}, "bas_lam30_s0": {"wall_seconds": None}}}
    ))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def summary(sweep):
    s, runs, difficulty = sr.summarize([str(sweep)], max_macs=0.65)
    return s


def _run(summary, name):
    return next(r for r in summary["runs"] if r["name"] == name)


def _config(summary, key):
    return next(c for c in summary["configs"] if c["config"] == key)


# ----------------------------------------------------------- pure numbers


def test_family_classification():
    assert sr.run_family({"gated": False, "gamma": 0.75}) == "plain"
    assert sr.run_family({"gated": True, "gamma": 0.0, "gate_granularity": "block"}) == "block"
    assert sr.run_family({"gated": True, "gamma": 0.0}) == "l0"  # missing granularity: channel
    assert sr.run_family({"gated": True, "gamma": 0.0, "gate_granularity": "channel"}) == "l0"
    assert sr.run_family({"gated": True, "gamma": 0.75}) == "bas_l0"
    assert sr.run_family({"gated": True, "gamma": 0.75, "gate_from": "runs/plain/last.keras"}) == "retrofit"
    assert sr.run_family({"gated": True, "gamma": 0.75, "hard_gates_begin": 0.8}) == "bas_l0_hard"
    assert sr.run_family({"gated": True, "gamma": 0.75, "hard_gates_begin": None}) == "bas_l0"
    assert sr.config_knob("plain", {"width_multiplier": 0.5, "lam": 3}) == ("width_multiplier", 0.5)
    assert sr.config_knob("block", {"width_multiplier": 0.5, "lam": 3}) == ("lam", 3.0)
    pruned = {"gated": False, "prune_from": "a.keras", "prune_macs": 0.4, "width_multiplier": 1.0}
    assert sr.run_family(pruned) == "pruned"
    assert sr.config_knob("pruned", pruned) == ("prune_macs", 0.4)
    assert sr.config_key("pruned", 0.4) == "pruned macs=0.4"


def test_average_ranks_with_ties():
    np.testing.assert_allclose(sr.average_ranks([10, 20, 10, 30, 20, 10]), [2, 4.5, 2, 6, 4.5, 2])


def test_spearman_hand_example():
    # MAC ranks [1.5, 1.5, 3.5, 3.5], loss ranks [1, 2, 4, 3]: rho = 4 / sqrt(4 * 5).
    rho = sr.spearman(BAS1_SAMPLES["macs"], BAS1_SAMPLES["loss"])
    assert rho == pytest.approx(4 / math.sqrt(20), abs=1e-12)
    assert sr.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(sr.spearman([5, 5, 5], [1, 2, 3]))
    assert math.isnan(sr.spearman([1, 2, 3], [7, 7, 7]))
    assert math.isnan(sr.spearman([1], [2]))


def test_spearman_matches_scipy_with_heavy_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        macs = rng.integers(0, 4, 300) * 1e6  # 4 distinct values: heavy ties
        loss = rng.integers(0, 6, 300) * 0.5 + 0.1 * macs / 1e6 + rng.normal(0, 0.3, 300) * (rng.random(300) < 0.5)
        expected = stats.spearmanr(macs, loss).statistic
        assert sr.spearman(macs, loss) == pytest.approx(expected, abs=1e-12)
    x = rng.normal(size=50)
    assert sr.spearman(x, x**3) == pytest.approx(1.0)


def test_interpolate_hand_values():
    pts = [(1.0, 0.91), (0.25, 0.80)]  # unsorted on purpose
    assert sr.interpolate(pts, 0.6) == pytest.approx(0.80 + 0.35 / 0.75 * 0.11)
    assert sr.interpolate(pts, 0.25) == pytest.approx(0.80)
    assert sr.interpolate(pts, 1.0) == pytest.approx(0.91)
    assert sr.interpolate(pts, 0.2) is None and sr.interpolate(pts, 1.01) is None
    assert sr.interpolate([(0.0, 0.0), (0.5, 1.0), (0.5, 0.0), (1.0, 0.0)], 0.25) == pytest.approx(0.25)
    assert sr.interpolate([(0.5, 0.7)], 0.5) == pytest.approx(0.7)
    assert sr.interpolate([(0.5, 0.7)], 0.6) is None
    assert sr.interpolate([], 0.5) is None


def test_aggregate_uses_ddof_1_and_std_0_for_one_seed():
    a = sr.aggregate([0.90, 0.92, None])
    assert a["mean"] == pytest.approx(0.91) and a["n"] == 2
    assert a["std"] == pytest.approx(math.sqrt(2 * 0.01**2 / 1))
    assert a["min"] == pytest.approx(0.90) and a["max"] == pytest.approx(0.92)
    assert sr.aggregate([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    assert sr.aggregate([None, math.nan]) is None


def test_gate_category_fractions():
    layers = [{"name": "a", "gates": 4, "always_on": 2, "conditional": 1, "always_off": 1},
              {"name": "b", "gates": 6, "always_on": 3, "conditional": 3, "always_off": 0}]  # fmt: skip
    out = sr.gate_category_fractions(layers)
    assert out["total"] == pytest.approx({"always_on": 0.5, "conditional": 0.4, "always_off": 0.1})
    assert out["layers"][0] == pytest.approx(
        {"name": "a", "gates": 4, "always_on": 0.5, "conditional": 0.25, "always_off": 0.25})
    assert out["layers"][1]["conditional"] == pytest.approx(0.5)
    assert sr.gate_category_fractions([])["total"] is None


# --------------------------------------------------------- on the sweep


def test_runs_missing_families_and_wall_times(summary):
    names = [r["name"] for r in summary["runs"]]
    assert len(names) == 12 and "bas_lam3_s0" not in names
    assert _run(summary, "pruned_p0.6_s0")["family"] == "pruned"
    assert _run(summary, "pruned_p0.6_s0")["macs_ratio"] == pytest.approx(0.6)  # vs the full plain model
    assert {m["name"]: m["reason"] for m in summary["missing"]} == {
        "bas_lam3_s0": "no report.json (unfinished)", "bas_lam30_s0": "in sweep.json, no run directory"}
    assert {r["name"]: r["family"] for r in summary["runs"]}["block_lam1_s0"] == "block"
    assert _run(summary, "l0_lam1_s0")["family"] == "l0"
    assert _run(summary, "bas_lam10_s0")["family"] == "bas_l0"
    assert _run(summary, "plain_w0.5_s0")["family"] == "plain"
    assert summary["reference_macs"] == FULL
    # Narrow plain runs are relative to the full-width network, not their own.
    assert _run(summary, "plain_w0.5_s0")["macs_ratio"] == pytest.approx(0.25)
    assert _run(summary, "plain_w0.5_s0")["own_macs_ratio"] == pytest.approx(1.0)
    assert _run(summary, "plain_w0.5_s0")["conditional"] is None
    bas = _run(summary, "bas_lam1_s0")
    assert (bas["wall_seconds"], bas["wall_seconds_source"]) == (123.0, "sweep.json")
    assert (_run(summary, "l0_lam1_s0")["wall_seconds"], _run(summary, "l0_lam1_s0")["wall_seconds_source"]) == (
        50.0, "report.json")
    assert bas["conditional"] == pytest.approx(0.4) and bas["always_off"] == pytest.approx(0.1)
    assert [l["conditional"] for l in bas["layers"]] == pytest.approx([0.25, 0.5])


def test_seed_aggregation(summary):
    keys = [c["config"] for c in summary["configs"]]
    assert keys == ["plain width=0.5", "plain width=1", "pruned macs=0.3", "pruned macs=0.6", "l0 lam=1", "l0 lam=10", "bas_l0 lam=1",
                    "bas_l0 lam=10", "block lam=1"]  # fmt: skip
    plain = _config(summary, "plain width=1")
    assert plain["n"] == 2 and plain["seeds"] == [0, 1]
    assert plain["accuracy"]["mean"] == pytest.approx(0.91)
    assert plain["accuracy"]["std"] == pytest.approx(0.0141421356, abs=1e-9)
    bas = _config(summary, "bas_l0 lam=1")
    assert bas["macs_ratio"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02), "min": 0.5, "max": 0.7, "n": 2})
    assert bas["conditional"]["mean"] == pytest.approx(0.5) and bas["conditional"]["std"] == pytest.approx(
        math.sqrt(0.02))
    one = _config(summary, "bas_l0 lam=10")
    assert one["n"] == 1 and one["accuracy"]["std"] == 0.0


def test_claim_1a_and_1b(summary):
    c = summary["claims"]["1a"]
    assert c["plain_range"] == pytest.approx([0.25, 1.0])
    bas = {r["knob"]: r for r in c["bas_l0"]}
    assert bas[1.0]["plain_accuracy_at_same_macs"] == pytest.approx(0.80 + 0.35 / 0.75 * 0.11)
    assert bas[1.0]["difference"] == pytest.approx(0.87 - (0.80 + 0.35 / 0.75 * 0.11))
    assert bas[10.0]["plain_accuracy_at_same_macs"] is None and bas[10.0]["difference"] is None  # 0.2 < 0.25
    l0 = {r["knob"]: r for r in c["l0"]}
    assert l0[1.0]["macs_ratio"] == pytest.approx(0.41)
    assert l0[1.0]["plain_accuracy_at_same_macs"] == pytest.approx(0.80 + 0.16 / 0.75 * 0.11)
    assert l0[1.0]["difference"] == pytest.approx(0.81 - (0.80 + 0.16 / 0.75 * 0.11))
    # Pruned curve: (0.3, 0.78), (0.6, 0.85), relative to the full plain model's 1000 MACs.
    assert c["pruned_range"] == pytest.approx([0.3, 0.6])
    assert bas[1.0]["pruned_accuracy_at_same_macs"] == pytest.approx(0.85)
    assert bas[1.0]["difference_vs_pruned"] == pytest.approx(0.02)
    assert l0[1.0]["pruned_accuracy_at_same_macs"] == pytest.approx(0.78 + 0.11 / 0.3 * 0.07)
    assert bas[10.0]["pruned_accuracy_at_same_macs"] is None
    (block,) = summary["claims"]["1b"]
    # Channel curve: (0.2, 0.70) lam 10, (0.6, 0.87) lam 1; block at 0.35.
    assert block["bas_l0_accuracy_at_same_macs"] == pytest.approx(0.70 + 0.15 / 0.4 * 0.17)
    assert block["difference_channel_minus_block"] == pytest.approx(0.70 + 0.15 / 0.4 * 0.17 - 0.75)


def test_claim_2_conditional_fraction(summary):
    rows = {r["knob"]: r for r in summary["claims"]["2"]}
    assert sorted(rows) == [1.0, 10.0]
    assert rows[1.0]["l0"]["mean"] == pytest.approx(0.2) and rows[1.0]["l0"]["std"] == pytest.approx(math.sqrt(0.02))
    assert rows[1.0]["bas_l0"]["mean"] == pytest.approx(0.5)
    assert rows[1.0]["difference"] == pytest.approx(0.3)
    assert rows[10.0]["difference"] == pytest.approx(0.5 - 0.2)


def test_claim_3_and_choices(summary, sweep):
    rows = {r["run"]: r for r in summary["claims"]["3"]}
    assert len(rows) == 7  # the gated runs
    bas = rows["bas_lam1_s0"]
    assert bas["spearman_macs_loss"] == pytest.approx(4 / math.sqrt(20))
    assert bas["macs_ratio_correct"] == pytest.approx(1400 / 3 / FULL)
    assert bas["macs_ratio_wrong"] == pytest.approx(0.6)
    assert bas["difference_wrong_minus_correct"] == pytest.approx(0.6 - 1400 / 3 / FULL)
    assert rows["l0_lam1_s0"]["spearman_macs_loss"] is None  # constant MACs
    demo = summary["claims"]["demo"]
    assert demo["knob"] == 1.0 and demo["accuracy"] == pytest.approx(0.87)
    configs = summary["configs"]
    assert sr.demo_choice(configs, 0.3)["knob"] == 10.0
    assert sr.demo_choice(configs, 0.1) is None
    assert summary["difficulty_run"] == "bas_lam1_s0"
    _, runs, _ = sr.summarize([str(sweep)])
    assert sr.pick_difficulty_run(runs, max_macs=0.3)["name"] == "bas_lam10_s0"
    assert sr.pick_difficulty_run(runs, max_macs=0.1)["name"] == "bas_lam1_s0"  # fallback: best gated
    assert sr.pick_difficulty_run(runs, "l0_lam10_s0")["name"] == "l0_lam10_s0"
    with pytest.raises(sr.SweepError, match="plain"):
        sr.pick_difficulty_run(runs, "plain_w1_s0")
    with pytest.raises(sr.SweepError, match="not a finished run"):
        sr.pick_difficulty_run(runs, "bas_lam3_s0")


def test_gate_category_pairs_use_the_smallest_seed(sweep):
    _, runs, _ = sr.summarize([str(sweep)])
    pairs = sr.gate_category_pairs(runs)
    assert [(lam, a["name"], b["name"]) for lam, a, b in pairs] == [
        (1.0, "l0_lam1_s0", "bas_lam1_s0"), (10.0, "l0_lam10_s0", "bas_lam10_s0")]


# ------------------------------------------------------------------ CLI


def test_cli_writes_everything(sweep, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    # A root and one of its run directories again: counted once.
    code = report_cli.main([str(sweep), str(sweep / "plain_w1_s0"), "--out", str(out), "--max-macs", "0.65"])
    assert code == 0
    for name in ("tradeoff.png", "gate_categories.png", "difficulty.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"runs", "configs", "claims", "missing", "reference_macs", "difficulty_run", "plots"}
    assert len(summary["runs"]) == 12
    assert summary["claims"]["demo"]["knob"] == 1.0
    assert summary["plots"] == ["tradeoff.png", "gate_categories.png", "difficulty.png"]
    md = (out / "results.md").read_text()
    assert "ddof=1" in md and "| bas_lam1_s0 | bas_l0 | lam=1 | 0 | 0.8800 | 0.500 |" in md
    assert "**lam = 1**" in md
    printed = capsys.readouterr().out
    assert "## Configurations" in printed
    assert "| bas_l0 lam=1 | 2 | 0,1 | 0.8700 ± 0.0141 | 0.600 ± 0.141 |" in printed
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_cli_explicit_difficulty_run(sweep, tmp_path):
    out = tmp_path / "out"
    assert report_cli.main([str(sweep), "--out", str(out), "--difficulty-run", "l0_lam10_s0"]) == 0
    assert json.loads((out / "summary.json").read_text())["difficulty_run"] == "l0_lam10_s0"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no run directories"),
        (lambda p: make_run(p / "root", "r0", finished=False).parent, "no finished run"),
    ],
)
def test_cli_bad_inputs_exit_2(make, message, tmp_path, capsys):
    path = make(tmp_path)
    assert report_cli.main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_cli_unknown_difficulty_run_and_bad_max_macs(sweep, tmp_path, capsys):
    assert report_cli.main([str(sweep), "--out", str(tmp_path / "o"), "--difficulty-run", "zzz"]) == 2
    assert "--difficulty-run 'zzz' is not a finished run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        report_cli.main([str(sweep), "--out", str(tmp_path / "o"), "--max-macs", "-1"])
    assert e.value.code == 2
    assert "must be a positive number" in capsys.readouterr().err


def test_help_does_not_import_tensorflow():
    code = ("import runpy, sys; sys.argv = ['bench/report.py', '--help']\n"
            "try:\n    runpy.run_path('bench/report.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TF', 'tensorflow' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--difficulty-run" in result.stdout and "TF False" in result.stdout, result.stderr


def test_budget_runs_are_keyed_by_target_and_carry_their_steps(tmp_path):
    """--budget long runs: gated runs at a MAC target are configurations
    `target=...` (not the unused lam), and every run records its optimizer
    steps; a pruned run's total adds those of the plain run it started from."""
    root = tmp_path / "long"
    src = make_run(root, "plain_half_w1_s0", gated=False, accuracy=0.88, macs=1000)
    make_run(root, "plain_w1_s0", gated=False, accuracy=0.90, macs=1000)
    for name, gamma, target in (("bas_l0_t0p55_s0", 0.75, 0.55), ("l0_t0p55_s0", 0.0, 0.55)):
        d = make_run(root, name, gamma=gamma, lam=12.0, macs=560)
        for f in ("config.json", "report.json"):
            data = json.loads((d / f).read_text())
            data["recipe"]["target_macs"] = target
            (d / f).write_text(json.dumps(data))
    hard = make_run(root, "bas_l0_hard_t0p55_s0", gamma=0.75, lam=12.0, macs=560, accuracy=0.95)
    for f in ("config.json", "report.json"):
        data = json.loads((hard / f).read_text())
        data["recipe"].update(target_macs=0.55, hard_gates_begin=0.8)
        (hard / f).write_text(json.dumps(data))
    pruned = make_run(root, "pruned_p0p6_s0", gated=False, accuracy=0.89, macs=600, prune=0.6)
    for f in ("config.json", "report.json"):
        data = json.loads((pruned / f).read_text())
        data["recipe"]["prune_from"] = str(src / "last.keras")
        if f == "report.json":
            data["optimizer_steps"] = 1404  # recorded by train.py: wins over epochs x limit/batch
        (pruned / f).write_text(json.dumps(data))
    for d in root.iterdir():  # the fabricated recipes lack a batch size; a run of 6 x 468 steps
        for f in ("config.json", "report.json"):
            data = json.loads((d / f).read_text())
            data["recipe"]["batch_size"] = 128
            if d.name != "pruned_p0p6_s0":
                data["recipe"]["limit_train"] = 60000
                data["epochs_completed"] = 3 if d.name.startswith("plain_half") else 6
            (d / f).write_text(json.dumps(data))
    summary = sr.summarize([str(root)])[0]
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["bas_l0_t0p55_s0"]["config"] == "bas_l0 target=0.55"
    assert (runs["l0_t0p55_s0"]["knob_name"], runs["l0_t0p55_s0"]["knob"]) == ("target_macs", 0.55)
    assert runs["plain_w1_s0"]["steps"] == runs["plain_w1_s0"]["total_steps"] == 6 * 468
    assert runs["pruned_p0p6_s0"]["steps"] == 1404
    assert runs["pruned_p0p6_s0"]["source_steps"] == 3 * 468
    assert runs["pruned_p0p6_s0"]["total_steps"] == 1404 + 3 * 468
    # The plain half run is only the start of the pruned one (1,404 < 2,808 steps): in the run
    # table, not averaged into the plain width-1 configuration.
    assert runs["plain_half_w1_s0"]["source_only"] and not runs["plain_w1_s0"]["source_only"]
    (plain1,) = [c for c in summary["configs"] if c["config"] == "plain width=1"]
    assert plain1["runs"] == ["plain_w1_s0"]
    assert any(w.startswith("plain_half_w1_s0: the start of other runs") for w in summary["warnings"])
    (row,) = summary["claims"]["2"]
    assert (row["knob_name"], row["knob"]) == ("target_macs", 0.55)
    # The hard-gate phase run is its own configuration, in claim 1a like the others.
    (hard,) = summary["claims"]["1a"]["bas_l0_hard"]
    assert hard["config"] == "bas_l0_hard target=0.55" and hard["accuracy"] == pytest.approx(0.95)
    assert summary["claims"]["1a"]["bas_l0"][0]["config"] == "bas_l0 target=0.55"
    text = sr.format_markdown(summary)
    assert "| bas_l0_hard target=0.55 | 1 |" in text
    assert "| target | L0 only |" in text and "| 1,404 | 2,808 |" in text
    # Read through a symlink to the sweep (the recorded prune_from is the real path): the same.
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    linked = {r["name"]: r for r in sr.summarize([str(link)])[0]["runs"]}
    assert linked["plain_half_w1_s0"]["source_only"] and not linked["plain_w1_s0"]["source_only"]


# ------------------------------------------------------------ depth sweep


def _set_recipe(run_dir, report=None, **recipe):
    """Updates the recipe in a fabricated run's config.json and report.json (and `report`'s top-level keys)."""
    for f in ("config.json", "report.json"):
        data = json.loads((run_dir / f).read_text())
        data["recipe"].update(recipe)
        if f == "report.json":
            data.update(report or {})
        (run_dir / f).write_text(json.dumps(data))
    return run_dir


def _depth_run(root, name, depth, macs, accuracy, *, gated=True, seed=0, target=None, distill=None, width=1.0,
               dataset="fashion_mnist", ungated=None):
    """A --budget depth run: ResNet-`depth` with `macs` mean MACs; ungated MACs `depth` M (plain: `macs`)."""
    ungated = ungated or (macs if not gated else depth * 1e6)
    d = make_run(root, name, gated=gated, seed=seed, width=width, accuracy=accuracy, macs=macs, ungated=ungated)
    return _set_recipe(d, {"optimizer_steps": 2808}, model=f"resnet{depth}", dataset=dataset, target_macs=target,
                       distill=distill)


@pytest.fixture(scope="module")
def depth_sweep(tmp_path_factory):
    """Plain ResNet-20/32/56 at 20/32/56 M MACs; gated ResNet-56 and ResNet-32 trained to about 20 M."""
    root = tmp_path_factory.mktemp("depth") / "tradeoff_depth"
    _depth_run(root, "plain_r20_s0", 20, 20e6, 0.90, gated=False)
    _depth_run(root, "plain_r20_s1", 20, 20e6, 0.92, gated=False, seed=1)
    _depth_run(root, "plain_r32_s0", 32, 32e6, 0.93, gated=False)
    _depth_run(root, "plain_r56_s0", 56, 56e6, 0.94, gated=False)
    _depth_run(root, "gated_r56_at_r20_s0", 56, 21e6, 0.915, target=0.357)
    _depth_run(root, "gated_r56_at_r20_s1", 56, 19e6, 0.925, target=0.357, seed=1)
    _depth_run(root, "distill_r56_at_r20_s0", 56, 20e6, 0.93, target=0.357, distill="self")
    _depth_run(root, "gated_r32_at_r20_s0", 32, 29e6, 0.91, target=0.625)  # 29 M: closer to ResNet-32's 32 M
    _depth_run(root, "gated_r20_w2_t0p25_s0", 20, 20e6, 0.905, target=0.25, width=2.0, ungated=80e6)
    _depth_run(root, "levels_plain_r20_s0", 20, 20e6, 0.80, gated=False, dataset="fashion_mnist_levels")
    _depth_run(root, "levels_gated_r56_at_r20_s0", 56, 20e6, 0.82, target=0.357, dataset="fashion_mnist_levels")
    make_run(root, "plain_r56_s1", gated=False, finished=False)
    (root / "sweep.json").write_text(json.dumps({"runs": {"plain_r32_s0": {"wall_seconds": 600.0}}}))
    return root


def test_depth_sweep_compares_on_absolute_macs(depth_sweep):
    import depth_report

    loaded = sr.load_runs([str(depth_sweep)])
    assert depth_report.is_depth_sweep(loaded["runs"])
    summary, _ = depth_report.summarize_depth([str(depth_sweep)], loaded)
    runs = {r["name"]: r for r in summary["runs"]}
    assert len(runs) == 11 and [m["name"] for m in summary["missing"]] == ["plain_r56_s1"]
    gated = runs["gated_r56_at_r20_s0"]
    # Its own ratio (of the ungated ResNet-56), not of a reference network.
    assert gated["macs_ratio"] == pytest.approx(21 / 56) and runs["plain_r32_s0"]["macs_ratio"] == 1.0
    assert (gated["depth"], gated["kind"], gated["steps"], gated["conditional"]) == (56, "gated", 2808, 0.2)
    assert runs["distill_r56_at_r20_s0"]["kind"] == "distilled" and runs["gated_r20_w2_t0p25_s0"]["kind"] == "wide"
    assert (runs["plain_r32_s0"]["wall_seconds"], runs["plain_r32_s0"]["wall_seconds_source"]) == (600.0, "sweep.json")
    assert [(c["dataset"], c["config"]) for c in summary["configs"]] == [
        ("fashion_mnist", "plain ResNet-20"), ("fashion_mnist", "plain ResNet-32"),
        ("fashion_mnist", "plain ResNet-56"), ("fashion_mnist", "gated ResNet-20 width=2 target=0.25"),
        ("fashion_mnist", "gated ResNet-32 target=0.625"), ("fashion_mnist", "gated ResNet-56 target=0.357"),
        ("fashion_mnist", "gated ResNet-56 target=0.357 + distill self"),
        ("fashion_mnist_levels", "plain ResNet-20"), ("fashion_mnist_levels", "gated ResNet-56 target=0.357")]
    rows = {(r["dataset"], r["config"]): r for r in summary["comparison"]}
    r56 = rows[("fashion_mnist", "gated ResNet-56 target=0.357")]
    assert r56["n"] == 2 and r56["macs"] == pytest.approx(20e6) and r56["accuracy"] == pytest.approx(0.92)
    assert (r56["plain_config"], r56["plain_n"]) == ("plain ResNet-20", 2)
    assert r56["plain_accuracy"] == pytest.approx(0.91) and r56["difference"] == pytest.approx(0.01)
    assert r56["macs_vs_plain"] == pytest.approx(1.0) and r56["difference_vs_curve"] == pytest.approx(0.01)
    distilled = rows[("fashion_mnist", "gated ResNet-56 target=0.357 + distill self")]
    assert distilled["difference"] == pytest.approx(0.02)
    # 29 M: closest plain is ResNet-32 (32 M); the plain curve at 29 M is 3/4 of the way from 0.91 to 0.93.
    r32 = rows[("fashion_mnist", "gated ResNet-32 target=0.625")]
    assert r32["plain_config"] == "plain ResNet-32" and r32["difference"] == pytest.approx(0.91 - 0.93)
    assert r32["plain_curve_accuracy"] == pytest.approx(0.925) and r32["difference_vs_curve"] == pytest.approx(-0.015)
    levels = rows[("fashion_mnist_levels", "gated ResNet-56 target=0.357")]
    assert levels["plain_accuracy"] == pytest.approx(0.80) and levels["difference"] == pytest.approx(0.02)
    # Below the plain MAC range: no curve value.
    assert depth_report.compare_with_plain([
        {**c, "mean_conditional_macs": sr.aggregate([19e6])} if c["gated"] else c
        for c in summary["configs"][:6]])[-1]["plain_curve_accuracy"] is None


def test_cli_writes_the_depth_report_for_runs_of_several_models(depth_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert report_cli.main([str(depth_sweep), "--out", str(out)]) == 0
    data = (out / "tradeoff.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "depth" and summary["plots"] == ["tradeoff.png"]
    assert {"steps", "accuracy", "macs_ratio", "conditional", "wall_seconds", "mean_conditional_macs"} <= set(
        summary["runs"][0])
    assert not (out / "gate_categories.png").exists()
    md = (out / "results.md").read_text()
    assert "| gated_r56_at_r20_s0 | fashion_mnist | resnet56 | gated | – | 1 | 0.357 | 0 | 0.9150 | 21.00 | " \
        "0.375 | 0.200 | 2,808 | 50 |" in md
    assert "| distill_r56_at_r20_s0 | fashion_mnist | resnet56 | gated | self |" in md
    assert "| gated ResNet-56 target=0.357 | fashion_mnist | 2 | 20.00 | 0.9200 ± 0.0071 | plain ResNet-20 | " \
        "20.00 | 0.9100 ± 0.0141 | 0.0100 | 1.000 | 0.9100 | 0.0100 |" in md
    assert "Missing runs: plain_r56_s1" in md and "## Gated vs plain at the same MACs" in capsys.readouterr().out
