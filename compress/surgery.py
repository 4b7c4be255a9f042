"""Model surgery: rewrite layers through `keras.models.clone_model`.

Every rewrite returns a new model (the input model is never modified) that
keeps the other layers, their names and weights, and the compile
configuration of the original.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import numpy as np

from compress.layers import LowRankDense
from compress.registry import PASS_THROUGH_LAYERS, PRUNABLE_LAYERS
from keras_localrank.taps import model_graph

__all__ = [
    "consumer_of",
    "effective_kernel",
    "factorize",
    "prune_units",
    "recompile_like",
    "replace_layers",
]


def recompile_like(new: keras.Model, old: keras.Model) -> None:
    """Compile `new` with `old`'s compile configuration (a fresh optimizer), if any."""
    if not getattr(old, "compiled", False):
        return
    config = old.get_compile_config()
    if config:
        new.compile_from_config(config)


def replace_layers(
    model: keras.Model,
    builders: Mapping[str, Callable[[keras.layers.Layer], keras.layers.Layer]],
    weights: Mapping[str, list[np.ndarray]],
) -> keras.Model:
    """Clone `model`, building the named layers anew and copying the rest.

    Args:
        model: a built functional or Sequential model.
        builders: `{layer name: layer -> new layer}` for the rewritten layers.
        weights: `{layer name: weight list}` for layers whose weights change
            (rewritten layers and, e.g., the consumers of pruned units).

    Returns:
        The new model, with the original's compile configuration.
    """
    model_graph(model)  # validates: built, functional or Sequential, one input

    def clone(layer):
        if layer.name in builders:
            return builders[layer.name](layer)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone)
    for layer in new.layers:
        if layer.name in weights:
            layer.set_weights(list(weights[layer.name]))
        elif layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    recompile_like(new, model)
    return new


def effective_kernel(layer) -> np.ndarray:
    """The `n_in x units` kernel of a Dense or `LowRankDense` layer."""
    if isinstance(layer, LowRankDense):
        return keras.ops.convert_to_numpy(layer.kernel_a) @ keras.ops.convert_to_numpy(
            layer.kernel_b
        )
    return keras.ops.convert_to_numpy(layer.kernel)


def _low_rank_builder(rank: int):
    def build(layer):
        return LowRankDense(
            units=layer.units,
            rank=rank,
            activation=keras.activations.serialize(layer.activation),
            use_bias=layer.use_bias,
            name=layer.name,
            dtype=layer.dtype_policy,
            trainable=layer.trainable,
        )

    return build


def factorize(
    model: keras.Model, factors: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]
) -> keras.Model:
    """Replace Dense layers by `LowRankDense` layers with given factors.

    Args:
        model: a built functional or Sequential model.
        factors: `{layer name: (A, B, bias)}` with `A` `[n_in, r]`, `B`
            `[r, units]` and `bias` `[units]` (None for a layer without bias).

    Returns:
        A new model.

    Raises:
        ValueError: factor shapes that do not match the layer.
    """
    builders, weights = {}, {}
    for name, (a, b, bias) in factors.items():
        layer = model.get_layer(name)
        n_in, units = layer.kernel.shape
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != n_in
            or b.shape[1] != units
            or (a.shape[1] != b.shape[0])
        ):
            raise ValueError(
                f"Expected factors [{n_in}, r] and [r, {units}] for layer {name!r}. "
                f"Received: shapes {a.shape} and {b.shape}."
            )
        builders[name] = _low_rank_builder(int(a.shape[1]))
        weights[name] = [a, b] + ([bias] if layer.use_bias else [])
    return replace_layers(model, builders, weights)


