"""Fold inference-mode BatchNormalization into the preceding linear layer.

At inference `BN(z) = gamma (z - mu) / sqrt(var + eps) + beta` is an affine
map per channel. When it directly follows a convolution or Dense layer
without activation, and nothing else reads that layer's output, it folds
into the layer: with `s = gamma / sqrt(var + eps)`, the kernel's output
channel `j` is scaled by `s_j` and the bias becomes `(b - mu) s + beta`.
Exact (up to float rounding); the model has the same function at inference
and fewer layers. BatchNormalization layers that cannot be folded are named
with the reason in the returned record.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from compress.graph import Part, consumers, flatten_nested, rebuild
from keras_localrank.graph import is_nested_model
from keras_localrank.taps import model_graph

__all__ = ["FOLDABLE_LAYERS", "FoldRecord", "fold_batchnorm", "fold_scale_shift"]

_DEPTHWISE = tuple(
    getattr(keras.layers, n) for n in ("DepthwiseConv1D", "DepthwiseConv2D")
    if hasattr(keras.layers, n)
)
#: Layers a following BatchNormalization can be folded into.
FOLDABLE_LAYERS: tuple[type, ...] = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
) + _DEPTHWISE


@dataclasses.dataclass
class FoldRecord:
    """What `fold_batchnorm` did.

    Attributes:
        folded: `{BatchNormalization name: layer it was folded into}`.
        skipped: `{BatchNormalization name: reason it was kept}`.
    """

    folded: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def fold_scale_shift(bn) -> tuple[np.ndarray, np.ndarray]:
    """`(s, t)` with `BN(z) = s z + t` per channel at inference (float64)."""
    eps = float(bn.epsilon)
    var = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    gamma = (
        keras.ops.convert_to_numpy(bn.gamma).astype(np.float64) if bn.scale else np.ones_like(var)
    )
    beta = (
        keras.ops.convert_to_numpy(bn.beta).astype(np.float64) if bn.center else np.zeros_like(var)
    )
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _fold_reason(model, bn, nodes) -> tuple[str | None, object]:
    """`(reason it cannot fold or None, producer layer)`."""
    own = [n for n in bn._inbound_nodes if n in nodes]
    if len(own) != 1:
        return "called several times", None
    tensor = own[0].input_tensors[0]
    producer = tensor._keras_history.operation
    ndim = len(tensor.shape)
    if bn.axis % ndim != ndim - 1:
        return f"normalizes axis {bn.axis}, not the last (channel) axis", producer
    if not isinstance(producer, FOLDABLE_LAYERS):
        return (
            f"its input comes from {type(producer).__name__} {producer.name!r}, not a "
            "Dense or convolution layer",
            producer,
        )
    if getattr(producer, "data_format", "channels_last") != "channels_last":
        return f"{producer.name!r} is channels_first", producer
    if len([n for n in producer._inbound_nodes if n in nodes]) != 1:
        return f"{producer.name!r} is called several times", producer
    if keras.activations.serialize(producer.activation) not in ("linear", None):
        return f"{producer.name!r} has an activation before the normalization", producer
    if getattr(producer, "quantization_mode", None) is not None:
        return f"{producer.name!r} is quantized", producer
    readers = consumers(model, producer)
    graph = model_graph(model)
    if len(readers) != 1 or any(
        t._keras_history.operation is producer for t in graph.outputs
    ):
        return f"the output of {producer.name!r} is also read elsewhere", producer
    return None, producer


def _folded_weights(producer, bn) -> list[np.ndarray]:
    s, t = fold_scale_shift(bn)
    dtype = keras.backend.standardize_dtype(producer.kernel.dtype)
    kernel = keras.ops.convert_to_numpy(producer.kernel).astype(np.float64)
    if isinstance(producer, _DEPTHWISE):  # output channel c * multiplier + m
        kernel = kernel * s.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        kernel = kernel * s
    bias = (
        keras.ops.convert_to_numpy(producer.bias).astype(np.float64)
        if producer.use_bias
        else np.zeros_like(s)
    )
    return [kernel.astype(dtype), (bias * s + t).astype(dtype)]


def fold_batchnorm(model: keras.Model) -> tuple[keras.Model, FoldRecord]:
    """Fold every foldable BatchNormalization into the layer before it.

    Args:
        model: a built functional or Sequential model (not modified).

    Returns:
        `(new model, FoldRecord)`. The new model is `model` rebuilt without
        the folded normalization layers (the input itself when nothing
        folds); BatchNormalization layers that stay are named in
        `FoldRecord.skipped` with the reason.
    """
    graph = model_graph(model)
    nodes = {n for group in graph._nodes_by_depth.values() for n in group}
    record = FoldRecord()
    replace, remove = {}, []
    for bn in model.layers:
        if not isinstance(bn, keras.layers.BatchNormalization):
            continue
        reason, producer = _fold_reason(model, bn, nodes)
        if reason is None and producer.name in replace:
            reason = f"{producer.name!r} already absorbs another normalization"
        if reason is not None:
            record.skipped[bn.name] = reason
            continue
        config = {**producer.get_config(), "use_bias": True}
        replace[producer.name] = [
            Part(producer.__class__.from_config(config), _folded_weights(producer, bn))
        ]
        remove.append(bn.name)
        record.folded[bn.name] = producer.name
    if not remove:
        return model, record
    return rebuild(model, replace=replace, remove=remove), record


@dataclasses.dataclass(frozen=True)
class RewritePlan:
    """A model ready for rewriting: BatchNorm folded, its layers sorted.

    Attributes:
        model: the model to rewrite (BatchNorm folded when asked).
        folded: BatchNorm layer -> the layer it was folded into.
        notes: layer -> remark for the outcome (BatchNorm left unfolded).
        dense, convs: the Dense and convolution layers to rewrite.
        skipped: weight layers left alone -> the reason.
    """

    model: object
    folded: dict
    notes: dict
    dense: list
    convs: list
    skipped: dict


def plan_rewrite(model, layers=None, *, fold_bn: bool = True) -> RewritePlan:
    """Inline nested models (`compress.graph.flatten_nested`), fold BatchNorm
    (if `fold_bn`) and choose the layers a rewrite may change.

    Raises:
        ValueError: the model has no Dense, Conv1D or Conv2D layer to rewrite
            (the message names the layers left alone and why).
    """
    from compress.registry import rewritable_layers

    nested = [layer.name for layer in model_graph(model).layers if is_nested_model(layer)]
    work, folded = flatten_nested(model), {}
    notes = {
        name: "nested model: inlined, its layers are rewritten as the model's own"
        for name in nested
    }
    if fold_bn:
        work, record = fold_batchnorm(work)
        folded = dict(record.folded)
        notes.update({k: f"not folded: {v}" for k, v in record.skipped.items()})
    dense, convs, skipped = rewritable_layers(work, layers)
    if not dense and not convs:
        raise ValueError(
            f"Model {model.name!r} has no compressible layer: expected at least one "
            "Dense, Conv1D or Conv2D layer"
            + (f" (not rewritten: {skipped})" if skipped else "")
            + ". Received layers: "
            f"{[type(layer).__name__ for layer in model.layers]}."
        )
    return RewritePlan(work, folded, notes, dense, convs, skipped)
