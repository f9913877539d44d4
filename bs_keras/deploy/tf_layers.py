"""TF ops standing in for Keras layers in a folded (BN-folded, Keras-free) model.

Each helper reads one Keras layer's configuration and weights and returns
plain TF ops or NumPy arrays: BatchNormalization as an affine map folded
into the preceding convolution, Conv2D / Dense / pooling / the option-A
shortcut as functions, and the branch selection between precompiled widths.
"""

import keras
import numpy as np
import tensorflow as tf

_L = keras.layers


def bn_affine(bn):
    """Inference BN as `y = x * scale + shift` (float64 numpy)."""
    var = np.asarray(bn.moving_variance, np.float64)
    mean = np.asarray(bn.moving_mean, np.float64)
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else np.ones_like(var)
    beta = np.asarray(bn.beta, np.float64) if bn.center else np.zeros_like(var)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def check_bn(bn):
    """Raises `ValueError` unless `bn` normalizes the last axis."""
    if bn.axis not in (-1, 3, [-1], [3]):
        raise ValueError(f"BatchNormalization '{bn.name}' must normalize the last axis.")


def conv_weights(conv, bn=None):
    """Kernel (HWIO) and bias of a Conv2D with an optional BN folded in."""
    if not isinstance(conv, _L.Conv2D) or type(conv) is not _L.Conv2D:
        raise ValueError(f"Layer '{conv.name}' ({type(conv).__name__}) is not a plain Conv2D.")
    if getattr(conv, "groups", 1) != 1:
        raise ValueError(f"Grouped convolution '{conv.name}' is not supported.")
    if conv.activation not in (None, keras.activations.linear):
        raise ValueError(f"Conv2D '{conv.name}' with an activation is not supported.")
    kernel = np.asarray(conv.kernel, np.float64)
    bias = np.asarray(conv.bias, np.float64) if conv.use_bias else np.zeros(kernel.shape[-1])
    if bn is not None:
        check_bn(bn)
        scale, shift = bn_affine(bn)
        kernel = kernel * scale
        bias = bias * scale + shift
    return kernel, bias


def conv_fn(conv):
    """`(x, kernel, bias) -> conv(x) + bias` with the layer's strides, padding and dilation."""
    strides = tuple(conv.strides)
    dilations = tuple(conv.dilation_rate)
    padding = conv.padding.upper()
    if conv.data_format != "channels_last":
        raise ValueError(f"Conv2D '{conv.name}' must be channels_last.")

    def run(x, kernel, bias):
        y = tf.nn.conv2d(x, kernel, strides=strides, padding=padding, dilations=dilations)
        return tf.nn.bias_add(y, bias)

    return run


def check_relu(op):
    """Raises `ValueError` unless `op` is a plain ReLU."""
    if isinstance(op, _L.ReLU):
        if op.max_value is not None or op.negative_slope or op.threshold:
            raise ValueError(f"ReLU '{op.name}' with max_value/negative_slope/threshold is not supported.")
        return
    if isinstance(op, _L.Activation) and op.activation in (keras.activations.relu,):
        return
    raise ValueError(f"Layer '{op.name}' is not a plain ReLU.")


def is_relu(op):
    """Whether `op` is a plain ReLU (layer or activation)."""
    try:
        check_relu(op)
        return True
    except ValueError:
        return False


def select_branch(index, fns, nested_cond=False, offset=0):
    """`tf.switch_case(index, fns)`, or a balanced tree of `tf.cond` (LiteRT IF)."""
    if not nested_cond:
        return tf.switch_case(index, fns)
    if len(fns) == 1:
        return fns[0]()
    half = len(fns) // 2
    return tf.cond(
        index < offset + half,
        lambda: select_branch(index, fns[:half], True, offset),
        lambda: select_branch(index, fns[half:], True, offset + half),
    )


def zero_pad_fn(filters, strides):
    """The option-A shortcut (`ZeroPadShortcut`): subsample, zero-pad channels."""
    def run(x):
        if strides > 1:
            x = x[:, ::strides, ::strides, :]
        pad = filters - x.shape[-1]
        if pad:
            x = tf.pad(x, [[0, 0], [0, 0], [0, 0], [pad // 2, pad - pad // 2]])
        return x

    return run


def pool_fn(op):
    """`tf.nn.max_pool2d` with a MaxPooling2D layer's options."""
    if op.data_format != "channels_last":
        raise ValueError(f"MaxPooling2D '{op.name}' must be channels_last.")
    size, strides, padding = tuple(op.pool_size), tuple(op.strides), op.padding.upper()
    return lambda x: tf.nn.max_pool2d(x, size, strides, padding)


def zero_padding_fn(op):
    """`tf.pad` with a ZeroPadding2D layer's (top, bottom), (left, right) padding."""
    if op.data_format != "channels_last":
        raise ValueError(f"ZeroPadding2D '{op.name}' must be channels_last.")
    (top, bottom), (left, right) = op.padding
    paddings = [[0, 0], [int(top), int(bottom)], [int(left), int(right)], [0, 0]]
    return lambda x: tf.pad(x, paddings)


def resize_like_fn(x, reference):
    """`ResizeLike`: bilinear resize of `x` to `reference`'s spatial size
    (static where known: a constant size in the graph and in TFLite)."""
    size = reference.shape[1:3]
    if None in size:
        size = tf.shape(reference)[1:3]
    return tf.image.resize(x, size, method="bilinear")


def dense_fn(op, weight):
    """`x -> act(x @ kernel + bias)` of a Dense layer; `weight(value, name)` holds its weights."""
    kv = weight(np.asarray(op.kernel), f"{op.name}/kernel")
    bv = weight(np.asarray(op.bias) if op.use_bias else np.zeros(op.units), f"{op.name}/bias")
    act = op.activation
    if act in (None, keras.activations.linear):
        post = tf.identity
    elif act is keras.activations.softmax:
        post = tf.nn.softmax
    elif act is keras.activations.relu:
        post = tf.nn.relu
    else:
        raise ValueError(f"Dense '{op.name}' activation {act} is not supported.")
    return lambda x: post(tf.matmul(x, kv()) + bv())
