"""The tasks a run can train: what each builds, its data, losses, metrics and report.

`ClassificationTask` (any `bs_keras.data.get_dataset` source) and
`SegmentationTask` (PSPNet on a `get_segmentation_dataset` source) share one
shape: `datasets()`, `build()`, `compile_args()`, `fit_eval_data()`,
`report()` and the `monitor` that selects `best.keras`.
"""

import os

import keras
import tensorflow as tf

from bs_keras import data as data_lib
from bs_keras import report as report_lib
from bs_keras.training.model import build_model, init_backbone, rebuild_at_size, start_gates


def limited(ds, limit, batch_size):
    if limit is None:
        return ds
    return ds.take(max(1, limit // batch_size))


def steps(examples, limit, batch_size, drop_remainder):
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
        train_ds = limited(self.source.train(r.batch_size, seed=r.seed), r.limit_train, r.batch_size)
        eval_ds = limited(self.source.eval(r.batch_size), r.limit_eval, r.batch_size)
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
        self.recipe = recipe
        self.source = data_lib.get_segmentation_dataset(
            recipe.dataset, data_dir=data_dir, manual_dir=manual_dir, crop_size=recipe.crop_size,
            seed=recipe.seed, limit_train=recipe.limit_train, limit_eval=recipe.limit_eval,
            canvas_size=recipe.canvas_size,
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
        return start_gates(model, r)

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


def make_task(recipe, data_dir=None, manual_dir=None, skip_bad_images=False):
    if recipe.task == "segmentation":
        return SegmentationTask(recipe, data_dir, manual_dir)
    return ClassificationTask(recipe, data_dir, manual_dir, skip_bad_images)


def log_bad_files(info, dataset, log):
    """Logs the image files `skip_bad_images` left out; returns them for the report."""
    bad = list(getattr(info, "bad_files", ()))
    if bad:
        shown = "\n".join(f"  {path}: {reason}" for path, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more (all in report.json)" if len(bad) > 20 else ""
        log(f"--skip-bad-images: left out {len(bad)} undecodable image file(s) of {dataset}:\n{shown}{more}")
    return [{"path": path, "reason": reason} for path, reason in bad]
