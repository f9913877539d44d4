"""The schedule and gate flags of train.py (--lam-begin, --lam-end, --gamma-end,
--gate-temperature, --gate-init-bias) reach the built model, `add_gates` and the
gate-loss schedule, and bad values are refused naming the flag."""

import json

import keras
import numpy as np
import pytest

import bs_keras
from bs_keras import recipes, training
from bs_keras.cli import train as train_cli
from bs_keras.models import cifar_resnet

INFO = type("Info", (), {"image_shape": (16, 16, 1), "num_classes": 10})()
SMALL = ["--recipe", "fashion_mnist_sweep", "--width-multiplier", "0.25"]


def _recipe(*flags):
    _, args = train_cli.parse_args([*SMALL, *flags])
    return train_cli.resolve_recipe(args)


def _bias(gate):
    return gate.logits_dense.bias.numpy()


def test_gate_temperature_and_init_bias_reach_every_built_gate_and_the_config(tmp_path):
    recipe = _recipe("--gate-temperature", "1.0", "--gate-init-bias", "-0.5", "--gate-noise", "0")
    gates = bs_keras.find_gates(training.build_model(recipe, INFO))
    assert len(gates) == 9
    for g in gates:
        assert g.get_config()["temperature"] == 1.0
        assert g.get_config()["noise"] == 0.0
        np.testing.assert_array_equal(_bias(g), -0.5)
    default = bs_keras.find_gates(training.build_model(_recipe(), INFO))
    assert default[0].temperature == pytest.approx(2 / 3)
    assert default[0].noise == 1.0
    np.testing.assert_array_equal(_bias(default[0]), 3.0)
    # The resolved config of the run records them (and resuming with others is refused).
    training.prepare_run_dir(str(tmp_path / "run"), recipe, {})
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]
    assert saved["gate_temperature"] == 1.0 and saved["gate_init_bias"] == -0.5 and saved["gate_noise"] == 0.0
    with pytest.raises(training.RunError, match="gate_init_bias, gate_noise, gate_temperature"):
        training.prepare_run_dir(str(tmp_path / "run"), _recipe(), {})


def test_gate_flags_reach_add_gates_with_gate_from(tmp_path):
    plain = cifar_resnet(20, num_classes=10, input_shape=(16, 16, 1), gated=False, width_multiplier=0.25)
    path = str(tmp_path / "plain.keras")
    plain.save(path)
    recipe = _recipe("--gate-from", path, "--gate-temperature", "0.4", "--gate-init-bias", "1.5")
    gates = bs_keras.find_gates(training.build_model(recipe, INFO))
    assert gates and all(g.temperature == pytest.approx(0.4) for g in gates)
    assert all(np.all(_bias(g) == 1.5) for g in gates)
    # --gate-init-macs starts the added gates half open too.
    recipe = _recipe("--gate-from", path, "--gate-init-bias", "1.5", "--gate-init-macs", "0.5")
    for g in bs_keras.find_gates(training.build_model(recipe, INFO)):
        assert (_bias(g) == 1.5).sum() == (_bias(g) == -1.5).sum() == g.num_gates // 2, g.name


