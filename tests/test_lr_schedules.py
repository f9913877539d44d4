"""Learning-rate schedules with warm-up, against hand formulas; the recipes'
warm-up and zero-initialised residual branches (for deep ResNets)."""

import math

import keras
import numpy as np
import pytest

from bs_keras import lr_schedules, recipes, training
from bs_keras.gates import find_gates, gates_open
from bs_keras.lr_schedules import WarmUp, learning_rate

LR, TOTAL, WARM = 0.1, 1000, 20


def _values(schedule, steps):
    return np.array([float(keras.ops.convert_to_numpy(schedule(s))) if callable(schedule) else schedule
                     for s in steps])


def _hand(kind, step):
    """The schedules by hand: linear 0 -> peak over WARM steps, then each shape."""
    if kind == "cosine":  # Keras' cosine warm-up: the decay runs over the remaining steps
        if step < WARM:
            return LR * step / WARM
        return LR * 0.5 * (1 + math.cos(math.pi * min(step - WARM, TOTAL - WARM) / (TOTAL - WARM)))

    def base(s):
        if kind == "constant":
            return LR
        if kind == "step":  # drops after 50 % and 75 % (a boundary step keeps the rate before it)
            return LR * (1.0 if s <= 500 else 0.1 if s <= 750 else 0.01)
        return LR * (1 - min(s, TOTAL) / TOTAL) ** 0.9  # poly

    return base(WARM) * step / WARM if step < WARM else base(step)


STEPS = [0, 1, 5, 10, 19, 20, 21, 100, 500, 501, 750, 751, 999, 1000]


@pytest.mark.parametrize("kind", lr_schedules.SCHEDULES)
def test_every_schedule_warms_up_linearly_then_follows_its_shape(kind):
    schedule = learning_rate(kind, LR, TOTAL, warmup_steps=WARM, decay_at=(0.5, 0.75))
    np.testing.assert_allclose(_values(schedule, STEPS), [_hand(kind, s) for s in STEPS], rtol=1e-5, atol=1e-8)
    assert float(keras.ops.convert_to_numpy(schedule(0))) == 0.0


@pytest.mark.parametrize("kind", ["step", "poly", "constant"])
def test_without_warmup_the_schedules_are_unchanged(kind):
    plain = learning_rate(kind, LR, TOTAL, decay_at=(0.5, 0.75))
    assert not isinstance(plain, WarmUp)
    assert _values(plain, [0])[0] == pytest.approx(LR)


def test_warmup_round_trips_through_the_optimizer_config(tmp_path):
    schedule = learning_rate("step", LR, TOTAL, warmup_steps=WARM, decay_at=(0.5, 0.75))
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer, "mse")
    optimizer.build(model.trainable_variables)
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras").optimizer._learning_rate
    assert isinstance(restored, WarmUp) and restored.warmup_steps == WARM
    np.testing.assert_allclose(_values(restored, STEPS), _values(schedule, STEPS))


def test_warmup_arguments_are_checked():
    with pytest.raises(ValueError, match="warmup_steps must be a positive integer"):
        WarmUp(0.1, 0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        learning_rate("linear", LR, TOTAL)


def test_recipe_warmup_is_a_fraction_of_the_run_and_old_configs_load():
    recipe = recipes.get_recipe("fashion_mnist_sweep").replace(warmup=0.02, epochs=4)
    assert recipe.warmup_steps(125) == 10  # 2 % of 500 steps
    assert recipe.replace(warmup=0.0).warmup_steps(125) == 0
    assert recipe.replace(warmup=1e-6).warmup_steps(125) == 1  # never rounds to none
    lr = training.learning_rate(recipe.replace(lr_schedule="step"), 125)
    assert isinstance(lr, WarmUp) and lr.warmup_steps == 10
    old = {**recipes.get_recipe("imagenet_resnet50_bas").to_dict(), "warmup_epochs": 5.0}
    del old["warmup"]
    assert recipes.Recipe.from_dict(old).warmup == pytest.approx(5 / 150)
    with pytest.raises(ValueError, match="--warmup=1.0 is invalid"):
        recipe.replace(warmup=1.0).validate()


def test_zero_init_residual_defaults_on_from_resnet56_and_zeroes_each_branch_last_bn():
    from bs_keras.models import cifar_resnet

    base = recipes.get_recipe("fashion_mnist_demo")
    assert base.zero_init_residual is None
    assert [base.replace(model=m).resolved().zero_init_residual for m in ("resnet20", "resnet32", "resnet44")] == [
        False, False, False]
    assert [base.replace(model=m).resolved().zero_init_residual for m in ("resnet56", "resnet110")] == [True, True]
    assert base.replace(model="resnet110", zero_init_residual=False).resolved().zero_init_residual is False
    assert recipes.get_recipe("imagenet_resnet50_bas").resolved().zero_init_residual is True
    model = cifar_resnet(8, input_shape=(8, 8, 1), num_classes=3, zero_init_residual=True)
    bn2 = [layer for layer in model.layers if layer.name.endswith("_bn2")]
    assert len(bn2) == 3 and all(not layer.gamma.numpy().any() for layer in bn2)
    assert all(layer.gamma.numpy().all() for layer in model.layers if layer.name.endswith("_bn1"))
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype("float32")
    # Every block starts as its shortcut: the gates (open or not) change nothing yet.
    for gate in find_gates(model):  # close every gate at inference
        gate.logits_dense.bias.assign(np.full(gate.logits_dense.bias.shape, -5.0, "float32"))
    with gates_open():
        opened = model(x, training=False)
    np.testing.assert_allclose(model(x, training=False), opened, atol=1e-6)

