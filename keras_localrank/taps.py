"""Taps: which layers of a model are measured, and their pre-activations.

A *tap* is a point of a functional (or built Sequential) Keras model whose
pre-activation `p_l(x)` is measured: a `Dense`, `EinsumDense` or convolution
layer (the output before its own activation), or any tensor marked by a
`keras_localrank.layers.RankProbe`. This module finds taps, validates the
model, builds one feature model that returns every tapped layer's input, and
recomputes each pre-activation from that input with the layer's own weights.
The graph itself (nested models, shared layers, attention projections,
several inputs, the differentiated tensor `wrt`) is read by
`keras_localrank.graph`.

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

from keras_localrank.graph import (
    RECURRENT_LAYERS,
    TRAVERSED_WEIGHTED_LAYERS,
    CaptureModel,
    LayerCall,
    Wrt,
    functional_graph,
    layer_calls,
    resolve_wrt,
)

__all__ = [
    "CONV_LAYERS",
    "INFERENCE_IDENTITY_LAYERS",
    "MEASURABLE_LAYERS",
    "Tap",
    "TapSelection",
    "select_taps",
    "model_graph",
    "preactivation",
    "tap_inputs_model",
]

#: Convolution layer classes (all measurable).
CONV_LAYERS = tuple(
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
) + CONV_LAYERS


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
    """True for a layer whose pre-activation this package can measure
    (a `TimeDistributed` wrapper of one included)."""
    if isinstance(layer, keras.layers.TimeDistributed):
        return isinstance(layer.layer, MEASURABLE_LAYERS)
    return isinstance(layer, MEASURABLE_LAYERS) or _is_probe(layer)


@dataclasses.dataclass(frozen=True, eq=False)
class Tap:
    """One measured point of a model: one call of a measurable layer.

    Attributes:
        layer: the Keras layer.
        input: the call's input `KerasTensor` (in the graph of the model, or
            of the nested model, that makes the call); None for the
            projections inside a `MultiHeadAttention` call.
        units: `n_l`, the number of pre-activation values per sample.
        input_dim: `n0`, the number of values per sample of the
            differentiated (`wrt`) tensor.
        name: the call's unique name (`graph.LayerCall.name`): the layer
            name, `layer@k` for the k-th call of a shared layer,
            `outer/inner` inside a nested model or an attention layer.
        call: the `graph.LayerCall`.
        wrt: the `graph.Wrt` the Jacobian is taken with respect to.
    """

    layer: keras.layers.Layer
    input: object
    units: int
    input_dim: int
    name: str = ""
    call: LayerCall | None = None
    wrt: Wrt | None = None

    def __post_init__(self):
        if not self.name:  # a hand-built tap: the layer's name
            object.__setattr__(self, "name", self.layer.name)

    @property
    def class_name(self) -> str:
        return type(self.layer).__name__

    @property
    def bound(self) -> int:
        """`min(n_l, n0)`, the largest possible rank of `J_l`."""
        return min(self.units, self.input_dim)

    @property
    def forward_mode_ok(self) -> bool:
        """False when a recurrent layer lies between `wrt` and the tap:
        TensorFlow's forward mode does not pass through their loops."""
        return self.call is None or not self.call.through_recurrent


@dataclasses.dataclass(frozen=True)
class TapSelection:
    """The taps of a model and the layers that were skipped (name -> reason).

    Attributes:
        taps: the measured calls.
        skipped: `{call name: reason}` for every call not measured: the
            requested ones that cannot be, and with the default selection
            every weighted layer that is neither measured nor traversed by
            design (normalisation, PReLU).
        input_shape: per-sample shape of the differentiated tensor.
        wrt: the `graph.Wrt` (None only for hand-built selections).
        open_input_shape: the shape given for the model's first input when
            the model leaves dimensions of it undefined (the layer shapes
            are then those of a run on inputs of this shape); else None.
    """

    taps: tuple[Tap, ...]
    skipped: dict[str, str]
    input_shape: tuple[int, ...]
    wrt: Wrt | None = None
    open_input_shape: tuple[int, ...] | None = None

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def single_input(self) -> bool:
        """True when `wrt` is the model's only input (no held inputs)."""
        return self.wrt is None or (self.wrt.is_input and not self.wrt.held)


def model_graph(model):
    """The functional graph of a one-input Keras model (see `graph.functional_graph`).

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if the model is unbuilt, subclassed, or has several inputs.
    """
    graph = functional_graph(model)
    inputs = graph.inputs
    if len(inputs) != 1:
        raise ValueError(
            "Expected a model with one input here. Received: "
            f"model={model.name!r} with {len(inputs)} inputs "
            f"{[tuple(t.shape) for t in inputs]}; local rank measures such models "
            "with `wrt=` (the input to differentiate)."
        )
    return graph


