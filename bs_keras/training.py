"""Training runs: model, optimizer, strategy, run directory, resume, report.

`train.py` parses flags into a `Recipe` and calls `train(...)` or
`evaluate(...)`; everything else lives here.

A run directory holds `config.json` (the resolved recipe and runtime),
`logs/` (TensorBoard), `log.csv`, `last.keras`, `best.keras`, `state/`
(weights + optimizer of the last completed epoch, for resume) and, at the
end, `report.json`, `per_sample.npz` and two PNG plots.
"""

import json
import math
import os
import platform
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import bs_keras
from bs_keras import data as data_lib
from bs_keras import report as report_lib
from bs_keras.callbacks import GateLossScheduler
from bs_keras.gates import find_gates
from bs_keras.models import cifar_resnet, imagenet_resnet
from bs_keras.schedules import paper_schedules

STRATEGIES = ("auto", "cpu", "mirrored", "multi_worker", "tpu")
EXIT_NAN = 3


class RunError(Exception):
    """A problem with the run that the user must fix; printed without a traceback."""


# ----------------------------------------------------------------- strategy


def make_strategy(name):
    """The `tf.distribute` strategy for `--strategy NAME`."""
    if name not in STRATEGIES:
        raise RunError(f"--strategy={name!r} is invalid: choose one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if name == "cpu":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise RunError(
                "--strategy multi_worker needs the TF_CONFIG environment variable "
                "(cluster addresses and this worker's index), e.g. "
                'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}\'.'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.NotFoundError) as e:
        raise RunError(f"--strategy tpu: no TPU found ({e}). Run on a TPU VM or pick another strategy.")
    return tf.distribute.TPUStrategy(resolver)


def _worker_info(strategy):
    """(is_chief, task_index) for this process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id
    chief = task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )
    return chief, task_id or 0


# -------------------------------------------------------------- model/optim


def build_model(recipe, info):
    """The recipe's model for a dataset's input shape and class count."""
    depth = int(recipe.model.replace("resnet", ""))
    kwargs = dict(
        num_classes=info.num_classes,
        input_shape=tuple(info.image_shape),
        gated=recipe.gated,
        width_multiplier=recipe.width_multiplier,
        weight_decay=recipe.weight_decay,
        gamma=recipe.gamma,
        lam=0.0,
        l0_weighting=recipe.l0_weighting,
        gate_kwargs={"prior_a": recipe.prior_a, "prior_b": recipe.prior_b, "group_size": recipe.group_size},
        seed=recipe.seed,
    )
    if depth in (18, 34, 50):
        return imagenet_resnet(depth, **kwargs)
    return cifar_resnet(depth, **kwargs)


def learning_rate(recipe, steps_per_epoch):
    """A Keras LearningRateSchedule over optimizer steps."""
    total = recipe.epochs * steps_per_epoch
    if recipe.lr_schedule == "constant":
        return recipe.lr
    if recipe.lr_schedule == "step":
        bounds = sorted({max(1, int(round(f * total))) for f in recipe.lr_decay_at if 0 < f < 1})
        values = [recipe.lr * recipe.lr_decay_factor**i for i in range(len(bounds) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)
    if recipe.lr_schedule == "poly":
        return keras.optimizers.schedules.PolynomialDecay(recipe.lr, max(1, total), 0.0, power=0.9)
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, max(1, total - warmup), warmup_target=recipe.lr, warmup_steps=warmup
        )
    return keras.optimizers.schedules.CosineDecay(recipe.lr, max(1, total))


def build_optimizer(recipe, steps_per_epoch):
    lr = learning_rate(recipe, steps_per_epoch)
    if recipe.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    return keras.optimizers.SGD(lr, momentum=recipe.momentum, nesterov=recipe.nesterov)


def gate_callback(recipe):
    gamma, lam = paper_schedules(
        recipe.epochs,
        gamma=recipe.gamma,
        lam=recipe.lam,
        gamma_end=recipe.gamma_end,
        lam_begin=recipe.lam_begin,
        lam_end=recipe.lam_end,
    )
    return GateLossScheduler(gamma, lam, l0_weighting=recipe.l0_weighting)


# ---------------------------------------------------------------- callbacks


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss; checkpoints skip that epoch."""

    def __init__(self):
        super().__init__()
        self.bad = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad = (self._epoch, batch, float(loss))
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


