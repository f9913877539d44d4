"""Training runs: model, optimizer, strategy, run directory, resume, report.

`train.py` parses flags into a `Recipe` and calls `train(...)` or
`evaluate(...)`; everything else lives here.

A run directory holds `config.json` (the resolved recipe and runtime),
`logs/` (TensorBoard), `log.csv`, `last.keras`, `best.keras`, `state/`
(weights + optimizer of the last two completed epochs, for resume) and, at
the end, `report.json`, `per_sample.npz` and two PNG plots. While a run
writes it, `.lock` names its process (`bs_keras.run_lock.RunLock`).
"""

import hashlib
import json
import os
import re
import platform
import shutil
import sys
import time

import keras
import tensorflow as tf

import bs_keras
from bs_keras import data as data_lib
from bs_keras import lr_schedules
from bs_keras import report as report_lib
from bs_keras.callbacks import (
    CheckpointWriteError,
    GateLossScheduler,
    GateTensorBoard,
    RunCheckpoint,
    RunCSVLogger,
    StopOnNaN,
    keras_file_problem,
    resume_states,
)
from bs_keras.distillation import Distiller, unwrap
from bs_keras.io_utils import atomic_path
from bs_keras.models import add_gates, cifar_resnet, imagenet_resnet
from bs_keras.budget import MacBudget
from bs_keras.run_lock import LOCK_NAME, RunLock, RunLockedError
from bs_keras.schedules import Linear, paper_schedules

# Runs load saved models (--gate-from, --prune-from, --init-from, --evaluate).
bs_keras.register_custom_objects()

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


def _patch_multi_worker_reduce(strategy):
    """Works around Keras 3.15 `fit` under MultiWorkerMirroredStrategy with >1 worker.

    Keras calls `strategy.reduce("MEAN", (x, y), axis=None)` on the first
    batch (`_maybe_symbolic_build`) and `strategy.reduce("MEAN", scalar,
    axis=0)` on every step's logs (`reduce_per_replica`); the collective
    strategy accepts neither a nest nor axis=0 on a scalar.
    """
    reduce = strategy.reduce

    def nested_reduce(reduce_op, value, axis=None):
        def one(v):
            rank = strategy.experimental_local_results(v)[0].shape.rank
            return reduce(reduce_op, v, axis=axis if rank else None)

        return tf.nest.map_structure(one, value)

    strategy.reduce = nested_reduce


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
        gate_kwargs=recipe.gate_kwargs,
        zero_init_residual=recipe.resolved().zero_init_residual,
        seed=recipe.seed,
    )
    builder = imagenet_resnet if depth in (18, 34, 50) else cifar_resnet
    if recipe.gate_from:
        return gated_from(recipe, info)
    if recipe.prune_from:
        return _pruned_model(recipe, builder, depth, kwargs)
    return builder(depth, **kwargs)


def _output_activation(model):
    """The activation of the layer producing the model's output (a name), or None."""
    layer = model.outputs[0]._keras_history[0]
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None)