def _flat_size(shape: Sequence[int | None], what: str) -> int:
    if any(d is None for d in shape):
        raise ValueError(f"Expected a fully defined shape for {what}. Received: {shape}")
    return math.prod(shape)


def _unmeasured_reason(call: LayerCall, wrt: Wrt) -> str | None:
    """Why a call that is not a measurable layer is listed in `skipped`
    (None: not listed, because it is traversed or has its parts measured)."""
    layer = call.layer
    if wrt.call is not None and (layer, call.index) == (wrt.call.layer, wrt.call.index):
        return "its output is the differentiated tensor (`wrt`)"
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return None  # its projections are measured as `<call>/<projection>`
    if isinstance(layer, RECURRENT_LAYERS):
        return (
            f"{type(layer).__name__} is a recurrent layer whose gates are not "
            "measured; add a `keras_localrank.layers.RankProbe` after it to "
            "measure its output"
        )
    if isinstance(layer, keras.Model):
        return (
            f"subclassed model `{type(layer).__name__}`: its layers cannot be "
            "inspected; build it with the functional API"
        )
    if isinstance(layer, keras.layers.Embedding):
        if not call.depends:
            return (
                "Embedding of integer inputs is not differentiable; pass "
                f"wrt={call.name!r} to measure the layers after it"
            )
        return "Embedding is not a measurable layer type"
    if isinstance(layer, TRAVERSED_WEIGHTED_LAYERS) or not getattr(layer, "weights", ()):
        return None
    return f"{type(layer).__name__} is not a measurable layer type"


def _call_problem(call: LayerCall, wrt: Wrt) -> str | None:
    """Why a call of a measurable layer cannot be measured, or None."""
    layer = call.layer
    if call.top_level or call.inputs:
        if len(call.inputs) != 1:
            return "layer has several input tensors"
    if getattr(layer, "quantization_mode", None) not in (None, "lora"):
        return "quantized layers are not supported"
    if any(d is None for d in call.output_shape):
        return f"output shape {call.output_shape} is not fully defined"
    if call.input_dtype and not keras.backend.is_float_dtype(call.input_dtype):
        return f"layer input has non-float dtype {call.input_dtype}"
    if not call.depends:
        return f"does not depend on the differentiated tensor {wrt.name!r} (`wrt`)"
    return None


def _inside(calls, name: str) -> list[LayerCall]:
    """The calls made inside the call(s) named `name` (`name` or `name@k`)."""
    return [
        c
        for c in calls
        if any(seg.split("@")[0] == name for seg in c.name.split("/")[:-1])
    ]


def _resolve_layers(model, calls, layers) -> list[LayerCall]:
    """The calls named by a `layers` argument (names, calls or layer objects)."""
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(
            "`layers` is empty. Pass None to measure every measurable layer, or "
            "the names of the layers to measure."
        )
    by_name = {c.name: c for c in calls}
    chosen: list[LayerCall] = []
    for item in layers:
        if isinstance(item, str):
            if item in by_name:
                found = [by_name[item]]
            else:
                found = [c for c in calls if c.layer.name == item and c.part_of is None]
            if not any(is_measurable(c.layer) for c in found):
                found = _inside(calls, item) or found  # a nested model or attention
            if not found:
                raise ValueError(
                    f"Unknown layer name in `layers`. Received: {item!r}; "
                    f"model {model.name!r} has layers {sorted(by_name)}."
                )
        elif isinstance(item, keras.layers.Layer):
            found = [c for c in calls if c.layer is item]
            if not found:
                found = _inside(calls, item.name)
            if not found:
                raise ValueError(
                    f"Layer {item.name!r} passed in `layers` is not a layer of "
                    f"model {model.name!r}."
                )
        else:
            raise TypeError(
                "Expected `layers` to contain layer names or layers. "
                f"Received: {item!r} of type {type(item).__name__}"
            )
        chosen.extend(c for c in found if all(c is not d for d in chosen))
    return chosen


