"""The constant first layer: a measured layer that is affine in the model input.

If a measured layer's pre-activation is `p_1(x) = K_1 x + b` (a Dense, Conv
or EinsumDense reached from the input through reshapes, padding, cropping,
average pooling, rescaling or normalisation with fixed statistics), then
`J_1 = K_1` does not depend on `x`, and every layer that sees the input only
through `p_1` has `J_l(x) = M_l(x) K_1`. With `Q` an orthonormal basis of the
row space of `K_1` (thin QR of `K_1^T`, `k = n_1 < n0` columns), `J_l Q Q^T =
J_l`, so `J_l Q` (`n_l x k`) has exactly the singular values of `J_l`: only
`k` directions need to be pushed through the network instead of `n0`.

`find_linear_root` finds the layer and the taps it covers (graph analysis);
`row_space_basis` computes `Q^T` from `K_1` (a plain function on tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_localrank.graph import functional_graph, producer
from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS, Tap

__all__ = [
    "LinearRoot",
    "AFFINE_LAYERS",
    "find_linear_root",
    "is_constant_tap",
    "row_space_basis",
]


def _classes(*names):
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


#: Layers affine in their input at inference.
AFFINE_LAYERS: tuple[type, ...] = (
    *INFERENCE_IDENTITY_LAYERS,
    *_classes(
        "Flatten", "Reshape", "Permute", "Rescaling", "Normalization",
        "BatchNormalization", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
        "Cropping1D", "Cropping2D", "Cropping3D", "AveragePooling1D",
        "AveragePooling2D", "AveragePooling3D", "GlobalAveragePooling1D",
        "GlobalAveragePooling2D", "GlobalAveragePooling3D", "UpSampling1D",
    ),
)


@dataclasses.dataclass(frozen=True, eq=False)
class LinearRoot:
    """A tap affine in the input, and the taps that see the input only through it.

    Attributes:
        tap: the affine tap (its pre-activation is `K_1 x + b`).
        covered: names of taps (the root included) whose Jacobians factor
            through `K_1`.
    """

    tap: Tap
    covered: frozenset


def _is_affine_in_input(tensor, model_input) -> bool:
    """True if `tensor` is an affine function of the model input alone."""
    if tensor is None:  # an attention projection: no single input tensor
        return False
    while tensor is not model_input:
        op, node = producer(tensor)
        if op is None or len(node.input_tensors) != 1:
            return False
        if not isinstance(op, AFFINE_LAYERS):
            from keras_localrank.layers import RankProbe

            if not isinstance(op, RankProbe):
                return False
        tensor = node.input_tensors[0]
    return True


def _through(tensor, gate, model_input, memo, held=frozenset()) -> bool:
    """True if every path from the model input to `tensor` passes `gate`.

    `held`: ids of the other model inputs (held at their values: constants).
    Conservative: False for a tensor of a nested model's inner graph (its
    paths end at the inner input)."""
    if tensor is None:  # an attention projection: not analysed
        return False
    if tensor is gate:
        return True
    if tensor is model_input:
        return False
    if id(tensor) in held:
        return True
    key = id(tensor)
    if key in memo:
        return memo[key]
    memo[key] = False  # cycle guard
    op, node = producer(tensor)
    if op is None:
        memo[key] = True  # a constant: does not depend on the input
        return True
    inputs = [t for t in node.input_tensors if hasattr(t, "_keras_history")]
    memo[key] = bool(inputs) and all(
        _through(t, gate, model_input, memo, held) for t in inputs
    )
    return memo[key]


def _wrt_tensor(model, tap: Tap):
    """The differentiated tensor of the tap's measurement: a model input (the
    only one, or `wrt`'s), or the output of the `wrt` layer call."""
    wrt = tap.wrt
    inputs = functional_graph(model).inputs
    if wrt is None:
        return inputs[0]
    if wrt.is_input:
        return inputs[wrt.input_index]
    return wrt.call.outputs[0]


def is_constant_tap(model, tap: Tap) -> bool:
    """True if the tap's pre-activation is affine in the differentiated tensor
    alone (constant `J`): the tap's input is reached from it through
    single-input affine layers only (so held inputs do not enter). Taps inside
    nested models and attention projections are conservatively not constant.
    """
    return _is_affine_in_input(tap.input, _wrt_tensor(model, tap))


def find_linear_root(model, taps: Sequence[Tap]) -> LinearRoot | None:
    """The affine tap with fewer units than inputs that covers the most taps.

    Args:
        model: the model the taps belong to.
        taps: the candidate taps.

    Returns:
        A `LinearRoot`, or None when no tap is affine in the input with
        `n_1 < n0` (only then does the reduction save work).
    """
    if not taps:
        return None
    model_input = _wrt_tensor(model, taps[0])
    held = frozenset(id(t) for t in functional_graph(model).inputs if t is not model_input)
    best = None
    for tap in taps:
        if tap.units >= tap.input_dim or not _is_affine_in_input(tap.input, model_input):
            continue
        nodes = [n for n in tap.layer._inbound_nodes if n.input_tensors[0] is tap.input]
        if len(nodes) != 1 or len(nodes[0].output_tensors) != 1:
            continue
        gate = nodes[0].output_tensors[0]
        memo: dict = {}
        covered = {tap.name} | {
            t.name
            for t in taps
            if t is not tap and _through(t.input, gate, model_input, memo, held)
        }
        key = (len(covered), -tap.units)
        if best is None or key > best[0]:
            best = (key, LinearRoot(tap, frozenset(covered)))
    return None if best is None else best[1]


def row_space_basis(kernel_rows: tf.Tensor) -> tf.Tensor:
    """`Q^T` (`[k, n0]`, orthonormal rows) spanning the row space of `K_1`.

    Args:
        kernel_rows: `K_1` as `[n1, n0]` with `n1 <= n0`.

    Returns:
        `[n1, n0]` float64 orthonormal rows from the thin QR of `K_1^T`: they
        span a space containing the row space of `K_1` even when `K_1` is rank
        deficient.
    """
    q, _ = tf.linalg.qr(tf.transpose(tf.cast(kernel_rows, tf.float64)))
    return tf.transpose(q)
