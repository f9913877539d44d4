"""bench/diagnose.py: its rows are valid one-change train.py runs, finished rows
are skipped, and the freeze modes move exactly the variables they say."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from bs_keras.cli import train
from bs_keras.gates import find_gates
from bs_keras.models import cifar_resnet
from bs_keras.recipes import RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("diagnose", os.path.join(ROOT, "bench", "diagnose.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


diagnose = _load()


def test_plan_rows_change_one_field_of_the_demo(tmp_path):
    rows = diagnose.plan(str(tmp_path))
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    demo = RECIPES["fashion_mnist_sweep"]  # every row starts from it
    changed = {}
    for r in rows:
        assert r["run_dir"] == os.path.join(str(tmp_path), r["name"])
        if r["kind"] != "train":
            continue
        assert r["argv"][0] == "train.py" and r["argv"][-2:] == ["--run-dir", r["run_dir"]]
        _, args = train.parse_args(r["argv"][1:])
        recipe = train.resolve_recipe(args)
        changed[r["name"]] = {k for k, v in recipe.to_dict().items() if v != demo.to_dict()[k]}
    assert changed["demo_s0"] == set()
    assert changed["plain_s0"] == {"gated"}
    assert changed["lam0_gamma0_s0"] == {"lam", "gamma"}
    assert changed["lam0_s1"] == {"lam", "seed"}
    assert changed["stop_gradient"] == {"gate_stop_gradient"}
    assert changed["lam_early_short"] == {"lam_begin", "lam_end"}
    assert changed["lam_long"] == {"lam_end"}  # lam_begin 0.2 is the demo's
    assert changed["l0_channels"] == {"l0_weighting"}
    assert changed["temp1"] == {"gate_temperature"}
    assert changed["bias1"] == {"gate_init_bias"}
    assert changed["hard0p8"] == {"hard_gates_begin"}
    assert changed["hard0p6"] == {"hard_gates_begin"}
    assert changed["target0p5"] == {"target_macs"}
    assert changed["target0p5_hard0p8"] == {"target_macs", "hard_gates_begin"}
    assert changed["early_hard0p6"] == {"lam_begin", "lam_end", "hard_gates_begin"}
    freeze = [r for r in rows if r["kind"] == "freeze"]
    assert [r["name"] for r in freeze] == [f"freeze_{m}" for m in diagnose.FREEZE_MODES]
    for r in freeze:
        assert os.path.join(str(tmp_path), "demo_s0", "last.keras") in r["argv"]


def test_the_demo_recipe_is_a_measured_row(tmp_path):
    """`python train.py` trains exactly the recipe of diagnose.DEMO_ROW, so the
    README can quote that row's result."""
    (row,) = [r for r in diagnose.plan(str(tmp_path)) if r["name"] == diagnose.DEMO_ROW]
    _, args = train.parse_args(row["argv"][1:])
    measured = train.resolve_recipe(args).to_dict()
    _, args = train.parse_args([])
    demo = train.resolve_recipe(args).to_dict()
    assert demo.pop("name") == "fashion_mnist_demo" and measured.pop("name") == "fashion_mnist_sweep"
    demo.pop("description"), measured.pop("description")
    assert demo == measured


