"""Gate a residual network you already have: `add_gates(model)`.

`add_gates` reads the residual blocks from a functional model's graph, not
from layer names: a two-input `Add` whose inputs start at one tensor, one of
them (the residual branch) starting with conv -> BN -> activation. It returns
a copy of the model with a `ChannelGate` right after that first activation,
every other layer's configuration, name and weights copied, so the source
model is left untouched. Works on the project's plain builders,
`keras.applications` ResNet50/101/152 (v1) and ResNet50V2/101V2/152V2,
keras-hub's `ResNetBackbone` and image classifier, and hand-written
functional ResNets; nested functional models (a backbone inside a
classifier) are gated in place.

Where the gate goes and what it reads:
- post-activation blocks (ResNet v1/v1.5, ours, keras-hub): after the
  branch's first conv + BN + ReLU (in a bottleneck the first 1x1), reading
  the block input, exactly as `blocks.apply_basic_block(gate=...)` and
  `apply_bottleneck_block(gate=...)`;
- pre-activation blocks (`ResNet50V2`): the branch starts with BN -> ReLU
  before its first convolution. The gate still goes after the first
  conv + BN + ReLU (that is where the closed channels save the first conv's
  filters and the second conv's input slices), and it reads what the first
  convolution reads, `relu(bn(x))`: the pooled pre-activation is normalized
  like a v1 block input, while the raw residual stream `x` of a v2 network
  grows in scale with depth.

The gate's logits kernel starts at zero and its bias at `init_bias` (3 by
default), so right after `add_gates` every gate is open at inference
(logit = 3 > 0) and the gated model computes exactly the source model's
outputs; training then learns which channels to switch off.

Example:

```python
base = keras.applications.ResNet50(weights="imagenet")
model = bs_keras.add_gates(base, lam=0.0, seed=0)
model.compile(...)
model.fit(..., callbacks=[bs_keras.GateLossScheduler(gamma, lam)])
```
"""

import dataclasses
import warnings

import keras
import numpy as np

from bs_keras.gates import ChannelGate, find_gates
from bs_keras.gating import L0_WEIGHTINGS, configure_gate_losses
from bs_keras.graph import LayerGraph, functional_model
from bs_keras.macs import MAC_LAYERS
from bs_keras.models.resnet import gate_factory, weight_decay_regularizer

_L = keras.layers
# Layers a branch may start with before its first convolution: the
# pre-activation (BN -> ReLU) of v2 blocks and explicit padding.
_PRE_ACTIVATION = (_L.BatchNormalization, _L.ReLU, _L.Activation, _L.ZeroPadding2D)
_ACTIVATIONS = (_L.ReLU, _L.Activation, _L.LeakyReLU, _L.ELU, _L.PReLU)


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
    """A residual block `add_gates` can gate.

    Attributes:
        add: name of the residual `Add` layer.
        conv: the branch's first convolution.
        reads: the layer whose input the gate reads: the first convolution,
            or the padding right before it.
        activation: the activation after conv + BN; the gate goes after it.
        gate: the name the new `ChannelGate` gets.
        channels: the gated width (the first convolution's filters).
    """

    add: str
    conv: str
    reads: str
    activation: str
    gate: str
    channels: int


def _walk_back(graph, tensor):
    """`(start, chain)`: back from `tensor` through single-input layers whose
    output has one consumer; `start` is where the path begins (a fork, a
    merge or a model input), `chain` the nodes from there to `tensor`."""
    chain = []
    while len(graph.consumers(tensor)) <= 1:
        op, node = graph.producer(tensor)
        if op is None or len(node.input_tensors) != 1:
            break
        chain.append(node)
        tensor = node.input_tensors[0]
    return tensor, chain[::-1]


def _gate_point(chain):
    """`((reader node, conv node, activation node), None)` or `(None, reason)`.

    The reader is the first of the padding layers right before the first
    convolution, or the convolution itself: the gate pools its input."""
    i = 0
    while i < len(chain) and isinstance(chain[i].operation, _PRE_ACTIVATION):
        i += 1
    if i == len(chain):
        return None, "the branch has no convolution"
    first = chain[i].operation
    if not isinstance(first, _L.Conv2D):
        return None, f"the branch starts with '{first.name}' ({type(first).__name__}), not a Conv2D"
    follow = [n.operation for n in chain[i + 1 : i + 3]]
    if (
        len(follow) < 2
        or not isinstance(follow[0], _L.BatchNormalization)
        or not isinstance(follow[1], _ACTIVATIONS)
    ):
        return None, (
            f"the branch's first convolution '{first.name}' is not followed by "
            "BatchNormalization and an activation"
        )
    if not any(isinstance(n.operation, MAC_LAYERS) for n in chain[i + 3 :]):
        return None, f"no convolution follows '{follow[1].name}' in the branch"
    reader = i
    while reader > 0 and isinstance(chain[reader - 1].operation, _L.ZeroPadding2D):
        reader -= 1
    return (chain[reader], chain[i], chain[i + 2]), None


