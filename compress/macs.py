"""Multiply-accumulate (MAC) counts per layer, read from the model graph.

One MAC is one multiplication followed by an addition, per sample (batch
size 1). Counts follow the usual conventions (as in fvcore/ptflops):

- `Dense`: output positions x `in x units` (a Dense on `(T, d)` inputs runs
  at each of the `T` positions). `EinsumDense`: the product of the sizes of
  every index of its equation (batch excluded).
- Convolutions (`Conv1D/2D/3D`, strides, padding, dilation and groups
  included): output positions x kernel size x input channels per group x
  filters, i.e. output positions x the kernel's weight count.
  `DepthwiseConv`: output positions x kernel size x channels x multiplier.
  `SeparableConv`: the depthwise part plus a 1x1 convolution, both at the
  output positions. `Conv*Transpose`: input positions x the kernel's weight
  count (each input value is scattered through the whole kernel).
- `LowRankDense`, `LowRankEinsumDense`: positions x the weights of both
  factors (the projections of a `LowRankMultiHeadAttention` likewise).
- `MultiHeadAttention`: the query, key, value and output projections, plus
  the two products of attention: scores `Tq x Tk x heads x key_dim` and
  the weighted sum `Tq x Tk x heads x value_dim`. The softmax is not counted.
- `BatchNormalization`: one MAC per output element (at inference it is a
  scale and a shift, which folds into the preceding convolution).
  `LayerNormalization`/`GroupNormalization`: one MAC per element for the
  scale and shift; the mean and variance reductions are not counted.
- Pooling: one MAC-equivalent per window element per output (an add for
  average pooling, a comparison for max pooling); global pooling: one per
  input element.
- `TimeDistributed`: the steps x the wrapped layer's MACs per step.
- Biases, activations, `Add`, reshapes and dropout count 0.

Layers with weights that no rule covers are returned by `uncounted_layers`
(and named in the report), never silently taken as free.
"""

from __future__ import annotations

import math
import string
import types
from collections.abc import Callable, Iterator

import keras

from compress.attention_layers import LowRankEinsumDense
from compress.layers import LowRankDense

__all__ = ["count_macs", "einsum_macs", "layer_macs", "uncounted_layers"]


def _dims(shape) -> list[int]:
    """Non-batch dimensions, unknown ones (None) as 1."""
    return [1 if d is None else int(d) for d in tuple(shape)[1:]]


def _positions(shape) -> int:
    """Positions of a channels-last tensor: every non-batch dimension but the last."""
    return math.prod(_dims(shape)[:-1])


