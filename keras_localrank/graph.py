"""The layer calls of a Keras model, flattened: nested models, shared layers,
attention internals, several inputs, and the differentiated tensor.

A functional model is a graph of *calls*: a layer object may be called
several times (a shared layer), and a nested model's call runs a whole inner
graph. This module lists every call of a model in execution order, as one
flat list of `LayerCall`s with unique names:

- a layer called once in its graph keeps its name (`dense`);
- a layer called several times gets one entry per call, `dense@0`,
  `dense@1`, ... (0-based, in execution order);
- a call inside a nested functional or Sequential model is prefixed with the
  name of the nested model's call (`mobilenetv2_1.00_32/Conv1`,
  `encoder@1/dense` for the second call of a shared nested model);
- the projections of a `MultiHeadAttention` call are sub-calls named after
  the attention call and the projection layer (`mha/query`, `mha/key`,
  `mha/value`, `mha/attention_output`).

It also resolves `wrt`, the tensor the measurement differentiates with
respect to (a model input, or the output of a named call such as an
`Embedding`), marks which calls depend on it, and builds `CaptureModel`, a
`keras.Model` that runs the original model (same layer objects and weights)
and returns the inputs of chosen calls, with the `wrt` tensor fed in.

Calls are captured while the original model runs, by wrapping the `call`
method of the captured layers for the duration of the model call (a trace,
under `tf.function`). Nothing is added to the model's graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math

import keras

__all__ = [
    "producer",
    "LayerCall",
    "Wrt",
    "CaptureModel",
    "cast_model",
    "functional_graph",
    "is_nested_model",
    "layer_calls",
    "open_input_shape",
    "resolve_wrt",
    "structured_inputs",
    "wrt_tensor",
    "wrt_values",
]

def _private_class(module: str, name: str):
    """A class of Keras' private modules, or None if this Keras has none."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


#: Recurrent layers: their internal gates are not measured, and forward-mode
#: differentiation does not pass through their while loops.
RECURRENT_LAYERS: tuple[type, ...] = tuple(
    getattr(keras.layers, n) for n in ("RNN", "Bidirectional") if hasattr(keras.layers, n)
)

#: Layers with weights that are traversed by design, not measured: they
#: normalise or apply an element-wise function, they have no pre-activation.
TRAVERSED_WEIGHTED_LAYERS: tuple[type, ...] = tuple(
    getattr(keras.layers, n)
    for n in (
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "UnitNormalization",
        "RMSNormalization",
        "Normalization",
        "PReLU",
    )
    if hasattr(keras.layers, n)
) + tuple(
    # Keras applications' own element-wise layers (ConvNeXt's per-channel scale).
    cls
    for cls in [_private_class("keras.src.applications.convnext", "LayerScale")]
    if cls is not None
)

#: Sub-layers of a `MultiHeadAttention` call, in the order its `call` runs them.
_ATTENTION_PARTS = ("_gate_dense", "_query_dense", "_key_dense", "_value_dense", "_output_dense")


