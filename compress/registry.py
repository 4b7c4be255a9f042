"""Registry of the layer types the compression app understands.

`FACTORIZABLE_LAYERS` are rewritten into `LowRankDense`;
`CONV_FACTORIZABLE_LAYERS` into chains of stock convolutions
(`compress.conv`); `PRUNABLE_LAYERS` can lose output units (and the next
layer the matching inputs); `PASS_THROUGH_LAYERS` may sit between a pruned
layer and its consumer. `rewritable_layers` splits a model's weight layers
into those the local-rank method rewrites and the others, each with the
reason it is left alone.
`count_params` counts weights (MAC counts live in `compress.macs`). Layer
types are looked up with `isinstance`, never by class name.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from compress.layers import LowRankDense
from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS

__all__ = [
    "CONV_FACTORIZABLE_LAYERS",
    "FACTORIZABLE_LAYERS",
    "PASS_THROUGH_LAYERS",
    "PRUNABLE_LAYERS",
    "compressible_layers",
    "count_params",
    "conv_rewrite_reason",
    "is_factorizable",
    "rewritable_layers",
]

#: Layers rewritten by factorization (kernel `n_in x units` -> two factors).
FACTORIZABLE_LAYERS: tuple[type, ...] = (keras.layers.Dense,)
#: Layers whose output units can be removed (with the consumer's inputs).
PRUNABLE_LAYERS: tuple[type, ...] = (keras.layers.Dense, LowRankDense)
#: Layers that are the identity at inference: a pruned unit passes through.
PASS_THROUGH_LAYERS: tuple[type, ...] = INFERENCE_IDENTITY_LAYERS


def is_factorizable(layer) -> bool:
    """True for a plain (unquantized) Dense layer with a 2-D kernel."""
    return (
        isinstance(layer, FACTORIZABLE_LAYERS)
        and not isinstance(layer, LowRankDense)
        and getattr(layer, "quantization_mode", None) is None
        and getattr(layer, "lora_enabled", False) is False
        and len(layer.kernel.shape) == 2
    )


#: Convolutions rewritten as a chain of stock convolutions (`compress.conv`).
CONV_FACTORIZABLE_LAYERS: tuple[type, ...] = (keras.layers.Conv1D, keras.layers.Conv2D)


def conv_rewrite_reason(layer) -> str | None:
    """None when `layer` is a convolution `compress.conv` can rewrite, else why not."""
    if not isinstance(layer, CONV_FACTORIZABLE_LAYERS):
        return f"{type(layer).__name__} is not a Conv1D or Conv2D layer"
    if layer.data_format != "channels_last":
        return "channels_first convolutions are not rewritten"
    if layer.groups != 1:
        return f"grouped convolution (groups={layer.groups}) is not rewritten"
    if getattr(layer, "quantization_mode", None) is not None:
        return "quantized layers are not rewritten"
    if getattr(layer, "lora_enabled", False):
        return "LoRA-enabled layers are not rewritten"
    return None


_NORMALIZATION = tuple(
    getattr(keras.layers, n)
    for n in ("BatchNormalization", "LayerNormalization", "GroupNormalization")
    if hasattr(keras.layers, n)
)


def _calls(model, layer) -> int:
    from keras_localrank.taps import model_graph

    graph = model_graph(model)
    nodes = {n for group in graph._nodes_by_depth.values() for n in group}
    return len([n for n in layer._inbound_nodes if n in nodes])


def rewritable_layers(model, layers=None) -> tuple[list, list, dict[str, str]]:
    """The Dense and convolution layers the local-rank method rewrites.

    Args:
        model: a built functional or Sequential model.
        layers: names to restrict to. Default None: every layer.

    Returns:
        `(dense layers, conv layers, skipped)`: layers in model order, and
        `{name: reason}` for every other layer with a kernel (or the named
        layers) that is left as it is. Normalization layers are not listed
        (see `compress.folding`).

    Raises:
        ValueError: an unknown name in `layers`.
    """
    names = {layer.name for layer in model.layers}
    if layers is not None:
        for name in layers:
            if name not in names:
                raise ValueError(
                    f"Unknown layer name in `layers`. Received: {name!r}; model "
                    f"{model.name!r} has layers {sorted(names)}."
                )
    dense, conv, skipped = [], [], {}
    for layer in model.layers:
        if layers is not None and layer.name not in layers:
            continue
        if is_factorizable(layer) or isinstance(layer, CONV_FACTORIZABLE_LAYERS):
            reason = None if is_factorizable(layer) else conv_rewrite_reason(layer)
            if reason is None and _calls(model, layer) != 1:
                reason = "shared layer (called several times)"
            if reason is None:
                (dense if is_factorizable(layer) else conv).append(layer)
                continue
        elif isinstance(layer, LowRankDense):
            reason = "already factorized"
        elif isinstance(layer, keras.layers.Dense):
            reason = "quantized, LoRA or non-matrix Dense layers are not rewritten"
        elif isinstance(layer, keras.Model):
            reason = "nested model: `compress.graph.flatten_nested(model)` inlines its layers"
        elif layer.weights and not isinstance(layer, _NORMALIZATION):
            reason = f"{type(layer).__name__} layers are not rewritten by this method"
        elif layers is not None:
            reason = f"{type(layer).__name__} has no weights to rewrite"
        else:
            continue
        skipped[layer.name] = reason
    return dense, conv, skipped


def compressible_layers(model) -> list:
    """The factorizable layers of `model`, in model order."""
    return [layer for layer in model.layers if is_factorizable(layer)]


def count_params(model, *, nonzero: bool = False) -> int:
    """Number of weights of `model` (trainable and not).

    Args:
        model: a built Keras model.
        nonzero: count only non-zero weights (how magnitude-pruned models are
            sized). Default False.

    Returns:
        The count, an int.
    """
    if not nonzero:
        return int(sum(math.prod(w.shape) for w in model.weights))
    return int(sum(np.count_nonzero(keras.ops.convert_to_numpy(w)) for w in model.weights))
