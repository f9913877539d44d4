"""Knowledge distillation for gated networks, as a Keras model wrapper.

`Distiller(student, teacher)` trains `student` with `model.fit` and adds,
in every training step, a distillation term to the student's own losses
(the compiled task loss, the gate losses, weight decay):

    alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))

(Hinton et al., 2015; the T**2 keeps the gradient scale independent of T).
The teacher is

- `"self"`: the student itself with every gate open, run in the same step
  (the full network teaches the gated one, as in slimmable networks). Its
  BatchNormalization layers normalise with the batch's statistics, but their
  moving statistics are left as the student's pass set them, so they keep
  tracking the gated network that is deployed. With `train_teacher=True`
  (the default) the full network also learns from the labels (the compiled
  loss on its outputs: the slimmable "sandwich" rule), while the distillation
  target carries no gradient; with `train_teacher=False` the teacher's outputs
  are only a constant target (stop-gradient). Measured on the 500-step
  Fashion-MNIST demo: sandwich 0.836 at 0.54 of the MACs, stop-gradient 0.796
  at 0.51, no distillation 0.817 at 0.52 (docs/RESULTS.md).
- a `keras.Model`: a trained classifier (e.g. a plain run's `best.keras`),
  frozen and run in inference mode.

Outputs may be softmax probabilities (the builders' default) or logits
(`from_logits=True`); probabilities are turned into logits as `log(p)`,
which softmax takes back exactly.

The wrapper only trains: `student` is the model to save, evaluate and
export (`train.py` saves it as `last.keras` / `best.keras`). The
distillation term is logged as `distill_loss`.

Example:

```python
model = bs_keras.cifar_resnet(20, num_classes=10)
distiller = bs_keras.Distiller(model, "self", alpha=1.0, temperature=4.0)
distiller.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
distiller.fit(x, y, epochs=4, callbacks=[bs_keras.GateLossScheduler(gamma, lam)])
model.save("gated.keras")
```
"""

import math
import threading

import keras
import tensorflow as tf

from bs_keras.gates import gates_open

SELF = "self"
_teachers = threading.local()  # the sandwich teacher's outputs, from call to compute_loss


def unwrap(model):
    """The model to save, count and report: a `Distiller`'s student, else `model`."""
    return model.student if isinstance(model, Distiller) else model


def _logits(outputs, from_logits):
    outputs = tf.cast(outputs, tf.float32)
    if from_logits:
        return outputs
    return tf.math.log(tf.clip_by_value(outputs, 1e-30, 1.0))


def distillation_loss(teacher_logits, student_logits, temperature):
    """Per-sample `T**2 * KL(softmax(teacher / T) || softmax(student / T))`."""
    t = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature, axis=-1)
    s = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature, axis=-1)
    kl = tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)
    return temperature**2 * kl


@keras.saving.register_keras_serializable(package="bs_keras")
class Distiller(keras.Model):
    """Trains `student` with a distillation term from `teacher` (module doc).

    Args:
        student: the (gated) classifier to train; a built Keras model.
        teacher: `"self"` (the student with all gates open) or a trained
            `keras.Model` with the same outputs (frozen here).
        alpha: weight of the distillation term, >= 0.
        temperature: softening temperature T, > 0.
        train_teacher: `"self"` only: the full network also learns from the
            labels (sandwich rule) instead of being a stop-gradient target;
            None (default): True for `"self"`, False for a model teacher.
        from_logits: whether the models output logits (else probabilities).
    """

    def __init__(self, student, teacher=SELF, alpha=1.0, temperature=4.0, train_teacher=None,
                 from_logits=False, **kwargs):
        if not isinstance(student, keras.Model):
            raise ValueError(f"student must be a keras.Model. Received: {type(student).__name__}")
        if isinstance(teacher, dict):
            teacher = keras.saving.deserialize_keras_object(teacher)
        if not (teacher == SELF or isinstance(teacher, keras.Model)):
            raise ValueError(f"teacher must be 'self' or a keras.Model. Received: {teacher!r}")
        if teacher is student:
            raise ValueError("Pass teacher='self' to distil the student from itself with its gates open.")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0. Received: alpha={alpha}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0. Received: temperature={temperature}")
        if train_teacher is None:
            train_teacher = teacher == SELF
        if train_teacher and teacher != SELF:
            raise ValueError("train_teacher is for teacher='self'; an external teacher stays frozen.")
        if teacher != SELF:
            s_shape, t_shape = tuple(student.outputs[0].shape[1:]), tuple(teacher.outputs[0].shape[1:])
            if s_shape != t_shape:
                raise ValueError(f"The teacher's outputs {t_shape} differ from the student's {s_shape}.")
            if tuple(student.inputs[0].shape[1:]) != tuple(teacher.inputs[0].shape[1:]):
                raise ValueError(
                    f"The teacher takes inputs of shape {tuple(teacher.inputs[0].shape[1:])}, the student "
                    f"{tuple(student.inputs[0].shape[1:])}."
                )
            teacher.trainable = False
        super().__init__(name=kwargs.pop("name", f"{student.name}_distiller"), **kwargs)
        self.student = student
        self.teacher = teacher if teacher != SELF else None
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.train_teacher = bool(train_teacher)
        self.from_logits = bool(from_logits)
        self.distill_tracker = keras.metrics.Mean(name="distill_loss")
        self._moving = [
            v for layer in student._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)
        ]
        self.built = student.built

    def call(self, inputs, training=None):
        outputs = self.student(inputs, training=training)
        if self.alpha == 0:
            return outputs
        # The teacher runs inside this call (not in `compute_loss`): an
        # outermost call of the student would clear the gates' `add_loss`
        # list, which MirroredStrategy's replica threads share.
        teacher = self._teacher_outputs(inputs, training)
        target = tf.stop_gradient(_logits(teacher, self.from_logits))
        kd = tf.reduce_mean(distillation_loss(target, _logits(outputs, self.from_logits), self.temperature))
        self.distill_tracker.update_state(kd)
        if training:
            self.add_loss(self.alpha * kd)
        # For compute_loss's sandwich term, in this (replica) thread.
        _teachers.outputs = (self, teacher) if training and self.train_teacher else None
        return outputs

    def _teacher_outputs(self, x, training):
        if self.teacher is not None:
            return tf.stop_gradient(self.teacher(x, training=False))
        if not training:
            with gates_open():
                return self.student(x, training=False)
        # The gates-open pass: batch statistics, but the moving statistics
        # stay the gated student's (restored after the pass).
        saved = [tf.identity(v.value) for v in self._moving]
        with gates_open():
            outputs = self.student(x, training=True)
        with tf.control_dependencies([outputs]):
            for v, value in zip(self._moving, saved):
                v.assign(value)
        return outputs

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        owner, teacher = getattr(_teachers, "outputs", None) or (None, None)
        if training and self.train_teacher and owner is self:
            _teachers.outputs = None
            loss = loss + self._compile_loss(y, teacher, sample_weight)  # sandwich: labels teach it too
        return loss

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": SELF if self.teacher is None else keras.saving.serialize_keras_object(self.teacher),
            "alpha": self.alpha,
            "temperature": self.temperature,
            "train_teacher": self.train_teacher,
            "from_logits": self.from_logits,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)