@pytest.mark.parametrize("lam_begin, lam_end, gamma_end", [(0.0, 0.3, 0.2), (0.2, 0.9, 0.2), (0.5, 0.5, 0.05)])
def test_schedule_fractions_set_the_gate_loss_weights_at_each_step(lam_begin, lam_end, gamma_end):
    recipe = _recipe("--lam-begin", str(lam_begin), "--lam-end", str(lam_end), "--gamma-end", str(gamma_end))
    assert (recipe.lam_begin, recipe.lam_end, recipe.gamma_end) == (lam_begin, lam_end, gamma_end)
    model = training.build_model(recipe, INFO)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    callback = training.gate_callback(recipe)
    callback.set_model(model)
    steps = 125
    callback.set_params({"epochs": recipe.epochs, "steps": steps})
    callback.on_train_begin()
    gates = bs_keras.find_gates(model)
    for step in (0, 10, 60, 100, 150, 240, 300, 420, 499):
        epoch, batch = divmod(step, steps)
        callback.on_epoch_begin(epoch)
        callback.on_train_batch_begin(batch)
        t = step / steps  # epochs
        ramp = np.clip((t - lam_begin * recipe.epochs) / max((lam_end - lam_begin) * recipe.epochs, 1e-12), 0, 1)
        if lam_end == lam_begin:
            ramp = float(t >= lam_begin * recipe.epochs)
        anneal = max(0.0, 1 - t / (gamma_end * recipe.epochs))
        lam = sum(float(g.l0_coef.numpy()) for g in gates)
        gamma = sum(float(g.bs_coef.numpy()) for g in gates)
        assert lam == pytest.approx(recipe.lam * ramp, rel=1e-5, abs=1e-5), step
        assert gamma == pytest.approx(recipe.gamma * anneal, rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lam-begin", "0.7"], "--lam-begin=0.7 is invalid: must be <= --lam-end (0.0)"),
        (["--lam-end", "1.5"], "--lam-end=1.5 is invalid: must be between 0 and 1"),
        (["--lam-begin", "-0.1"], "--lam-begin=-0.1 is invalid: must be between 0 and 1"),
        (["--gamma-end", "2"], "--gamma-end=2.0 is invalid: must be between 0 and 1"),
        (["--gate-temperature", "0"], "--gate-temperature=0.0 is invalid: must be a finite number > 0"),
        (["--gate-temperature", "inf"], "--gate-temperature=inf is invalid"),
        (["--gate-init-bias", "nan"], "--gate-init-bias=nan is invalid: must be a finite number"),
        (["--gate-noise", "-1"], "--gate-noise=-1.0 is invalid: must be a finite number >= 0"),
        (["--gate-init-macs", "0"], "--gate-init-macs=0.0 is invalid: the starting conditional MAC ratio"),
        (["--gate-init-macs", "1.5"], "--gate-init-macs=1.5 is invalid: the starting conditional MAC ratio"),
        (["--gate-init-macs", "nan"], "--gate-init-macs=nan is invalid"),
        (["--gate-init-macs", "0.5", "--plain"], "--gate-init-macs=0.5 is invalid: sets where the gates start: "
         "drop --plain"),
    ],
)
def test_bad_schedule_and_gate_values_name_the_flag(flags, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main([*flags, "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_the_short_recipes_train_deterministic_gates_and_the_paper_recipes_sample_them():
    # Generic (folders, other TFDS names) and the demo: --gate-noise 0, measured better at 140, 500
    # and 1,050 steps.
    generic = recipes.default_recipe_for("/data/my_folder").validate()
    assert generic.gate_noise == 0.0 and recipes.default_recipe_for("fashion_mnist").gate_noise == 0.0
    gates = bs_keras.find_gates(training.build_model(generic.replace(model="resnet20"), INFO))
    assert gates and all(g.noise == 0.0 for g in gates)
    for name in ("fashion_mnist_sweep", "fashion_mnist_levels_sweep", "cifar10_resnet20_bas", "imagenet_resnet50_bas",
                 "cityscapes_pspnet50_bas"):
        assert recipes.RECIPES[name].gate_noise == 1.0, name
        assert "noise" not in recipes.RECIPES[name].gate_kwargs
    # A run recorded before the flag existed resumes with binary concrete, as it trained.
    old = {k: v for k, v in generic.to_dict().items() if k != "gate_noise"}
    assert recipes.Recipe.from_dict(old).gate_noise == 1.0


def test_gate_init_macs_starts_each_gate_layer_half_open_and_defaults_to_a_budget_held_from_step_0(tmp_path):
    recipe = _recipe("--gate-init-macs", "0.5", "--gate-init-bias", "2")
    for g in bs_keras.find_gates(training.build_model(recipe, INFO)):
        bias = _bias(g)
        assert sorted(set(bias.tolist())) == [-2.0, 2.0]
        assert (bias > 0).sum() == round(0.5 * g.num_gates), g.name  # this model's closed ratio is ~0.004
    training.prepare_run_dir(str(tmp_path / "run"), recipe.resolved(), {})
    assert json.loads((tmp_path / "run" / "config.json").read_text())["recipe"]["gate_init_macs"] == 0.5
    # Defaults: every gate open, unless a budget holds its target from the first step.
    assert _recipe().resolved().gate_init_macs == 1.0
    np.testing.assert_array_equal(_bias(bs_keras.find_gates(training.build_model(_recipe(), INFO))[0]), 3.0)
    assert _recipe("--target-macs", "0.5").resolved().gate_init_macs == 1.0  # ramped target (lam_end 0.4)
    held = _recipe("--target-macs", "0.3", "--lam-begin", "0", "--lam-end", "0").resolved()
    assert held.gate_init_macs == 0.3
    assert _recipe("--target-macs", "0.3", "--lam-end", "0", "--lam-begin", "0",
                   "--gate-init-macs", "1").resolved().gate_init_macs == 1.0
    generic = recipes.default_recipe_for("/data/my_folder").validate()
    assert (generic.lam_begin, generic.lam_end, generic.resolved().gate_init_macs) == (0.0, 0.0, 0.5)
    assert generic.replace(target_macs=0.7).resolved().gate_init_macs == 0.7
    for name in ("fashion_mnist_sweep", "cifar10_resnet20_bas", "imagenet_resnet50_bas"):
        assert recipes.RECIPES[name].resolved().gate_init_macs == 1.0, name
    demo = recipes.RECIPES["fashion_mnist_demo"]  # the demo starts at its target too
    assert (demo.lam_end, demo.resolved().gate_init_macs, demo.resolved().gate_init_bias) == (0.0, 0.5, 1.0)
    # A resolved plain recipe (which records 1) validates again, e.g. on resume.
    plain = recipes.RECIPES["fashion_mnist_sweep"].replace(gated=False).validate().resolved()
    assert plain.gate_init_macs == 1.0 and plain.validate() is plain
    # A run recorded before the field existed resumes as it trained: every gate open.
    old = {k: v for k, v in generic.resolved().to_dict().items() if k not in ("gate_init_macs", "gate_noise")}
    upgraded = recipes.upgrade(old)
    assert (upgraded["gate_init_macs"], upgraded["gate_noise"]) == (1.0, 1.0)


def test_an_unreachable_gate_start_names_the_flag_and_leaves_no_config_behind(tmp_path, capsys):
    """The start is checked on the built model (the MACs no gate controls):
    the run stops before training, says which flag, and a fresh run directory
    keeps no config.json, so the corrected command starts cleanly."""
    from data_fixtures import write_image_folder

    rng = np.random.default_rng(0)
    folder = write_image_folder(
        tmp_path / "folder", {c: list(rng.integers(0, 255, (8, 16, 16, 1), dtype=np.uint8)) for c in ("a", "b")})
    run_dir = tmp_path / "run"
    flags = ["--dataset", str(folder), "--epochs", "1", "--batch-size", "4",
             "--width-multiplier", "0.25", "--run-dir", str(run_dir)]
    assert train_cli.main([*flags, "--gate-init-macs", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "--gate-init-macs 0.001 cannot be set up" in err and "still executes" in err, err
    assert not (run_dir / "config.json").exists()
    assert train_cli.main([*flags, "--gate-init-macs", "0.5"]) == 0  # the fixed command, same --run-dir
    assert json.loads((run_dir / "config.json").read_text())["recipe"]["gate_init_macs"] == 0.5
