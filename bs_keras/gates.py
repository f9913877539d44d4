"""The channel gate: per-input, per-channel on/off switches.

A `ChannelGate` takes the block input `x` and the features `h` it gates. A
small MLP on `global_avg_pool(x)` gives one logit per gate. In training the
gate samples binary-concrete (relaxed Bernoulli) noise and uses the
straight-through estimator: the forward value is exactly 0 or 1, the backward
pass sees the relaxed sample. At inference the gate is deterministic:
`logit > 0`. The gated features are `h * gate`.

In training the gate adds its own share of the batch-shaping and L0 losses
(`add_loss`), weighted by two non-trainable variables `bs_coef` and
`l0_coef` that `bs_keras.callbacks.GateLossScheduler` assigns every step, and
it keeps running statistics (`stats`) the callback reads for logging.

A third variable, `hard_training`, switches training to the inference
decisions (`logit > 0`, the gate MLP's BatchNorm on its moving statistics):
the hard-gate phase at the end of a run, where the backbone trains on
exactly the network that is evaluated and the gates stop moving.
"""

import contextlib
import math
import threading

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from bs_keras import losses as gate_losses

_recording = threading.local()  # record_gates' stack; gates_open's flag


@contextlib.contextmanager
def record_gates():
    """Context manager collecting the hard gates of every `ChannelGate` call.

    Yields a dict `{gate_layer: [mask, ...]}`, one `(batch, channels)` 0/1
    mask per call, in call order. Use it around an eager model call.
    """
    stack = getattr(_recording, "stack", None)
    if stack is None:
        stack = _recording.stack = []
    record = {}
    stack.append(record)
    try:
        yield record
    finally:
        stack.pop()


@contextlib.contextmanager
def gates_open():
    """Context manager: every `ChannelGate` called (or traced) inside passes
    its features through unchanged (the ungated network): no sampling, no
    losses, no statistics. `bs_keras.Distiller` runs its "self" teacher so."""
    previous = getattr(_recording, "open", False)
    _recording.open = True
    try:
        yield
    finally:
        _recording.open = previous


def _record(gate, mask):
    stack = getattr(_recording, "stack", None)
    if stack:
        stack[-1].setdefault(gate, []).append(mask)


class GateStats(keras.metrics.Metric):
    """Running means of a gate's training statistics, read by the callback.

    Tracked as a metric so Keras resets it at every epoch and it is not saved
    with the weights. `result()` is empty on purpose: the per-gate values are
    aggregated over all gates by `GateLossScheduler` before they are logged.
    One variable holds the sums and counts, so reading it is one copy.
    """

    # sums: batch-shaping, its count, l0, open rate, hard open rate, steps.
    def __init__(self, name="gate_stats", **kwargs):
        super().__init__(name=name, **kwargs)
        self.sums = self.add_variable(shape=(6,), initializer="zeros", name="sums")

    def update_state(self, bs, bs_count, l0, open_rate, hard_open_rate):
        values = [bs, bs_count, l0, open_rate, hard_open_rate, 1.0]
        self.sums.assign_add(tf.stack([tf.cast(v, self.sums.dtype) for v in values]))

    def values(self, totals=None):
        """Means since the last reset as a dict (None before any step).

        `totals`: the sums from `totals()`, if already read.

        `batch_shaping` is None when the term was not computed (weight 0).
        `open_rate` is the fraction of sampled gates that were open,
        `hard_open_rate` the fraction with `logit > 0` (what inference runs).
        """
        bs, bs_count, l0, open_rate, hard, count = (float(v) for v in (self.totals() if totals is None else totals))
        if count == 0:
            return None
        return {
            "batch_shaping": bs / bs_count if bs_count else None,
            "l0": l0 / count,
            "open_rate": open_rate / count,
            "hard_open_rate": hard / count,
        }

    def totals(self):
        """The raw running sums (float64 NumPy, 6 values; the last counts steps)."""
        return np.asarray(keras.ops.convert_to_numpy(self.sums), np.float64)

    def result(self):
        return {}

    def reset_state(self):
        self.sums.assign(tf.zeros_like(self.sums))


