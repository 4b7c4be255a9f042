"""Rewire a functional graph: replace a layer by a chain of layers, drop layers.

`keras.models.clone_model` maps one layer to one layer; a factorized
convolution is two or three stock layers, and a folded BatchNormalization
disappears. `rebuild` runs the model's graph on a fresh input, calling a
clone of every layer except the ones replaced (by a chain of `Part`s) or
removed (skipped: their input flows on). The result is a plain functional
model of stock layers that loads with `keras.models.load_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import keras
import numpy as np

from compress.surgery import recompile_like
from keras_localrank.taps import model_graph

__all__ = ["Part", "consumers", "producer_node", "rebuild"]


@dataclasses.dataclass
class Part:
    """One new layer of a replacement chain, and its weights.

    Attributes:
        layer: the new (unbuilt) layer; its name must be unique in the model.
        weights: its weights, in `layer.get_weights()` order.
    """

    layer: keras.layers.Layer
    weights: list[np.ndarray]


def _graph_nodes(graph) -> set:
    return {node for nodes in graph._nodes_by_depth.values() for node in nodes}


def producer_node(model, tensor):
    """The node of `model`'s graph that computes `tensor`."""
    history = tensor._keras_history
    return history.operation._inbound_nodes[history.node_index]


def consumers(model, layer) -> list:
    """`(node, layer)` pairs of the graph nodes that read `layer`'s output."""
    graph = model_graph(model)
    nodes = _graph_nodes(graph)
    return [(n, n.operation) for n in layer._outbound_nodes if n in nodes]


def rebuild(
    model: keras.Model,
    *,
    replace: Mapping[str, Sequence[Part]] | None = None,
    remove: Collection[str] = (),
) -> keras.Model:
    """A new functional model with some layers replaced or removed.

    Every other layer is cloned from its config and gets the original's
    weights; the input model is not modified.

    Args:
        model: a built functional or Sequential model with one input.
        replace: `{layer name: parts}`; the layer is replaced by its parts
            called in sequence (a single-input layer). Default None.
        remove: names of single-input, single-output layers to drop (their
            input is passed on unchanged). Default ().

    Returns:
        The new model, compiled like the original.

    Raises:
        ValueError: a replaced or removed layer that is not in the model or
            not called exactly once.
    """
    replace = dict(replace or {})
    remove = set(remove)
    graph = model_graph(model)
    nodes = _graph_nodes(graph)
    names = {layer.name for layer in model.layers}
    for name in list(replace) + sorted(remove):
        if name not in names:
            raise ValueError(f"Unknown layer name {name!r} in model {model.name!r}.")
        layer = model.get_layer(name)
        if len([n for n in layer._inbound_nodes if n in nodes]) != 1:
            raise ValueError(f"Layer {name!r} is called several times; it cannot be rewritten.")
    clones: dict[int, object] = {}
    new_weights: dict[str, list[np.ndarray]] = {}

    def chain(parts):
        def call(x, **kwargs):
            for part in parts:
                x = part.layer(x)
            return x

        return call

    def operation_fn(op):
        if id(op) in clones:
            return clones[id(op)]
        if op.name in remove:
            fn = _identity
        elif op.name in replace:
            parts = replace[op.name]
            for part in parts:
                new_weights[part.layer.name] = list(part.weights)
            fn = chain(parts)
        elif isinstance(op, keras.layers.InputLayer):
            fn = op
        else:
            fn = op.__class__.from_config(op.get_config())
            if op.weights:
                new_weights.setdefault(op.name, op.get_weights())
        clones[id(op)] = fn
        return fn

    old_input = graph.inputs[0]
    new_input = keras.Input(
        batch_shape=old_input.shape,
        dtype=old_input.dtype,
        name=old_input._keras_history.operation.name,
    )
    outputs = graph._run_through_graph(new_input, operation_fn=operation_fn)
    new = keras.Model(new_input, outputs, name=model.name)
    for layer in new.layers:
        if layer.name in new_weights:
            layer.set_weights(new_weights[layer.name])
    recompile_like(new, model)
    return new


def _identity(x, **kwargs):
    return x