class RunCheckpoint(keras.callbacks.Callback):
    """Saves, after every completed epoch, atomically and in this order:
    `last.keras`, `best.keras` (when `monitor` improved), the resume state
    (`state/epoch-N.weights.h5`: weights and optimizer) and `state/state.json`
    (epoch, best value) that points at it. A crash at any moment leaves a
    consistent state: the newest `state.json` and the files it names.
    """

    def __init__(self, run_dir, nan_guard, monitor="val_accuracy", write=True):
        super().__init__()
        self.run_dir = run_dir
        self.nan_guard = nan_guard
        self.monitor = monitor
        self.write = write
        self.state = load_state(run_dir) or {"epoch": 0, "best": None, "best_epoch": None}

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_guard.bad is not None:
            return
        logs = logs or {}
        value = logs.get(self.monitor)
        improved = value is not None and (self.state["best"] is None or value > self.state["best"])
        if not self.write:
            return
        save_model(self.model, os.path.join(self.run_dir, "last.keras"))
        if improved:
            save_model(self.model, os.path.join(self.run_dir, "best.keras"))
            self.state.update(best=float(value), best_epoch=epoch + 1)
        state_dir = os.path.join(self.run_dir, "state")
        os.makedirs(state_dir, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        tmp = os.path.join(state_dir, f"tmp-{os.getpid()}.weights.h5")
        self.model.save_weights(tmp)
        os.replace(tmp, os.path.join(state_dir, name))
        self.state.update(epoch=epoch + 1, weights=name, monitor=self.monitor)
        report_lib.write_json(os.path.join(state_dir, "state.json"), self.state)
        for old in os.listdir(state_dir):
            if old.endswith(".weights.h5") and old != name:
                os.remove(os.path.join(state_dir, old))


class GateTensorBoard(keras.callbacks.Callback):
    """Per-layer gate open rates as TensorBoard histograms and scalars."""

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "gates"))
        self._rates = None

    def on_train_batch_end(self, batch, logs=None):
        values = [g.stats.values() for g in find_gates(self.model)]
        if all(v is not None for v in values):
            self._rates = [v["open_rate"] for v in values]

    def on_epoch_end(self, epoch, logs=None):
        if self._rates is None:
            return
        with self.writer.as_default(step=epoch):
            tf.summary.histogram("open_rate_per_layer", np.asarray(self._rates))
            for gate, rate in zip(find_gates(self.model), self._rates):
                tf.summary.scalar(f"open_rate/{gate.name}", rate)
        self.writer.flush()


# ------------------------------------------------------------------ run dir


def save_model(model, path):
    """`model.save` to a temporary name, then rename: never half a file."""
    tmp = f"{path[: -len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    os.replace(tmp, path)


def load_state(run_dir):
    path = os.path.join(run_dir, "state", "state.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _versions():
    import tensorflow_probability as tfp

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_probability": tfp.__version__,
        "bs_keras": bs_keras.__version__,
    }


def prepare_run_dir(run_dir, recipe, runtime, overwrite=False):
    """Creates the run directory or checks that it holds this same run.

    Returns the saved state (None for a fresh run).
    """
    config_path = os.path.join(run_dir, "config.json")
    if overwrite and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
        if saved.get("recipe") != recipe.to_dict():
            diff = sorted(
                k for k in set(saved.get("recipe", {})) | set(recipe.to_dict())
                if saved.get("recipe", {}).get(k) != recipe.to_dict().get(k)
            )
            raise RunError(
                f"{run_dir} holds a run with different settings ({', '.join(diff)}). "
                "Resume it with the same flags, choose another --run-dir, or pass --overwrite."
            )
        return load_state(run_dir)
    if os.path.exists(run_dir) and os.listdir(run_dir):
        raise RunError(
            f"{run_dir} exists and is not a bs_keras run directory (no config.json). "
            "Choose another --run-dir or pass --overwrite."
        )
    os.makedirs(run_dir, exist_ok=True)
    report_lib.write_json(config_path, {"recipe": recipe.to_dict(), "runtime": runtime})
    return None


# -------------------------------------------------------------------- train


