"""Registry of the layer types the compression app understands.

`FACTORIZABLE_LAYERS` are rewritten into `LowRankDense`; `PRUNABLE_LAYERS`
can lose output units (and the next layer the matching inputs);
`PASS_THROUGH_LAYERS` may sit between a pruned layer and its consumer.
`count_params` and `count_macs` use one rule per layer type, looked up with
`isinstance`, never by class name.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from compress.layers import LowRankDense
from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS

__all__ = [
    "FACTORIZABLE_LAYERS",
    "PASS_THROUGH_LAYERS",
    "PRUNABLE_LAYERS",
    "compressible_layers",
    "count_macs",
    "count_params",
    "is_factorizable",
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


def _positions(layer) -> int:
    """Output positions that share the layer's kernel (1 for a vector output)."""
    shape = layer.output.shape
    return int(math.prod(d for d in shape[1:-1] if d is not None))


def _dense_macs(layer) -> int:
    return _positions(layer) * math.prod(layer.kernel.shape)


def _low_rank_macs(layer) -> int:
    return _positions(layer) * (math.prod(layer.kernel_a.shape) + math.prod(layer.kernel_b.shape))


def _conv_macs(layer) -> int:
    out_positions = math.prod(d for d in layer.output.shape[1:-1])
    return int(out_positions * math.prod(layer.kernel.shape))


#: Multiply-accumulates per sample, by layer type (checked in order).
MAC_RULES: tuple[tuple[type, object], ...] = (
    (LowRankDense, _low_rank_macs),
    (keras.layers.Dense, _dense_macs),
    (keras.layers.Conv1D, _conv_macs),
    (keras.layers.Conv2D, _conv_macs),
    (keras.layers.Conv3D, _conv_macs),
)


def count_macs(model) -> int:
    """Multiply-accumulates per sample of the layers in `MAC_RULES`.

    Dense and convolution layers are counted as executed (a zero weight still
    costs a MAC in a dense kernel); other layers count 0.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        The count, an int.
    """
    total = 0
    for layer in model.layers:
        for cls, rule in MAC_RULES:
            if isinstance(layer, cls):
                total += rule(layer)
                break
    return int(total)
