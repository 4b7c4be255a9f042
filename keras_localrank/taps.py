"""Taps: which layers of a model are measured, and their pre-activations.

A *tap* is a point of a functional (or built Sequential) Keras model whose
pre-activation `p_l(x)` is measured: a `Dense`, `EinsumDense` or convolution
layer (the output before its own activation), or any tensor marked by a
`keras_localrank.layers.RankProbe`. This module finds taps, validates the
model, builds one feature model that returns every tapped layer's input, and
recomputes each pre-activation from that input with the layer's own weights.

Registry: `MEASURABLE_LAYERS` lists the supported layer classes; use
`isinstance`, never class-name matching.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence

import keras

__all__ = [
    "INFERENCE_IDENTITY_LAYERS",
    "MEASURABLE_LAYERS",
    "Tap",
    "TapSelection",
    "select_taps",
    "model_graph",
    "preactivation",
    "tap_inputs_model",
]

_CONV_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
        "DepthwiseConv1D",
        "DepthwiseConv2D",
        "SeparableConv1D",
        "SeparableConv2D",
    )
    if hasattr(keras.layers, name)
)

#: Layer classes whose pre-activation can be measured.
MEASURABLE_LAYERS: tuple[type, ...] = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
) + _CONV_LAYERS


#: Layers that are the identity at inference (noise and dropout layers).
INFERENCE_IDENTITY_LAYERS: tuple[type, ...] = (
    keras.layers.Dropout,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
)


def _is_probe(layer) -> bool:
    # Imported lazily: layers imports this module's registry users.
    from keras_localrank.layers import RankProbe

    return isinstance(layer, RankProbe)


def is_measurable(layer) -> bool:
    """True for a layer whose pre-activation this package can measure."""
    return isinstance(layer, MEASURABLE_LAYERS) or _is_probe(layer)


@dataclasses.dataclass(frozen=True, eq=False)
class Tap:
    """One measured point of a model.

    Attributes:
        layer: the Keras layer.
        input: the layer's input `KerasTensor` in the model's graph.
        units: `n_l`, the number of pre-activation values per sample.
        input_dim: `n0`, the number of model-input values per sample.
    """

    layer: keras.layers.Layer
    input: object
    units: int
    input_dim: int

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def class_name(self) -> str:
        return type(self.layer).__name__

    @property
    def bound(self) -> int:
        """`min(n_l, n0)`, the largest possible rank of `J_l`."""
        return min(self.units, self.input_dim)


@dataclasses.dataclass(frozen=True)
class TapSelection:
    """The taps of a model and the layers that were skipped (name -> reason)."""

    taps: tuple[Tap, ...]
    skipped: dict[str, str]
    input_shape: tuple[int, ...]

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)


def model_graph(model):
    """The functional graph of a Keras model (a built Sequential's inner graph).

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if the model is unbuilt, subclassed, or has several inputs.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected `model` to be a Keras 3 `keras.Model`. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None or not model.built:
            raise ValueError(
                f"Expected a built model. Received: model={model.name!r}, which is "
                "an unbuilt Sequential model; start it with `keras.Input(shape)`, "
                "call `model.build(input_shape)`, or call it on data first."
            )
    else:
        graph = model
        if not hasattr(model, "_nodes_by_depth"):
            raise ValueError(
                "Expected a functional or Sequential model. Received: "
                f"model={model.name!r}, a subclassed `{type(model).__name__}` whose "
                "layer graph cannot be inspected; build it with the functional API."
            )
    inputs = graph.inputs
    if len(inputs) != 1:
        raise ValueError(
            "Models with several inputs are not supported yet. Received: "
            f"model={model.name!r} with {len(inputs)} inputs "
            f"{[tuple(t.shape) for t in inputs]}."
        )
    return graph


def _graph_nodes(graph) -> set:
    return {node for nodes in graph._nodes_by_depth.values() for node in nodes}


def _flat_size(shape: Sequence[int | None], what: str) -> int:
    if any(d is None for d in shape):
        raise ValueError(f"Expected a fully defined shape for {what}. Received: {shape}")
    return math.prod(shape)


def select_taps(
    model,
    layers: Iterable[str | keras.layers.Layer] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> TapSelection:
    """Choose the taps of `model`.

    Args:
        model: a built functional or Sequential `keras.Model` with one input.
        layers: layer names or layer objects to measure. Default None: every
            measurable layer (see `MEASURABLE_LAYERS`) and every `RankProbe`.
        input_shape: the per-sample input shape, needed only when the model's
            input has undefined (None) dimensions.

    Returns:
        A `TapSelection`. Layers that cannot be measured (not a supported
        type, called several times in the graph, nested models) are skipped
        with a warning and named in `skipped`.

    Raises:
        ValueError: unknown layer names, a model with no measurable layer.
        TypeError: a `layers` entry that is neither a string nor a layer.
    """
    graph = model_graph(model)
    model_input = graph.inputs[0]
    in_shape = tuple(model_input.shape[1:])
    if any(d is None for d in in_shape):
        if input_shape is None:
            raise ValueError(
                "The model input has undefined dimensions "
                f"{in_shape}; pass data so the input shape is known."
            )
        in_shape = tuple(input_shape)
    input_dim = _flat_size(in_shape, "the model input")

    all_layers = list(model.layers)
    if layers is None:
        chosen = [layer for layer in all_layers if is_measurable(layer)]
        requested_explicitly = False
    else:
        if isinstance(layers, (str, keras.layers.Layer)):
            layers = [layers]
        by_name = {layer.name: layer for layer in all_layers}
        chosen = []
        for item in layers:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(
                        f"Unknown layer name in `layers`. Received: {item!r}; "
                        f"model {model.name!r} has layers {sorted(by_name)}."
                    )
                chosen.append(by_name[item])
            elif isinstance(item, keras.layers.Layer):
                if not any(item is layer for layer in all_layers):
                    raise ValueError(
                        f"Layer {item.name!r} passed in `layers` is not a layer of "
                        f"model {model.name!r}."
                    )
                chosen.append(item)
            else:
                raise TypeError(
                    "Expected `layers` to contain layer names or layers. "
                    f"Received: {item!r} of type {type(item).__name__}"
                )
        requested_explicitly = True

    nodes_in_graph = _graph_nodes(graph)
    skipped: dict[str, str] = {}
    taps = []
    for layer in chosen:
        reason = None
        nodes = [n for n in layer._inbound_nodes if n in nodes_in_graph]
        if isinstance(layer, keras.Model):
            reason = "nested model: pass the layers of the inner model instead"
        elif not is_measurable(layer):
            reason = f"{type(layer).__name__} is not a measurable layer type"
        elif len(nodes) != 1:
            reason = f"layer is called {len(nodes)} times in the graph (shared layer)"
        elif len(nodes[0].input_tensors) != 1:
            reason = "layer has several input tensors"
        elif getattr(layer, "quantization_mode", None) not in (None, "lora"):
            reason = "quantized layers are not supported"
        if reason is None:
            layer_input = nodes[0].input_tensors[0]
            out_shape = tuple(nodes[0].output_tensors[0].shape[1:])
            if any(d is None for d in out_shape):
                reason = f"output shape {out_shape} is not fully defined"
            elif not layer_input.dtype.startswith("float"):
                reason = f"layer input has non-float dtype {layer_input.dtype}"
        if reason is not None:
            skipped[layer.name] = reason
            warnings.warn(
                f"Skipping layer {layer.name!r}: {reason}.",
                stacklevel=3 if requested_explicitly else 2,
            )
            continue
        taps.append(
            Tap(
                layer=layer,
                input=layer_input,
                units=math.prod(out_shape),
                input_dim=input_dim,
            )
        )
    if not taps:
        raise ValueError(
            f"Model {model.name!r} has no measurable layer"
            + (f" (skipped: {skipped})" if skipped else "")
            + ". Measurable: "
            + ", ".join(c.__name__ for c in MEASURABLE_LAYERS)
            + ", RankProbe."
        )
    return TapSelection(taps=tuple(taps), skipped=skipped, input_shape=in_shape)


def tap_inputs_model(model, taps: Sequence[Tap]) -> keras.Model:
    """A functional model from the model input to each tapped layer's input."""
    graph = model_graph(model)
    return keras.Model(graph.inputs[0], [tap.input for tap in taps])


@contextlib.contextmanager
def _linear_activation(layer):
    """Temporarily replace a layer's activation by the identity."""
    if not hasattr(layer, "activation"):
        yield
        return
    saved = layer.activation
    layer.activation = keras.activations.linear
    try:
        yield
    finally:
        layer.activation = saved


def preactivation(layer, inputs):
    """The output of `layer` on `inputs` before the layer's own activation.

    Uses the layer's own `call` with its activation swapped for the identity
    (only while the call is traced), so every detail of the layer (causal
    padding, groups, LoRA) is honoured. A `RankProbe` returns its input.
    """
    if _is_probe(layer):
        return inputs
    with _linear_activation(layer):
        return layer.call(keras.ops.cast(inputs, layer.compute_dtype))
