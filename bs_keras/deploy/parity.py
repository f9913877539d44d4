"""Parity of exported models with Keras inference, measured on the same inputs.

For every variant (SavedModel, each TFLite quantization, a compacted Keras
model) `parity_rows` reports against the Keras model's inference outputs:

- `max_abs_diff`: largest absolute difference of the primary output
  (class probabilities, segmentation logits) over all samples and classes;
- `top1_agreement`: fraction of samples with the same arg-max class
  (classification: an output of shape `(N, classes)`);
- segmentation (an output of shape `(N, H, W, classes)`) instead:
  `pixel_agreement`, the fraction of pixels with the same arg-max class, and
  `miou`, the mean IoU of the variant's arg-max map taking the Keras model's
  as the labels (over the classes either predicts);
- `gate_agreement`: fraction of all (sample, gate) decisions that agree
  (from the `serving_with_gates` outputs; a compacted variant's masks are
  first expanded to the original layout; None, shown "-", when a variant
  does not return every gate's mask);
- `mean_macs`: mean per-sample MACs the variant reports executing
  (`conditional_macs`: the gated model's, closed channels skipped;
  `executed_macs` for the conditional export: the executed branch widths);
- `size_bytes` and `latency_ms` (median batch-1 call) where measured.
"""

import dataclasses
import math
import time

import numpy as np

from bs_keras.gates import find_gates
from bs_keras.macs import conditional_macs, gate_masks
from bs_keras.segmentation import confusion_matrix, iou_from_confusion
from bs_keras.deploy.savedmodel import MACS_OUTPUT, output_names

# Extra outputs of the conditional export (bs_keras.deploy.conditional.FoldedModel.with_gates).
EXECUTED_MACS = "executed_macs"
NOT_MASKS = (MACS_OUTPUT, EXECUTED_MACS, "widths")


@dataclasses.dataclass
class ParityRow:
    name: str
    max_abs_diff: float
    top1_agreement: float | None
    gate_agreement: float | None = None
    mean_macs: float | None = None
    size_bytes: int | None = None
    latency_ms: float | None = None
    pixel_agreement: float | None = None
    miou: float | None = None

    def as_dict(self):
        return dataclasses.asdict(self)