def _gate_name(add_name, taken):
    base = add_name
    for suffix in ("_add", "_out"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    name, k = f"{base}_gate", 1
    while name in taken:
        name, k = f"{base}_gate_{k}", k + 1
    taken.add(name)
    return name


def residual_blocks(model):
    """The residual blocks of a functional model that `add_gates` can gate.

    Nested models are not searched (`add_gates` visits them itself).

    Returns:
        `(blocks, skipped)`: a list of `ResidualBlock` in graph order, and
        `(add layer name, reason)` for every `Add` that was not gated.
    """
    graph = LayerGraph(model, purpose="add_gates")
    calls = {}
    for node in graph.nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    taken = {layer.name for layer in model.layers}
    blocks, skipped = [], []
    for node in graph.nodes:
        add = node.operation
        if not isinstance(add, _L.Add):
            continue
        if len(node.input_tensors) != 2:
            skipped.append((add.name, f"it adds {len(node.input_tensors)} tensors, not a branch and a shortcut"))
            continue
        walks = [_walk_back(graph, t) for t in node.input_tensors]
        if walks[0][0] is not walks[1][0]:
            skipped.append((add.name, "its two inputs do not start from one tensor (no shortcut around a branch)"))
            continue
        points = [_gate_point(chain) + (chain,) for _, chain in walks]
        found = [(p, chain) for p, _, chain in points if p is not None]
        if not found:
            reasons = [why for _, why, chain in points if chain] or ["neither input has a layer of its own"]
            skipped.append((add.name, "; ".join(dict.fromkeys(reasons))))
            continue
        if len(found) == 2:
            convs = [sum(isinstance(n.operation, MAC_LAYERS) for n in chain) for _, chain in found]
            if convs[0] == convs[1]:
                skipped.append((add.name, "both of its inputs look like residual branches"))
                continue
            found = [found[int(np.argmax(convs))]]
        (reader_node, conv_node, act_node), _ = found[0]
        shared = [n.operation.name for n in (reader_node, act_node) if calls[id(n.operation)] > 1]
        if shared:
            skipped.append((add.name, f"layer '{shared[0]}' is called more than once in the model"))
            continue
        blocks.append(
            ResidualBlock(
                add=add.name,
                conv=conv_node.operation.name,
                reads=reader_node.operation.name,
                activation=act_node.operation.name,
                gate=_gate_name(add.name, taken),
                channels=int(conv_node.output_tensors[0].shape[-1]),
            )
        )
    return blocks, skipped


def copy_model(model, call_function=None, config_of=None, nested=None, input_tensors=None):
    """`keras.models.clone_model` with the weights copied and the inputs'
    layer names kept.

    Args:
        model: a functional or Sequential model.
        call_function: as `clone_model`'s (not for Sequential models).
        config_of: `layer -> config` for the copies (default `get_config`).
        nested: `model -> copy` for nested models (default: `copy_model`).
        input_tensors: new inputs (default: `keras.Input`s named like the
            source's input layers; `clone_model` would name them after the
            symbolic tensors).
    """
    config_of = config_of or (lambda layer: layer.get_config())
    nested = nested or (lambda m: copy_model(m, config_of=config_of))
    copies = []

    def clone(layer):
        if isinstance(layer, keras.Model):
            return nested(layer)
        new = layer.__class__.from_config(config_of(layer))
        copies.append((layer, new))
        return new

    kwargs = {}
    if not isinstance(model, keras.Sequential):
        kwargs["input_tensors"] = input_tensors if input_tensors is not None else keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history[0].name),
            model.input,
        )
    new_model = keras.models.clone_model(model, clone_function=clone, call_function=call_function, **kwargs)
    for old, new in copies:
        if getattr(old, "weights", None):
            new.set_weights(old.get_weights())
    return new_model