@keras.saving.register_keras_serializable(package="bs_keras")
class ChannelGate(keras.layers.Layer):
    """Input-dependent channel gate trained with batch-shaping and L0.

    Logits: global average pool of `x` -> Dense(`hidden_units`, no bias) ->
    BatchNorm -> ReLU -> Dense(`channels // group_size`, bias initialised to
    `init_bias`). Each gate switches `group_size` consecutive channels of `h`.

    Args:
        hidden_units: width of the gate MLP (default 16).
        temperature: binary-concrete temperature in training (default 2/3).
        init_bias: initial bias of the logits; positive so that most gates
            start open (default 3.0: `sigmoid(3) = 0.95`).
        group_size: channels switched by one gate (default 1: per-channel
            gates as in the paper), or "all": one gate switches every
            channel, i.e. the whole residual branch (block-level gating,
            the coarse ConvNet-AIG-style baseline).
        prior_a: first Beta parameter of the batch-shaping prior.
        prior_b: second Beta parameter of the batch-shaping prior.
        bs_coef: initial weight of this gate's batch-shaping loss.
        l0_coef: initial weight of this gate's L0 loss.
        seed: int seed for the training noise (reproducible runs).
        stop_input_gradient: stop the gradient at the gate's input `x`: the
            gate MLP learns from the pooled block input without moving it
            (neither the gate losses nor the task loss reach the backbone
            through the gate; the gated features `h` are unaffected).
        noise: scale of the logistic noise of the training samples (default
            1: binary concrete, the paper). A gate opens in training when
            `logit + noise * L > 0` (L standard logistic), i.e. with
            probability `sigmoid(logit / noise)`; 0 gives deterministic
            straight-through gates (open where `logit > 0`, the gradient of
            `sigmoid(logit / temperature)`). The losses use `sigmoid(logit)`
            at any scale.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: list `[x, h]`: the block input `x` (rank 4, NHWC) the gate
            looks at, and the features `h` (`(batch, ..., channels)`) it
            gates.
        training: whether to sample (True) or use hard `logit > 0` gates.
            While the `hard_training` variable is 1, training uses the hard
            gates too (no sampling, the gate MLP in inference mode: the gate
            gets no gradient from the task loss).

    Reference:
        Bejnordi, Blankevoort, Welling. Batch-Shaping for Learning
        Conditional Channel Gated Networks. ICLR 2020.
    """

    def __init__(
        self,
        hidden_units=16,
        temperature=2.0 / 3.0,
        init_bias=3.0,
        group_size=1,
        prior_a=0.6,
        prior_b=0.4,
        bs_coef=0.0,
        l0_coef=0.0,
        seed=None,
        stop_input_gradient=False,
        noise=1.0,
        **kwargs,
    ):
        # Gate math stays float32 under mixed precision: the inputs are not
        # autocast and the MLP runs in float32; only `h * mask` uses h's dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if int(hidden_units) != hidden_units or hidden_units < 1:
            raise ValueError(
                f"hidden_units must be a positive integer. Received: hidden_units={hidden_units}"
            )
        if not temperature > 0:
            raise ValueError(
                f"temperature must be positive. Received: temperature={temperature}"
            )
        if group_size != "all" and (
            isinstance(group_size, str) or int(group_size) != group_size or group_size < 1
        ):
            raise ValueError(
                "group_size must be a positive integer or 'all' (one gate for "
                f"all channels). Received: group_size={group_size!r}"
            )
        if not (0 < prior_a < math.inf and 0 < prior_b < math.inf):
            raise ValueError(
                "prior_a and prior_b must be positive. "
                f"Received: prior_a={prior_a}, prior_b={prior_b}"
            )
        if not 0 <= noise < math.inf:
            raise ValueError(
                "noise must be a finite number >= 0 (1: binary concrete, 0: "
                f"deterministic straight-through gates). Received: noise={noise}"
            )
        if bs_coef < 0 or l0_coef < 0:
            raise ValueError(
                "Loss coefficients must be non-negative. "
                f"Received: bs_coef={bs_coef}, l0_coef={l0_coef}"
            )
        self.hidden_units = int(hidden_units)
        self.temperature = float(temperature)
        self.init_bias = float(init_bias)
        self._group_size_arg = group_size if group_size == "all" else int(group_size)
        # The resolved channels per gate (an int once built).
        self.group_size = None if group_size == "all" else int(group_size)
        self.prior_a = float(prior_a)
        self.prior_b = float(prior_b)
        self._init_bs_coef = float(bs_coef)
        self._init_l0_coef = float(l0_coef)
        self.seed = seed
        self.stop_input_gradient = bool(stop_input_gradient)
        self.noise = float(noise)
        self.seed_generator = keras.random.SeedGenerator(seed, name="gate_seed")
        self.stats = GateStats(name=f"{self.name}_stats")
        self.channels = None
        self.num_gates = None

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                "ChannelGate expects two inputs [x, h]: the block input and the "
                f"features to gate. Received: input_shape={input_shape}"
            )
        x_shape, h_shape = (tuple(s) for s in input_shape)
        if len(x_shape) != 4:
            raise ValueError(
                "ChannelGate's first input must be an NHWC feature map. "
                f"Received: x shape={x_shape}"
            )
        channels = h_shape[-1]
        if self._group_size_arg == "all" and channels is not None:
            self.group_size = int(channels)
        if channels is None or channels % self.group_size:
            raise ValueError(
                f"The gated features have {channels} channels, which is not a "
                f"multiple of group_size={self.group_size}. Pick a group_size "
                "that divides the channel count."
            )
        self.channels = int(channels)
        self.num_gates = self.channels // self.group_size
        self.hidden = keras.layers.Dense(
            self.hidden_units, use_bias=False, name="hidden", dtype="float32"
        )
        self.hidden_bn = keras.layers.BatchNormalization(
            name="hidden_bn", dtype="float32"
        )
        self.logits_dense = keras.layers.Dense(
            self.num_gates,
            bias_initializer=keras.initializers.Constant(self.init_bias),
            name="logits",
            dtype="float32",
        )
        self.hidden.build((x_shape[0], x_shape[-1]))
        self.hidden_bn.build((x_shape[0], self.hidden_units))
        self.logits_dense.build((x_shape[0], self.hidden_units))
        self.bs_coef = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self._init_bs_coef),
            trainable=False,
            name="bs_coef",
        )
        self.l0_coef = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self._init_l0_coef),
            trainable=False,
            name="l0_coef",
        )
        # 1 in the hard-gate phase (GateLossScheduler assigns it); saved
        # with the weights, so a resumed run stays in its phase.
        self.hard_training = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="hard_training"
        )

    def gate_logits(self, x, training=False):
        """Gate logits of shape `(batch, num_gates)` for block input `x`."""
        if self.stop_input_gradient:
            x = tf.stop_gradient(x)
        # sum * (1/HW), not reduce_mean: the gradient of reduce_mean divides
        # the broadcast full-size tensor; this scales the small one first.
        # (float16 sums could overflow: mixed precision keeps reduce_mean.)
        if x.dtype == tf.float32:
            area = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], tf.float32)
            pooled = tf.reduce_sum(x, axis=[1, 2]) * (1.0 / area)
        else:
            pooled = tf.cast(tf.reduce_mean(x, axis=[1, 2]), tf.float32)
        z = self.hidden(pooled)
        z = self.hidden_bn(z, training=training)
        z = tf.nn.relu(z)
        return self.logits_dense(z)

    def _sample(self, logits):
        if self.noise == 0:
            soft = tf.sigmoid(logits / self.temperature)
        elif self.noise == 1:
            seed = tf.cast(self.seed_generator.next(), tf.int32)
            dist = tfp.distributions.RelaxedBernoulli(
                tf.cast(self.temperature, logits.dtype), logits=logits
            )
            soft = dist.sample(seed=seed)
        else:
            # sigmoid((logit + s L) / t), L standard logistic: binary concrete
            # with its noise scaled (RelaxedBernoulli at logits / s and
            # temperature t / s is the same law, but its gradient overflows
            # for large s).
            seed = tf.cast(self.seed_generator.next(), tf.int32)
            noisy = tfp.distributions.Logistic(logits, tf.cast(self.noise, logits.dtype)).sample(seed=seed)
            soft = tf.sigmoid(noisy / self.temperature)
        hard = tf.cast(soft > 0.5, soft.dtype)
        # Exactly 0/1 forward (soft - soft == 0), relaxed gradient backward.
        return hard + (soft - tf.stop_gradient(soft))

    def _add_losses(self, logits, mask):
        probs = tf.sigmoid(tf.cast(logits, tf.float32))
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        # The paper anneals gamma to 0 early; skip the sort and Beta CDF then
        # (the weight is the same variable on every replica, so all replicas
        # take the same branch).
        active = self.bs_coef > 0
        # Batch-shaping compares the batch distribution with the prior: it must
        # see the global batch. all_gather is a sync point: never inside tf.cond.
        batch = ctx.all_gather(probs, axis=0) if replicas > 1 else probs
        bs = tf.cond(
            active,
            lambda: gate_losses.batch_shaping_loss(batch, self.prior_a, self.prior_b),
            lambda: tf.zeros(()),
        )
        l0 = tf.reduce_mean(probs)
        # Keras scales added losses by 1/replicas and sums replica gradients.
        self.add_loss(self.bs_coef * bs + self.l0_coef * l0)
        open_rate = tf.reduce_mean(tf.cast(mask, tf.float32))
        hard_open_rate = tf.reduce_mean(tf.cast(logits > 0, tf.float32))
        self.stats.update_state(bs, tf.cast(active, tf.float32), l0, open_rate, hard_open_rate)

    def call(self, inputs, training=None):
        x, h = inputs
        if getattr(_recording, "open", False):  # inside gates_open()
            return h
        if training:
            hard = self.hard_training > 0.5
            logits = tf.cond(
                hard,
                lambda: tf.stop_gradient(self.gate_logits(x, training=False)),
                lambda: self.gate_logits(x, training=True),
            )
            mask = tf.cond(
                hard,
                lambda: tf.cast(logits > 0, tf.float32),
                lambda: self._sample(logits),
            )
            # In the hard phase the scheduler sets both loss weights to 0.
            self._add_losses(logits, mask)
        else:
            logits = self.gate_logits(x, training=training)
            mask = tf.cast(logits > 0, tf.float32)
        _record(self, tf.stop_gradient(mask))
        if self.group_size > 1:
            mask = tf.repeat(mask, self.group_size, axis=-1)
        mask = tf.cast(mask, h.dtype)
        shape = [-1] + [1] * (len(h.shape) - 2) + [self.channels]
        return h * tf.reshape(mask, shape)

    def load_own_variables(self, store):
        own = self._trainable_variables + self._non_trainable_variables
        if len(store.keys()) == len(own) - 1 and own[-1] is self.hard_training:
            # Saved before `hard_training` existed: load the rest, start soft.
            for i, v in enumerate(own[:-1]):
                v.assign(store[f"{i}"])
            self.hard_training.assign(0.0)
            return
        super().load_own_variables(store)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[1])

    def mlp_macs(self, in_channels):
        """Multiply-accumulates of the gate MLP for one sample."""
        return int(in_channels) * self.hidden_units + self.hidden_units * self.num_gates

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_units": self.hidden_units,
                "temperature": self.temperature,
                "init_bias": self.init_bias,
                "group_size": self._group_size_arg,
                "prior_a": self.prior_a,
                "prior_b": self.prior_b,
                "bs_coef": self._init_bs_coef,
                "l0_coef": self._init_l0_coef,
                "seed": self.seed,
                "stop_input_gradient": self.stop_input_gradient,
                "noise": self.noise,
            }
        )
        return config


def find_gates(model):
    """All `ChannelGate` layers of a model, found recursively, in order."""
    gates = []
    seen = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, ChannelGate) and id(layer) not in seen:
            seen.add(id(layer))
            gates.append(layer)
    if not gates and isinstance(model, ChannelGate):
        gates.append(model)
    return gates