def consumer_of(model: keras.Model, layer) -> keras.layers.Layer | None:
    """The Dense-like layer that alone reads `layer`'s output, if any.

    Follows identity-at-inference layers (`PASS_THROUGH_LAYERS`). Returns
    None when the output is a model output, is read by several layers, or
    reaches a layer of another type.
    """
    graph = model_graph(model)
    nodes = {n for group in graph._nodes_by_depth.values() for n in group}
    outputs = {id(t) for t in graph.outputs}
    current = layer
    while True:
        own = [n for n in current._inbound_nodes if n in nodes]
        if len(own) != 1 or any(id(t) in outputs for t in own[0].output_tensors):
            return None
        readers = [n for n in current._outbound_nodes if n in nodes]
        if len(readers) != 1:
            return None
        nxt = readers[0].operation
        if isinstance(nxt, PASS_THROUGH_LAYERS):
            current = nxt
            continue
        if isinstance(nxt, PRUNABLE_LAYERS) and len(readers[0].input_tensors) == 1:
            return nxt
        return None


def _with_units(units: int):
    def build(layer):
        return layer.__class__.from_config({**layer.get_config(), "units": units})

    return build


def prune_units(
    model: keras.Model,
    remove: Mapping[str, Mapping[int, float]],
) -> keras.Model:
    """Remove output units of Dense-like layers and fold them into the consumer.

    Unit `j` of layer `l`, whose output is the constant `c_j` on the data, is
    removed from `l` (kernel column, bias entry) and from its consumer
    (kernel row); `c_j` times that row is added to the consumer's bias. The
    rewrite is exact wherever the removed units really output `c_j` (a
    never-active ReLU unit outputs 0).

    Args:
        model: a built functional or Sequential model.
        remove: `{layer name: {unit index: constant output}}`.

    Returns:
        A new model.

    Raises:
        ValueError: a layer with no single Dense-like consumer, a non-zero
            constant into a consumer without bias, all units removed, or a
            bad unit index.
    """
    builders, weights = {}, {}
    consumer_rows: dict[str, list] = {}
    kept_units: dict[str, np.ndarray] = {}
    for name, units in remove.items():
        layer = model.get_layer(name)
        if not isinstance(layer, PRUNABLE_LAYERS):
            raise TypeError(
                f"Expected a Dense or LowRankDense layer to prune. Received: layer "
                f"{name!r} of type {type(layer).__name__}."
            )
        n = layer.units
        drop = np.array(sorted(int(j) for j in units), dtype=np.int64)
        if drop.size and (drop.min() < 0 or drop.max() >= n):
            raise ValueError(f"Unit index out of range [0, {n}) for layer {name!r}: {drop}")
        if drop.size >= n:
            raise ValueError(f"Cannot remove all {n} units of layer {name!r}.")
        consumer = consumer_of(model, layer)
        if consumer is None:
            raise ValueError(
                f"Layer {name!r} has no single Dense-like consumer; its units cannot be removed."
            )
        keep = np.setdiff1d(np.arange(n), drop)
        ws = [keras.ops.convert_to_numpy(w) for w in layer.weights]
        if isinstance(layer, LowRankDense):
            new_ws = [ws[0], ws[1][:, keep]] + ([ws[2][keep]] if layer.use_bias else [])
        else:
            new_ws = [ws[0][:, keep]] + ([ws[1][keep]] if layer.use_bias else [])
        kept_units[name] = keep
        builders[name] = _with_units(int(keep.size))
        weights[name] = new_ws
        consts = np.array([float(units[j]) for j in drop])
        consumer_rows.setdefault(consumer.name, []).append((keep, drop, consts, name))
    for cname, entries in consumer_rows.items():
        if len(entries) != 1:
            raise ValueError(f"Layer {cname!r} consumes several pruned layers.")
        keep, drop, consts, source = entries[0]
        consumer = model.get_layer(cname)
        kernel = effective_kernel(consumer)
        shift = consts @ kernel[drop] if drop.size else np.zeros(kernel.shape[1])
        if cname in kept_units:  # the consumer loses output units too
            shift = shift[kept_units[cname]]
        if not consumer.use_bias and np.any(consts != 0):
            raise ValueError(
                f"Units of {source!r} output non-zero constants, but consumer "
                f"{cname!r} has no bias to absorb them."
            )
        base = weights.get(cname) or [keras.ops.convert_to_numpy(w) for w in consumer.weights]
        base = list(base)
        base[0] = base[0][keep]  # kernel (or kernel_a) rows
        if consumer.use_bias:
            base[-1] = base[-1] + shift
        weights[cname] = base
    return replace_layers(model, builders, weights)