class _Retrofit:
    """One `add_gates` call: gate counter, skipped blocks, weight copies."""

    def __init__(self, gate_kwargs, seed, weight_decay, dtype_policy=None, keep_dtype=()):
        self.gate_for = gate_factory(True, gate_kwargs, seed)
        self.regularizer = weight_decay_regularizer(weight_decay)
        self.dtype_policy = dtype_policy
        self.keep_dtype = set(keep_dtype)  # layer names that keep their own policy (the outputs)
        self.gates = []
        self.skipped = []

    def config_of(self, layer):
        config = layer.get_config()
        if (
            self.dtype_policy is not None
            and "dtype" in config
            and not isinstance(layer, keras.layers.InputLayer)
            and layer.name not in self.keep_dtype
            and layer.dtype_policy.name == "float32"
        ):
            config["dtype"] = self.dtype_policy
        if (
            self.regularizer is not None
            and isinstance(layer, MAC_LAYERS)
            and "kernel_regularizer" in config
            and config["kernel_regularizer"] is None
        ):
            config["kernel_regularizer"] = keras.regularizers.serialize(self.regularizer)
        return config

    def rebuild(self, model):
        """A gated (or, without blocks, plain) copy of `model` with its weights."""
        if isinstance(model, keras.Sequential):
            blocks, call = [], None
        else:
            functional_model(model, "add_gates")
            blocks, skipped = residual_blocks(model)
            self.skipped += [(f"{model.name}/{add}", why) for add, why in skipped]
            call = self._caller(blocks)
        return copy_model(model, call, config_of=self.config_of, nested=self.rebuild)

    def _caller(self, blocks):
        by_reader = {b.reads: b for b in blocks}
        by_activation = {b.activation: b for b in blocks}
        gate_inputs = {}

        def call(layer, *args, **kwargs):
            out = layer(*args, **kwargs)
            if layer.name in by_reader:
                gate_inputs[layer.name] = args[0]
            block = by_activation.get(layer.name)
            if block is not None:
                gate = ChannelGate(name=block.gate, **self.gate_for(len(self.gates)))
                out = gate([gate_inputs[block.reads], out])
                # Zero logits kernel: logit = init_bias for every input, so
                # every gate starts open and the source's function is kept.
                gate.logits_dense.kernel.assign(np.zeros(gate.logits_dense.kernel.shape, "float32"))
                self.gates.append(gate)
            return out

        return call


def add_gates(
    model,
    *,
    gate_kwargs=None,
    gamma=0.75,
    lam=0.0,
    l0_weighting="macs",
    seed=None,
    weight_decay=0.0,
    name=None,
    dtype_policy=None,
):
    """A copy of a trained (or fresh) ResNet with a `ChannelGate` in every residual block.

    Args:
        model: a built functional or Sequential Keras model with residual
            blocks (nested functional models are gated too). Not modified.
        gate_kwargs: extra `ChannelGate` arguments (temperature, init_bias,
            hidden_units, group_size, prior_a, prior_b), as the builders'.
        gamma: initial batch-shaping weight (`GateLossScheduler` changes it).
        lam: initial L0 weight.
        l0_weighting: "macs" or "channels" (see `bs_keras.gating`).
        seed: seed of the gates' training noise (gate i gets
            `seed * 1000 + i`, as in the builders).
        weight_decay: SGD-style weight decay added to the conv and dense
            kernels that have no regularizer (e.g. `keras.applications`
            models); existing regularizers are kept, gates get none.
        name: name of the new model (default: the source's, "plain_"
            replaced by "gated_" or "gated_" prepended).
        dtype_policy: e.g. `"mixed_float16"`: the copied layers whose policy
            is float32 get this one (a model saved in float32, fine-tuned
            under mixed precision); the layers producing the model's outputs
            keep theirs (float32 probabilities), and the gates are float32
            under any policy. None: every layer keeps its own.

    Returns:
        A functional `keras.Model`. Right after the call its inference
        outputs equal the source's (every gate open), and `count_macs` is
        the source's plus the gate MLPs.

    Raises:
        ValueError: the model is subclassed, already has gates, or has no
            residual block to gate (the message names each `Add` and why).
            Blocks that cannot be gated in a model that has others are
            named in a `UserWarning`.
    """
    if gamma < 0 or lam < 0:
        raise ValueError(f"gamma and lam must be >= 0. Received: gamma={gamma}, lam={lam}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0. Received: weight_decay={weight_decay}")
    if l0_weighting not in L0_WEIGHTINGS:
        raise ValueError(f"l0_weighting must be one of {L0_WEIGHTINGS}. Received: l0_weighting={l0_weighting!r}")
    if not isinstance(model, keras.Model):
        raise ValueError(f"add_gates needs a Keras model. Received: {type(model).__name__}")
    functional_model(model, "add_gates")
    if find_gates(model):
        raise ValueError(
            f"Model '{model.name}' already has ChannelGate layers "
            f"({', '.join(g.name for g in find_gates(model)[:3])}, ...); add_gates takes an ungated model."
        )
    if dtype_policy is not None:
        dtype_policy = keras.dtype_policies.get(dtype_policy).name  # raises on an unknown name
    outputs = {t._keras_history[0].name for t in keras.tree.flatten(model.outputs)}
    retrofit = _Retrofit(gate_kwargs, seed, weight_decay, dtype_policy, keep_dtype=outputs)
    gated = retrofit.rebuild(model)
    skipped = "; ".join(f"'{add}': {why}" for add, why in retrofit.skipped)
    if not retrofit.gates:
        raise ValueError(
            f"Model '{model.name}' has no residual block add_gates can gate (an Add of a "
            "shortcut and a branch starting conv -> BN -> activation). "
            + (f"Add layers found: {skipped}." if skipped else "It has no Add layer.")
        )
    if skipped:
        warnings.warn(f"add_gates left {len(retrofit.skipped)} Add layer(s) ungated: {skipped}.", stacklevel=2)
    if name is None:
        name = "gated_" + (model.name[len("plain_"):] if model.name.startswith("plain_") else model.name)
    if isinstance(gated, keras.Sequential):
        gated = keras.Model(gated.inputs[0], gated.outputs[0], name=name)
    elif gated.name != name:
        gated = keras.Model(gated.input, gated.output, name=name)
    configure_gate_losses(gated, gamma=gamma, lam=lam, l0_weighting=l0_weighting)
    return gated


