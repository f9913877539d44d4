"""The training run: `train` (and `evaluate`) step by step.

`train` records the recipe's source files, picks the strategy, locks the
run directory and runs `_train_locked`, whose steps are the functions below
it: prepare the run directory (`run_dir`), build the task's data
(`tasks`), compile the model under the strategy (`model`), resume from
the last checkpoint, fit with the run's callbacks, stop on NaN, report.
"""

import contextlib
import hashlib
import os
import platform
import sys
import time

import keras
import tensorflow as tf

import bs_keras
from bs_keras import data as data_lib
from bs_keras import recipes
from bs_keras import report as report_lib
from bs_keras.callbacks import GateTensorBoard, RunCSVLogger, StopOnNaN
from bs_keras.distillation import unwrap
from bs_keras.run_lock import RunLock, RunLockedError
from bs_keras.training.errors import RunError
from bs_keras.training.model import (
    best_candidate_from,
    build_for_fit,
    build_optimizer,
    gate_callback,
    with_distillation,
)
from bs_keras.training.run_dir import (
    CheckpointWriteError,
    RunCheckpoint,
    cannot_resume,
    completed_report,
    prepare_run_dir,
    resume,
    resume_states,
)
from bs_keras.training.strategy import make_strategy, patch_multi_worker_reduce, shard_by_data, worker_info
from bs_keras.training.tasks import SegmentationTask, classification_report, limited, log_bad_files, make_task, steps

EXIT_NAN = 3


def file_sha256(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions():
    import tensorflow_probability as tfp

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_probability": tfp.__version__,
        "bs_keras": bs_keras.__version__,
    }


def _what(recipe):
    what = (f"a gated copy of {recipe.gate_from}" if recipe.gate_from else
            f"{recipe.model} ({'gated' if recipe.gated else 'plain'})")  # fmt: skip
    if recipe.distill:
        what += ", distilled from itself with every gate open"
    elif recipe.distill_from:
        what += f", distilled from {recipe.distill_from}"
    return what


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
    recipe = _with_source_hashes(recipe.validate().resolved())
    strategy_obj = make_strategy(strategy)
    is_chief, task_id = worker_info(strategy_obj)
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
    with _lock(run_dir, log):
        return _train_locked(
            recipe, run_dir, runtime, strategy_obj, is_chief, data_dir=data_dir, manual_dir=manual_dir,
            mixed_precision=mixed_precision, jit_compile=jit_compile, overwrite=overwrite,
            verbose=verbose, skip_bad_images=skip_bad_images, log=log,
        )  # fmt: skip


def _with_source_hashes(recipe):
    """The recipe with the sha256 of its `--gate-from` / `--distill-from`
    files, recorded in config.json: resuming with a changed file is refused."""
    if recipe.gate_from and recipe.gate_from_sha256 is None:
        recipe = recipe.replace(gate_from_sha256=file_sha256(recipe.gate_from))
    if recipe.distill_from and recipe.distill_from_sha256 is None:
        recipe = recipe.replace(distill_from_sha256=file_sha256(recipe.distill_from))
    return recipe


def _lock(run_dir, log):
    """The run directory's lock, acquired; a `RunError` if it cannot be."""
    try:
        return RunLock(run_dir, log=log).acquire()
    except RunLockedError as e:
        raise RunError(str(e)) from None
    except OSError as e:
        raise RunError(f"Cannot lock the run directory {run_dir}: {e}. Choose a writable --run-dir.") from e


def _train_locked(recipe, run_dir, runtime, strategy_obj, is_chief, *, data_dir, manual_dir,
                  mixed_precision, jit_compile, overwrite, verbose, skip_bad_images, log):
    """`train` once its run directory is locked."""
    state = prepare_run_dir(run_dir, recipe, runtime, overwrite=overwrite)
    states, damaged = resume_states(run_dir)
    if damaged and not states:
        raise cannot_resume(run_dir, damaged)
    report = completed_report(run_dir, recipe.epochs, state)
    if report is not None:
        _log_complete(run_dir, recipe, state, report, log)
        return report

    keras.utils.set_random_seed(recipe.seed)
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        task = make_task(recipe, data_dir, manual_dir, skip_bad_images)
        skipped = log_bad_files(task.info, recipe.dataset, log)
        steps_per_epoch, train_ds, eval_ds, fit_eval = _datasets(task, recipe, strategy_obj)
        model = _compiled_model(task, recipe, strategy_obj, steps_per_epoch, train_ds.element_spec, jit_compile)
    except BaseException:
        if state is None and not states:  # a fresh run that never started: take its config.json back
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, "config.json"))
        raise
    if states:
        state = resume(model, run_dir, states, damaged, recipe.epochs, strategy_obj, log)
    patch_multi_worker_reduce(strategy_obj)
    callbacks, nan_guard, checkpoint = _callbacks(recipe, run_dir, task.monitor, state)
    log(
        f"Training {_what(recipe)} on {recipe.dataset}: "
        f"{min(task.train_examples, recipe.limit_train or task.train_examples)} train / "
        f"{min(task.eval_examples, recipe.limit_eval or task.eval_examples)} eval examples, "
        f"{steps_per_epoch} steps per epoch, {strategy_obj.num_replicas_in_sync} replica(s); "
        f"run directory {run_dir}"
    )
    wall = _fit(model, train_ds, fit_eval, recipe.epochs, state["epoch"] if state else 0, callbacks, verbose)
    kept = checkpoint.state if checkpoint.state.get("weights") else None
    _exit_if_nan(nan_guard, kept, run_dir, log)
    return _report(task, model, eval_ds, recipe, run_dir, wall, kept, skipped, is_chief, log)


