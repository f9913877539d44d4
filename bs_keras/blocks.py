"""Residual blocks, gated or plain, as functions composing standard layers.

Each block is a plain function `apply_*_block(x, ...) -> tensor` building
layers under stable names (`{name}_conv1`, `{name}_gate`, ...), as in
keras-hub. With `gate=None` the block is the ordinary ResNet block; with a
dict of `ChannelGate` arguments a gate switches the channels after the first
convolution (+BN+ReLU), computed from the block input.
"""

import keras
import tensorflow as tf

from bs_keras.gates import ChannelGate

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="bs_keras")
class ZeroPadShortcut(keras.layers.Layer):
    """Parameter-free shortcut: subsample spatially, zero-pad channels.

    The "option A" shortcut of He et al. (2016) for CIFAR ResNets.

    Args:
        filters: output channels (>= input channels).
        strides: spatial subsampling factor.
    """

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        if int(filters) != filters or filters < 1:
            raise ValueError(f"filters must be a positive integer. Received: filters={filters}")
        if int(strides) != strides or strides < 1:
            raise ValueError(f"strides must be a positive integer. Received: strides={strides}")
        self.filters = int(filters)
        self.strides = int(strides)

    def build(self, input_shape):
        if input_shape[-1] > self.filters:
            raise ValueError(
                "ZeroPadShortcut cannot reduce channels: "
                f"input has {input_shape[-1]}, filters={self.filters}."
            )

    def call(self, x):
        if self.strides > 1:
            x = x[:, :: self.strides, :: self.strides, :]
        pad = self.filters - x.shape[-1]
        if pad:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [pad // 2, pad - pad // 2]])
        return x

    def compute_output_shape(self, input_shape):
        def sub(d):
            return None if d is None else -(-d // self.strides)

        return (input_shape[0], sub(input_shape[1]), sub(input_shape[2]), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


def conv(filters, kernel_size, strides, name, regularizer, dilation_rate=1):
    """A bias-free "same"-padded He-normal `Conv2D`, as in every block."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        dilation_rate=dilation_rate,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=regularizer,
        name=name,
    )


def batch_norm(name, zero_gamma=False):
    """`BatchNormalization` with the blocks' epsilon and momentum."""
    return keras.layers.BatchNormalization(
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        gamma_initializer="zeros" if zero_gamma else "ones",
        name=name,
    )


def _shortcut(x, filters, strides, shortcut, name, regularizer):
    if strides == 1 and x.shape[-1] == filters:
        return x
    if shortcut == "zero_pad":
        return ZeroPadShortcut(filters, strides, name=f"{name}_shortcut")(x)
    if shortcut != "projection":
        raise ValueError(
            f"shortcut must be 'projection' or 'zero_pad'. Received: shortcut={shortcut!r}"
        )
    x = conv(filters, 1, strides, f"{name}_shortcut_conv", regularizer)(x)
    return batch_norm(f"{name}_shortcut_bn")(x)


def _gate(x, h, gate, name):
    if gate is None:
        return h
    return ChannelGate(name=f"{name}_gate", **gate)([x, h])


def apply_basic_block(
    x,
    filters,
    strides=1,
    gate=None,
    shortcut="projection",
    regularizer=None,
    dilation_rate=1,
    zero_init_residual=False,
    name="block",
):
    """Basic block: conv3x3-BN-ReLU [x gate] conv3x3-BN, + shortcut, ReLU.

    Args:
        x: input tensor (NHWC).
        filters: output channels (and the gated hidden width).
        strides: stride of the first convolution.
        gate: None for a plain block, else a dict of `ChannelGate` arguments.
        shortcut: "projection" (1x1 conv + BN when shapes change) or
            "zero_pad" (parameter-free, CIFAR option A).
        regularizer: kernel regularizer for the convolutions.
        dilation_rate: dilation of both 3x3 convolutions.
        zero_init_residual: start the branch's last BN scale at 0, so the
            block starts as its shortcut (Goyal et al., 2017).
        name: prefix of the layer names.
    """
    residual = _shortcut(x, filters, strides, shortcut, name, regularizer)
    h = conv(filters, 3, strides, f"{name}_conv1", regularizer, dilation_rate)(x)
    h = batch_norm(f"{name}_bn1")(h)
    h = keras.layers.ReLU(name=f"{name}_relu1")(h)
    h = _gate(x, h, gate, name)
    h = conv(filters, 3, 1, f"{name}_conv2", regularizer, dilation_rate)(h)
    h = batch_norm(f"{name}_bn2", zero_gamma=zero_init_residual)(h)
    h = keras.layers.Add(name=f"{name}_add")([h, residual])
    return keras.layers.ReLU(name=f"{name}_out")(h)


def apply_bottleneck_block(
    x,
    filters,
    strides=1,
    gate=None,
    expansion=4,
    regularizer=None,
    dilation_rate=1,
    zero_init_residual=False,
    name="block",
):
    """Bottleneck block (ResNet v1.5: stride on the 3x3), optionally gated.

    conv1x1-BN-ReLU [x gate] conv3x3-BN-ReLU conv1x1-BN, + shortcut, ReLU.

    The gate acts on the hidden width after the first 1x1 convolution. A
    closed channel removes one output filter of the 1x1 (`C_in` MACs per
    pixel) and one input slice of the 3x3 (`9 * filters` MACs per output
    pixel): with `C_in = 4 * filters` that is 13/17 of the block's MACs under
    the gate's control, linear in the number of open gates, so L0 and MAC
    accounting are exact and a compacted block is an ordinary narrower block.

    Args:
        x: input tensor (NHWC).
        filters: hidden width; the block outputs `expansion * filters`.
        strides: stride of the 3x3 convolution.
        gate: None for a plain block, else a dict of `ChannelGate` arguments.
        expansion: output width factor (4 in ResNet-50).
        regularizer: kernel regularizer for the convolutions.
        dilation_rate: dilation of the 3x3 convolution.
        zero_init_residual: start the branch's last BN scale at 0 (Goyal et
            al., 2017).
        name: prefix of the layer names.
    """
    out = filters * expansion
    residual = _shortcut(x, out, strides, "projection", name, regularizer)
    h = conv(filters, 1, 1, f"{name}_conv1", regularizer)(x)
    h = batch_norm(f"{name}_bn1")(h)
    h = keras.layers.ReLU(name=f"{name}_relu1")(h)
    h = _gate(x, h, gate, name)
    h = conv(filters, 3, strides, f"{name}_conv2", regularizer, dilation_rate)(h)
    h = batch_norm(f"{name}_bn2")(h)
    h = keras.layers.ReLU(name=f"{name}_relu2")(h)
    h = conv(out, 1, 1, f"{name}_conv3", regularizer)(h)
    h = batch_norm(f"{name}_bn3", zero_gamma=zero_init_residual)(h)
    h = keras.layers.Add(name=f"{name}_add")([h, residual])
    return keras.layers.ReLU(name=f"{name}_out")(h)
