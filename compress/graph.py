"""Rewire a functional graph: replace a layer by a chain of layers, drop layers.

`keras.models.clone_model` maps one layer to one layer; a factorized
convolution is two or three stock layers, and a folded BatchNormalization
disappears. `rebuild` runs the model's graph on a fresh input, calling a
clone of every layer except the ones replaced (by a chain of `Part`s) or
removed (skipped: their input flows on). Nested functional and Sequential
models (the transfer-learning pattern `head(base(inputs))`) are inlined:
their layers become layers of the new model. The result is a plain
functional model of stock layers that loads with `keras.models.load_model`.
`flatten_nested` is that rebuild with nothing replaced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import keras
import numpy as np

from compress.surgery import recompile_like
from keras_localrank.graph import functional_graph, is_nested_model
from keras_localrank.taps import model_graph

__all__ = ["Part", "consumers", "flatten_nested", "producer_node", "rebuild"]


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
    new_weights: dict[int, list[np.ndarray]] = {}
    # Names of the new model's layers: the outer model's names are kept; an
    # inlined layer whose name is taken gets its nested model's name in front.
    used = {layer.name for layer in model.layers if not is_nested_model(layer)}
    used |= {p.layer.name for parts in replace.values() for p in parts}

    def chain(parts):
        def call(x, **kwargs):
            for part in parts:
                x = part.layer(x)
            return x

        return call

    def inline(nested):
        inner = functional_graph(nested)

        def call(*args, **kwargs):
            inputs = args[0] if len(args) == 1 else list(args)
            return inner._run_through_graph(
                inputs, operation_fn=lambda op: operation_fn(op, nested.name)
            )

        return call

    def clone(op, prefix):
        config = op.get_config()
        if prefix is not None and op.name in used:
            name, k = f"{prefix}_{op.name}", 1
            while name in used:
                name, k = f"{prefix}_{op.name}_{k}", k + 1
            config["name"] = name
        used.add(config.get("name", op.name))
        fn = op.__class__.from_config(config)
        if op.weights:
            new_weights[id(fn)] = op.get_weights()
        return fn

    def operation_fn(op, prefix=None):
        if id(op) in clones:
            return clones[id(op)]
        if prefix is None and op.name in remove:
            fn = _identity
        elif prefix is None and op.name in replace:
            parts = replace[op.name]
            for part in parts:
                new_weights[id(part.layer)] = list(part.weights)
            fn = chain(parts)
        elif isinstance(op, keras.layers.InputLayer):
            fn = op
        elif is_nested_model(op):
            fn = inline(op)
        else:
            fn = clone(op, prefix)
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
        if id(layer) in new_weights:
            layer.set_weights(new_weights[id(layer)])
    recompile_like(new, model)
    return new


def flatten_nested(model: keras.Model) -> keras.Model:
    """`model` with its nested functional and Sequential models inlined.

    The transfer-learning pattern `head(base(inputs))` becomes one flat
    functional model whose layers are the base's and the head's, with the
    same weights and outputs, so every layer can be rewritten. A layer of a
    nested model keeps its name unless the name is taken, then it is
    `<nested model>_<name>`. A nested model called several times shares its
    layers between the calls. Keras 3 runs a nested model's layers with the
    outer call's `training` value, so inlining does not change training.

    Returns:
        `model` itself when it has no nested model, else a new model
        (compiled like `model`); `model` is not modified.
    """
    if not any(is_nested_model(layer) for layer in model_graph(model).layers):
        return model
    return rebuild(model)


def _identity(x, **kwargs):
    return x
