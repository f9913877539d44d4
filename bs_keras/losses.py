"""Gate losses: batch-shaping (Bejnordi et al., 2020) and L0.

Each loss is a plain function on tensors plus a thin `keras.losses.Loss`
class beside it, following the Keras losses pattern. Inside gated models the
losses are added by the gate layers themselves (see `bs_keras.gates`); the
classes here are for using the losses on their own.
"""

import math

import keras
import tensorflow as tf
import tensorflow_probability as tfp

PDF_CLIP = (1e-3, 100.0)


def _beta_prior(prior_a, prior_b):
    if not (0 < prior_a < math.inf and 0 < prior_b < math.inf):
        raise ValueError(
            "Beta prior parameters must be positive. "
            f"Received: prior_a={prior_a}, prior_b={prior_b}"
        )
    return tfp.distributions.Beta(
        tf.constant(prior_a, tf.float32), tf.constant(prior_b, tf.float32)
    )


def _cdf_with_clipped_pdf_grad(prior, x):
    """Prior CDF at `x` whose gradient is the pdf clipped to `PDF_CLIP`.

    Beta(a, b) with a, b < 1 has infinite density at 0 and 1; the clip keeps
    gradients finite there, as in the authors' reference implementation.
    """

    a, b = prior.concentration1, prior.concentration0
    log_norm = tf.math.lbeta(tf.stack([a, b]))

    @tf.custom_gradient
    def cdf(v):
        def grad(dy):
            # The Beta density written out (a handful of ops; TFP's `prob`
            # adds dozens per call, which shows in a training step).
            log_pdf = tf.math.xlogy(a - 1.0, v) + tf.math.xlog1py(b - 1.0, -v) - log_norm
            pdf = tf.clip_by_value(tf.exp(log_pdf), PDF_CLIP[0], PDF_CLIP[1])
            return dy * pdf

        return prior.cdf(v), grad

    return cdf(x)


def batch_shaping_loss(x, prior_a=0.6, prior_b=0.4):
    """Batch-shaping loss: Cramér–von Mises distance to a Beta prior.

    For each channel `c` the batch of gate probabilities `x[:, c]` is sorted,
    the prior CDF `F` is evaluated at the sorted values and compared with the
    empirical CDF `i / (N + 1)`:

    `loss_c = sum_i (i / (N + 1) - F(x_(i))) ** 2 / N`,  loss = mean_c loss_c.

    The gradient with respect to `x` is `2 (F - i/(N+1)) pdf(x) / N` (divided
    by `C` for the channel mean) with the pdf clipped to `[1e-3, 100]`.

    Args:
        x: float tensor of shape `(N, C)` with values in `[0, 1]`: gate-open
            probabilities of `C` gates over a batch of `N` samples.
        prior_a: first Beta parameter of the prior (default 0.6).
        prior_b: second Beta parameter of the prior (default 0.4).

    Returns:
        Scalar float32 tensor.
    """
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 2:
        raise ValueError(
            "batch_shaping_loss expects gate probabilities of shape "
            f"(batch, channels). Received: shape={x.shape}"
        )
    if not x.dtype.is_floating:
        raise TypeError(
            "batch_shaping_loss expects a float tensor of probabilities. "
            f"Received: dtype={x.dtype.name}"
        )
    x = tf.cast(x, tf.float32)
    prior = _beta_prior(prior_a, prior_b)
    # Sort each channel over the batch: (C, N), ascending.
    xs = tf.sort(tf.transpose(x), axis=-1)
    n = tf.cast(tf.shape(x)[0], tf.float32)
    ecdf = tf.range(1.0, n + 1.0) / (n + 1.0)
    f = _cdf_with_clipped_pdf_grad(prior, xs)
    per_channel = tf.reduce_sum(tf.square(ecdf - f), axis=-1) / n
    return tf.reduce_mean(per_channel)


def l0_loss(probs, weights=None):
    """Expected fraction of open gates (the relaxed L0 penalty).

    Args:
        probs: float tensor of shape `(N, C)`: gate-open probabilities
            `sigmoid(logits)`.
        weights: optional float tensor of shape `(C,)`: how much each gate
            counts, e.g. the MACs it controls. With weights the loss is the
            expected fraction of the gated MACs that are executed.

    Returns:
        Scalar float32 tensor.
    """
    probs = tf.cast(tf.convert_to_tensor(probs), tf.float32)
    if probs.shape.rank != 2:
        raise ValueError(
            "l0_loss expects gate probabilities of shape (batch, channels). "
            f"Received: shape={probs.shape}"
        )
    if weights is None:
        return tf.reduce_mean(probs)
    weights = tf.cast(tf.convert_to_tensor(weights), tf.float32)
    if weights.shape.rank != 1 or (
        probs.shape[-1] is not None
        and weights.shape[0] is not None
        and weights.shape[0] != probs.shape[-1]
    ):
        raise ValueError(
            "l0_loss weights must have shape (channels,) matching probs. "
            f"Received: probs.shape={probs.shape}, weights.shape={weights.shape}"
        )
    per_channel = tf.reduce_mean(probs, axis=0)
    return tf.reduce_sum(per_channel * weights) / tf.reduce_sum(weights)


@keras.saving.register_keras_serializable(package="bs_keras")
class BatchShapingLoss(keras.losses.Loss):
    """Batch-shaping loss as a Keras loss; `y_pred` holds gate probabilities.

    `y_true` is ignored (pass any tensor, e.g. zeros). The loss is a statistic of the whole batch, so no
    per-sample reduction applies (`reduction` is fixed to `"none"` on the
    scalar result).

    Args:
        prior_a: first Beta parameter of the prior.
        prior_b: second Beta parameter of the prior.
    """

    def __init__(self, prior_a=0.6, prior_b=0.4, name="batch_shaping", **kwargs):
        kwargs.pop("reduction", None)
        super().__init__(name=name, reduction="none", **kwargs)
        _beta_prior(prior_a, prior_b)  # validates
        self.prior_a = float(prior_a)
        self.prior_b = float(prior_b)

    def call(self, y_true, y_pred):
        return batch_shaping_loss(y_pred, self.prior_a, self.prior_b)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        return {**config, "prior_a": self.prior_a, "prior_b": self.prior_b}


@keras.saving.register_keras_serializable(package="bs_keras")
class L0Loss(keras.losses.Loss):
    """L0 (expected open fraction) loss; `y_pred` holds gate probabilities.

    Args:
        weights: optional per-gate weights (e.g. MACs per channel).
    """

    def __init__(self, weights=None, name="l0", **kwargs):
        kwargs.pop("reduction", None)
        super().__init__(name=name, reduction="none", **kwargs)
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    "L0Loss weights must be non-negative with a positive sum. "
                    f"Received: weights={weights}"
                )
        self.weights = weights

    def call(self, y_true, y_pred):
        return l0_loss(y_pred, self.weights)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        return {**config, "weights": self.weights}