def _log_complete(run_dir, recipe, state, report, log):
    path = os.path.join(run_dir, "report.json")
    log(f"{run_dir} is complete ({state['epoch']} epochs); its report: {path}")
    if recipe.task == "classification":
        log(report_lib.format_summary(report["evaluation"]))


def _datasets(task, recipe, strategy):
    """Steps per epoch and the training, evaluation and fit-validation datasets."""
    if task.train_examples < recipe.batch_size:
        raise RunError(
            f"--batch-size={recipe.batch_size} is larger than the {task.train_examples} "
            f"training examples of {recipe.dataset}; use a smaller batch."
        )
    steps_per_epoch = steps(task.train_examples, recipe.limit_train, recipe.batch_size, True)
    train_ds, eval_ds = task.datasets()
    train_ds, fit_eval = shard_by_data(strategy, train_ds, task.fit_eval_data(eval_ds))
    return steps_per_epoch, train_ds, eval_ds, fit_eval


def _compiled_model(task, recipe, strategy, steps_per_epoch, element_spec, jit_compile):
    """The task's model (in a `Distiller` if the recipe distils), compiled and
    built for `fit` under `strategy`."""
    with strategy.scope():
        model = with_distillation(task.build(), recipe)
        model.compile(
            optimizer=build_optimizer(recipe, steps_per_epoch), jit_compile=jit_compile, **task.compile_args()
        )
        build_for_fit(model, element_spec)
    return model


def _callbacks(recipe, run_dir, monitor, state):
    """The run's callbacks (gate-loss schedule, NaN guard, checkpoints, CSV
    and TensorBoard logs), its NaN guard and its checkpoint callback."""
    nan_guard = StopOnNaN()
    checkpoint = RunCheckpoint(run_dir, nan_guard, monitor=monitor, first_best_epoch=best_candidate_from(recipe),
                               state=state)
    callbacks = [gate_callback(recipe)] if recipe.gated else []
    callbacks += [
        nan_guard,
        checkpoint,
        RunCSVLogger(os.path.join(run_dir, "log.csv")),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs"), write_graph=False),
    ]
    if recipe.gated:
        callbacks.append(GateTensorBoard(os.path.join(run_dir, "logs")))
    return callbacks, nan_guard, checkpoint


def _fit(model, train_ds, fit_eval, epochs, done_epochs, callbacks, verbose):
    """`model.fit` from epoch `done_epochs`; returns its wall time in seconds.

    A checkpoint write that fails (the disk is full) is a `RunError`."""
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2
    start = time.time()
    try:
        model.fit(
            train_ds,
            validation_data=fit_eval,
            epochs=epochs,
            initial_epoch=done_epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the tf.data pipeline shuffles
        )
    except CheckpointWriteError as e:
        raise RunError(str(e)) from e
    return time.time() - start


def _exit_if_nan(nan_guard, kept, run_dir, log):
    """Exits with `EXIT_NAN` if the loss became NaN, naming the checkpoint `kept`."""
    if nan_guard.bad is None:
        return
    epoch, batch, value = nan_guard.bad
    where = f"epoch {kept['epoch']}" if kept else "none (no epoch completed)"
    log(
        f"Stopped: the loss became {value} at epoch {epoch + 1}, batch {batch}. "
        f"Last good checkpoint: {where} in {run_dir}. Lower --lr or --lam and rerun "
        "(the run resumes from that checkpoint)."
    )
    raise SystemExit(EXIT_NAN)


def _report(task, model, eval_ds, recipe, run_dir, wall, kept, skipped, is_chief, log):
    """Evaluates the trained model; the chief writes the report. Returns it."""
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
    if kept and kept.get("best_epoch"):
        first = best_candidate_from(recipe)
        since = f"; candidates: epochs {first}-{recipe.epochs}, after the L0 ramp" if first > 1 else ""
        log(f"best.keras: epoch {kept['best_epoch']} of {recipe.epochs} ({kept.get('monitor', 'monitor')} "
            f"{kept['best']:.4f}{since}); the report is of the last epoch (last.keras)")
    log(f"Report: {os.path.join(run_dir, 'report.json')}")
    return report


def evaluate(model_path, dataset, out_dir=None, *, data_dir=None, manual_dir=None, batch_size=128,
             image_size=None, limit_eval=None, skip_bad_images=False, log=print):
    """Evaluates a saved `.keras` model and writes the same report as training."""
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
        skipped = log_bad_files(source.info, dataset, log)
        if skipped:
            extra["skipped_bad_images"] = skipped
        eval_ds = limited(source.eval(batch_size), limit_eval, batch_size)
        report, text = classification_report(model, eval_ds, out_dir, extra, metadata=source.info.eval_metadata)
    log(text)
    log(f"Report: {os.path.join(out_dir, 'report.json')}")
    return report