def select_taps(
    model,
    layers: Iterable[str | keras.layers.Layer] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    wrt: int | str | None = None,
) -> TapSelection:
    """Choose the taps of `model`.

    Args:
        model: a built functional or Sequential `keras.Model`. Nested
            functional/Sequential models are measured layer by layer, each
            call of a shared layer separately, and the projections of every
            `MultiHeadAttention` (names: see `keras_localrank.graph`).
        layers: call names (`"dense"`, `"dense@1"`, `"base/conv"`,
            `"mha/query"`), layer names (every call of that layer), names of
            a nested model or attention call (every measurable call inside),
            or layer objects. Default None: every measurable call (see
            `MEASURABLE_LAYERS`; a `TimeDistributed` wrapper of one) and
            every `RankProbe`.
        input_shape: per-sample shape of the `wrt` input (for an
            intermediate `wrt`, of the model's first input: the token ids of
            a variable-length text model), needed only when the model input
            has undefined (None) dimensions.
        wrt: the tensor to differentiate with respect to: None (the only
            float model input), a model input's index or name, or the name of
            a layer call whose output is used (e.g. `"embedding"` for a text
            model); other inputs are held at their sample values.

    Returns:
        A `TapSelection`. Calls that cannot be measured are skipped with a
        warning and named in `skipped` with the reason.

    Raises:
        ValueError: unknown layer names, a bad `wrt`, a model with no
            measurable layer.
        TypeError: a `layers` entry that is neither a string nor a layer, a
            `wrt` of the wrong type, or no `wrt` for a model without a float
            input.
    """
    functional_graph(model)
    resolved = resolve_wrt(model, wrt, input_shape=input_shape)
    in_shape = tuple(resolved.shape)
    # The model input's shape, when the model leaves it open (for an
    # intermediate `wrt`, `resolve_wrt` computed its shape for it).
    concrete = None if resolved.is_input else resolved.open_input_shape
    if any(d is None for d in in_shape):
        if input_shape is None:
            raise ValueError(
                "The model input has undefined dimensions "
                f"{in_shape}; pass `input_shape=` (the per-sample shape of the data "
                "to measure; `local_rank` and `LocalRankCallback` take it from `x`)."
            )
        in_shape = tuple(input_shape)
        if resolved.input_index == 0:
            concrete = in_shape
    input_dim = _flat_size(in_shape, "the model input")
    calls = layer_calls(model, resolved, input_shape=concrete)

    skipped: dict[str, str] = {}
    if layers is None:
        chosen = [c for c in calls if is_measurable(c.layer)]
        for c in calls:
            if not is_measurable(c.layer):
                reason = _unmeasured_reason(c, resolved)
                if reason is not None:
                    skipped[c.name] = reason
        requested_explicitly = False
    else:
        chosen = _resolve_layers(model, calls, layers)
        requested_explicitly = True

    taps = []
    for call in chosen:
        if not is_measurable(call.layer):
            reason = _unmeasured_reason(call, resolved) or (
                f"{type(call.layer).__name__} is not a measurable layer type"
            )
        else:
            reason = _call_problem(call, resolved)
        if reason is not None:
            skipped[call.name] = reason
            continue
        taps.append(
            Tap(
                layer=call.layer,
                input=call.inputs[0] if call.inputs else None,
                units=math.prod(call.output_shape),
                input_dim=input_dim,
                name=call.name,
                call=call,
                wrt=resolved,
            )
        )
    if skipped:
        if requested_explicitly:
            for name, reason in skipped.items():
                warnings.warn(f"Skipping layer {name!r}: {reason}.", stacklevel=2)
        else:
            warnings.warn(
                f"Not measured ({len(skipped)}): "
                + "; ".join(f"{name!r}: {reason}" for name, reason in skipped.items()),
                stacklevel=2,
            )
    if not taps:
        raise ValueError(
            f"Model {model.name!r} has no measurable layer"
            + (f" (skipped: {skipped})" if skipped else "")
            + ". Measurable: "
            + ", ".join(c.__name__ for c in MEASURABLE_LAYERS)
            + ", TimeDistributed of one of these, RankProbe."
        )
    return TapSelection(
        taps=tuple(taps),
        skipped=skipped,
        input_shape=in_shape,
        wrt=resolved,
        open_input_shape=concrete,
    )


def tap_inputs_model(model, taps: TapSelection | Sequence[Tap]) -> keras.Model:
    """A model from the `wrt` tensor (and held inputs) to each tap's layer input.

    When `wrt` is the model's only input and every tap is a node of the
    model's own graph, this is a plain functional model called on `x`.
    Otherwise it is a `graph.CaptureModel` called on `[x, *held]` (held
    model inputs in the order of `wrt.held`, with `x`'s batch size), which
    runs the original model's layers.
    """
    if isinstance(taps, TapSelection):
        taps = taps.taps
    taps = tuple(taps)
    wrt = taps[0].wrt
    graph = functional_graph(model)
    plain = (
        wrt is None or (wrt.is_input and not wrt.held)
    ) and all(t.call is None or (t.call.top_level and t.input is not None) for t in taps)
    if plain and len(graph.inputs) == 1:
        return keras.Model(graph.inputs[0], [tap.input for tap in taps])
    return CaptureModel(model, wrt, [t.call for t in taps])


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
    padding, groups, LoRA) is honoured. A `TimeDistributed` wrapper applies
    its inner layer's pre-activation at every step. A `RankProbe` returns its
    input.
    """
    if _is_probe(layer):
        return inputs
    inner = layer.layer if isinstance(layer, keras.layers.TimeDistributed) else layer
    with _linear_activation(inner):
        return layer.call(keras.ops.cast(inputs, layer.compute_dtype))
