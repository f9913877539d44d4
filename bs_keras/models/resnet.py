"""ResNet builders, gated or plain from one code path.

`cifar_resnet(depth)` builds the CIFAR ResNets of He et al. (2016) (depth
6n+2: 20, 32, 44, 56, 110, widths 16/32/64); `imagenet_resnet(depth)` builds
ResNet-18/34 (basic blocks) and ResNet-50 (bottleneck, v1.5). With
`gated=True` every residual block gets a `ChannelGate` after its first
convolution; the builders then call `configure_gate_losses` so that the gate
losses are the global batch-shaping and L0 terms of the paper.
"""

import keras

from bs_keras import blocks
from bs_keras.gating import configure_gate_losses

IMAGENET_SPECS = {
    18: {"block": "basic", "blocks": (2, 2, 2, 2)},
    34: {"block": "basic", "blocks": (3, 4, 6, 3)},
    50: {"block": "bottleneck", "blocks": (3, 4, 6, 3)},
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


def _check_common(num_classes, input_shape, width_multiplier, weight_decay, gamma, lam):
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer. Received: num_classes={num_classes}")
    if len(input_shape) != 3 or any(d is not None and d < 1 for d in input_shape):
        raise ValueError(
            "input_shape must be (height, width, channels). "
            f"Received: input_shape={input_shape}"
        )
    if input_shape[-1] is None:
        raise ValueError("The channel dimension of input_shape must be known.")
    if not width_multiplier > 0:
        raise ValueError(
            f"width_multiplier must be positive. Received: width_multiplier={width_multiplier}"
        )
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0. Received: weight_decay={weight_decay}")
    if gamma < 0 or lam < 0:
        raise ValueError(f"gamma and lam must be >= 0. Received: gamma={gamma}, lam={lam}")


def _width(base, multiplier):
    return max(1, int(round(base * multiplier)))


def weight_decay_regularizer(weight_decay):
    """The kernel regularizer for SGD-style decay `weight_decay` (None if 0).

    Decay wd adds wd * w to the gradient: an L2 penalty of wd / 2.
    """
    return keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None


def gate_factory(gated, gate_kwargs, seed):
    """Returns f(i) -> ChannelGate kwargs for the i-th block, or None."""
    if not gated:
        return lambda i: None
    base = dict(gate_kwargs or {})
    if "seed" in base:
        raise ValueError("Pass the seed as the builder's `seed` argument, not in gate_kwargs.")

    def make(i):
        kwargs = dict(base)
        # Distinct seeds per gate: identical noise in every gate would
        # correlate their decisions.
        kwargs["seed"] = None if seed is None else int(seed) * 1000 + i
        return kwargs

    return make


def _head(x, num_classes, classifier_activation, regularizer, include_top):
    if not include_top:
        return x
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    policy = keras.mixed_precision.dtype_policy()
    return keras.layers.Dense(
        num_classes,
        activation=classifier_activation,
        kernel_regularizer=regularizer,
        # Under mixed precision the softmax/logits stay float32 (Keras' advice).
        dtype="float32" if policy.compute_dtype != policy.variable_dtype else None,
        name="predictions",
    )(x)


def cifar_resnet(
    depth,
    num_classes=10,
    input_shape=(32, 32, 3),
    gated=True,
    width_multiplier=1.0,
    shortcut="zero_pad",
    classifier_activation="softmax",
    weight_decay=0.0,
    gamma=0.75,
    lam=0.0,
    l0_weighting="macs",
    gate_kwargs=None,
    include_top=True,
    zero_init_residual=False,
    seed=None,
    name=None,
):
    """CIFAR ResNet (He et al., 2016), gated or plain.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110, ...).
        num_classes: classifier outputs.
        input_shape: `(height, width, channels)`, any size.
        gated: add a `ChannelGate` to every residual block.
        width_multiplier: scales the widths 16/32/64.
        shortcut: "zero_pad" (option A, 0.27M params for ResNet-20) or
            "projection" (1x1 conv when the shape changes).
        classifier_activation: activation of the last layer ("softmax" or
            None for logits).
        weight_decay: SGD-style weight decay on conv and dense kernels,
            never on gate parameters.
        gamma: initial batch-shaping weight (the schedule callback changes it).
        lam: initial L0 weight.
        l0_weighting: "macs" (each gate counts by the MACs it controls) or
            "channels" (each gate counts once).
        gate_kwargs: extra `ChannelGate` arguments (temperature, init_bias,
            hidden_units, group_size, prior_a, prior_b).
        include_top: add pooling + classifier (False: the last feature map,
            as in `keras.applications`).
        zero_init_residual: start the last BatchNormalization scale of every
            residual branch at 0 (Goyal et al., 2017), so each block starts
            as its shortcut.
        seed: seed of the gates' training noise.
        name: model name.

    Returns:
        A functional `keras.Model`.
    """
    if int(depth) != depth or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 56, 110). Received: depth={depth}")
    _check_common(num_classes, input_shape, width_multiplier, weight_decay, gamma, lam)
    n = (depth - 2) // 6
    reg = weight_decay_regularizer(weight_decay)
    gate_for = gate_factory(gated, gate_kwargs, seed)
    widths = [_width(w, width_multiplier) for w in CIFAR_WIDTHS]

    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = blocks.conv(widths[0], 3, 1, "stem_conv", reg)(inputs)
    x = blocks.batch_norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    i = 0
    for stage, filters in enumerate(widths):
        for b in range(n):
            strides = 2 if stage > 0 and b == 0 else 1
            x = blocks.apply_basic_block(
                x,
                filters,
                strides,
                gate=gate_for(i),
                shortcut=shortcut,
                regularizer=reg,
                zero_init_residual=zero_init_residual,
                name=f"stage{stage + 1}_block{b + 1}",
            )
            i += 1
    outputs = _head(x, num_classes, classifier_activation, reg, include_top)
    kind = "gated" if gated else "plain"
    model = keras.Model(inputs, outputs, name=name or f"{kind}_cifar_resnet{depth}")
    if gated:
        configure_gate_losses(model, gamma=gamma, lam=lam, l0_weighting=l0_weighting)
    return model


