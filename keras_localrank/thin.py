"""Thin rows: a pointwise layer measured through its narrower input.

A `Dense` layer (its kernel acts on the last axis) or a convolution with a
kernel of size 1 computes `p = K a + b`, where `a` is the layer's input and
`K` applies one matrix `W` (`c_in x c_out`) at every output position, the
positions `S a` that the strides visit. Then `J_p = K J_a` and

    J_p^T J_p = J_a^T K^T K J_a,    K^T K = S^T S (x) W W^T.

With the thin QR `W^T = Q R` (`R`: `c_in x c_in`, float64), `W W^T = R^T R`,
so the *thin rows* `T = (S (x) R) J_a`, `c_in` values per output position
instead of `c_out`, satisfy `T^T T = J_p^T J_p`: `T` has exactly the singular
values of `J_p`, hence the same rank under any tolerance evaluated with
`J_p`'s own shape `(n_l, n0)`. For an expanding layer (`c_in < c_out`: a
ResNet bottleneck's `_3` and shortcut `_0` convolutions, MobileNetV2's
`expand` convolutions, a Transformer's feed-forward up-projection) the exact
path pushes and accumulates `c_in / c_out` of the rows: forward mode keeps an
accumulated Gram instead of an assembled Jacobian once the thin rows fit the
directions, reverse mode needs fewer products, and the eigen-solve is of the
smaller order.

`thin_width` decides at plan time (graph facts only); `thin_factor` computes
`R` from the layer's current kernel (once per measurement, traced with it, so
weights that change during training are honoured) and `thin_rows` the rows
`T` (plain functions on tensors).
"""

from __future__ import annotations

import keras
import tensorflow as tf

__all__ = ["thin_factor", "thin_rows", "thin_width"]

_CONVS = tuple(
    getattr(keras.layers, name) for name in ("Conv1D", "Conv2D", "Conv3D")
)


def _is_pointwise_conv(layer) -> bool:
    return (
        isinstance(layer, _CONVS)
        and all(k == 1 for k in layer.kernel_size)
        and layer.groups == 1
        and layer.data_format == "channels_last"
    )


def _plain(layer) -> bool:
    """The layer computes `K a + b` with `layer.kernel` (no quantized kernel,
    no `call` of a user subclass that could compute something else)."""
    if getattr(layer, "quantization_mode", None) is not None:
        return False
    base = keras.layers.Dense if isinstance(layer, keras.layers.Dense) else _CONVS[layer.rank - 1]
    return type(layer).call is base.call


def thin_width(layer, units: int) -> int | None:
    """Rows per sample of the thin rows of `layer`, or None when they do not
    apply or are not fewer than `units` (`n_l`).

    Args:
        layer: the measured layer (a `Tap.layer`).
        units: its `n_l`.
    """
    if not (isinstance(layer, keras.layers.Dense) or _is_pointwise_conv(layer)):
        return None
    if not _plain(layer):
        return None
    c_in, c_out = (int(d) for d in tuple(layer.kernel.shape)[-2:])
    if c_in >= c_out:
        return None
    return units // c_out * c_in


def thin_factor(layer) -> tf.Tensor:
    """`R` (`c_in x c_in`, the layer's compute dtype) with `R^T R = W W^T`,
    from the thin QR of `W^T` in float64, for the layer's current kernel.

    Computed once per measurement, outside the loops over directions."""
    kernel = tf.convert_to_tensor(layer.kernel)
    c_in = int(kernel.shape[-2])
    w = tf.cast(tf.reshape(kernel, [c_in, -1]), tf.float64)
    r = tf.linalg.qr(tf.transpose(w))[1]  # W^T = Q R
    return tf.cast(r, layer.compute_dtype)


def thin_rows(layer, inputs: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """`[B, positions * c_in]`: the thin rows `(S (x) R) a` of `layer` at its
    input `a` (`inputs`, `[B, ..., c_in]`), whose Jacobian has the Gram of
    the layer's pre-activation Jacobian (see the module docstring).

    Args:
        layer: a layer for which `thin_width` is not None.
        inputs: the layer's input.
        factor: `thin_factor(layer)`.
    """
    a = tf.cast(inputs, layer.compute_dtype)
    if not isinstance(layer, keras.layers.Dense):
        index = (slice(None),) + tuple(slice(None, None, s) for s in layer.strides)
        a = a[index]
    t = tf.linalg.matmul(a, factor, transpose_b=True)
    return tf.reshape(t, [tf.shape(a)[0], -1])
