"""What a classifier's output is: logits, probabilities, or sigmoid scores.

The loss the compression app scores candidates with (the greedy allocation,
fine-tuning of uncompiled models, the TF-MOT baseline) must match the
output: cross-entropy on probabilities read as logits is a different
number (and a different ranking of candidates). `output_kind` reads the
kind from the model graph — the activation of the last layer that has one
(a Dense/Conv `activation`, a `Softmax` layer, an `Activation` layer),
looking through layers that are the identity at inference — and, when the
graph shows no normalizing activation, from the compiled loss
(`from_logits`, binary or categorical). The kind found and the evidence go
into the report.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS

__all__ = ["KINDS", "OutputKind", "output_kind"]

#: `"logits"`: unnormalized multi-class scores (softmax applied in the loss);
#: `"probabilities"`: a softmax output; `"sigmoid"`: independent
#: probabilities per unit (binary when there is one unit);
#: `"binary_logits"`: one unnormalized unit, sigmoid applied in the loss.
KINDS = ("logits", "probabilities", "sigmoid", "binary_logits")

# Layers that do not change what the output means (a reshape of logits is
# still logits).
_TRANSPARENT = INFERENCE_IDENTITY_LAYERS + (
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Identity,
)


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """The kind of a classifier's output and how it was found.

    Attributes:
        kind: one of `KINDS`.
        evidence: a sentence saying where the kind was read (for the report).
    """

    kind: str
    evidence: str

    @property
    def from_logits(self) -> bool:
        """True when the loss must apply the softmax/sigmoid itself."""
        return self.kind in ("logits", "binary_logits")

    @property
    def binary(self) -> bool:
        """True for sigmoid outputs (one-vs-rest binary cross-entropy)."""
        return self.kind in ("sigmoid", "binary_logits")

    def loss(self) -> keras.losses.Loss:
        """The Keras loss for integer class labels and this output."""
        if self.binary:
            return _OneVsRestCrossentropy(from_logits=self.from_logits)
        return keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)

    def numpy_loss(self, y: np.ndarray, out: np.ndarray) -> float:
        """Mean cross-entropy of integer labels `y` under outputs `out` (float64)."""
        out = np.asarray(out, dtype=np.float64).reshape(len(y), -1)
        y = np.asarray(y).astype(np.int64).reshape(-1)
        eps = 1e-7
        if self.binary:
            target = _one_hot_or_binary(y, out.shape[1])
            if self.from_logits:  # log(1 + e^-z) and log(1 + e^z), stably
                per = np.logaddexp(0.0, -out) * target + np.logaddexp(0.0, out) * (1 - target)
            else:
                p = np.clip(out, eps, 1 - eps)
                per = -(target * np.log(p) + (1 - target) * np.log(1 - p))
            return float(per.mean(axis=1).mean())
        if self.from_logits:
            shifted = out - out.max(axis=1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        else:
            p = np.clip(out / out.sum(axis=1, keepdims=True), eps, 1 - eps)
            log_p = np.log(p)
        return float(-log_p[np.arange(len(y)), y].mean())


def _one_hot_or_binary(y: np.ndarray, units: int) -> np.ndarray:
    if units == 1:
        return y.reshape(-1, 1).astype(np.float64)
    return np.eye(units)[y]


@keras.saving.register_keras_serializable(package="compress")
class _OneVsRestCrossentropy(keras.losses.Loss):
    """Binary cross-entropy of integer labels against sigmoid outputs (one-vs-rest)."""

    def __init__(self, from_logits: bool = False, name: str = "one_vs_rest_crossentropy", **kw):
        super().__init__(name=name, **kw)
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        units = y_pred.shape[-1]
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        if units == 1:
            target = keras.ops.cast(keras.ops.reshape(y_true, (-1, 1)), y_pred.dtype)
        else:
            target = keras.ops.one_hot(y_true, units, dtype=y_pred.dtype)
        return keras.losses.binary_crossentropy(target, y_pred, from_logits=self.from_logits)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


_NORMALIZING = {"softmax": "probabilities", "sigmoid": "sigmoid"}


def _graph_activation(model) -> tuple[str | None, str | None]:
    """`(activation name, layer name)` of the last activation before the output."""
    node_layer = model.outputs[0]._keras_history.operation if model.outputs else None
    layer = node_layer
    while layer is not None:
        if isinstance(layer, keras.layers.Softmax):
            return "softmax", layer.name
        if isinstance(layer, _TRANSPARENT) and not isinstance(layer, keras.layers.Activation):
            parents = _parents(layer)
            layer = parents[0] if len(parents) == 1 else None
            continue
        activation = getattr(layer, "activation", None)
        if activation is not None:
            name = keras.activations.serialize(activation)
            if isinstance(name, dict):
                name = name.get("config", name.get("class_name"))
            return str(name), layer.name
        return None, layer.name
    return None, None


def _parents(layer) -> list:
    node = layer._inbound_nodes[0] if layer._inbound_nodes else None
    if node is None:
        return []
    return [t._keras_history.operation for t in node.input_tensors]


def _compiled_loss(model) -> tuple[str | None, bool | None, str | None]:
    """`(family, from_logits, description)` of the compiled loss, or Nones."""
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        return None, None, None
    loss = model.loss
    if isinstance(loss, (list, tuple, dict)):
        return None, None, None
    if isinstance(loss, keras.losses.Loss):
        name = type(loss).__name__
        from_logits = getattr(loss, "from_logits", None)
        if from_logits is None:
            from_logits = loss.get_config().get("from_logits")
    else:
        name = loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss))
        from_logits = False  # Keras's default for every cross-entropy
    key = name.lower().replace("_", "")
    if "binary" in key and "crossentropy" in key:
        family = "binary"
    elif "crossentropy" in key:
        family = "categorical"
    else:
        return None, None, None
    return family, (None if from_logits is None else bool(from_logits)), f"{name}"


def output_kind(model) -> OutputKind:
    """Detect what `model`'s (first) output is.

    The graph decides when it shows a softmax or sigmoid; otherwise a
    compiled cross-entropy loss with `from_logits=False` means the output is
    a probability (the model was trained that way); otherwise the output is
    taken as logits.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        An `OutputKind`.
    """
    activation, layer = _graph_activation(model)
    family, from_logits, loss_name = _compiled_loss(model)
    units = model.outputs[0].shape[-1] if model.outputs else None
    if activation in _NORMALIZING:
        kind = _NORMALIZING[activation]
        evidence = f"layer {layer!r} applies {activation}"
        if from_logits:
            evidence += f" (the compiled loss {loss_name} says from_logits=True: ignored)"
        return OutputKind(kind, evidence)
    if activation == "log_softmax":
        return OutputKind("logits", f"layer {layer!r} applies log_softmax (log-probabilities)")
    if family is not None and from_logits is not None:
        if family == "binary":
            kind = "binary_logits" if from_logits else "sigmoid"
        else:
            kind = "logits" if from_logits else "probabilities"
        return OutputKind(
            kind,
            f"no softmax/sigmoid in the graph (layer {layer!r}: activation "
            f"{activation or 'unknown'}); the compiled loss {loss_name} has "
            f"from_logits={from_logits}",
        )
    kind = "binary_logits" if units == 1 else "logits"
    return OutputKind(
        kind,
        f"no softmax/sigmoid in the graph (layer {layer!r}: activation "
        f"{activation or 'unknown'}) and no compiled cross-entropy: taken as logits",
    )