class KerasRunner:
    """A Keras model behind the runner interface (`__call__`, `with_gates`)."""

    def __init__(self, model, batch_size=128):
        self.model = model
        self.batch_size = batch_size
        self.output_name = output_names(model)[0]
        self.gates = find_gates(model)

    def _predict(self, images):
        outs = [
            np.asarray(self._primary(self.model(images[i : i + self.batch_size], training=False)))
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(outs)

    def _primary(self, outputs):
        if isinstance(outputs, dict):
            return outputs[self.output_name]
        if isinstance(outputs, (list, tuple)):
            return outputs[0]
        return outputs

    def __call__(self, images):
        return {self.output_name: self._predict(images)}

    def with_gates(self, images):
        out = self(images)
        if self.gates:
            out.update(gate_masks(self.model, images, batch_size=self.batch_size))
        try:
            out[MACS_OUTPUT] = conditional_macs(self.model, images, batch_size=self.batch_size)
        except ValueError:  # unknown spatial size
            pass
        return out


def compare(reference, outputs, output_name, gate_names, expand=None):
    """One `ParityRow`'s numbers from two `with_gates` output dicts."""
    ref = np.asarray(reference[output_name], np.float64)
    got = np.asarray(outputs[output_name], np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"Output shapes differ: reference {ref.shape}, variant {got.shape}.")
    agreement = {"top1_agreement": None}
    if ref.ndim == 4:  # (N, H, W, classes): per-pixel classes
        agreement.update(pixel_agreement_and_miou(ref.argmax(-1), got.argmax(-1), ref.shape[-1]))
    else:
        flat_ref, flat_got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        agreement["top1_agreement"] = float(np.mean(flat_ref.argmax(-1) == flat_got.argmax(-1))) if len(ref) else math.nan
    gates = None
    if gate_names:
        masks = {k: outputs[k] for k in outputs if k not in (output_name, *NOT_MASKS)}
        if expand is not None:
            masks = expand(masks, len(ref))
        if all(g in masks for g in gate_names):
            agree = [np.asarray(masks[g]) == np.asarray(reference[g]) for g in gate_names]
            gates = float(np.concatenate([a.reshape(-1) for a in agree]).mean())
    macs = next((float(np.mean(outputs[k])) for k in (MACS_OUTPUT, EXECUTED_MACS) if k in outputs), None)
    return {
        "max_abs_diff": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
        **agreement,
        "gate_agreement": gates,
        "mean_macs": macs,
    }


def pixel_agreement_and_miou(reference, predicted, num_classes):
    """`{"pixel_agreement", "miou"}` of two arg-max maps of equal shape: the
    fraction of equal pixels, and the mean IoU of `predicted` against
    `reference` as the labels, over the classes present in either."""
    _, miou, agreement = iou_from_confusion(confusion_matrix(reference, predicted, num_classes, ignore_label=-1))
    return {"pixel_agreement": agreement, "miou": miou}


def latency_ms(runner, image, runs):
    """Median wall time (ms) of `runs` batch-1 calls of `runner`, after a warm-up."""
    if runs < 1:
        return None
    image = image[:1]
    runner(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(image)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def parity_rows(model, images, variants, latency_runs=0):
    """Compares each variant with the Keras model on `images`.

    Args:
        model: the reference Keras model (masked gates).
        images: `(N, H, W, C)` float32 preprocessed images.
        variants: list of `(name, runner, extras)`: `runner` has
            `__call__(images)` and `with_gates(images)` returning dicts of
            arrays; `extras` is a dict with optional `expand`
            (masks, n) -> masks in the reference gate layout, and
            `size_bytes`.
        latency_runs: batch-1 calls to time per variant (0: no timing).

    Returns:
        A list of `ParityRow`, the Keras reference first.
    """
    images = np.asarray(images, np.float32)
    keras_runner = KerasRunner(model)
    reference = keras_runner.with_gates(images)
    gate_names = [g.name for g in keras_runner.gates]
    name = keras_runner.output_name
    rows = [
        ParityRow(
            "keras",
            **compare(reference, reference, name, gate_names),
            latency_ms=latency_ms(keras_runner, images, latency_runs),
        )
    ]
    for variant_name, runner, extras in variants:
        outputs = runner.with_gates(images)
        numbers = compare(reference, outputs, name, gate_names, expand=extras.get("expand"))
        rows.append(
            ParityRow(
                variant_name,
                **numbers,
                size_bytes=extras.get("size_bytes"),
                latency_ms=latency_ms(runner, images, latency_runs),
            )
        )
    return rows


def format_table(rows):
    """A Markdown table of `ParityRow`s."""

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    segmentation = any(r.pixel_agreement is not None for r in rows)
    agree = "pixel agree | mIoU vs Keras" if segmentation else "top-1 agree"
    lines = [
        f"| variant | max abs diff | {agree} | gate agree | mean MACs | size | batch-1 ms |",
        "|---|---|---|---|---|---|---|" + ("---|" if segmentation else ""),
    ]
    for r in rows:
        size = "-" if r.size_bytes is None else f"{r.size_bytes / 1024:.0f} KiB"
        macs = "-" if r.mean_macs is None else f"{r.mean_macs / 1e6:.3f} M"
        if segmentation:
            agreement = f"{fmt(r.pixel_agreement, '.3%')} | {fmt(r.miou, '.4f')}"
        else:
            agreement = fmt(r.top1_agreement, ".2%")
        lines.append(
            f"| {r.name} | {fmt(r.max_abs_diff, '.3g')} | {agreement} | "
            f"{fmt(r.gate_agreement, '.2%')} | {macs} | {size} | {fmt(r.latency_ms, '.2f')} |"
        )
    return "\n".join(lines)
