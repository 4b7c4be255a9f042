"""Structured channel pruning of convolutions, with the constants folded on.

A convolution's output channel `j` is removed when the tensor its consumer
reads (after BatchNormalization, the activation, pooling: the per-channel
layers in between) holds the constant `c_j` on the calibration data. The
channel is dropped from the convolution, from every per-channel layer in
between, and from the consumer's input, whose bias absorbs the constant:

- a convolution consumer with `"valid"` padding: `c_j * sum_{window} K[..., j, :]`
  (with `"same"`/`"causal"` padding the zero border breaks this, so only
  channels with `c_j = 0`, such as dead ReLUs, are removed);
- a Dense consumer reading the channels directly, through
  `GlobalAveragePooling`/`GlobalMaxPooling`, or through `Flatten` (every row
  of that channel, at every position): `c_j * K[rows of j, :]`.

The rewrite is exact wherever the removed channels really hold their
constant. A convolution whose output reaches a merge (`Add`,
`Concatenate`, ...), several readers or a model output keeps its channels
(a residual sum needs the same channel set on both sides): such layers are
named in `ChannelPruning.skipped` with the reason, never dropped silently.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from compress.graph import Part, consumers, rebuild
from compress.layers import LowRankDense
from compress.statistics import channel_ranges
from keras_localrank.dense_chain import ELEMENTWISE_ACTIVATIONS
from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS, model_graph

__all__ = [
    "PRUNABLE_CONV_LAYERS",
    "ChannelPruning",
    "ChannelRoute",
    "channel_route",
    "prune_constant_channels",
    "remove_channels",
]

#: Convolutions whose output channels can be removed.
PRUNABLE_CONV_LAYERS: tuple[type, ...] = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_CONV_CONSUMERS = PRUNABLE_CONV_LAYERS
_DENSE_CONSUMERS = (keras.layers.Dense, LowRankDense)
_POOLS = tuple(
    getattr(keras.layers, n)
    for n in (
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
        "AveragePooling2D", "AveragePooling3D", "ZeroPadding1D", "ZeroPadding2D",
        "ZeroPadding3D", "UpSampling1D", "UpSampling2D", "UpSampling3D",
        "Cropping1D", "Cropping2D", "Cropping3D",
    )
    if hasattr(keras.layers, n)
)
_ELEMENTWISE = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU)
_GLOBAL_POOLS = tuple(
    getattr(keras.layers, n)
    for n in (
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    )
)


@dataclasses.dataclass
class ChannelRoute:
    """How a convolution's channels reach the layer that mixes them.

    Attributes:
        source: the convolution whose output channels may be removed.
        chain: per-channel layers in between (normalization, activations,
            pooling, padding, dropout), in order.
        end: the tensor the channels are measured on (output of the chain).
        via: `None` (the consumer reads `end`), or the `Flatten` /
            global-pooling layer between `end` and a Dense consumer.
        consumer: the layer that mixes the channels (its bias absorbs them).
    """

    source: keras.layers.Layer
    chain: list
    end: object
    via: keras.layers.Layer | None
    consumer: keras.layers.Layer


@dataclasses.dataclass
class ChannelPruning:
    """What `prune_constant_channels` did.

    Attributes:
        removed: `{convolution: number of output channels removed}`.
        skipped: `{convolution: reason its channels were not removed}`
            (including constant channels kept because they could not be
            folded).
    """

    removed: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def _per_channel(layer) -> bool:
    if isinstance(layer, INFERENCE_IDENTITY_LAYERS + _POOLS + _ELEMENTWISE):
        return getattr(layer, "data_format", "channels_last") in (None, "channels_last")
    if isinstance(layer, keras.layers.Activation):
        return layer.activation in ELEMENTWISE_ACTIVATIONS
    if isinstance(layer, keras.layers.BatchNormalization):
        ndim = len(layer.input.shape)
        return layer.axis % ndim == ndim - 1
    return False


def _single_reader(model, layer, outputs):
    """`(reader layer, None)` or `(None, reason)`."""
    if any(t._keras_history.operation is layer for t in outputs):
        return None, f"the output of {layer.name!r} is a model output"
    readers = consumers(model, layer)
    if len(readers) != 1:
        return None, f"the output of {layer.name!r} is read by {len(readers)} layers"
    node, nxt = readers[0]
    if len(node.input_tensors) != 1:
        return None, (
            f"its channels reach {type(nxt).__name__} {nxt.name!r}, which merges several "
            "tensors (the channel sets of a merge must stay aligned)"
        )
    return nxt, None


def channel_route(model, layer) -> ChannelRoute | str:
    """The `ChannelRoute` of convolution `layer`, or the reason there is none."""
    if not isinstance(layer, PRUNABLE_CONV_LAYERS):
        return f"{type(layer).__name__} is not a prunable convolution"
    if layer.data_format != "channels_last" or layer.groups != 1:
        return "only channels_last convolutions with groups=1 are pruned"
    outputs = model_graph(model).outputs
    chain, current = [], layer
    while True:
        nxt, reason = _single_reader(model, current, outputs)
        if reason:
            return reason
        if _per_channel(nxt):
            chain.append(nxt)
            current = nxt
            continue
        break
    end = current.output
    via = None
    if isinstance(nxt, (keras.layers.Flatten,) + _GLOBAL_POOLS):
        if isinstance(nxt, keras.layers.Flatten) and nxt.data_format == "channels_first":
            return f"{nxt.name!r} flattens channels_first"
        if isinstance(nxt, _GLOBAL_POOLS) and (
            nxt.data_format != "channels_last" or getattr(nxt, "keepdims", False)
        ):
            return f"{nxt.name!r} is channels_first or keeps dims"
        via, current = nxt, nxt
        while True:
            nxt, reason = _single_reader(model, current, outputs)
            if reason:
                return reason
            if isinstance(nxt, INFERENCE_IDENTITY_LAYERS):
                current = nxt
                continue
            break
        if not isinstance(nxt, _DENSE_CONSUMERS):
            return f"read by {type(nxt).__name__} {nxt.name!r} after {via.name!r}, not Dense"
    elif isinstance(nxt, _CONV_CONSUMERS):
        if nxt.data_format != "channels_last" or nxt.groups != 1:
            return f"consumer {nxt.name!r} is channels_first or grouped"
    elif not isinstance(nxt, _DENSE_CONSUMERS):
        return (
            f"its channels reach {type(nxt).__name__} {nxt.name!r}, which cannot drop "
            "input channels"
        )
    return ChannelRoute(source=layer, chain=chain, end=end, via=via, consumer=nxt)


def _np(w) -> np.ndarray:
    return keras.ops.convert_to_numpy(w)


def _foldable(route: ChannelRoute, consts: dict[int, float]) -> tuple[dict[int, float], str]:
    """The channels whose constant the consumer can absorb, and a note on the others."""
    consumer = route.consumer
    if not consumer.use_bias:
        kept = {j: c for j, c in consts.items() if c == 0.0}
        note = "" if len(kept) == len(consts) else "consumer has no bias"
        return kept, note
    if isinstance(consumer, _CONV_CONSUMERS) and consumer.padding != "valid":
        kept = {j: c for j, c in consts.items() if c == 0.0}
        note = "" if len(kept) == len(consts) else f"consumer pads ({consumer.padding!r})"
        return kept, note
    return consts, ""


def _consumer_update(route, weights, drop, keep, consts):
    """New weights of the consumer without input channels `drop` (constants folded)."""
    consumer = route.consumer
    c = np.asarray(consts, dtype=np.float64)
    if isinstance(consumer, _CONV_CONSUMERS):
        k = weights[0].astype(np.float64)
        spatial = tuple(range(k.ndim - 2))
        shift = c @ k[..., drop, :].sum(axis=spatial) if drop.size else 0.0
        new = [k[..., keep, :].astype(weights[0].dtype)] + list(weights[1:])
    else:
        low_rank = isinstance(consumer, LowRankDense)
        rows = weights[0].astype(np.float64)
        n_ch = int(route.end.shape[-1])
        if isinstance(route.via, keras.layers.Flatten):
            positions = rows.shape[0] // n_ch
            rows3 = rows.reshape(positions, n_ch, -1)
            dropped = rows3[:, drop, :]  # (positions, |drop|, width)
            kept_rows = rows3[:, keep, :].reshape(positions * keep.size, -1)
            row_shift = np.einsum("j,pjw->w", c, dropped)
        else:
            kept_rows = rows[keep]
            row_shift = c @ rows[drop]
        shift = row_shift @ weights[1].astype(np.float64) if low_rank else row_shift
        new = [kept_rows.astype(weights[0].dtype)] + list(weights[1:])
    if consumer.use_bias:
        new[-1] = (new[-1].astype(np.float64) + shift).astype(weights[-1].dtype)
    return new


def remove_channels(model, plan: dict[str, dict[int, float]]) -> keras.Model:
    """Remove output channels of convolutions, folding their constants on.

    Args:
        model: a built functional or Sequential model (not modified).
        plan: `{convolution name: {channel: constant at the consumer's input}}`.

    Returns:
        A new functional model.

    Raises:
        ValueError: a convolution without a `ChannelRoute`, a bad channel
            index, all channels removed, or a non-zero constant the consumer
            cannot absorb.
    """
    weights: dict[str, list[np.ndarray]] = {}
    layers: dict[str, keras.layers.Layer] = {}
    out_keep: dict[str, np.ndarray] = {}

    def current(layer):
        layers[layer.name] = layer
        if layer.name not in weights:
            weights[layer.name] = [_np(w) for w in layer.weights]
        return weights[layer.name]

    routes = {}
    for name, consts in plan.items():
        layer = model.get_layer(name)
        route = channel_route(model, layer)
        if isinstance(route, str):
            raise ValueError(f"Cannot remove channels of {name!r}: {route}.")
        n = int(layer.filters)
        drop = np.array(sorted(int(j) for j in consts), dtype=np.int64)
        if drop.size and (drop.min() < 0 or drop.max() >= n):
            raise ValueError(f"Channel index out of range [0, {n}) for layer {name!r}: {drop}")
        if drop.size >= n:
            raise ValueError(f"Cannot remove all {n} channels of layer {name!r}.")
        foldable, note = _foldable(route, dict(consts))
        if len(foldable) != len(consts):
            raise ValueError(f"Cannot fold the constants of {name!r} into its consumer: {note}.")
        routes[name] = (route, drop, np.setdiff1d(np.arange(n), drop), consts)
    # Input side first (the bias shift is over all output channels), then outputs.
    for name, (route, drop, keep, consts) in routes.items():
        ws = current(route.consumer)
        weights[route.consumer.name] = _consumer_update(
            route, ws, drop, keep, [consts[int(j)] for j in drop]
        )
        for link in route.chain:
            if link.weights:  # BatchNormalization: every weight is per channel
                weights[link.name] = [w[keep] for w in current(link)]
        out_keep[name] = keep
    for name, keep in out_keep.items():
        ws = current(routes[name][0].source)
        weights[name] = [ws[0][..., keep]] + ([ws[1][keep]] if len(ws) > 1 else [])
    replace = {}
    for name, ws in weights.items():
        layer = layers[name]
        config = layer.get_config()
        if name in out_keep:
            config["filters"] = int(out_keep[name].size)
        replace[name] = [Part(layer.__class__.from_config(config), ws)]
    return rebuild(model, replace=replace)


def prune_constant_channels(
    model: keras.Model,
    x,
    *,
    layers=None,
    atol: float = 0.0,
    batch_size: int = 256,
) -> tuple[keras.Model, ChannelPruning]:
    """Remove the convolution channels that are constant on `x` (see the module doc).

    Args:
        model: a built functional or Sequential model (not modified).
        x: calibration samples.
        layers: names of the convolutions to consider. Default None: every
            `PRUNABLE_CONV_LAYERS` layer.
        atol: a channel is constant when its range on `x` is <= `atol`.
            Default 0 (constant to the last bit).
        batch_size: samples per chunk. Default 256.

    Returns:
        `(new model, ChannelPruning)`; the model itself when nothing is removed.
    """
    record = ChannelPruning()
    chosen = [
        layer
        for layer in model.layers
        if isinstance(layer, PRUNABLE_CONV_LAYERS) and (layers is None or layer.name in layers)
    ]
    routes = []
    for layer in chosen:
        route = channel_route(model, layer)
        if isinstance(route, str):
            record.skipped[layer.name] = route
        else:
            routes.append(route)
    if not routes:
        return model, record
    ranges = channel_ranges(model, x, [r.end for r in routes], batch_size=batch_size)
    plan = {}
    for route, (lo, hi) in zip(routes, ranges):
        idx = np.flatnonzero(hi - lo <= atol)
        consts = {int(j): float((hi[j] + lo[j]) / 2) for j in idx}
        consts, note = _foldable(route, consts)
        if note:
            record.skipped[route.source.name] = (
                f"{len(idx) - len(consts)} constant channel(s) kept: {note}"
            )
        if len(consts) >= int(route.source.filters):  # keep one channel
            consts.pop(max(consts))
        if consts:
            plan[route.source.name] = consts
    if not plan:
        return model, record
    record.removed = {k: len(v) for k, v in plan.items()}
    return remove_channels(model, plan), record
