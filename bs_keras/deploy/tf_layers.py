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


def depthwise_weights(conv, bn=None):
    """Kernel `(kh, kw, C, 1)` and bias `(C,)` of a DepthwiseConv2D (depth
    multiplier 1, no activation) with an optional BN folded in."""
    if type(conv) is not _L.DepthwiseConv2D:
        raise ValueError(f"Layer '{conv.name}' ({type(conv).__name__}) is not a plain DepthwiseConv2D.")
    problem = depthwise_problem(conv)
    if problem:
        raise ValueError(problem)
    kernel = np.asarray(conv.kernel, np.float64)
    bias = np.asarray(conv.bias, np.float64) if conv.use_bias else np.zeros(kernel.shape[2])
    if bn is not None:
        check_bn(bn)
        scale, shift = bn_affine(bn)
        kernel = kernel * scale[None, None, :, None]
        bias = bias * scale + shift
    return kernel, bias


def depthwise_problem(conv):
    """Why `depthwise_fn` cannot run the DepthwiseConv2D `conv`, or None."""
    if conv.depth_multiplier != 1:
        return f"DepthwiseConv2D '{conv.name}' with depth_multiplier={conv.depth_multiplier} is not supported."
    if conv.activation not in (None, keras.activations.linear):
        return f"DepthwiseConv2D '{conv.name}' with an activation is not supported."
    if conv.data_format != "channels_last":
        return f"DepthwiseConv2D '{conv.name}' must be channels_last."
    return None


def depthwise_fn(conv):
    """`(x, kernel, bias) -> depthwise_conv(x) + bias` with the layer's strides, padding and dilation."""
    strides = (1, *conv.strides, 1)
    dilations = tuple(conv.dilation_rate)
    padding = conv.padding.upper()

    def run(x, kernel, bias):
        y = tf.nn.depthwise_conv2d(x, kernel, strides=strides, padding=padding, dilations=dilations)
        return tf.nn.bias_add(y, bias)

    return run


def activation_fn(op):
    """The TF function of a ReLU or ReLU6 layer (`ReLU()`, `ReLU(6.0)`,
    `Activation("relu" | "relu6")`), or None for any other layer."""
    if isinstance(op, _L.ReLU):
        if op.negative_slope or op.threshold:
            return None
        if op.max_value is None:
            return tf.nn.relu
        return tf.nn.relu6 if float(op.max_value) == 6.0 else None
    if isinstance(op, _L.Activation):
        return {keras.activations.relu: tf.nn.relu, keras.activations.relu6: tf.nn.relu6}.get(op.activation)
    return None


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
