"""The trade-off sweep's plan (bench/tradeoff.py): valid train.py runs that
differ only in the family's knob and the seed; finished runs are skipped."""

import importlib.util
import json
import os

import pytest

from bs_keras.lr_schedules import WarmUp

from bs_keras.cli import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("tradeoff", os.path.join(ROOT, "bench", "tradeoff.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tradeoff = _load()


def _resolved(runs):
    """The resolved train.py recipe of each `(name, flags)` run."""
    out = {}
    for name, flags in runs:
        _, args = train.parse_args(flags)
        out[name] = train.resolve_recipe(args)
    return out


def _recipes(root):
    for seed in (0, 1):  # the pruned runs' sources must exist to validate
        (root / f"plain_w1_s{seed}").mkdir(parents=True)
        (root / f"plain_w1_s{seed}" / "last.keras").write_bytes(b"")
    return _resolved(tradeoff.plan(root=str(root)))


def test_default_plan_families_and_seeds(tmp_path):
    recipes = _recipes(tmp_path)
    assert len(recipes) == 2 * (4 + 3 + 3 + 3 + 2 + 3)
    plain = {k: r for k, r in recipes.items() if k.startswith("plain")}
    pruned = {k: r for k, r in recipes.items() if k.startswith("pruned")}
    assert all(not r.gated and r.width_multiplier == 1.0 for r in pruned.values())
    assert sorted(r.prune_macs for r in pruned.values()) == [0.4, 0.4, 0.6, 0.6]
    assert all(r.prune_from == str(tmp_path / f"plain_w1_s{r.seed}" / "last.keras") for r in pruned.values())
    names = list(recipes)
    assert all(names.index(f"plain_w1_s{r.seed}") < names.index(k) for k, r in pruned.items())
    assert sorted({r.width_multiplier for r in plain.values()}) == [0.35, 0.5, 0.75, 1.0]
    assert all(not r.gated for r in plain.values())
    l0 = [r for k, r in recipes.items() if k.startswith("l0_")]
    bas = [r for k, r in recipes.items() if k.startswith("bas_l0_")]
    block = [r for k, r in recipes.items() if k.startswith("block_")]
    assert all(r.gated and r.gamma == 0 and r.gate_granularity == "channel" for r in l0)
    assert all(r.gated and r.gamma == 0.75 and r.gate_granularity == "channel" for r in bas)
    assert all(r.gated and r.gamma == 0.75 and r.gate_granularity == "block" for r in block)
    assert sorted({r.lam for r in l0}) == sorted({r.lam for r in bas}) == [8.0, 12.0, 20.0]
    retrofit = {k: r for k, r in recipes.items() if k.startswith("retrofit_")}
    assert all(r.gated and r.gamma == 0.75 and r.width_multiplier == 1.0 for r in retrofit.values())
    assert all(r.gate_from == str(tmp_path / f"plain_w1_s{r.seed}" / "last.keras") for r in retrofit.values())
    assert all(names.index(f"plain_w1_s{r.seed}") < names.index(k) for k, r in retrofit.items())
    assert sorted({r.lam for r in retrofit.values()}) == [8.0, 12.0, 20.0]
    assert {r.seed for r in recipes.values()} == {0, 1}
    assert all(r.seed == tradeoff.name_seed(k) for k, r in recipes.items())


def test_runs_differ_only_in_knob_and_seed(tmp_path):
    recipes = _recipes(tmp_path)
    knobs = {"gated", "width_multiplier", "lam", "gamma", "gate_granularity", "seed", "prune_from", "prune_macs",
             "clipnorm", "gate_from"}
    assert {r.clipnorm for k, r in recipes.items() if k.startswith("block")} == {10.0}
    assert {r.clipnorm for k, r in recipes.items() if not k.startswith("block")} == {None}
    shared = [{k: v for k, v in r.to_dict().items() if k not in knobs} for r in recipes.values()]
    assert all(s == shared[0] for s in shared)
    assert shared[0]["epochs"] == 4 and shared[0]["limit_train"] == 16000
    assert shared[0]["dataset"] == "fashion_mnist" and shared[0]["model"] == "resnet20"


def test_finished_runs_are_skipped(tmp_path, capsys):
    root = tmp_path / "sweep"
    done = root / "plain_w1_s0"
    done.mkdir(parents=True)
    (done / "report.json").write_text(json.dumps({"evaluation": {}}))
    argv = ["--root", str(root), "--families", "plain", "--seeds", "0", "--dry-run"]
    assert tradeoff.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 runs, 1 finished, 3 to do" in out
    assert "[done] plain_w1_s0" in out and "[todo] plain_w0p35_s0" in out


def test_bad_family_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        tradeoff.parse_args(["--families", "plain,big"])
    assert e.value.code == 2
    assert "unknown ['big']" in capsys.readouterr().err


def test_sweep_recipe_is_a_sweep_point(tmp_path):
    """The short sweep is built on recipe fashion_mnist_sweep: its BAS+L0
    run at the recipe's lambda (seed 0) trains exactly that recipe."""
    _, args = train.parse_args(["--recipe", "fashion_mnist_sweep"])
    sweep = train.resolve_recipe(args)
    name = f"bas_l0_lam{tradeoff._num(sweep.lam)}_s0"
    assert sweep.lam in tradeoff.LAMS
    recipes = _recipes(tmp_path)
    assert recipes[name].to_dict() == sweep.to_dict()


def test_long_budget_plan_matches_every_run_to_the_same_steps(tmp_path):
    """--budget long (issue 19): N = 6 full epochs for every run; pruned and
    gated-from-plain runs are N/2 + N/2 from a plain N/2 run of their seed;
    gated runs have MAC targets; two seeds only for the decisive pair."""
    runs = tradeoff.plan_long(root=str(tmp_path))
    for seed in (0, 1):
        (tmp_path / f"plain_half_w1_s{seed}").mkdir()
        (tmp_path / f"plain_half_w1_s{seed}" / "last.keras").write_bytes(b"")
    recipes = _resolved(runs)
    steps = {name: r.epochs * (60000 // r.batch_size) for name, r in recipes.items()}
    assert all(r.limit_train == 60000 and r.batch_size == 128 for r in recipes.values())
    names = list(recipes)
    for name, r in recipes.items():
        source = r.prune_from or r.gate_from
        if source:
            parent = os.path.basename(os.path.dirname(source))
            assert parent == f"plain_half_w1_s{r.seed}" and names.index(parent) < names.index(name)
            assert steps[name] + steps[parent] == 6 * 468
        elif not name.startswith("plain_half"):
            assert steps[name] == 6 * 468 >= 2800
    gated = {k: r for k, r in recipes.items() if r.gated}
    assert all(r.target_macs in (0.75, 0.55, 0.35) for r in gated.values())
    assert {r.gamma for k, r in gated.items() if k.startswith("l0_")} == {0.0}
    assert sorted(k for k in recipes if k.endswith("_s1")) == [
        "bas_l0_t0p55_s1", "plain_half_w1_s1", "plain_w0p75_s1", "pruned_p0p6_s1"]
    assert len(runs) == 20
    hard = recipes["bas_l0_hard_t0p55_s0"]
    assert (hard.target_macs, hard.hard_gates_begin, hard.gamma) == (0.55, 0.8, 0.75)
    assert not any(r.hard_gates_begin for k, r in recipes.items() if k != "bas_l0_hard_t0p55_s0")
    # A sweep cut short has answered the decisive comparison of seed 0 first.
    assert sorted(names[:4]) == ["bas_l0_t0p55_s0", "plain_half_w1_s0", "plain_w0p75_s0", "pruned_p0p6_s0"]
    assert all(name.endswith("_s1") for name in names[-4:])


def test_long_budget_dry_run_prints_its_plan(tmp_path, capsys):
    assert tradeoff.main(["--budget", "long", "--root", str(tmp_path / "long"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "20 runs, 0 finished, 20 to do" in out
    assert "[todo] retrofit_t0p55_s0: python train.py" in out and "--gate-from" in out


def test_paper_protocol_plan_is_the_long_plan_with_the_papers_cifar10_schedule(tmp_path, capsys):
    """--budget paper: the families of --budget long, each run the paper's
    CIFAR-10 protocol: 500 epochs of the full training set at batch 256, lr
    0.1 divided by 10 at epochs 300/375/450, gamma 0.75 annealed to 0 by
    epoch 100, L0 from epoch 100 to full weight by epoch 300; pruned and
    gated-from runs 250 + 250 epochs from a plain 250-epoch run."""
    from bs_keras.training import learning_rate

    root = tmp_path / "paper"
    assert tradeoff.main(["--budget", "paper", "--root", str(root), "--data-dir", str(tmp_path / "tfds"),
                          "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "20 runs, 0 finished, 20 to do" in out
    runs = tradeoff.plan_paper(root=str(root), extra=["--data-dir", str(tmp_path / "tfds")])
    assert [name for name, _ in runs] == [name for name, _ in tradeoff.plan_long(root=str(root))]
    for seed in (0, 1):
        (root / f"plain_half_w1_s{seed}").mkdir(parents=True)
        (root / f"plain_half_w1_s{seed}" / "last.keras").write_bytes(b"")
    steps_per_epoch = 50000 // 256
    for name, flags in runs:
        assert f"[todo] {name}: python train.py {' '.join(flags)}" in out
        _, args = train.parse_args(flags)
        r = train.resolve_recipe(args)
        assert args.data_dir == str(tmp_path / "tfds")
        assert (r.dataset, r.model, r.batch_size, r.lr, r.limit_train) == ("cifar10", "resnet20", 256, 0.1, None)
        half = bool(r.prune_from or r.gate_from) or name.startswith("plain_half")
        assert r.epochs == (250 if half else 500)
        if r.epochs == 500:
            lr = learning_rate(r, steps_per_epoch)
            assert isinstance(lr, WarmUp) and lr.warmup_steps == 5 * steps_per_epoch  # 1 % of 500 epochs
            drops = lr.schedule.boundaries
            assert [int(b) for b in drops] == [e * steps_per_epoch for e in (300, 375, 450)]
            if r.gated:
                assert r.gamma == (0.0 if name.startswith("l0_") else 0.75)
                assert (r.gamma_end * r.epochs, r.lam_begin * r.epochs, r.lam_end * r.epochs) == (100, 100, 300)
        if r.gated:
            assert r.target_macs in tradeoff.LONG_TARGETS


def test_long_and_paper_plans_refuse_the_short_sweeps_knobs(capsys):
    with pytest.raises(SystemExit):
        tradeoff.parse_args(["--budget", "paper", "--lams", "1,2", "--epochs", "3"])
    assert "--budget paper runs a fixed plan; --lams, --epochs apply to --budget short only" in capsys.readouterr().err


def test_only_runs_the_named_runs_in_the_given_order(tmp_path, capsys):
    root = str(tmp_path / "long")
    assert tradeoff.main(["--budget", "long", "--root", root, "--dry-run",
                          "--only", "l0_t0p55_s0,plain_half_w1_s1"]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 0 finished, 2 to do" in out
    listed = [line.split("] ")[1].split(":")[0] for line in out.splitlines() if line.startswith("  [")]
    assert listed == ["l0_t0p55_s0", "plain_half_w1_s1"]
    assert tradeoff.main(["--budget", "long", "--root", root, "--only", "l0_t0p55_s0,bas_l0_lam12_s0"]) == 2
    assert "no run named bas_l0_lam12_s0 in this plan" in capsys.readouterr().err


def test_runs_another_driver_finished_or_holds_are_skipped(tmp_path, capsys, monkeypatch):
    """Two drivers on one root: a run finished after this driver listed its
    runs, or locked by a live train.py, is skipped instead of trained twice."""
    from bs_keras.run_lock import RunLock

    root = tmp_path / "long"
    finished_later = str(root / "l0_t0p55_s0")
    seen = []

    def is_finished(run_dir):  # unfinished when listed, finished when its turn comes
        seen.append(run_dir)
        return run_dir == finished_later and seen.count(run_dir) > 1

    started = []
    monkeypatch.setattr(tradeoff, "is_finished", is_finished)
    monkeypatch.setattr(tradeoff.subprocess, "call", lambda cmd, **kw: started.append(cmd) or 1)
    held = RunLock(root / "plain_half_w1_s1").acquire()
    try:
        assert tradeoff.main(["--budget", "long", "--root", str(root), "--only",
                              "plain_half_w1_s1,l0_t0p55_s0"]) == 0
    finally:
        held.release()
    out = capsys.readouterr().out
    assert "plain_half_w1_s1: finished or running in another driver; skipped" in out
    assert "l0_t0p55_s0: finished or running in another driver; skipped" in out
    assert started == []
    # Unlocked and unfinished: it runs (the fake train.py fails, so the driver stops).
    assert tradeoff.main(["--budget", "long", "--root", str(root), "--only", "plain_half_w1_s1"]) == 1
    assert len(started) == 1


def _hand_macs(depth, height, channels, classes=10):
    """MACs of a plain CIFAR ResNet-`depth` (option-A shortcuts: no MACs) on
    height x height x channels inputs, from its layer shapes: H*W*k*k*Cin*Cout
    per 3x3 conv ('same' padding, stride 2 at the first conv of stages 2 and 3)
    plus the 64 x classes classifier."""
    n = (depth - 2) // 6
    macs, size, cin = height * height * 9 * channels * 16, height, 16  # the stem
    for stage, cout in enumerate((16, 32, 64)):
        for block in range(n):
            if stage and not block:
                size = -(-size // 2)
            macs += size * size * 9 * (cin * cout + cout * cout)
            cin = cout
    return macs + 64 * classes


def test_hand_mac_formula_is_the_published_resnet20_count_and_count_macs():
    assert _hand_macs(20, 32, 3) == 40_551_040  # ResNet-20 on CIFAR-10: 40.55 M MACs
    for depth in (20, 32, 56):
        assert tradeoff.plain_macs(depth, (28, 28, 1)) == _hand_macs(depth, 28, 1)


def test_depth_plan_trains_deep_gated_resnets_to_resnet20s_macs():
    """--budget depth: the paper's comparison at the long budget's 2,808
    steps; gated ResNet-N at MACs(ResNet-20) / MACs(ResNet-N) of its own
    ungated network; the decisive comparison of each seed first."""
    runs = tradeoff.plan_depth()
    names = [name for name, _ in runs]
    assert names == [
        "plain_r20_s0", "gated_r56_at_r20_s0", "distill_r56_at_r20_s0",
        "plain_r20_s1", "gated_r56_at_r20_s1", "distill_r56_at_r20_s1",
        "plain_r32_s0", "plain_r56_s0", "gated_r32_at_r20_s0",
        "levels_plain_r20_s0", "levels_gated_r56_at_r20_s0", "gated_r20_w2_t0p25_s0"]  # fmt: skip
    recipes = _resolved(runs)
    target = {d: round(_hand_macs(20, 28, 1) / _hand_macs(d, 28, 1), 3) for d in (32, 56)}
    assert target == {32: 0.587, 56: 0.322}
    sweep = train.resolve_recipe(train.parse_args(["--recipe", "fashion_mnist_sweep"])[1])
    for (name, flags), r in zip(runs, recipes.values()):
        depth = int(name.split("_r")[1].split("_")[0])
        assert r.model == f"resnet{depth}" and r.seed == tradeoff.name_seed(name)
        assert r.epochs * (r.limit_train // r.batch_size) == 6 * 468
        assert (r.lr, r.lr_schedule, r.weight_decay) == (0.1, "cosine", 5e-4)
        # Warm-up and zero-init residual are the recipe's, plain runs included.
        assert "--warmup" not in flags and "--zero-init-residual" not in flags
        assert (r.warmup, r.zero_init_residual) == (sweep.warmup, sweep.zero_init_residual)
        assert r.dataset == ("fashion_mnist_levels" if name.startswith("levels_") else "fashion_mnist")
        assert r.gated == ("plain" not in name)
        if "_at_r20" in name:
            assert r.target_macs == target[depth] and r.width_multiplier == 1.0
        assert (r.distill == "self") == name.startswith("distill_")
    distilled = dict(runs)["distill_r56_at_r20_s0"]
    assert distilled == dict(runs)["gated_r56_at_r20_s0"][:-2] + list(tradeoff.DEPTH_DISTILL) + ["--seed", "0"]
    wide = recipes["gated_r20_w2_t0p25_s0"]
    assert (wide.model, wide.width_multiplier, wide.target_macs) == ("resnet20", 2.0, 0.25)


def test_depth_dry_run_prints_the_mac_targets_and_skips_finished_runs(tmp_path, capsys):
    root = tmp_path / "depth"
    (root / "plain_r20_s0").mkdir(parents=True)
    (root / "plain_r20_s0" / "report.json").write_text(json.dumps({"evaluation": {}}))
    assert tradeoff.main(["--budget", "depth", "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 runs, 1 finished, 11 to do" in out
    assert "ResNet-20: 30.82 M MACs" in out and "ResNet-56: 95.85 M MACs; gated at ResNet-20's MACs: " \
        "--target-macs 0.322" in out
    assert "[done] plain_r20_s0" in out and "[todo] distill_r56_at_r20_s1: python train.py" in out
    assert tradeoff.main(["--budget", "depth", "--root", str(root), "--dry-run", "--families", "plain,distill",
                          "--seeds", "0", "--only", "distill_r56_at_r20_s0,plain_r56_s0"]) == 0
    listed = [line.split("] ")[1].split(":")[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  [")]
    assert listed == ["distill_r56_at_r20_s0", "plain_r56_s0"]
    assert tradeoff.main(["--budget", "depth", "--root", str(root), "--families", "plain",
                          "--only", "gated_r56_at_r20_s0"]) == 2
    with pytest.raises(SystemExit):
        tradeoff.parse_args(["--budget", "depth", "--families", "bas_l0"])
    assert "unknown ['bas_l0']; choose from plain, gated, distill, levels, wide" in capsys.readouterr().err


def test_depth_paper_plan_includes_resnet110(tmp_path, capsys):
    """--budget depth-paper: the depth plan with the paper's CIFAR-10 recipe;
    plain ResNet-20/32/56/110 and gated ResNet-32/56/110 at ResNet-20's MACs
    on 32x32x3 inputs; no levels family."""
    root = tmp_path / "paper"
    tfds = ["--data-dir", str(tmp_path / "tfds")]
    assert tradeoff.main(["--budget", "depth-paper", "--root", str(root), "--dry-run", *tfds]) == 0
    out = capsys.readouterr().out
    assert "ResNet-110: 252.89 M MACs" in out
    runs = tradeoff.plan_depth_paper(extra=tfds)
    for name, flags in runs:
        assert f"[todo] {name}: python train.py {' '.join(flags)}" in out
    recipes = _resolved(runs)
    assert {"plain_r110_s0", "gated_r110_at_r20_s0"} <= set(recipes)
    assert not any(name.startswith("levels_") for name in recipes)
    assert [name for name, _ in runs][:3] == ["plain_r20_s0", "gated_r56_at_r20_s0", "distill_r56_at_r20_s0"]
    for name, r in recipes.items():
        assert (r.dataset, r.epochs, r.batch_size) == ("cifar10", 500, 256)
        if "_at_r20" in name:
            depth = int(r.model[len("resnet"):])
            assert r.target_macs == round(_hand_macs(20, 32, 3) / _hand_macs(depth, 32, 3), 3)
    assert recipes["gated_r110_at_r20_s0"].target_macs == 0.16
    with pytest.raises(SystemExit):
        tradeoff.parse_args(["--budget", "depth-paper", "--families", "levels"])
    with pytest.raises(ValueError, match="no levels recipe"):
        tradeoff.plan_depth(("levels",), levels_recipe=None)