def gated_from(recipe, info):
    """`--gate-from`: the trained classifier, gated by `add_gates` (weights kept)."""
    path = recipe.gate_from
    try:
        source = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 (any loader failure is the file's problem)
        raise RunError(f"--gate-from {path} cannot be loaded as a Keras model ({type(e).__name__}: {e}).") from e
    problems = []
    inputs = getattr(source, "inputs", None) or []
    if len(inputs) != 1 or len(source.outputs) != 1:
        problems.append("it must have one image input and one output")
    else:
        shape = tuple(inputs[0].shape[1:])
        if shape != tuple(info.image_shape):
            problems.append(
                f"it takes inputs of shape {shape}, the data gives {tuple(info.image_shape)} "
                "(pass --image-size, or save the model with that input_shape)"
            )
        classes = source.outputs[0].shape[-1]
        if classes != info.num_classes:
            problems.append(f"it has {classes} outputs, {recipe.dataset} has {info.num_classes} classes")
        elif _output_activation(source) != "softmax":
            problems.append("its last layer must output softmax probabilities (train.py's loss expects "
                            "them; build it with classifier_activation='softmax')")
    if problems:
        raise RunError(f"--gate-from {path} does not fit {recipe.dataset}: " + "; ".join(problems) + ".")
    try:
        return add_gates(
            source,
            gate_kwargs=recipe.gate_kwargs,
            gamma=recipe.gamma, lam=0.0, l0_weighting=recipe.l0_weighting, seed=recipe.seed,
            weight_decay=recipe.weight_decay,
        )  # fmt: skip
    except ValueError as e:
        raise RunError(f"--gate-from {path}: {e}") from e


def with_distillation(model, recipe):
    """`model` inside a `Distiller` when the recipe distils, else `model`."""
    if recipe.distill is None and recipe.distill_from is None:
        return model
    teacher = "self"
    if recipe.distill_from:
        path = recipe.distill_from
        try:
            teacher = keras.saving.load_model(path, compile=False)
        except Exception as e:  # noqa: BLE001 (any loader failure is the file's problem)
            raise RunError(f"--distill-from {path} cannot be loaded as a Keras model ({type(e).__name__}: {e}).") from e
        if _output_activation(teacher) != _output_activation(model):
            raise RunError(f"--distill-from {path}: its last layer must output softmax probabilities like "
                           f"the student's (it outputs {_output_activation(teacher)}).")
    try:
        return Distiller(model, teacher, alpha=recipe.distill_alpha, temperature=recipe.distill_temperature,
                         train_teacher=recipe.distill_train_teacher)
    except ValueError as e:
        raise RunError(f"--distill-from {recipe.distill_from}: {e}") from e


def file_sha256(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pruned_model(recipe, builder, depth, kwargs):
    """`--prune-from`: the trained plain model, magnitude-pruned to `prune_macs`."""
    from bs_keras.deploy.prune import magnitude_prune

    source = keras.saving.load_model(recipe.prune_from, compile=False)
    twin = builder(depth, **{**kwargs, "gated": True})
    try:
        return magnitude_prune(source, twin, recipe.prune_macs, name=f"{recipe.model}_pruned")
    except ValueError as e:
        raise RunError(
            f"--prune-from={recipe.prune_from} does not match --model {recipe.model} "
            f"--width-multiplier {recipe.width_multiplier} on {recipe.dataset}: {e}"
        ) from e


def build_for_fit(model, element_spec):
    """Create the optimizer slots and compiled-metric variables before `fit`.

    Without a distribution strategy Keras creates them while tracing the
    first train step, and a `tf.function` that creates variables is traced a
    second time. Building them first saves that trace (the CLI tests' tiny
    ResNet-20: first epoch 22 s -> 14-16 s, same losses). With a strategy
    Keras does this itself; calling it again changes nothing.

    Args:
        model: a compiled Keras model.
        element_spec: the training dataset's `element_spec`: `(x, y)`,
            `(x, y, sample_weight)` or `x` alone.
    """
    model.optimizer.build(model.trainable_variables)
    symbolic_build = getattr(model, "_symbolic_build", None)  # Keras' own pre-build step
    if symbolic_build is None:
        return

    # Specs, not tensors: Keras only reads their shapes (unknown dims kept) and dtypes.
    batch = tuple(element_spec) if isinstance(element_spec, (tuple, list)) else (element_spec,)
    symbolic_build(data_batch=batch + (None,) * (3 - len(batch)))


def learning_rate(recipe, steps_per_epoch):
    """The recipe's Keras LearningRateSchedule over optimizer steps."""
    total = recipe.epochs * steps_per_epoch
    return lr_schedules.learning_rate(
        recipe.lr_schedule, recipe.lr, total, warmup_steps=recipe.warmup_steps(steps_per_epoch),
        decay_at=recipe.lr_decay_at, decay_factor=recipe.lr_decay_factor,
    )  # fmt: skip


def build_optimizer(recipe, steps_per_epoch):
    lr = learning_rate(recipe, steps_per_epoch)
    # Optional global-norm clipping: a gate that closes a whole branch for a
    # whole batch leaves the next BN with zero batch variance, whose backward
    # pass amplifies gradients ~1/sqrt(eps) (seen as NaN with block gates).
    clip = {"global_clipnorm": recipe.clipnorm} if recipe.clipnorm else {}
    if recipe.optimizer == "adam":
        return keras.optimizers.Adam(lr, **clip)
    return keras.optimizers.SGD(lr, momentum=recipe.momentum, nesterov=recipe.nesterov, **clip)


def gate_callback(recipe):
    """`GateLossScheduler` with the paper's schedule shape; with `target_macs`
    a `MacBudget` over the same L0 ramp replaces the fixed lambda; with
    `hard_gates_begin` the run ends with the hard-gate phase."""
    gamma, lam = paper_schedules(
        recipe.epochs,
        gamma=recipe.gamma,
        lam=recipe.lam,
        gamma_end=recipe.gamma_end,
        lam_begin=recipe.lam_begin,
        lam_end=recipe.lam_end,
    )
    if recipe.target_macs is not None:
        lam = MacBudget(
            recipe.target_macs, begin=recipe.lam_begin * recipe.epochs, end=recipe.lam_end * recipe.epochs,
            rate=recipe.budget_rate, gain=recipe.budget_gain, unwind=recipe.budget_unwind,
            max_multiplier=recipe.budget_max, measure=recipe.budget_measure,
            max_loss_ratio=recipe.budget_loss_ratio,
        )  # fmt: skip
    hard = None
    if recipe.hard_gates_begin is not None:
        begin = recipe.hard_gates_begin * recipe.epochs
        hard = Linear(0.0, 1.0, begin, begin)  # 0 up to `begin`, then 1
    return GateLossScheduler(gamma, lam, l0_weighting=recipe.l0_weighting, hard=hard)


# ------------------------------------------------------------------ run dir


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
        for entry in os.listdir(run_dir):  # all but the lock this run holds
            if entry != LOCK_NAME:
                _remove_path(os.path.join(run_dir, entry))
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise RunError(
                f"{config_path} is damaged ({type(e).__name__}: {e}); it records the run's settings, "
                "so the run cannot be resumed. Restore it from a backup, or pass --overwrite to start "
                "the run again."
            ) from e
        if saved.get("recipe") != recipe.to_dict():
            diff = sorted(
                k for k in set(saved.get("recipe", {})) | set(recipe.to_dict())
                if saved.get("recipe", {}).get(k) != recipe.to_dict().get(k)
            )
            raise RunError(
                f"{run_dir} holds a run with different settings ({', '.join(diff)}). "
                "Resume it with the same flags, choose another --run-dir, or pass --overwrite."
            )
        states, _ = resume_states(run_dir)
        return states[0] if states else None
    # Non-chief workers of a multi-worker run write <run>/worker-N/, possibly
    # before the chief gets here.
    if os.path.exists(run_dir) and [
        e for e in os.listdir(run_dir) if not re.fullmatch(r"worker-\d+", e) and e != LOCK_NAME
    ]:
        raise RunError(
            f"{run_dir} exists and is not a bs_keras run directory (no config.json). "
            "Choose another --run-dir or pass --overwrite."
        )
    os.makedirs(run_dir, exist_ok=True)
    report_lib.write_json(config_path, {"recipe": recipe.to_dict(), "runtime": runtime})
    return None


def _remove_path(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# -------------------------------------------------------------------- train


def _limited(ds, limit, batch_size):
    if limit is None:
        return ds
    return ds.take(max(1, limit // batch_size))


def _steps(examples, limit, batch_size, drop_remainder):
    n = examples if limit is None else min(examples, limit)
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    return max(1, steps)


class ClassificationTask:
    """Data, model, compile arguments and report of an image classifier."""

    monitor = "val_accuracy"

    def __init__(self, recipe, data_dir, manual_dir, skip_bad_images=False):
        self.recipe = recipe
        self.source = data_lib.get_dataset(
            recipe.dataset, data_dir=data_dir, manual_dir=manual_dir, image_size=recipe.image_size,
            validation_split=recipe.validation_split, seed=recipe.seed,
            skip_bad_images=skip_bad_images,
        )  # fmt: skip
        self.info = self.source.info
        self.train_examples = self.info.train_examples
        self.eval_examples = self.info.eval_examples

    def datasets(self):
        r = self.recipe
        train_ds = _limited(self.source.train(r.batch_size, seed=r.seed), r.limit_train, r.batch_size)
        eval_ds = _limited(self.source.eval(r.batch_size), r.limit_eval, r.batch_size)
        return train_ds, eval_ds

    def build(self):
        return build_model(self.recipe, self.info)

    def fit_eval_data(self, eval_ds):
        return eval_ds

    def compile_args(self):
        """Crossentropy loss; `task_loss` logs it alone, since Keras' `loss`
        also holds the gate terms and weight decay."""
        task_loss = keras.metrics.SparseCategoricalCrossentropy(name="task_loss")
        return {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy", task_loss]}

    def report(self, model, eval_ds, run_dir, extra, write):
        return classification_report(model, eval_ds, run_dir, extra, write, metadata=self.info.eval_metadata)


def classification_report(model, eval_ds, run_dir, extra, write=True, metadata=None):
    """Evaluates a classifier; writes report.json, per_sample.npz and plots.

    `metadata`: the data source's `info.eval_metadata` (e.g. the difficulty
    levels of `fashion_mnist_levels`), in `eval_ds` order.
    """
    summary, per_sample = report_lib.evaluate_model(model, eval_ds, metadata=metadata)
    if write:
        report_lib.write_report(summary, per_sample, run_dir, extra)
    return {**extra, "evaluation": summary}, report_lib.format_summary(summary)


class SegmentationTask:
    """Data, PSPNet, losses/metrics and report for semantic segmentation."""

    monitor = "val_seg_miou"

    def __init__(self, recipe, data_dir, manual_dir):
        from bs_keras.data import segmentation as segmentation_data

        self.recipe = recipe
        self.source = segmentation_data.get_segmentation_dataset(
            recipe.dataset, data_dir=data_dir, manual_dir=manual_dir, crop_size=recipe.crop_size,
            seed=recipe.seed, limit_train=recipe.limit_train, limit_eval=recipe.limit_eval,
        )  # fmt: skip
        self.info = self.source.info
        self.train_examples = self.info.train_examples
        self.eval_examples = self.info.eval_examples

    @staticmethod
    def _two_heads(ds):
        return ds.map(lambda x, y: (x, {"seg": y, "aux": y}), num_parallel_calls=tf.data.AUTOTUNE)

    def datasets(self):
        r = self.recipe
        train_ds = self._two_heads(self.source.train(r.batch_size, seed=r.seed))
        eval_ds = self.source.eval(r.batch_size)
        return train_ds, eval_ds

    def build(self):
        from bs_keras.segmentation import pspnet

        r = self.recipe
        model = pspnet(
            num_classes=self.info.num_classes,
            input_shape=(*self.info.crop_size, self.info.channels),
            gated=r.gated, width_multiplier=r.width_multiplier, weight_decay=r.weight_decay,
            gamma=r.gamma, lam=0.0, l0_weighting=r.l0_weighting,
            gate_kwargs=r.gate_kwargs,
            seed=r.seed,
        )  # fmt: skip
        if r.init_from:
            init_backbone(model, r.init_from)
        return model

    def compile_args(self):
        from bs_keras.segmentation import segmentation_losses, segmentation_metrics

        loss, weights = segmentation_losses(self.recipe.aux_weight)
        return {"loss": loss, "loss_weights": weights, "metrics": segmentation_metrics(self.info.num_classes, self.info.class_names)}

    def fit_eval_data(self, eval_ds):
        """Validation during fit: center crops of the training size (the
        trained graph has a fixed input size); the final report uses full
        images."""
        h, w = self.info.crop_size
        ignore = self.info.ignore_label

        def center(x, y):
            x = tf.image.resize_with_crop_or_pad(x, h, w)
            # Pad labels with the ignore value: shift it to 0, pad, shift back.
            y = tf.cast(y, tf.int32)[..., None] - ignore
            y = tf.image.resize_with_crop_or_pad(y, h, w)[..., 0] + ignore
            return x, y

        if tuple(self.info.eval_size) != (h, w):
            eval_ds = eval_ds.map(center, num_parallel_calls=tf.data.AUTOTUNE)
        return self._two_heads(eval_ds)

    def report(self, model, eval_ds, run_dir, extra, write):
        from bs_keras import segmentation

        if tuple(self.info.eval_size) != tuple(self.info.crop_size):
            # The trained graph has a fixed input size; evaluate full images
            # with a copy of the same weights built at the evaluation size.
            model = rebuild_at_size(model, (*self.info.eval_size, self.info.channels))
        summary, examples = segmentation.evaluate_segmentation(
            model, eval_ds, self.info.num_classes, self.info.class_names, self.info.ignore_label
        )
        report = {**extra, "evaluation": summary}
        if write:
            report_lib.write_json(os.path.join(run_dir, "report.json"), report)
            segmentation.plot_predictions(
                examples, os.path.join(run_dir, "predictions.png"), self.info.num_classes,
                self.info.mean, self.info.std, self.info.ignore_label,
            )  # fmt: skip
        text = (
            f"mean IoU            {summary['mean_iou']:.4f} ({summary['num_images']} images)\n"
            f"pixel accuracy      {summary['pixel_accuracy']:.4f}\n"
            f"mean MACs / image   {summary['mean_conditional_macs'] / 1e9:.3f} G "
            f"({summary['macs_ratio']:.1%} of the ungated {summary['ungated_macs'] / 1e9:.3f} G)"
        )
        return report, text


def rebuild_at_size(model, input_shape):
    """The same architecture and weights for another fixed input size."""
    config = model.get_config()
    layers = config["layers"]
    for layer in layers:
        if layer["class_name"] == "InputLayer":
            key = "batch_shape" if "batch_shape" in layer["config"] else "batch_input_shape"
            layer["config"][key] = [None, *input_shape]
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def init_backbone(model, path):
    """Copies backbone weights, matched by layer name, from a `.keras` model
    (e.g. an ImageNet ResNet-50 trained with train.py)."""
    if not os.path.exists(path):
        raise RunError(f"--init-from {path} does not exist; pass a .keras ResNet-50 written by train.py.")
    source = keras.models.load_model(path)
    by_name = {layer.name: layer for layer in source.layers}
    copied = 0
    for layer in model.layers:
        src = by_name.get(layer.name)
        if src is None or not layer.weights or layer.name == "predictions":
            continue
        if [w.shape for w in src.weights] != [w.shape for w in layer.weights]:
            raise RunError(
                f"--init-from: layer {layer.name} has shapes {[tuple(w.shape) for w in src.weights]} in "
                f"{path} but {[tuple(w.shape) for w in layer.weights]} here (width or gating differ)."
            )
        layer.set_weights(src.get_weights())
        copied += 1
    if copied == 0:
        raise RunError(f"--init-from {path}: no layer names match the backbone; is it a ResNet-50?")
    return copied


def _what(recipe):
    what = (f"a gated copy of {recipe.gate_from}" if recipe.gate_from else
            f"{recipe.model} ({'gated' if recipe.gated else 'plain'})")  # fmt: skip
    if recipe.distill:
        what += ", distilled from itself with every gate open"
    elif recipe.distill_from:
        what += f", distilled from {recipe.distill_from}"
    return what


def make_task(recipe, data_dir=None, manual_dir=None, skip_bad_images=False):
    if recipe.task == "segmentation":
        return SegmentationTask(recipe, data_dir, manual_dir)
    return ClassificationTask(recipe, data_dir, manual_dir, skip_bad_images)


def _log_bad_files(info, dataset, log):
    """Logs the image files `skip_bad_images` left out; returns them for the report."""
    bad = list(getattr(info, "bad_files", ()))
    if bad:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more (all in report.json)" if len(bad) > 20 else ""
        log(f"--skip-bad-images: left out {len(bad)} undecodable image file(s) of {dataset}:\n{shown}{more}")
    return [{"path": path, "reason": reason} for path, reason in bad]


def _damaged_models(run_dir, state):
    """`(path, reason)` of the run's `last.keras` / `best.keras` that cannot be loaded."""
    if not state:
        return []
    names = ["last.keras"] + (["best.keras"] if state.get("best") is not None else [])
    paths = [os.path.join(run_dir, name) for name in names]
    return [(path, problem) for path in paths if (problem := keras_file_problem(path))]


def _cannot_resume(run_dir, damaged):
    files = "; ".join(f"{path} ({reason})" for path, reason in damaged)
    return RunError(
        f"Cannot resume {run_dir}: damaged checkpoint files: {files}. No intact resume "
        "checkpoint is left. Restore the files from a backup, or pass --overwrite to start the "
        "run again (this deletes the run directory)."
    )


def restore_checkpoint(model, run_dir, states, damaged, log=print):
    """Loads the newest intact resume state of `run_dir` into `model`.

    Tries `state/state.json`'s weights, then `state/previous.json`'s (the
    epoch before), and logs which files were damaged.

    Args:
        model: the built, compiled model.
        run_dir: the run directory.
        states, damaged: from `bs_keras.callbacks.resume_states(run_dir)`.

    Returns:
        The state loaded.

    Raises:
        RunError: no state loads; the message names every damaged file.
    """
    damaged = list(damaged)
    for state in states:
        path = os.path.join(run_dir, "state", state["weights"])
        try:
            model.load_weights(path)
        except Exception as e:  # noqa: BLE001 (truncated h5, wrong variables, ...: the file's problem)
            damaged.append((path, f"{type(e).__name__}: {e}"))
            continue
        if damaged:
            files = "; ".join(f"{p} ({r})" for p, r in damaged)
            log(f"Damaged checkpoint files: {files}. Going back to the intact checkpoint of epoch {state['epoch']}.")
        return state
    raise _cannot_resume(run_dir, damaged)


def _repair_models(model, run_dir, state, damaged_models, epochs, log):
    """Rewrites a damaged last.keras (or best.keras of this epoch) from the
    restored model; returns the state to continue from."""
    for path, problem in damaged_models:
        if os.path.basename(path) == "last.keras" or state.get("best_epoch") == state["epoch"]:
            with atomic_path(path) as tmp:
                unwrap(model).save(tmp)
            log(f"{path} was damaged ({problem}); rewrote it from the checkpoint of epoch {state['epoch']}.")
            continue
        later = (
            "it will hold the best of the epochs trained from now on" if state["epoch"] < epochs else
            "use last.keras, or pass --overwrite to train the run again"
        )  # fmt: skip
        log(f"{path} is damaged ({problem}) and the weights of its epoch {state.get('best_epoch')} are "
            f"not kept elsewhere: {later}.")
        state = {**state, "best": None, "best_epoch": None}
    return state


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
    skip_bad_images=False,
    log=print,
):
    """Trains (or resumes) a run and writes its report. Returns the report.

    The run directory is locked (`<run_dir>/.lock`) while the run writes it.
    `skip_bad_images` leaves out the files of an image folder that cannot be
    decoded (otherwise they stop the run before training).

    Raises:
        RunError: a problem the user must fix (message says how), e.g.
            another process holds the run directory, a checkpoint is
            damaged, or a checkpoint write failed (the disk is full).
        SystemExit(3): the loss became NaN; the last good checkpoint is kept.
    """
    recipe = recipe.validate().resolved()
    if recipe.gate_from and recipe.gate_from_sha256 is None:
        # Recorded in config.json: resuming with a changed source file is refused.
        recipe = recipe.replace(gate_from_sha256=file_sha256(recipe.gate_from))
    if recipe.distill_from and recipe.distill_from_sha256 is None:
        recipe = recipe.replace(distill_from_sha256=file_sha256(recipe.distill_from))
    strategy_obj = make_strategy(strategy)
    is_chief, task_id = _worker_info(strategy_obj)
    if not is_chief:
        run_dir = os.path.join(run_dir, f"worker-{task_id}")
    runtime = {
        "strategy": strategy,
        "replicas": strategy_obj.num_replicas_in_sync,
        "mixed_precision": bool(mixed_precision),
        "jit_compile": bool(jit_compile),
        "data_dir": data_dir,
        "manual_dir": manual_dir,
        "versions": _versions(),
        "command": sys.argv,
        "skip_bad_images": bool(skip_bad_images),
    }
    try:
        lock = RunLock(run_dir, log=log).acquire()
    except RunLockedError as e:
        raise RunError(str(e)) from None
    except OSError as e:
        raise RunError(f"Cannot lock the run directory {run_dir}: {e}. Choose a writable --run-dir.") from e
    with lock:
        return _train_locked(
            recipe, run_dir, runtime, strategy_obj, is_chief, data_dir=data_dir, manual_dir=manual_dir,
            mixed_precision=mixed_precision, jit_compile=jit_compile, overwrite=overwrite,
            verbose=verbose, skip_bad_images=skip_bad_images, log=log,
        )  # fmt: skip


def _train_locked(recipe, run_dir, runtime, strategy_obj, is_chief, *, data_dir, manual_dir,
                  mixed_precision, jit_compile, overwrite, verbose, skip_bad_images, log):
    """`train` once its run directory is locked."""
    state = prepare_run_dir(run_dir, recipe, runtime, overwrite=overwrite)
    states, damaged = resume_states(run_dir)
    if damaged and not states:
        raise _cannot_resume(run_dir, damaged)
    damaged_models = _damaged_models(run_dir, state)
    done_epochs = state["epoch"] if state else 0
    if done_epochs >= recipe.epochs and os.path.exists(os.path.join(run_dir, "report.json")) \
            and not damaged_models:
        with open(os.path.join(run_dir, "report.json")) as f:
            report = json.load(f)
        log(f"{run_dir} is complete ({done_epochs} epochs); its report: {os.path.join(run_dir, 'report.json')}")
        if recipe.task == "classification":
            log(report_lib.format_summary(report["evaluation"]))
        return report

    keras.utils.set_random_seed(recipe.seed)
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    task = make_task(recipe, data_dir, manual_dir, skip_bad_images)
    skipped = _log_bad_files(task.info, recipe.dataset, log)
    if task.train_examples < recipe.batch_size:
        raise RunError(
            f"--batch-size={recipe.batch_size} is larger than the {task.train_examples} "
            f"training examples of {recipe.dataset}; use a smaller batch."
        )
    steps_per_epoch = _steps(task.train_examples, recipe.limit_train, recipe.batch_size, True)
    train_ds, eval_ds = task.datasets()
    fit_eval = task.fit_eval_data(eval_ds)
    if isinstance(strategy_obj, tf.distribute.MultiWorkerMirroredStrategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_ds = train_ds.with_options(options)
        fit_eval = fit_eval.with_options(options)

    with strategy_obj.scope():
        model = with_distillation(task.build(), recipe)
        model.compile(
            optimizer=build_optimizer(recipe, steps_per_epoch), jit_compile=jit_compile, **task.compile_args()
        )
        build_for_fit(model, train_ds.element_spec)
        if states:
            state = restore_checkpoint(model, run_dir, states, damaged, log)
            done_epochs = state["epoch"]
            log(f"Resuming {run_dir} after epoch {done_epochs} of {recipe.epochs}.")
    if states:
        state = _repair_models(model, run_dir, state, _damaged_models(run_dir, state), recipe.epochs, log)

    if isinstance(strategy_obj, tf.distribute.MultiWorkerMirroredStrategy):
        _patch_multi_worker_reduce(strategy_obj)
    nan_guard = StopOnNaN()
    checkpoint = RunCheckpoint(run_dir, nan_guard, monitor=task.monitor, state=state)
    callbacks = []
    if recipe.gated:
        callbacks.append(gate_callback(recipe))
    callbacks += [
        nan_guard,
        checkpoint,
        RunCSVLogger(os.path.join(run_dir, "log.csv")),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
    ]
    if recipe.gated:
        callbacks.append(GateTensorBoard(os.path.join(run_dir, "logs")))
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    log(
        f"Training {_what(recipe)} on {recipe.dataset}: "
        f"{min(task.train_examples, recipe.limit_train or task.train_examples)} train / "
        f"{min(task.eval_examples, recipe.limit_eval or task.eval_examples)} eval examples, "
        f"{steps_per_epoch} steps per epoch, {strategy_obj.num_replicas_in_sync} replica(s); "
        f"run directory {run_dir}"
    )
    start = time.time()
    try:
        model.fit(
            train_ds,
            validation_data=fit_eval,
            epochs=recipe.epochs,
            initial_epoch=done_epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles
        )
    except CheckpointWriteError as e:
        raise RunError(str(e)) from e
    wall = time.time() - start
    kept = checkpoint.state if checkpoint.state.get("weights") else None
    if nan_guard.bad is not None:
        epoch, batch, value = nan_guard.bad
        where = f"epoch {kept['epoch']}" if kept else "none (no epoch completed)"
        log(
            f"Stopped: the loss became {value} at epoch {epoch + 1}, batch {batch}. "
            f"Last good checkpoint: {where} in {run_dir}. Lower --lr or --lam and rerun "
            "(the run resumes from that checkpoint)."
        )
        raise SystemExit(EXIT_NAN)

    extra = {
        "recipe": recipe.to_dict(),
        "epochs_completed": recipe.epochs,
        # All of the run's optimizer steps (restored with the optimizer on resume).
        "optimizer_steps": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "train_wall_seconds_this_session": wall,
        "best": kept,
    }
    if skipped:
        extra["skipped_bad_images"] = skipped
    report, text = task.report(unwrap(model), eval_ds, run_dir, extra, write=is_chief)
    log(text)
    log(f"Report: {os.path.join(run_dir, 'report.json')}")
    return report


def evaluate(model_path, dataset, out_dir=None, *, data_dir=None, manual_dir=None, batch_size=128,
             image_size=None, limit_eval=None, skip_bad_images=False, log=print):
    """Evaluates a saved `.keras` model and writes the same report as training."""
    from bs_keras import recipes

    if not os.path.exists(model_path):
        raise RunError(f"--model-path {model_path} does not exist; pass a .keras file written by train.py.")
    if not model_path.endswith(".keras"):
        raise RunError(f"--model-path {model_path} is not a .keras file.")
    model = keras.models.load_model(model_path)
    out_dir = out_dir or os.path.join(
        os.path.dirname(os.path.abspath(model_path)), f"eval-{os.path.basename(dataset.rstrip('/'))}"
    )
    os.makedirs(out_dir, exist_ok=True)
    extra = {"model_path": model_path, "dataset": dataset}
    expected = tuple(model.inputs[0].shape[1:])
    if dataset in recipes.SEGMENTATION_DATASETS:
        recipe = recipes.default_recipe_for(dataset).replace(
            batch_size=batch_size, limit_eval=limit_eval, crop_size=expected[0]
        )
        task = SegmentationTask(recipe, data_dir, manual_dir)
        _, eval_ds = task.datasets()
        report, text = task.report(model, eval_ds, out_dir, extra, write=True)
    else:
        source = data_lib.get_dataset(dataset, data_dir=data_dir, manual_dir=manual_dir, image_size=image_size,
                                      skip_bad_images=skip_bad_images)
        if tuple(source.info.image_shape) != expected:
            raise RunError(
                f"The model takes images of shape {expected}, but {dataset} gives "
                f"{tuple(source.info.image_shape)}; pass --image-size or the dataset it was trained on."
            )
        skipped = _log_bad_files(source.info, dataset, log)
        if skipped:
            extra["skipped_bad_images"] = skipped
        eval_ds = _limited(source.eval(batch_size), limit_eval, batch_size)
        report, text = classification_report(model, eval_ds, out_dir, extra, metadata=source.info.eval_metadata)
    log(text)
    log(f"Report: {os.path.join(out_dir, 'report.json')}")
    return report