def imagenet_resnet(
    depth,
    num_classes=1000,
    input_shape=(224, 224, 3),
    gated=True,
    width_multiplier=1.0,
    classifier_activation="softmax",
    weight_decay=0.0,
    gamma=0.75,
    lam=0.0,
    l0_weighting="macs",
    gate_kwargs=None,
    include_top=True,
    output_stride=32,
    zero_init_residual=False,
    seed=None,
    name=None,
):
    """ImageNet ResNet-18/34 (basic) or ResNet-50 (bottleneck v1.5).

    Args: as `cifar_resnet` (`zero_init_residual` included), with `depth` in (18, 34, 50), plus
    `output_stride` (32, 16 or 8): the last stages trade their stride for
    dilation (stage 4 dilation 2 and stage 5 dilation 4 at output stride 8),
    as in DeepLab/PSPNet backbones. The plain ResNet-50 has 25,557,032
    parameters and 4.09 GMACs at 224x224 with 1000 classes (the torchvision
    figures).

    Returns:
        A functional `keras.Model`.
    """
    if depth not in IMAGENET_SPECS:
        raise ValueError(
            f"ImageNet ResNet depth must be one of {sorted(IMAGENET_SPECS)}. Received: depth={depth}"
        )
    _check_common(num_classes, input_shape, width_multiplier, weight_decay, gamma, lam)
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32. Received: output_stride={output_stride}")
    spec = IMAGENET_SPECS[depth]
    reg = weight_decay_regularizer(weight_decay)
    gate_for = gate_factory(gated, gate_kwargs, seed)
    widths = [_width(w, width_multiplier) for w in IMAGENET_WIDTHS]

    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = blocks.conv(widths[0], 7, 2, "stem_conv", reg)(inputs)
    x = blocks.batch_norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    i = 0
    current_stride, dilation = 4, 1
    for stage, (filters, count) in enumerate(zip(widths, spec["blocks"])):
        stage_stride, previous_dilation = (2 if stage > 0 else 1), dilation
        if current_stride * stage_stride > output_stride:
            dilation *= stage_stride
            stage_stride = 1
        current_stride *= stage_stride
        for b in range(count):
            strides = stage_stride if b == 0 else 1
            kwargs = dict(
                gate=gate_for(i),
                regularizer=reg,
                dilation_rate=previous_dilation if b == 0 else dilation,
                zero_init_residual=zero_init_residual,
                name=f"stage{stage + 1}_block{b + 1}",
            )
            if spec["block"] == "basic":
                x = blocks.apply_basic_block(x, filters, strides, shortcut="projection", **kwargs)
            else:
                x = blocks.apply_bottleneck_block(x, filters, strides, **kwargs)
            i += 1
    outputs = _head(x, num_classes, classifier_activation, reg, include_top)
    kind = "gated" if gated else "plain"
    model = keras.Model(inputs, outputs, name=name or f"{kind}_resnet{depth}")
    if gated:
        configure_gate_losses(model, gamma=gamma, lam=lam, l0_weighting=l0_weighting)
    return model
