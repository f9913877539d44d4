"""PSPNet on a (gated) dilated ResNet-50 for semantic segmentation.

`pspnet(num_classes)` builds the backbone with `imagenet_resnet(50,
output_stride=8, include_top=False)` (gated or plain from the same code),
a pyramid pooling module (bins 1, 2, 3, 6), the final classifier and an
auxiliary head on stage 4, both upsampled bilinearly to the input size. The
model returns `{"seg": logits, "aux": logits}` (or only the main logits with
`aux=False`); train with `segmentation_losses()` and evaluate with
`segmentation_metrics()` / `evaluate_segmentation`.

Reference: Zhao et al., Pyramid Scene Parsing Network, CVPR 2017.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from bs_keras import blocks
from bs_keras.gates import find_gates, record_gates
from bs_keras.gating import configure_gate_losses
from bs_keras.io_utils import atomic_path
from bs_keras.macs import count_macs, gate_table, macs_from_masks, ungated_macs
from bs_keras.models import IMAGENET_SPECS, weight_decay_regularizer, imagenet_resnet

IGNORE_LABEL = 255


@keras.saving.register_keras_serializable(package="bs_keras")
class AdaptiveAveragePooling2D(keras.layers.Layer):
    """Average pooling to a fixed `bins x bins` grid (PyTorch-style bins).

    Bin `i` of `n` covers rows `floor(i * H / n)` to `ceil((i + 1) * H / n)`.

    Args:
        bins: output height and width.
    """

    def __init__(self, bins, **kwargs):
        super().__init__(**kwargs)
        if int(bins) != bins or bins < 1:
            raise ValueError(f"bins must be a positive integer. Received: bins={bins}")
        self.bins = int(bins)

    def build(self, input_shape):
        if input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "AdaptiveAveragePooling2D needs a fixed spatial size; build the "
                f"model with a fixed input size. Received: input_shape={input_shape}"
            )

    def _edges(self, size):
        n = self.bins
        return [(math.floor(i * size / n), math.ceil((i + 1) * size / n)) for i in range(n)]

    def call(self, x):
        if self.bins == 1:
            return tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        rows = []
        for r0, r1 in self._edges(x.shape[1]):
            cols = [
                tf.reduce_mean(x[:, r0:r1, c0:c1, :], axis=[1, 2])
                for c0, c1 in self._edges(x.shape[2])
            ]
            rows.append(tf.stack(cols, axis=1))
        return tf.stack(rows, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.bins, self.bins, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "bins": self.bins}


@keras.saving.register_keras_serializable(package="bs_keras")
class ResizeLike(keras.layers.Layer):
    """Bilinear resize of `x` to the spatial size of `reference`.

    Call arguments:
        inputs: `[x, reference]`, both NHWC.
    """

    def call(self, inputs):
        x, reference = inputs
        size = tf.shape(reference)[1:3]
        out = tf.image.resize(x, size, method="bilinear")
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shape):
        x, reference = input_shape
        return (x[0], reference[1], reference[2], x[-1])


def _conv_bn_relu(x, filters, kernel_size, name, regularizer):
    x = blocks.conv(filters, kernel_size, 1, f"{name}_conv", regularizer)(x)
    x = blocks.batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _classifier(x, num_classes, name, regularizer):
    return keras.layers.Conv2D(
        num_classes, 1, kernel_regularizer=regularizer, dtype="float32", name=f"{name}_logits"
    )(x)


def pspnet(
    num_classes=19,
    input_shape=(713, 713, 3),
    gated=True,
    bins=(1, 2, 3, 6),
    aux=True,
    dropout=0.1,
    width_multiplier=1.0,
    weight_decay=0.0,
    gamma=0.75,
    lam=0.0,
    l0_weighting="macs",
    gate_kwargs=None,
    seed=None,
    name=None,
):
    """PSPNet with a (gated) dilated ResNet-50 backbone, output stride 8.

    Args:
        num_classes: segmentation classes (19 for Cityscapes).
        input_shape: `(height, width, channels)`; fixed, since the pyramid
            pooling bins depend on the feature size.
        gated: gate the backbone's bottleneck blocks.
        bins: pyramid pooling grid sizes.
        aux: add the auxiliary head on stage 4 (training only needs it).
        dropout: dropout before each classifier.
        width_multiplier, weight_decay, gamma, lam, l0_weighting,
        gate_kwargs, seed: as `bs_keras.models.imagenet_resnet`.
        name: model name.

    Returns:
        A functional `keras.Model` with outputs `{"seg", "aux"}` (logits at
        the input resolution), or the `seg` logits alone if `aux=False`.
    """
    if any(d is None for d in input_shape[:2]):
        raise ValueError(f"pspnet needs a fixed input size. Received: input_shape={input_shape}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
    backbone = imagenet_resnet(
        50,
        input_shape=input_shape,
        include_top=False,
        output_stride=8,
        gated=gated,
        width_multiplier=width_multiplier,
        weight_decay=weight_decay,
        gamma=gamma,
        lam=lam,
        l0_weighting=l0_weighting,
        gate_kwargs=gate_kwargs,
        seed=seed,
        name="backbone",
    )
    reg = weight_decay_regularizer(weight_decay)
    images = backbone.input
    features = backbone.output
    channels = features.shape[-1]
    branch = max(1, channels // len(bins))
    pyramid = [features]
    for b in bins:
        p = AdaptiveAveragePooling2D(b, name=f"ppm{b}_pool")(features)
        p = _conv_bn_relu(p, branch, 1, f"ppm{b}", reg)
        pyramid.append(ResizeLike(name=f"ppm{b}_resize")([p, features]))
    x = keras.layers.Concatenate(name="ppm_concat")(pyramid)
    x = _conv_bn_relu(x, max(1, int(round(512 * width_multiplier))), 3, "head", reg)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    x = _classifier(x, num_classes, "head", reg)
    seg = ResizeLike(name="seg", dtype="float32")([x, images])
    outputs = seg
    if aux:
        stage4 = backbone.get_layer(f"stage3_block{IMAGENET_SPECS[50]['blocks'][2]}_out").output
        a = _conv_bn_relu(stage4, max(1, int(round(256 * width_multiplier))), 3, "aux", reg)
        a = keras.layers.Dropout(dropout, name="aux_dropout")(a)
        a = _classifier(a, num_classes, "aux", reg)
        outputs = {"seg": seg, "aux": ResizeLike(name="aux", dtype="float32")([a, images])}
    kind = "gated" if gated else "plain"
    model = keras.Model(images, outputs, name=name or f"{kind}_pspnet50")
    if gated:
        configure_gate_losses(model, gamma=gamma, lam=lam, l0_weighting=l0_weighting)
    return model


def segmentation_losses(aux_weight=0.4, ignore_label=IGNORE_LABEL):
    """`(loss, loss_weights)` for `compile`: pixel crossentropy ignoring
    `ignore_label` (mean over the valid pixels) on both heads."""
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=ignore_label)
    return {"seg": ce, "aux": ce}, {"seg": 1.0, "aux": float(aux_weight)}


@keras.saving.register_keras_serializable(package="bs_keras")
class PixelAccuracy(keras.metrics.Metric):
    """Fraction of correctly classified pixels, ignoring `ignore_label`.

    Args:
        ignore_label: label value excluded from the count (default 255).
    """

    def __init__(self, ignore_label=IGNORE_LABEL, name="pixel_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ignore_label = int(ignore_label)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(tf.reshape(y_true, tf.shape(y_pred)[:-1]), tf.int32)
        pred = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        valid = tf.not_equal(y_true, self.ignore_label)
        hits = tf.logical_and(valid, tf.equal(pred, y_true))
        self.correct.assign_add(tf.reduce_sum(tf.cast(hits, self.correct.dtype)))
        self.total.assign_add(tf.reduce_sum(tf.cast(valid, self.total.dtype)))

    def result(self):
        return tf.math.divide_no_nan(self.correct, self.total)

    def reset_state(self):
        self.correct.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "ignore_label": self.ignore_label}


def _metric_name(class_name):
    return "iou_" + "".join(c if c.isalnum() else "_" for c in str(class_name).lower()).strip("_")


def segmentation_metrics(num_classes, class_names=None, ignore_label=IGNORE_LABEL):
    """Metrics for the `seg` output: mean IoU, pixel accuracy and, per
    class, its IoU (`iou_<class>`), all ignoring `ignore_label`."""
    names = class_names or [str(i) for i in range(num_classes)]
    per_class = [
        keras.metrics.IoU(
            num_classes, [c], ignore_class=ignore_label, sparse_y_pred=False, name=_metric_name(n)
        )
        for c, n in enumerate(names)
    ]
    return {
        "seg": [
            keras.metrics.MeanIoU(
                num_classes, ignore_class=ignore_label, sparse_y_pred=False, name="miou"
            ),
            PixelAccuracy(ignore_label),
            *per_class,
        ]
    }


def confusion_matrix(labels, predictions, num_classes, ignore_label=IGNORE_LABEL):
    """`(num_classes, num_classes)` counts, rows = truth, ignoring a label."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    keep = labels != ignore_label
    idx = labels[keep] * num_classes + predictions[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(cm):
    """Per-class IoU (NaN for classes absent from truth and prediction),
    mean IoU over the present classes, and pixel accuracy."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    pixel_acc = tp.sum() / cm.sum() if cm.sum() else math.nan
    return iou, float(np.nanmean(iou)) if np.any(union > 0) else math.nan, float(pixel_acc)


def evaluate_segmentation(model, dataset, num_classes, class_names=None, ignore_label=IGNORE_LABEL,
                          max_batches=None, keep_examples=4):
    """mIoU, pixel accuracy, per-class IoU and per-image conditional MACs.

    Returns:
        `(summary, examples)`: a JSON-ready dict and up to `keep_examples`
        `(image, label, prediction)` triples for plotting.
    """
    gates = find_gates(model)
    static = count_macs(model)
    table = gate_table(model) if gates else []
    ungated = ungated_macs(model, static)
    cm = np.zeros((num_classes, num_classes), np.int64)
    macs, examples = [], []
    for b, (x, y) in enumerate(dataset):
        if max_batches is not None and b >= max_batches:
            break
        with record_gates() as record:
            out = model(x, training=False)
        logits = out["seg"] if isinstance(out, dict) else out
        pred = np.asarray(tf.argmax(logits, axis=-1))
        y = np.asarray(y)
        cm += confusion_matrix(y, pred, num_classes, ignore_label)
        masks = {info.gate.name: np.asarray(record[info.gate][0]) for info in table}
        macs.append(macs_from_masks(static, table, masks, len(y)))
        for i in range(len(y)):
            if len(examples) < keep_examples:
                examples.append((np.asarray(x[i]), y[i], pred[i]))
    if not macs:
        raise ValueError("The evaluation dataset is empty.")
    macs = np.concatenate(macs)
    iou, miou, pixel_acc = iou_from_confusion(cm)
    names = class_names or [str(i) for i in range(num_classes)]
    summary = {
        "num_images": int(len(macs)),
        "mean_iou": miou,
        "pixel_accuracy": pixel_acc,
        "per_class_iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "static_macs": int(static),
        "ungated_macs": int(ungated),
        "mean_conditional_macs": float(macs.mean()),
        "macs_ratio": float(macs.mean() / ungated),
        "gated": bool(gates),
    }
    return summary, examples


def plot_predictions(examples, path, num_classes, mean=None, std=None, ignore_label=IGNORE_LABEL):
    """A PNG of images, ground truth and predictions side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20", max(num_classes, 2))
    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, (image, label, pred) in enumerate(examples):
        img = np.asarray(image, np.float64)
        if mean is not None and std is not None:
            img = img * np.asarray(std) + np.asarray(mean)
        img = np.clip(img, 0, 1)
        axes[row, 0].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray")
        label = np.ma.masked_equal(np.asarray(label), ignore_label)
        axes[row, 1].imshow(label, cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
        axes[row, 2].imshow(pred, cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
        for ax, title in zip(axes[row], ("image", "ground truth", "prediction")):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path