# keras.applications' `preprocess_input` modes, from RGB pixels x in [0, 255]:
# "caffe": BGR, minus the ImageNet BGR mean (ResNet50/101/152 v1);
# "tf": x / 127.5 - 1 (ResNet50V2/101V2/152V2); "torch": (x / 255 - mean) / std.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESSING = ("caffe", "tf", "torch")


def adapt_inputs(model, preprocessing="caffe", mean=TORCH_MEAN, std=TORCH_STD):
    """A copy of `model` that takes train.py's inputs instead of another preprocessing.

    train.py (and the export) feed RGB images `(x / 255 - mean) / std`. A
    `keras.applications` model trained on another preprocessing gets a frozen
    1x1 `Conv2D` named "input_adapter" in front of its first layer: a
    per-channel affine map (and the RGB -> BGR swap for "caffe") that turns
    those inputs into what its weights expect, exactly (the adapter runs
    before any zero padding). Cost: 9 MACs per pixel.

    Args:
        model: a functional model with one image input (channels last, 3 channels).
        preprocessing: what `model` expects: "caffe" (ResNet50/101/152),
            "tf" (the V2 ResNets) or "torch".
        mean, std: the per-channel normalization of the new inputs (the
            ImageNet values train.py uses by default).

    Returns:
        A functional model with the same layers, names and weights plus the adapter.
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}. Received: {preprocessing!r}")
    if isinstance(model, keras.Sequential) or len(functional_model(model, "adapt_inputs").inputs) != 1:
        raise ValueError("adapt_inputs needs a functional model with one input.")
    if model.inputs[0].shape[-1] != 3:
        raise ValueError(f"adapt_inputs needs RGB inputs (3 channels). Received: {model.inputs[0].shape}")
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    # Pixels x = 255 * (z * std + mean) for the new inputs z.
    scale, shift = 255.0 * std, 255.0 * mean
    kernel = np.zeros((1, 1, 3, 3))
    if preprocessing == "caffe":
        for k in range(3):  # output channel k (BGR) reads input channel 2 - k (RGB)
            kernel[0, 0, 2 - k, k] = scale[2 - k]
        bias = shift[::-1] - np.asarray(CAFFE_BGR_MEAN)
    elif preprocessing == "tf":
        kernel[0, 0] = np.diag(scale / 127.5)
        bias = shift / 127.5 - 1.0
    else:
        kernel[0, 0] = np.diag(scale / 255.0 / np.asarray(TORCH_STD))
        bias = (shift / 255.0 - np.asarray(TORCH_MEAN)) / np.asarray(TORCH_STD)
    adapter = keras.layers.Conv2D(3, 1, name="input_adapter", trainable=False)
    new_input = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype,
                            name=model.inputs[0]._keras_history[0].name)  # fmt: skip
    adapted = adapter(new_input)
    adapter.set_weights([kernel.astype("float32"), bias.astype("float32")])

    def call(layer, *args, **kwargs):
        if args and args[0] is new_input:
            args = (adapted,) + args[1:]
        return layer(*args, **kwargs)

    return copy_model(model, call, input_tensors=new_input)