def test_dry_run_marks_finished_rows(tmp_path, capsys):
    (tmp_path / "lam_long").mkdir()
    (tmp_path / "lam_long" / "report.json").write_text("{}")
    assert diagnose.main(["--root", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[done] lam_long: python train.py --recipe fashion_mnist_sweep --lam-begin 0.2 --lam-end 0.9" in out
    assert "[todo] demo_s0:" in out
    assert diagnose.main(["--root", str(tmp_path), "--only", "nope"]) == 2
    assert "unknown rows ['nope']" in capsys.readouterr().err


def test_write_table_from_reports(tmp_path):
    def report(name, acc, macs, extra):
        d = tmp_path / name
        d.mkdir()
        ev = {"accuracy": acc, "macs_ratio": macs, "gated": True,
              "gate_categories": {"always_on": 0.5, "conditional": 0.3, "always_off": 0.2}}
        (d / "report.json").write_text(json.dumps({**extra, "evaluation": ev}))

    recipe = {"limit_train": 16000, "batch_size": 128}
    report("demo_s0", 0.8, 0.52, {"recipe": recipe, "epochs_completed": 4})
    source = str(tmp_path / "demo_s0" / "last.keras")
    report("freeze_gates", 0.81, 0.5, {"freeze": {"steps": 250, "source": source}})
    out = tmp_path / "out"
    curve = tmp_path / "summary.json"

    def config(family, macs, acc):
        return {"family": family, "macs_ratio": {"mean": macs}, "accuracy": {"mean": acc}}

    curve.write_text(json.dumps({"configs": [config("bas_l0", 0.4, 0.70), config("bas_l0", 0.6, 0.80),
                                             config("plain", 0.5, 0.99)]}))
    diagnose.write_table(diagnose.plan(str(tmp_path)), str(tmp_path), str(out), str(curve))
    md = (out / "diagnosis.md").read_text()
    # Curve at 0.52: 0.70 + 0.6 * 0.10 = 0.76 (bas_l0 only); 0.80 - 0.76 = +0.04.
    assert "| demo_s0 | the sweep recipe (BAS + L0, lambda 12; the demo until 2026-12-03) | 0.8000 | 0.520 | 0.7600 | +0.0400 | 0.300 |" in md
    assert "| 500 + 250 |" in md
    data = json.loads((out / "diagnosis.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["demo_s0", "freeze_gates"]
    assert "plain_s0" in data["not_run"]


def _tiny():
    model = cifar_resnet(8, num_classes=3, input_shape=(16, 16, 3), seed=0, gate_kwargs={"init_bias": 0.5})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    return model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _moved(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


@pytest.mark.parametrize("mode", diagnose.FREEZE_MODES)
@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_freeze_modes_move_only_their_part(mode):
    model, ds = _tiny()
    gates = find_gates(model)
    gate_vars = {id(v) for g in gates for v in g.weights}
    gate_params = [v for g in gates for v in g.trainable_weights]  # dense kernels/biases, BN scale/offset
    backbone = [v for v in model.trainable_weights if id(v) not in gate_vars]
    kernels = [v for v in backbone if "kernel" in v.path]
    assert gate_params and kernels
    g0, b0 = _snapshot(gate_params), _snapshot(kernels)
    info = diagnose.freeze_finetune(model, mode, ds, 3, lr=0.05, lam=2.0)
    assert info["steps"] == 3
    gates_moved, backbone_moved = _moved(g0, gate_params), _moved(b0, kernels)
    if mode == "gates":
        assert any(gates_moved) and not any(backbone_moved)
    elif mode.startswith("backbone"):
        assert all(backbone_moved) and not any(gates_moved)
    else:
        assert any(gates_moved) and all(backbone_moved)


def _gate_inputs(gate):
    rng = np.random.default_rng(1)
    return [rng.normal(size=(8, *t.shape[1:])).astype("float32") for t in gate.input]


def test_hard_gates_train_with_their_inference_decisions():
    model, _ = _tiny()
    diagnose.set_trainable(model, "backbone_hard")
    gate = find_gates(model)[0]
    inputs = _gate_inputs(gate)
    hard = gate(inputs, training=False)
    for _ in range(2):  # no sampling: the same output on every training call, and no gate loss
        np.testing.assert_array_equal(gate(inputs, training=True), hard)
    assert not gate.losses
    model2, _ = _tiny()
    diagnose.set_trainable(model2, "backbone")  # frozen but sampled: the training gate is noisy
    gate2 = find_gates(model2)[0]
    assert not np.array_equal(gate2(inputs, training=True), gate2(inputs, training=False))


def test_freeze_refuses_an_ungated_model():
    model = cifar_resnet(8, num_classes=3, input_shape=(16, 16, 3), gated=False)
    with pytest.raises(ValueError, match="no ChannelGate"):
        diagnose.set_trainable(model, "gates")
    with pytest.raises(ValueError, match="mode must be one of"):
        diagnose.set_trainable(model, "all")


@pytest.mark.slow
def test_freeze_cli_on_a_tiny_run_writes_a_report(tiny_gated_run, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    assert tiny_gated_run.returncode == 0, tiny_gated_run.stderr[-3000:]
    run = tiny_gated_run.run_dir  # the session's shared run: --lam 2, 64 held-out images
    out = tmp_path / "freeze"
    result = subprocess.run(
        [sys.executable, "bench/diagnose.py", "freeze", "--source", str(run / "last.keras"), "--mode", "gates",
         "--steps", "3", "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["freeze"]["steps"] == 3 and report["freeze"]["mode"] == "gates"
    assert report["freeze"]["lam"] == 2.0
    # All gates open costs a little more than the plain network (the gate MLPs).
    assert report["evaluation"]["num_samples"] == 64 and 0 < report["evaluation"]["macs_ratio"] <= 1.01
    result = subprocess.run([sys.executable, "bench/diagnose.py", "freeze", "--source", str(tmp_path / "x.keras"),
                             "--mode", "gates", "--out-dir", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "give the last.keras of a finished train.py run" in result.stderr
