"""Knowledge distillation from the original model while fine-tuning a compressed one.

The student is trained on `(1 - w) * CE(y, student) + w * T^2 * KL(p_T || q_T)`
where `p_T` and `q_T` are the teacher's and the student's class
probabilities at temperature `T` (Hinton, Vinyals & Dean 2015). The
teacher's outputs are computed once, before training, and travel with the
labels: `y_true = [label, teacher outputs...]` (`pack_targets`), so the loss
is an ordinary Keras loss and `model.fit` needs nothing else.

References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    https://arxiv.org/abs/1503.02531
"""

from __future__ import annotations

import keras
import numpy as np

from keras_localrank.validation import check_finite_float, check_fraction

__all__ = ["DistillationLoss", "pack_targets"]


def pack_targets(y, teacher_outputs) -> np.ndarray:
    """`[label, teacher outputs...]` rows (float32) for `DistillationLoss`.

    Raises:
        ValueError: different numbers of labels and teacher outputs.
    """
    y = np.asarray(y).reshape(-1)
    teacher_outputs = np.asarray(teacher_outputs, dtype=np.float32)
    teacher_outputs = teacher_outputs.reshape(len(teacher_outputs), -1)
    if len(y) != len(teacher_outputs):
        raise ValueError(
            f"Expected one teacher output per label. Received: {len(y)} labels and "
            f"{len(teacher_outputs)} teacher outputs."
        )
    return np.concatenate([y[:, None].astype(np.float32), teacher_outputs], axis=1)


def _log_softmax(out, *, from_logits: bool, temperature: float):
    ops = keras.ops
    if not from_logits:  # probabilities: back to log-probabilities first
        out = ops.log(ops.clip(out, 1e-7, 1.0))
    return ops.log_softmax(out / temperature, axis=-1)


@keras.saving.register_keras_serializable(package="keras_localrank")
class DistillationLoss(keras.losses.Loss):
    """Cross-entropy to the labels mixed with KL divergence to a teacher.

    Args:
        weight: share `w` in [0, 1] of the distillation term. Default 0.5.
        temperature: softmax temperature `T` > 0 of both distributions.
            Default 2.0.
        from_logits: whether student and teacher output logits (else
            probabilities). Default True.
        name: loss name. Default `"distillation"`.

    Call arguments:
        y_true: `[batch, 1 + classes]`: the integer label, then the
            teacher's outputs (see `pack_targets`).
        y_pred: the student's outputs `[batch, classes]`.
    """

    def __init__(
        self,
        weight: float = 0.5,
        temperature: float = 2.0,
        from_logits: bool = True,
        name: str = "distillation",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.weight = check_fraction("weight", weight, allow_zero=True)
        self.temperature = check_finite_float("temperature", temperature, low=0.0, low_open=True)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        ops = keras.ops
        labels = ops.cast(y_true[:, 0], "int32")
        teacher = y_true[:, 1:]
        ce = keras.losses.sparse_categorical_crossentropy(
            labels, y_pred, from_logits=self.from_logits
        )
        t = self.temperature
        log_p = _log_softmax(teacher, from_logits=self.from_logits, temperature=t)
        log_q = _log_softmax(y_pred, from_logits=self.from_logits, temperature=t)
        kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        return (1.0 - self.weight) * ce + self.weight * t * t * kl

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "weight": self.weight,
            "temperature": self.temperature,
            "from_logits": self.from_logits,
        }
