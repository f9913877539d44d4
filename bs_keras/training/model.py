"""What a run trains: the recipe's model, its optimizer and gate-loss schedule.

`build_model` builds the recipe's ResNet (or gates a saved classifier,
`--gate-from`, or prunes a plain one, `--prune-from`); `with_distillation`
wraps it in a `Distiller`; `build_optimizer` and `gate_callback` give what
`fit` steps it with. `init_backbone` and `rebuild_at_size` serve the
segmentation task.
"""

import math
import os

import keras

from bs_keras import lr_schedules
from bs_keras.budget import MacBudget
from bs_keras.callbacks import GateLossScheduler
from bs_keras.distillation import Distiller
from bs_keras.gating import start_gates_at
from bs_keras.models import add_gates, cifar_resnet, imagenet_resnet
from bs_keras.schedules import Linear, paper_schedules
from bs_keras.training.errors import RunError


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
    if recipe.prune_from:
        return _pruned_model(recipe, builder, depth, kwargs)
    return start_gates(gated_from(recipe, info) if recipe.gate_from else builder(depth, **kwargs), recipe)


def start_gates(model, recipe):
    """The recipe's starting gates (`--gate-init-macs`) set on a fresh model."""
    ratio = recipe.resolved().gate_init_macs
    if recipe.gated and ratio < 1:
        try:
            start_gates_at(model, ratio)
        except ValueError as e:
            raise RunError(f"--gate-init-macs {ratio:g} cannot be set up: {e} Pass a larger ratio.") from e
    return model


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
    policy = keras.mixed_precision.dtype_policy()
    try:
        return add_gates(
            source,
            gate_kwargs=recipe.gate_kwargs,
            gamma=recipe.gamma, lam=0.0, l0_weighting=recipe.l0_weighting, seed=recipe.seed,
            weight_decay=recipe.weight_decay,
            # --mixed-precision (the global policy): the source's float32 layers follow it.
            dtype_policy=policy.name if policy.compute_dtype != policy.variable_dtype else None,
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
            max_loss_ratio=recipe.budget_loss_ratio or None,
        )  # fmt: skip
    hard = None
    if recipe.hard_gates_begin is not None:
        begin = recipe.hard_gates_begin * recipe.epochs
        hard = Linear(0.0, 1.0, begin, begin)  # 0 up to `begin`, then 1
    return GateLossScheduler(gamma, lam, l0_weighting=recipe.l0_weighting, hard=hard)


def best_candidate_from(recipe):
    """The first epoch (1-based) whose model may become `best.keras`.

    A gated run with an L0 term (`lam` or `target_macs`) trains with its
    gates open until the L0 ramp ends (`lam_end`): an earlier epoch can score
    higher while costing the full MACs, so only epochs ending at or after
    the ramp's end are candidates. Other runs: every epoch.
    """
    if not recipe.gated or (not recipe.lam and recipe.target_macs is None):
        return 1
    return max(1, min(recipe.epochs, math.ceil(recipe.lam_end * recipe.epochs - 1e-9)))


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