def _channels_first(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_first"


def _spatial_positions(layer, shape) -> int:
    dims = _dims(shape)
    return math.prod(dims[1:] if _channels_first(layer) else dims[:-1])


def einsum_macs(equation: str, input_shape, kernel_shape) -> int:
    """MACs of `einsum(equation, x, kernel)` per sample.

    The product of the sizes of every index in the equation (each output
    element sums over the contracted indices), the batch dimension excluded.

    Args:
        equation: an `EinsumDense` equation such as `"abc,cd->abd"` or
            `"...b,bc->...c"`.
        input_shape: shape of `x`, batch dimension first.
        kernel_shape: shape of the kernel.

    Returns:
        The count, an int.
    """
    lhs, _ = equation.split("->")
    x_spec, k_spec = lhs.split(",")
    shape = list(input_shape)
    sizes: dict[str, int] = {}
    extra = 1
    if "..." in x_spec:
        head, tail = x_spec.split("...")
        n_ellipsis = len(shape) - len(head) - len(tail)
        letters = list(head) + [None] * n_ellipsis + list(tail)
    else:
        letters = list(x_spec)
    for i, (letter, size) in enumerate(zip(letters, shape)):
        size = 1 if i == 0 or size is None else int(size)  # dimension 0 is the batch
        if letter is None:
            extra *= size
        else:
            sizes[letter] = size
    for letter, size in zip(k_spec, kernel_shape):
        if letter in string.ascii_letters:
            sizes.setdefault(letter, int(size))
    return int(extra * math.prod(sizes.values()))


def _node_shapes(node) -> tuple[list, list]:
    inputs = [t.shape for t in node.arguments.keras_tensors]
    outputs = [t.shape for t in node.outputs]
    return inputs, outputs


def _dense(layer, node) -> int:
    inputs, _ = _node_shapes(node)
    return _positions(inputs[0]) * math.prod(layer.kernel.shape)


def _low_rank_dense(layer, node) -> int:
    inputs, _ = _node_shapes(node)
    weights = math.prod(layer.kernel_a.shape) + math.prod(layer.kernel_b.shape)
    return _positions(inputs[0]) * weights


def _projection(layer, input_shape) -> int:
    """MACs of an `EinsumDense` or a `LowRankEinsumDense` on `input_shape`."""
    if isinstance(layer, LowRankEinsumDense):
        positions = math.prod(_dims(input_shape)[: -layer.contract_dims])
        weights = math.prod(layer.kernel_a.shape) + math.prod(layer.kernel_b.shape)
        return positions * weights
    return einsum_macs(layer.equation, input_shape, layer.kernel.shape)


def _einsum_dense(layer, node) -> int:
    inputs, _ = _node_shapes(node)
    return _projection(layer, inputs[0])


def _conv(layer, node) -> int:
    _, outputs = _node_shapes(node)
    return _spatial_positions(layer, outputs[0]) * math.prod(layer.kernel.shape)


def _separable(layer, node) -> int:
    _, outputs = _node_shapes(node)
    weights = math.prod(layer.depthwise_kernel.shape) + math.prod(layer.pointwise_kernel.shape)
    return _spatial_positions(layer, outputs[0]) * weights


def _conv_transpose(layer, node) -> int:
    inputs, _ = _node_shapes(node)
    return _spatial_positions(layer, inputs[0]) * math.prod(layer.kernel.shape)


def _elements(layer, node) -> int:
    _, outputs = _node_shapes(node)
    return math.prod(_dims(outputs[0]))


def _pooling(layer, node) -> int:
    _, outputs = _node_shapes(node)
    return math.prod(_dims(outputs[0])) * math.prod(layer.pool_size)


def _global_pooling(layer, node) -> int:
    inputs, _ = _node_shapes(node)
    return math.prod(_dims(inputs[0]))


def _attention(layer, node) -> int:
    args = node.arguments
    query = args.args[0] if args.args else args.kwargs["query"]
    value = args.args[1] if len(args.args) > 1 else args.kwargs["value"]
    key = args.args[2] if len(args.args) > 2 else args.kwargs.get("key")
    key = value if key is None else key
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    heads, key_dim = layer.num_heads, layer.key_dim
    value_dim = layer.value_dim or key_dim
    total = _projection(layer._query_dense, q_shape)
    total += _projection(layer._key_dense, k_shape)
    total += _projection(layer._value_dense, v_shape)
    # Attention axes index the sequence dims; the other non-batch dims act as batch.
    q_dims, k_dims = _dims(q_shape)[:-1], _dims(k_shape)[:-1]
    axes = [a - 1 for a in (layer._attention_axes or range(1, len(q_shape) - 1))]
    outer = math.prod(d for i, d in enumerate(q_dims) if i not in axes)
    t_q = math.prod(q_dims[i] for i in axes)
    t_k = math.prod(k_dims[i] for i in axes)
    total += outer * t_q * t_k * heads * (key_dim + value_dim)
    attended = (None, *q_dims, heads, value_dim)
    total += _projection(layer._output_dense, attended)
    return int(total)


class _StepNode:
    """The tensors of one step of a `TimeDistributed` call (time axis dropped),
    in the shape of a node for the inner layer's rule."""

    def __init__(self, node):
        def step(t):
            return keras.KerasTensor((t.shape[0], *t.shape[2:]), dtype=t.dtype)

        tensors = [step(t) for t in node.arguments.keras_tensors]
        self.arguments = types.SimpleNamespace(keras_tensors=tensors, args=tensors, kwargs={})
        self.outputs = [step(t) for t in node.outputs]


def _time_distributed(layer, node) -> int | None:
    """Steps x the wrapped layer's MACs per step (None: no rule for it)."""
    rule = _rule(layer.layer)
    if rule is None:
        return None
    inputs, _ = _node_shapes(node)
    return _dims(inputs[0])[0] * rule(layer.layer, _StepNode(node))


L = keras.layers
#: `(layer class, rule)`, checked in order (subclasses before their bases).
MAC_RULES: tuple[tuple[type, Callable], ...] = (
    (LowRankDense, _low_rank_dense),
    (L.Dense, _dense),
    (L.EinsumDense, _einsum_dense),
    (LowRankEinsumDense, _einsum_dense),
    (L.Conv1DTranspose, _conv_transpose),
    (L.Conv2DTranspose, _conv_transpose),
    (L.Conv3DTranspose, _conv_transpose),
    (L.SeparableConv1D, _separable),
    (L.SeparableConv2D, _separable),
    (L.DepthwiseConv1D, _conv),
    (L.DepthwiseConv2D, _conv),
    (L.Conv1D, _conv),
    (L.Conv2D, _conv),
    (L.Conv3D, _conv),
    (L.MultiHeadAttention, _attention),
    (L.TimeDistributed, _time_distributed),
    (L.BatchNormalization, _elements),
    (L.LayerNormalization, _elements),
    (L.GroupNormalization, _elements),
    (L.MaxPooling1D, _pooling),
    (L.MaxPooling2D, _pooling),
    (L.MaxPooling3D, _pooling),
    (L.AveragePooling1D, _pooling),
    (L.AveragePooling2D, _pooling),
    (L.AveragePooling3D, _pooling),
    (L.GlobalAveragePooling1D, _global_pooling),
    (L.GlobalAveragePooling2D, _global_pooling),
    (L.GlobalAveragePooling3D, _global_pooling),
    (L.GlobalMaxPooling1D, _global_pooling),
    (L.GlobalMaxPooling2D, _global_pooling),
    (L.GlobalMaxPooling3D, _global_pooling),
)
del L


def _rule(layer) -> Callable | None:
    for cls, rule in MAC_RULES:
        if isinstance(layer, cls):
            return rule
    return None


def _graph_nodes(model) -> Iterator:
    graph = getattr(model, "_functional", None) or model
    by_depth = getattr(graph, "_nodes_by_depth", None)
    if by_depth is None:
        raise ValueError(
            "Expected a built functional or Sequential model (with an Input). "
            f"Received: model={model.name!r} of type {type(model).__name__}."
        )
    for depth in sorted(by_depth, reverse=True):
        yield from by_depth[depth]


def _walk(model, prefix: str, counts: dict, uncounted: list) -> None:
    for node in _graph_nodes(model):
        layer = node.operation
        name = prefix + layer.name
        if isinstance(layer, keras.Model):
            _walk(layer, name + "/", counts, uncounted)
            continue
        rule = _rule(layer)
        macs = None if rule is None else rule(layer, node)
        if macs is None:
            if layer.weights:
                uncounted.append(name)
            continue
        counts[name] = counts.get(name, 0) + int(macs)


def layer_macs(model) -> dict[str, int]:
    """`{layer name: MACs per sample}` for every layer a rule covers.

    A layer called several times counts every call; layers of a nested model
    are named `"<model>/<layer>"`. Layers with no cost (activations,
    reshapes, `Add`, dropout) are left out.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        The counts, in graph order.

    Raises:
        ValueError: a model without a graph (subclassed or unbuilt).
    """
    counts: dict[str, int] = {}
    _walk(model, "", counts, [])
    return counts


def uncounted_layers(model) -> list[str]:
    """Names of layers that hold weights but have no MAC rule."""
    uncounted: list[str] = []
    _walk(model, "", {}, uncounted)
    return sorted(set(uncounted))


def count_macs(model) -> int:
    """Total MACs per sample of `model` (see the module docstring for the rules)."""
    return int(sum(layer_macs(model).values()))