def functional_graph(model):
    """The functional graph of `model` (a built Sequential's inner graph).

    Raises:
        TypeError: if `model` is not a `keras.Model`.
        ValueError: if the model is unbuilt or subclassed.
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
        return graph
    if not hasattr(model, "_nodes_by_depth"):
        raise ValueError(
            "Expected a functional or Sequential model. Received: "
            f"model={model.name!r}, a subclassed `{type(model).__name__}` whose "
            "layer graph cannot be inspected; build it with the functional API."
        )
    return model


def producer(tensor):
    """The operation and node that produced a symbolic Keras tensor, or
    `(None, None)` for a tensor with no history (a model input's source)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, None
    op, node_index, _ = history
    return op, op._inbound_nodes[node_index]


def is_nested_model(layer) -> bool:
    """True for a functional or built Sequential model used as a layer."""
    if not isinstance(layer, keras.Model):
        return False
    if isinstance(layer, keras.Sequential):
        return getattr(layer, "_functional", None) is not None
    return hasattr(layer, "_nodes_by_depth")


def _shape(tensor) -> tuple:
    return tuple(tensor.shape[1:])


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCall:
    """One call of a layer in the flattened graph of a model.

    Attributes:
        name: unique name (see the module docstring).
        layer: the layer object.
        index: the 0-based index of this call among all calls of `layer`
            during one call of the model (used to capture it at run time).
        inputs: the call's input `KerasTensor`s (empty for attention parts).
        outputs: the call's output `KerasTensor`s (empty for attention parts).
        input_shape: per-sample shape of the first input.
        output_shape: per-sample shape of the first output.
        output_shapes: per-sample shapes of all outputs.
        input_dtype: dtype of the first input.
        depends: True when the call's input depends on the `wrt` tensor.
        through_recurrent: True when a recurrent layer lies between the `wrt`
            tensor and this call's input.
        top_level: True for a node of the model's own graph (not nested,
            not an attention part).
        part_of: name of the enclosing attention call, for attention parts.
    """

    name: str
    layer: keras.layers.Layer
    index: int
    inputs: tuple
    outputs: tuple
    input_shape: tuple
    output_shape: tuple
    input_dtype: str
    depends: bool
    through_recurrent: bool
    top_level: bool
    part_of: str | None = None
    output_shapes: tuple = ()


@dataclasses.dataclass(frozen=True)
class Wrt:
    """The tensor a measurement differentiates with respect to.

    Attributes:
        name: a model input's name, or the name of a `LayerCall` whose output
            is differentiated.
        input_index: index of the model input, or None for an intermediate.
        call: the `LayerCall` whose output is differentiated, or None.
        shape: per-sample shape of the differentiated tensor.
        dtype: its dtype.
        held: indices of the model inputs passed alongside (held at their
            sample values): every other input for an input `wrt`, every
            input for an intermediate one.
        open_input_shape: for an intermediate `wrt` of a model whose first
            input has undefined (None) dimensions, the per-sample shape of
            that input the shapes (`shape`, `call`) were computed for (the
            samples' shape); else None.
    """

    name: str
    input_index: int | None
    call: LayerCall | None
    shape: tuple
    dtype: str
    held: tuple[int, ...]
    open_input_shape: tuple | None = None

    @property
    def is_input(self) -> bool:
        return self.input_index is not None


class _State:
    __slots__ = ("depends", "recurrent")

    def __init__(self, depends=False, recurrent=False):
        self.depends = depends
        self.recurrent = recurrent


def _count_calls(graph, counts: dict) -> None:
    """Total calls per layer object when `graph` runs once."""
    for node in _execution_order(graph):
        op = node.operation
        counts[id(op)] = counts.get(id(op), 0) + 1
        if is_nested_model(op):
            _count_calls(functional_graph(op), counts)


def _execution_order(graph):
    """The nodes of a functional graph in the order `Functional.call` runs them."""
    nodes = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation is not None and not node.is_input:
                nodes.append(node)
    return nodes


def layer_calls(model, wrt=None, input_shape=None) -> list[LayerCall]:
    """Every layer call of `model`, flattened, in execution order.

    Args:
        model: a built functional or Sequential `keras.Model`.
        wrt: a `Wrt` marking the differentiated tensor (sets `depends` and
            `through_recurrent`), or None (nothing depends).
        input_shape: per-sample shape of the model's first input, for a
            model built with undefined (None) dimensions: the calls' shapes
            are then those of a run on inputs of this shape (Keras' own
            `compute_output_spec` of every layer); undefined where a layer
            cannot tell. Default None: the shapes the model was built with.

    Returns:
        A list of `LayerCall`. Nested functional/Sequential models are
        replaced by their inner calls; `InputLayer`s are left out.
    """
    graph = functional_graph(model)
    # Concrete per-sample shapes by tensor id (only with `input_shape`).
    concrete: dict[int, tuple] = {}
    if input_shape is not None:
        concrete[id(graph.inputs[0])] = tuple(input_shape)

    def shape_of(tensor) -> tuple:
        return concrete.get(id(tensor), _shape(tensor))

    def propagate(node) -> None:
        """Concrete shapes of the node's outputs from those of its inputs."""
        if not any(id(t) in concrete for t in node.input_tensors):
            return
        specs = {
            id(t): keras.KerasTensor((1, *shape_of(t)), dtype=t.dtype)
            for t in node.input_tensors
        }
        try:
            args, kwargs = node.arguments.fill_in(specs)
            outs = keras.tree.flatten(node.operation.compute_output_spec(*args, **kwargs))
        except Exception:  # a layer that cannot tell: its declared shapes stay
            return
        if len(outs) == len(node.output_tensors):
            for t, out in zip(node.output_tensors, outs):
                concrete[id(t)] = tuple(out.shape[1:])
    calls: list[LayerCall] = []
    global_counts: dict[int, int] = {}
    wrt_call_key = (id(wrt.call.layer), wrt.call.index) if wrt is not None and wrt.call else None

    def walk(graph, prefix: str, input_states: list[_State], top: bool):
        totals: dict[int, int] = {}
        for node in _execution_order(graph):
            totals[id(node.operation)] = totals.get(id(node.operation), 0) + 1
        local: dict[int, int] = {}
        states: dict[int, _State] = {}
        for tensor, state in zip(graph.inputs, input_states):
            states[id(tensor)] = state
        for node in _execution_order(graph):
            if concrete and not is_nested_model(node.operation):
                propagate(node)
            op = node.operation
            k_local = local.get(id(op), 0)
            local[id(op)] = k_local + 1
            k_global = global_counts.get(id(op), 0)
            global_counts[id(op)] = k_global + 1
            name = prefix + op.name + (f"@{k_local}" if totals[id(op)] > 1 else "")
            in_states = [states.get(id(t), _State()) for t in node.input_tensors]
            depends = any(s.depends for s in in_states)
            recurrent = any(s.recurrent for s in in_states)
            if is_nested_model(op):
                inner = functional_graph(op)
                if len(inner.inputs) == len(in_states):
                    inner_states = in_states
                    for outer, tensor in zip(node.input_tensors, inner.inputs):
                        if id(outer) in concrete:
                            concrete[id(tensor)] = concrete[id(outer)]
                else:
                    inner_states = [_State(depends, recurrent) for _ in inner.inputs]
                out_states = walk(inner, name + "/", inner_states, False)
                for outer, tensor in zip(node.output_tensors, inner.outputs):
                    if id(tensor) in concrete:
                        concrete[id(outer)] = concrete[id(tensor)]
                if len(out_states) != len(node.output_tensors):
                    merged = _State(
                        any(s.depends for s in out_states), any(s.recurrent for s in out_states)
                    )
                    out_states = [merged] * len(node.output_tensors)
                for tensor, state in zip(node.output_tensors, out_states):
                    states[id(tensor)] = state
                continue
            first_in = node.input_tensors[0] if node.input_tensors else None
            first_out = node.output_tensors[0]
            call = LayerCall(
                name=name,
                layer=op,
                index=k_global,
                inputs=tuple(node.input_tensors),
                outputs=tuple(node.output_tensors),
                input_shape=shape_of(first_in) if first_in is not None else (),
                output_shape=shape_of(first_out),
                output_shapes=tuple(shape_of(t) for t in node.output_tensors),
                input_dtype=str(first_in.dtype) if first_in is not None else "",
                depends=depends,
                through_recurrent=recurrent,
                top_level=top,
            )
            calls.append(call)
            if isinstance(op, keras.layers.MultiHeadAttention):
                calls.extend(
                    _attention_parts(
                        call, node, lambda t: states.get(id(t), _State()), shape_of
                    )
                )
            out_state = _State(depends, recurrent or (depends and isinstance(op, RECURRENT_LAYERS)))
            if wrt_call_key == (id(op), k_global):
                out_state = _State(True, False)
            for tensor in node.output_tensors:
                states[id(tensor)] = out_state
        return [states.get(id(t), _State()) for t in graph.outputs]

    if wrt is None or not wrt.is_input:
        start = [_State() for _ in graph.inputs]
    else:
        start = [_State(i == wrt.input_index) for i in range(len(graph.inputs))]
    walk(graph, "", start, True)
    return calls


def _attention_parts(call: LayerCall, node, state_of, shape_of=_shape) -> list[LayerCall]:
    """The projections of one `MultiHeadAttention` call, as sub-calls.

    `state_of(tensor)` gives the dependence state of an argument tensor,
    `shape_of(tensor)` its per-sample shape.
    """
    mha = call.layer
    args, kwargs = node.arguments.args, node.arguments.kwargs
    names = ("query", "value", "key")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    query, value = bound.get("query"), bound.get("value")
    key = bound.get("key") if bound.get("key") is not None else value

    parts = []
    query_out = None
    for attr in _ATTENTION_PARTS:
        sub = getattr(mha, attr, None)
        if sub is None:
            continue
        if attr in ("_gate_dense", "_query_dense"):
            source = query
            in_shape = shape_of(query)
        elif attr == "_key_dense":
            source, in_shape = key, shape_of(key)
        elif attr == "_value_dense":
            source, in_shape = value, shape_of(value)
        else:
            source = None
            in_shape = tuple(query_out[:-1]) + (mha._value_dim,)
        out_shape = list(sub.compute_output_shape((None, *in_shape))[1:])
        for i, d in enumerate(out_shape):  # free (sequence) axes follow the input
            if d is None and i < len(in_shape):
                out_shape[i] = in_shape[i]
        out_shape = tuple(out_shape)
        if attr == "_query_dense":
            query_out = out_shape
        depends = call.depends if source is None else state_of(source).depends
        parts.append(
            LayerCall(
                name=f"{call.name}/{sub.name}",
                layer=sub,
                index=call.index,
                inputs=(),
                outputs=(),
                input_shape=in_shape,
                output_shape=out_shape,
                input_dtype=call.input_dtype,
                depends=depends,
                through_recurrent=call.through_recurrent,
                top_level=False,
                part_of=call.name,
                output_shapes=(out_shape,),
            )
        )
    return parts


def resolve_wrt(model, wrt, input_shape=None) -> Wrt:
    """Resolve the `wrt` argument of a measurement.

    Args:
        model: a built functional or Sequential `keras.Model`.
        wrt: None (the only float model input), an input index (int), a
            model input's name, or the name of a layer call whose output is
            differentiated (`"embedding"`, `"base/conv"`, `"dense@1"`).
        input_shape: per-sample shape of the model's first input (the
            samples' shape), used only for an intermediate `wrt` of a model
            whose first input has undefined (None) dimensions (a
            variable-length text model): the `wrt` tensor's shape is then
            that of a run on inputs of this shape. Default None.

    Returns:
        A `Wrt`.

    Raises:
        TypeError: `wrt` is not None, an int or a string; or it is None and
            the model has no float input.
        ValueError: an ambiguous default, an unknown name or index, a
            tensor that cannot be differentiated (non-float, undefined shape,
            several outputs), or an `input_shape` that does not fit the
            model's first input.
    """
    graph = functional_graph(model)
    inputs = list(graph.inputs)
    input_names = [t.name for t in inputs]
    described = ", ".join(f"{i}: {t.name!r} {t.dtype}" for i, t in enumerate(inputs))
    if wrt is None:
        floats = [i for i, t in enumerate(inputs) if keras.backend.is_float_dtype(t.dtype)]
        if len(floats) == 1:
            index = floats[0]
        elif not floats:
            hint = _intermediate_hint(model)
            raise TypeError(
                f"Model {model.name!r} has no float input (inputs {described}); "
                "local rank needs derivatives, so pass `wrt` naming a layer whose "
                f"output is differentiated{hint}."
            )
        else:
            raise ValueError(
                f"Model {model.name!r} has several float inputs ({described}); pass "
                "`wrt` (an input name or index) to choose the one to differentiate."
            )
    elif isinstance(wrt, bool) or not isinstance(wrt, (int, str)):
        raise TypeError(
            "Expected `wrt` to be an input index, an input name or a layer name. "
            f"Received: wrt={wrt!r} of type {type(wrt).__name__}"
        )
    elif isinstance(wrt, int):
        if not 0 <= wrt < len(inputs):
            raise ValueError(
                f"Expected `wrt` in [0, {len(inputs) - 1}] (inputs {described}). "
                f"Received: wrt={wrt}"
            )
        index = wrt
    elif wrt in input_names:
        index = input_names.index(wrt)
    else:
        return _intermediate(model, wrt, inputs, described, input_shape)
    tensor = inputs[index]
    if not keras.backend.is_float_dtype(tensor.dtype):
        raise ValueError(
            f"Expected `wrt` to name a float tensor. Received: wrt={wrt!r}, input "
            f"{tensor.name!r} of dtype {tensor.dtype}; pass `wrt` naming a layer "
            f"whose output is differentiated{_intermediate_hint(model)}."
        )
    held = tuple(i for i in range(len(inputs)) if i != index)
    return Wrt(tensor.name, index, None, _shape(tensor), str(tensor.dtype), held)


def _intermediate_hint(model) -> str:
    """`, e.g. wrt=<name>` naming the first call that turns non-float inputs
    into a float tensor (an `Embedding`, a `Rescaling` of uint8 images, a
    cast), or "" when there is none."""
    for call in layer_calls(model):
        if (
            call.part_of is None
            and len(call.outputs) == 1
            and keras.backend.is_float_dtype(call.outputs[0].dtype)
            and call.inputs
            and not any(keras.backend.is_float_dtype(t.dtype) for t in call.inputs)
        ):
            return f", e.g. wrt={call.name!r}"
    return ""


def open_input_shape(model, input_shape):
    """The concrete per-sample shape of the model's first input, when the
    model leaves dimensions of it undefined (None) and `input_shape` is given;
    else None.

    Raises:
        ValueError: an `input_shape` that does not fit the first input (another
            rank, a different defined dimension, a non-positive size).
    """
    first = functional_graph(model).inputs[0]
    declared = _shape(first)
    if input_shape is None or all(d is not None for d in declared):
        return None
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = None
    if (
        shape is None
        or len(shape) != len(declared)
        or any(d < 1 for d in shape)
        or any(e is not None and e != d for e, d in zip(declared, shape))
    ):
        raise ValueError(
            f"Expected `input_shape` to be the per-sample shape of the model input "
            f"{first.name!r} {declared} (positive sizes for its None dimensions). "
            f"Received: input_shape={input_shape!r}"
        )
    return shape


def _intermediate(model, wrt: str, inputs, described, input_shape=None) -> Wrt:
    concrete = open_input_shape(model, input_shape)
    calls = layer_calls(model, input_shape=concrete)
    by_name = {c.name: c for c in calls if c.part_of is None}
    if wrt not in by_name:
        shared = [c.name for c in calls if c.name.startswith(wrt + "@")]
        if shared:
            raise ValueError(
                f"Layer {wrt!r} is called {len(shared)} times; pass one call as "
                f"`wrt`, one of {shared}."
            )
        raise ValueError(
            f"Unknown `wrt`. Received: wrt={wrt!r}; model {model.name!r} has inputs "
            f"{described} and layer calls {sorted(by_name)}."
        )
    call = by_name[wrt]
    if len(call.outputs) != 1:
        raise ValueError(
            f"Expected `wrt` to name a layer with one output. Received: wrt={wrt!r} "
            f"with {len(call.outputs)} outputs."
        )
    out = call.outputs[0]
    if not keras.backend.is_float_dtype(out.dtype):
        raise ValueError(
            f"Expected `wrt` to name a layer with a float output. Received: "
            f"wrt={wrt!r} whose output has dtype {out.dtype}."
        )
    if any(d is None for d in call.output_shape):
        open_first = any(d is None for d in _shape(inputs[0]))
        if open_first and concrete is None:
            advice = (
                f"pass `input_shape=` (the per-sample shape of the model input "
                f"{inputs[0].name!r} {_shape(inputs[0])}; `local_rank` and "
                "`LocalRankCallback` take it from `x`)"
            )
        else:
            advice = "give the model inputs a fixed shape"
        raise ValueError(
            f"Expected `wrt` to name a layer with a fully defined output shape. "
            f"Received: wrt={wrt!r} with output shape {call.output_shape}"
            + (f" for model input shape {concrete}" if concrete is not None else "")
            + f"; {advice}."
        )
    return Wrt(
        wrt,
        None,
        call,
        call.output_shape,
        str(out.dtype),
        tuple(range(len(inputs))),
        open_input_shape=concrete,
    )


class _Capture:
    """Wraps the `call` of chosen layers to record inputs and feed `wrt`."""

    def __init__(self, wanted: dict, feed: tuple | None):
        # wanted: {id(layer): (layer, {call index: slot})}; feed: (layer, index).
        self.wanted = wanted
        self.feed = feed
        self.values: dict[int, object] = {}
        self.fed_value = None

    @contextlib.contextmanager
    def active(self, fed_value=None):
        self.values = {}
        self.fed_value = fed_value
        layers = {lid: layer for lid, (layer, _) in self.wanted.items()}
        if self.feed is not None:
            layers[id(self.feed[0])] = self.feed[0]
        counters = {lid: 0 for lid in layers}
        saved = {}
        for lid, layer in layers.items():
            saved[lid] = layer.__dict__.get("call")
            original = layer.call

            def wrapper(*args, _lid=lid, _original=original, **kwargs):
                k = counters[_lid]
                counters[_lid] = k + 1
                slots = self.wanted.get(_lid, (None, {}))[1]
                if k in slots:
                    first = args[0] if args else kwargs.get("inputs")
                    self.values[slots[k]] = first
                if self.feed is not None and _lid == id(self.feed[0]) and k == self.feed[1]:
                    if self.fed_value is None:  # record the output instead
                        self.values["wrt"] = _original(*args, **kwargs)
                        return self.values["wrt"]
                    return self.fed_value
                return _original(*args, **kwargs)

            object.__setattr__(layer, "call", wrapper)
        try:
            yield self.values
        finally:
            for lid, layer in layers.items():
                if saved[lid] is None:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", saved[lid])


class CaptureModel(keras.Model):
    """Runs `model` and returns the inputs of chosen calls, `wrt` fed in.

    Called on `x` (the `wrt` tensor) when `wrt` is the model's only input,
    else on `[x, *held]` with the held model inputs in the order of
    `wrt.held`, each with the same batch size as `x`.

    Args:
        model: the model whose layers are used (same objects and weights).
        wrt: the `Wrt` of the measurement.
        calls: the `LayerCall`s whose inputs are returned, in order.
    """

    def __init__(self, model, wrt: Wrt, calls, **kwargs):
        super().__init__(autocast=False, **kwargs)
        self._source = model
        self._wrt = wrt
        self._calls = tuple(calls)
        self._num_inputs = len(functional_graph(model).inputs)
        wanted: dict = {}
        for slot, call in enumerate(self._calls):
            wanted.setdefault(id(call.layer), (call.layer, {}))[1][call.index] = slot
        feed = (wrt.call.layer, wrt.call.index) if wrt.call is not None else None
        self._capture = _Capture(wanted, feed)
        self._simple = wrt.is_input and self._num_inputs == 1

    @property
    def captured_calls(self):
        """`(model, [(layer, call index), ...])` when this model is called on
        the source model's only input (nothing fed in, nothing held), else
        None: the calls whose inputs it returns, for `linearize.pushforward`."""
        if not self._simple:
            return None
        return self._source, [(c.layer, c.index) for c in self._calls]

    def call(self, inputs, training=False):
        if self._simple:
            x, held = inputs, ()
        else:
            x, *held = inputs
        model_inputs = [None] * self._num_inputs
        for index, value in zip(self._wrt.held, held):
            model_inputs[index] = value
        if self._wrt.is_input:
            model_inputs[self._wrt.input_index] = x
        with self._capture.active(fed_value=x) as values:
            self._source(structured_inputs(self._source, model_inputs), training=False)
        missing = [c.name for i, c in enumerate(self._calls) if i not in values]
        if missing:
            raise RuntimeError(f"Layer calls {missing} were not run by the model.")
        return [values[i] for i in range(len(self._calls))]


def structured_inputs(model, flat: list):
    """`flat` (one value per model input, in `functional_graph(model).inputs`
    order) in the structure `model` was built with: the one value, a list,
    or a dict keyed by input name for a model built on a dict of inputs."""
    if len(flat) == 1:
        return flat[0]
    struct = getattr(functional_graph(model), "_inputs_struct", None)
    if isinstance(struct, dict):
        return keras.tree.pack_sequence_as(struct, list(flat))
    return list(flat)


def flat_size(shape) -> int:
    """Number of values per sample of a fully defined shape."""
    return math.prod(shape)


def cast_model(model, dtype: str):
    """A copy of `model` computing in `dtype`, nested models included.

    Layer names and the nesting are kept, so call names (and therefore tap
    names) are the same in the copy; integer inputs keep their dtype. The
    copy's weights are `model`'s, cast (`copy.set_weights(model.get_weights())`
    refreshes them).
    """
    graph = functional_graph(model)
    new_inputs = [
        keras.Input(
            batch_shape=t.shape,
            dtype=dtype if keras.backend.is_float_dtype(t.dtype) else t.dtype,
            name=t.name,
        )
        for t in graph.inputs
    ]

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a stateless operation (`x + y` in a functional model)
        if is_nested_model(layer):
            # Cast with its inputs: a nested model keeping float32 inputs casts
            # its input values, and (in reverse mode) the gradients flowing
            # back through them, to float32.
            return cast_model(layer, dtype)
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    copy = keras.models.clone_model(
        model,
        input_tensors=structured_inputs(model, new_inputs),
        clone_function=clone,
        recursive=False,
    )
    copy.set_weights(model.get_weights())
    return copy


def wrt_values(model, wrt: Wrt, inputs, *, batch_size: int = 256):
    """The values of an intermediate `wrt` tensor on the model inputs.

    Args:
        model: the model.
        wrt: an intermediate `Wrt` (the output of a layer call).
        inputs: list of `[N, ...]` arrays, one per model input.
        batch_size: samples per forward pass.

    Returns:
        `[N, *wrt.shape]` NumPy array.

    Raises:
        ValueError: samples of another length than the one the measurement
            was set up for (`wrt_tensor`).
    """
    import numpy as np

    num = len(inputs[0])
    parts = []
    for start in range(0, num, batch_size):
        batch = [a[start : start + batch_size] for a in inputs]
        parts.append(np.asarray(wrt_tensor(model, wrt, batch)))
    return np.concatenate(parts, axis=0)


def wrt_tensor(model, wrt: Wrt, inputs):
    """The intermediate `wrt` tensor on one batch (usable inside `tf.function`).

    Args:
        model: the model.
        wrt: an intermediate `Wrt` (the output of a layer call).
        inputs: one batch per model input (tensors or arrays), in model
            input order.

    Raises:
        ValueError: a first input of another per-sample shape than the one
            `wrt` was resolved for (`wrt.open_input_shape`).
    """
    inputs = list(inputs)
    _check_open_input(model, wrt, inputs)
    capture = _Capture({}, (wrt.call.layer, wrt.call.index))
    with capture.active(fed_value=None) as values:
        model(structured_inputs(model, inputs), training=False)
    return values["wrt"]


def _check_open_input(model, wrt: Wrt, inputs) -> None:
    """Raise if the first model input's batch does not have the per-sample
    shape an intermediate `wrt` of a model with an open first input was
    resolved for (`wrt.open_input_shape`); dimensions unknown while tracing
    are not checked."""
    if wrt.open_input_shape is None or not inputs:
        return
    got = tuple(getattr(inputs[0], "shape", ()))[1:]
    want = tuple(wrt.open_input_shape)
    if len(got) != len(want) or any(
        g is not None and g != w for g, w in zip(got, want)
    ):
        graph = functional_graph(model)
        name = "x" if len(graph.inputs) == 1 else f"x[{graph.inputs[0].name!r}]"
        shape = tuple(getattr(inputs[0], "shape", ()))
        raise ValueError(
            f"Expected `{name}` of shape (N, {', '.join(map(str, want))}), the "
            "per-sample shape the measurement was set up for (the model input "
            f"{graph.inputs[0].name!r} {_shape(graph.inputs[0])} is measured at one "
            "length per call; measure other lengths in separate calls, as "
            f"`local_rank` does). Received: {name} with shape {shape}."
        )