def _limited(ds, limit, batch_size):
    if limit is None:
        return ds
    return ds.take(max(1, limit // batch_size))


def _steps(examples, limit, batch_size, drop_remainder):
    n = examples if limit is None else min(examples, limit)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    return max(1, steps)


def train(
    recipe,
    run_dir,
    *,
    data_dir=None,
    manual_dir=None,
    strategy="auto",
    mixed_precision=False,
    jit_compile=False,
    overwrite=False,
    verbose=None,
    log=print,
):
    """Trains (or resumes) a run and writes its report. Returns the report.

    Raises:
        RunError: a problem the user must fix (message says how).
        SystemExit(3): the loss became NaN; the last good checkpoint is kept.
    """
    recipe.validate()
    strategy_obj = make_strategy(strategy)
    is_chief, task = _worker_info(strategy_obj)
    if not is_chief:
        run_dir = os.path.join(run_dir, f"worker-{task}")
    runtime = {
        "strategy": strategy,
        "replicas": strategy_obj.num_replicas_in_sync,
        "mixed_precision": bool(mixed_precision),
        "jit_compile": bool(jit_compile),
        "data_dir": data_dir,
        "manual_dir": manual_dir,
        "versions": _versions(),
        "command": sys.argv,
    }
    state = prepare_run_dir(run_dir, recipe, runtime, overwrite=overwrite)
    done_epochs = state["epoch"] if state else 0
    if done_epochs >= recipe.epochs and os.path.exists(os.path.join(run_dir, "report.json")):
        with open(os.path.join(run_dir, "report.json")) as f:
            report = json.load(f)
        log(f"{run_dir} is complete ({done_epochs} epochs); its report:")
        log(report_lib.format_summary(report["evaluation"]))
        return report

    keras.utils.set_random_seed(recipe.seed)
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    source = data_lib.get_dataset(
        recipe.dataset,
        data_dir=data_dir,
        manual_dir=manual_dir,
        image_size=recipe.image_size,
        validation_split=recipe.validation_split,
        seed=recipe.seed,
    )
    info = source.info
    steps_per_epoch = _steps(info.train_examples, recipe.limit_train, recipe.batch_size, True)
    if info.train_examples < recipe.batch_size:
        raise RunError(
            f"--batch-size={recipe.batch_size} is larger than the {info.train_examples} "
            f"training examples of {recipe.dataset}; use a smaller batch."
        )
    train_ds = _limited(
        source.train(recipe.batch_size, seed=recipe.seed, repeat=False),
        recipe.limit_train,
        recipe.batch_size,
    )
    eval_ds = _limited(source.eval(recipe.batch_size), recipe.limit_eval, recipe.batch_size)
    if isinstance(strategy_obj, tf.distribute.MultiWorkerMirroredStrategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_ds = train_ds.with_options(options)
        eval_ds = eval_ds.with_options(options)

    with strategy_obj.scope():
        model = build_model(recipe, info)
        model.compile(
            optimizer=build_optimizer(recipe, steps_per_epoch),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=jit_compile,
        )
        if state:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(os.path.join(run_dir, "state", state["weights"]))
            log(f"Resuming {run_dir} after epoch {done_epochs} of {recipe.epochs}.")

    nan_guard = StopOnNaN()
    callbacks = []
    if recipe.gated:
        callbacks.append(gate_callback(recipe))
    callbacks += [
        nan_guard,
        RunCheckpoint(run_dir, nan_guard, write=True),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "log.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
    ]
    if recipe.gated:
        callbacks.append(GateTensorBoard(os.path.join(run_dir, "logs")))
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    log(
        f"Training {recipe.model} ({'gated' if recipe.gated else 'plain'}) on {recipe.dataset}: "
        f"{min(info.train_examples, recipe.limit_train or info.train_examples)} train / "
        f"{min(info.eval_examples, recipe.limit_eval or info.eval_examples)} eval examples, "
        f"{steps_per_epoch} steps per epoch, {strategy_obj.num_replicas_in_sync} replica(s); "
        f"run directory {run_dir}"
    )
    start = time.time()
    model.fit(
        train_ds,
        validation_data=eval_ds,
        epochs=recipe.epochs,
        initial_epoch=done_epochs,
        callbacks=callbacks,
        verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles
    )
    wall = time.time() - start
    if nan_guard.bad is not None:
        epoch, batch, value = nan_guard.bad
        kept = load_state(run_dir)
        where = f"epoch {kept['epoch']}" if kept else "none (no epoch completed)"
        log(
            f"Stopped: the loss became {value} at epoch {epoch + 1}, batch {batch}. "
            f"Last good checkpoint: {where} in {run_dir}. Lower --lr or --lam and rerun "
            "(the run resumes from that checkpoint)."
        )
        raise SystemExit(EXIT_NAN)

    summary, per_sample = report_lib.evaluate_model(model, eval_ds)
    extra = {
        "recipe": recipe.to_dict(),
        "epochs_completed": recipe.epochs,
        "train_wall_seconds_this_session": wall,
        "best": load_state(run_dir),
    }
    report = report_lib.write_report(summary, per_sample, run_dir, extra) if is_chief else extra
    log(report_lib.format_summary(summary))
    log(f"Report: {os.path.join(run_dir, 'report.json')}")
    return report


def evaluate(model_path, dataset, out_dir=None, *, data_dir=None, manual_dir=None, batch_size=128,
             image_size=None, limit_eval=None, log=print):
    """Evaluates a saved `.keras` model and writes the same report."""
    if not os.path.exists(model_path):
        raise RunError(f"--model-path {model_path} does not exist; pass a .keras file written by train.py.")
    if not model_path.endswith(".keras"):
        raise RunError(f"--model-path {model_path} is not a .keras file.")
    model = keras.models.load_model(model_path)
    source = data_lib.get_dataset(dataset, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size)
    expected = tuple(model.inputs[0].shape[1:])
    if tuple(source.info.image_shape) != expected:
        raise RunError(
            f"The model takes images of shape {expected}, but {dataset} gives "
            f"{tuple(source.info.image_shape)}; pass --image-size or the dataset it was trained on."
        )
    eval_ds = _limited(source.eval(batch_size), limit_eval, batch_size)
    summary, per_sample = report_lib.evaluate_model(model, eval_ds)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(model_path)), f"eval-{os.path.basename(dataset.rstrip('/'))}")
    report = report_lib.write_report(summary, per_sample, out_dir, {"model_path": model_path, "dataset": dataset})
    log(report_lib.format_summary(summary))
    log(f"Report: {os.path.join(out_dir, 'report.json')}")
    return report
