import keras
import numpy as np
import pytest

import bs_keras
from bs_keras import macs
from bs_keras.models import cifar_resnet
from bs_keras.schedules import Constant, Linear, Schedule


def _quadrant_task(n=256, size=16, seed=0):
    """Class = the quadrant holding a bright square: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, 4, size=(n,))
    half = size // 2
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, r * half + 2 : r * half + 6, q * half + 2 : q * half + 6, :] += 2.0
    return x, y


def _compiled(lr=0.05, **kwargs):
    model = cifar_resnet(8, num_classes=4, input_shape=(16, 16, 3), seed=0, **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


LOG_KEYS = ("gamma", "lam", "bs_loss", "l0_loss", "gate_open_rate", "cond_macs", "cond_macs_ratio")


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_fit_with_scheduler_lowers_loss_and_logs_gate_terms():
    x, y = _quadrant_task()
    model = _compiled()
    gamma, lam = bs_keras.paper_schedules(5, gamma=0.75, lam=0.1)
    history = model.fit(
        x, y, batch_size=32, epochs=5, verbose=0,
        callbacks=[bs_keras.GateLossScheduler(gamma, lam)],
    )
    h = history.history
    assert h["loss"][-1] < 0.6 * h["loss"][0]
    assert h["accuracy"][-1] > 0.8
    for key in LOG_KEYS:
        if key != "bs_loss":
            assert key in h and len(h[key]) == 5, key
    # gamma is annealed to 0 at epoch 1 (gamma_end=0.2): computed, and logged, in epoch 0 only.
    assert gamma(1.0) == 0 and len(h["bs_loss"]) == 1 and np.isfinite(h["bs_loss"][0])
    # Epoch-end values are those at the last batch: t = epoch + 7/8.
    for epoch in range(5):
        t = epoch + 7 / 8
        assert h["gamma"][epoch] == pytest.approx(gamma(t))
        assert h["lam"][epoch] == pytest.approx(lam(t))
    assert all(0 <= v <= 1 for v in h["gate_open_rate"])
    static = macs.count_macs(model)
    for m, r in zip(h["cond_macs"], h["cond_macs_ratio"]):
        assert m == pytest.approx(r * static)
    # The coefficients in the gates are gamma(t) * share, shares summing to 1.
    gates = bs_keras.find_gates(model)
    assert sum(float(g.l0_coef) for g in gates) == pytest.approx(lam(4 + 7 / 8), rel=1e-5)
    assert sum(float(g.bs_coef) for g in gates) == pytest.approx(gamma(4 + 7 / 8), abs=1e-7)


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_gate_terms_absent_while_gamma_is_0_and_task_loss_is_the_loss_without_them(tmp_path):
    import csv

    from bs_keras.callbacks import RunCSVLogger

    x, y = _quadrant_task(n=64)
    xv, yv = _quadrant_task(n=32, seed=1)
    model = cifar_resnet(8, num_classes=4, input_shape=(16, 16, 3), seed=0)  # no weight decay
    task_loss = keras.metrics.SparseCategoricalCrossentropy(name="task_loss")
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", metrics=["accuracy", task_loss])
    # 2 steps an epoch at t = epoch + {0, 0.5}: gamma 0.5 in epochs 0-1, 0 in epochs 2-3.
    gamma, lam = Linear(0.5, 0.0, 1.5, 2.0), 0.2
    seen = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(dict(logs)))
    history = model.fit(
        x, y, batch_size=32, epochs=4, verbose=0, validation_data=(xv, yv),
        callbacks=[bs_keras.GateLossScheduler(gamma, lam), record, RunCSVLogger(tmp_path / "log.csv")],
    )  # fmt: skip
    h = history.history
    assert all(np.isfinite(v).all() for v in h.values()), h
    assert ["bs_loss" in logs for logs in seen] == [True, True, False, False]
    assert len(h["bs_loss"]) == 2 and len(h["task_loss"]) == 4
    for logs in seen:
        # Keras' loss = crossentropy + the gates' add_loss terms (linear in
        # the logged means, gamma and lam being constant within each epoch).
        gates = logs["lam"] * logs["l0_loss"] + logs["gamma"] * logs.get("bs_loss", 0.0)
        assert logs["loss"] - logs["task_loss"] == pytest.approx(gates, rel=1e-4, abs=1e-6)
        assert logs["val_loss"] == pytest.approx(logs["val_task_loss"], rel=1e-5)  # no gate loss in inference
    # The last validation ran with the final weights: an independent crossentropy.
    probs = model.predict(xv, verbose=0).astype("float64")
    expected = -np.mean(np.log(np.clip(probs[np.arange(len(yv)), yv], 1e-7, 1.0)))
    assert h["val_task_loss"][-1] == pytest.approx(expected, rel=1e-4)

    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["bs_loss"] != "" for r in rows] == [True, True, False, False]
    assert not any(v.lower() in ("nan", "na") for r in rows for v in r.values())
    assert float(rows[3]["task_loss"]) == pytest.approx(h["task_loss"][3])


def test_run_csv_logger_adds_a_column_for_a_key_that_appears_later(tmp_path):
    from bs_keras.callbacks import RunCSVLogger

    path = tmp_path / "log.csv"
    RunCSVLogger(path).on_epoch_end(0, {"loss": 1.0, "gamma": 0.0})
    logger = RunCSVLogger(path)  # a resumed run
    logger.on_epoch_end(1, {"loss": 0.5, "gamma": 0.1, "bs_loss": np.float32(0.25)})
    logger.on_epoch_end(2, {"loss": 0.25, "gamma": 0.0})
    assert path.read_text().splitlines() == [
        "epoch,bs_loss,gamma,loss",
        "0,,0.0,1.0",
        "1,0.25,0.1,0.5",
        "2,,0.0,0.25",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_logged_conditional_macs_match_the_gates():
    x, y = _quadrant_task(n=64)
    model = _compiled(lr=0.0)
    for gate in bs_keras.find_gates(model):
        kernel, _ = gate.logits_dense.get_weights()
        # Closed for every input and every noise draw that matters.
        gate.logits_dense.set_weights([kernel * 0, np.full(gate.num_gates, -30.0, "float32")])
    history = model.fit(
        x, y, batch_size=32, epochs=1, verbose=0,
        callbacks=[bs_keras.GateLossScheduler(0.0, 0.0)],
    )
    expected = macs.conditional_macs(model, x[:4])
    np.testing.assert_allclose(expected, expected[0])
    assert history.history["gate_open_rate"][0] == 0.0
    assert history.history["cond_macs"][0] == pytest.approx(expected[0])
    assert history.history["cond_macs_ratio"][0] < 0.3


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_l0_alone_drives_the_open_rate_down():
    x, y = _quadrant_task(n=128)
    model = _compiled(lr=0.05, gate_kwargs={"init_bias": 1.0})
    history = model.fit(
        x, y, batch_size=32, epochs=6, verbose=0,
        callbacks=[bs_keras.GateLossScheduler(0.0, 20.0)],
    )
    rates = history.history["gate_open_rate"]
    assert "bs_loss" not in history.history  # gamma = 0: not computed, not logged
    assert rates[-1] < rates[0] - 0.1  # measured drops: 0.19-0.22
    assert history.history["cond_macs_ratio"][-1] < history.history["cond_macs_ratio"][0]


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_step_unit_schedule_and_bad_schedule_values():
    x, y = _quadrant_task(n=64)
    model = _compiled()
    lam = Linear(0.0, 1.0, 0, 4, unit="step")
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0,
        callbacks=[bs_keras.GateLossScheduler(0.0, lam)],
    )
    # 4 steps an epoch; before the last batch of epoch 0 the step is 3.
    assert history.history["lam"] == pytest.approx([0.75, 1.0])

    class Broken(Schedule):
        def __call__(self, t):
            return float("nan")

        def get_config(self):
            return {}

    with pytest.raises(ValueError, match="gamma schedule returned nan"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[bs_keras.GateLossScheduler(Broken(), 0.0)])
    with pytest.raises(ValueError, match="l0_weighting"):
        bs_keras.GateLossScheduler(0.0, 0.0, l0_weighting="flops")


def test_scheduler_on_a_model_without_gates_fails_clearly():
    model = cifar_resnet(8, input_shape=(16, 16, 3), gated=False, num_classes=4)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = _quadrant_task(n=16)
    with pytest.raises(ValueError, match="no ChannelGate"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[bs_keras.GateLossScheduler(Constant(0.5), 0.0)])


def test_clipnorm_bounds_the_step_of_a_gradient_spike():
    from bs_keras import recipes, training

    base = recipes.get_recipe("fashion_mnist_sweep").replace(lr_schedule="constant", lr=0.1, momentum=0.0,
                                                              warmup=0.0)  # step 0 of a warm-up has lr 0
    steps = {}
    for clip in (None, 10.0):
        recipe = base.replace(clipnorm=clip) if clip else base
        opt = training.build_optimizer(recipe.validate(), steps_per_epoch=10)
        v = keras.Variable(np.zeros(4, np.float32))
        opt.apply_gradients([(np.full(4, 300.0, np.float32), v)])  # global norm 600
        steps[clip] = float(np.linalg.norm(v.numpy()))
    assert steps[None] == pytest.approx(0.1 * 600.0)
    assert steps[10.0] == pytest.approx(0.1 * 10.0)
    with pytest.raises(ValueError, match="--clipnorm=0.0 is invalid"):
        base.replace(clipnorm=0.0).validate()


@pytest.mark.slow  # 5-30 s on 2 busy cores (pytest --durations, 2026-12-05)
def test_build_for_fit_traces_the_train_step_once_and_trains_the_same():
    import tensorflow as tf

    from bs_keras.training import build_for_fit

    x, y = _quadrant_task(n=64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    traces, losses = {}, {}
    for prebuilt in (False, True):
        keras.utils.set_random_seed(0)  # same weights and gate noise in both runs
        model = _compiled()
        calls, step = [], model.train_step
        model.train_step = lambda data, calls=calls, step=step: (calls.append(1), step(data))[1]
        if prebuilt:
            build_for_fit(model, ds.element_spec)
            assert model.optimizer.built and all(m.variables for m in model.metrics)
        losses[prebuilt] = model.fit(ds, epochs=2, verbose=0, shuffle=False).history["loss"]
        traces[prebuilt] = len(calls)  # train_step runs in Python only while tracing
    # Keras without a strategy creates the optimizer slots and metric variables in
    # the first trace, so tf.function traces again; pre-built: once.
    assert traces[True] == 1 < traces[False]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
