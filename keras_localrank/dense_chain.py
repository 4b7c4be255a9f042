"""The analytic path: Jacobian spectra of Dense chains without Jacobians.

For Dense layers with element-wise activations fed (possibly through
`Flatten`/`Reshape`) by the model input,

    J_1 = W_1^T,    J_l = W_l^T diag(act'(p_{l-1})) J_{l-1}.

If `W_1^T = U S V^T` (thin SVD, `k = min(n0, n1)` columns) then every `J_l`
has its row space inside `span(V)`, so `F_l = J_l V` has exactly the singular
values of `J_l`:

    F_1 = U S,      F_l = W_l^T diag(act'(p_{l-1})) F_{l-1}     (n_l x k).

`J_1` does not depend on `x`: its spectrum is computed once per call.

When an activation has exact zeros (ReLU and friends), `D F_{l-1}` has only
`a` non-zero rows `C` (`a x k`). With the thin QR `C^T = Q R`, `C = R^T Q^T`
and `Q` has orthonormal columns, so `F_l Q = W_l^T[:, A] R^T` (`n_l x
min(k, a)`) again has the singular values of `J_l`: each factor shrinks to
the number of active units feeding it. Every step is an orthogonal change of
basis, so ranks equal those of the explicit Jacobian up to rounding.

The module finds such chains (`find_dense_forest`, which also accepts
branches: a forest rooted at the input) and computes factor spectra
(`dense_forest_singular_values`), a plain function on tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from keras_localrank.spectra import singular_values
from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS, Tap, model_graph

__all__ = ["DenseLink", "find_dense_forest", "dense_forest_singular_values"]


def _elementwise_activations() -> frozenset:
    names = (
        "linear celu elu exponential gelu hard_shrink hard_sigmoid hard_silu "
        "hard_swish hard_tanh leaky_relu log_sigmoid mish relu relu6 selu sigmoid "
        "silu soft_shrink softplus softsign sparse_plus sparse_sigmoid squareplus "
        "swish tanh tanh_shrink"
    ).split()
    return frozenset(
        getattr(keras.activations, n) for n in names if hasattr(keras.activations, n)
    )


ELEMENTWISE_ACTIVATIONS = _elementwise_activations()

#: Layers that apply an element-wise function (their `call` is used).
_ELEMENTWISE_LAYERS = (
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
)
_RESHAPE_LAYERS = (keras.layers.Flatten, keras.layers.Reshape)


@dataclasses.dataclass(frozen=True, eq=False)
class DenseLink:
    """A Dense layer in a forest rooted at the model input.

    Attributes:
        layer: the `Dense` layer.
        parent: the `DenseLink` whose pre-activation feeds this layer, or None
            when the layer reads the (flattened) model input.
        stages: element-wise functions applied, in order, to the parent's
            pre-activation before this layer (the parent's own activation,
            then any activation layers in between).
    """

    layer: keras.layers.Dense
    parent: DenseLink | None
    stages: tuple[Callable, ...]


def _stage_of(layer):
    """The element-wise function a layer applies, None if it is the identity,
    or False if it is not element-wise."""
    from keras_localrank.layers import RankProbe

    if isinstance(layer, (*INFERENCE_IDENTITY_LAYERS, RankProbe)):
        return None
    if isinstance(layer, keras.layers.Activation):
        return layer.activation if layer.activation in ELEMENTWISE_ACTIVATIONS else False
    if isinstance(layer, _ELEMENTWISE_LAYERS):
        return layer.call
    return False


def _is_plain_dense(layer) -> bool:
    return (
        type(layer) is keras.layers.Dense
        and getattr(layer, "quantization_mode", None) is None
        and layer.activation in ELEMENTWISE_ACTIVATIONS
    )


def find_dense_forest(model, taps: Sequence[Tap]) -> dict[str, DenseLink]:
    """Links for every tap that lies on a Dense forest rooted at the input.

    Args:
        model: the model the taps belong to.
        taps: the taps to place.

    Returns:
        `{tap name: DenseLink}` for the taps the analytic path can measure
        (others are absent). Untapped Dense ancestors appear as parents.
    """
    graph = model_graph(model)
    model_input = graph.inputs[0]
    cache: dict[tuple[int, int], DenseLink | None] = {}

    def link_for(layer, tensor) -> DenseLink | None:
        key = (id(layer), id(tensor))  # one link per call of a shared layer
        if key in cache:
            return cache[key]
        cache[key] = None  # guards against cycles; overwritten below
        if not _is_plain_dense(layer) or len(tensor.shape) != 2:
            return None
        stages: list[Callable] = []
        reshaped = False
        while True:
            if tensor is model_input:
                if stages:
                    return None  # element-wise ops on the raw input: not a chain
                link = DenseLink(layer, None, ())
                break
            op, node_index, _ = tensor._keras_history
            node = op._inbound_nodes[node_index]
            if len(node.input_tensors) != 1:
                return None
            if _is_plain_dense(op):
                if reshaped:
                    return None
                parent = link_for(op, node.input_tensors[0])
                if parent is None:
                    return None
                link = DenseLink(layer, parent, (op.activation, *reversed(stages)))
                break
            if isinstance(op, _RESHAPE_LAYERS):
                reshaped = True
            else:
                stage = _stage_of(op)
                if stage is False:
                    return None
                if stage is not None:
                    stages.append(stage)
            tensor = node.input_tensors[0]
        cache[key] = link
        return link

    forest = {}
    for tap in taps:
        if tap.input is None:  # a part of an attention layer
            continue
        link = link_for(tap.layer, tap.input)
        if link is not None:
            forest[tap.name] = link
    return forest


_ZERO_PRODUCING = frozenset(
    getattr(keras.activations, n)
    for n in ("relu", "relu6", "hard_sigmoid", "hard_shrink", "soft_shrink", "hard_tanh")
    if hasattr(keras.activations, n)
)


def _may_have_exact_zeros(stages) -> bool:
    for stage in stages:
        fn = getattr(stage, "__func__", stage)
        owner = getattr(stage, "__self__", None)
        if fn in _ZERO_PRODUCING:
            return True
        if isinstance(owner, keras.layers.ReLU) and not owner.negative_slope:
            return True
    return False


def _apply_with_derivative(stages, p):
    """`(g(p), g'(p))` for the composition `g` of element-wise `stages`."""
    if not stages:
        return p, tf.ones_like(p)
    with tf.GradientTape() as tape:
        tape.watch(p)
        a = p
        for stage in stages:
            a = stage(a)
    return a, tape.gradient(a, p, output_gradients=tf.ones_like(a))


def _shrink_by_active_rows(kernel, g, d, k):
    """`W^T G` reduced to `min(k, a_max)` columns via QR of the active rows.

    `g = diag(d) F` has zero rows where `d == 0`.
    """
    active = tf.cast(tf.not_equal(d, 0), tf.int32)  # (B, n_p)
    a_max = tf.reduce_max(tf.reduce_sum(active, axis=1))

    def shrink():
        order = tf.argsort(active, axis=1, direction="DESCENDING", stable=True)
        idx = order[:, :a_max]  # (B, a): active rows first, zero rows pad
        c = tf.gather(g, idx, batch_dims=1)  # (B, a, k)
        w = tf.gather(kernel, idx)  # (B, a, n_c)
        r = tf.linalg.qr(tf.linalg.matrix_transpose(c))[1]  # (B, min(k, a), a)
        return tf.linalg.matmul(w, r, transpose_a=True, transpose_b=True)

    def full():
        return tf.einsum("pc,bpk->bck", kernel, g)

    return tf.cond(a_max < k, shrink, full)


def dense_forest_singular_values(
    x_flat: tf.Tensor,
    links: dict[str, DenseLink],
    *,
    dtype,
    shrink: bool = True,
    via_gram: bool = False,
) -> dict[str, tf.Tensor]:
    """Singular values of `J_l(x)` for every link, per sample.

    Args:
        x_flat: `[B, n0]` flattened model inputs.
        links: `{name: DenseLink}` from `find_dense_forest`.
        dtype: the compute dtype (weights and inputs are cast to it).
        shrink: shrink factors on exact zeros of the activation derivative
            (dynamic shapes; turn off under XLA). Default True.
        via_gram: see `spectra.singular_values`. Default False.

    Returns:
        `{name: [B, k_l] singular values}` (padded with zeros to a common width
        inside a batch; zeros never count towards a rank).
    """
    x_flat = tf.cast(x_flat, dtype)
    batch = tf.shape(x_flat)[0]
    pre: dict[int, tf.Tensor] = {}  # id(link) -> [B, n_l] pre-activation
    factor: dict[int, tf.Tensor] = {}  # id(link) -> [n_l, k] or [B, n_l, k]
    spectra: dict[int, tf.Tensor] = {}

    def visit(link: DenseLink):
        key = id(link)  # one link per call: a shared layer has several
        if key in pre:
            return
        kernel = tf.cast(link.layer.kernel, dtype)
        bias = tf.cast(link.layer.bias, dtype) if link.layer.use_bias else None
        if link.parent is None:
            inp = x_flat
            n0, n1 = kernel.shape
            if n0 > n1:
                s, u, _ = tf.linalg.svd(tf.transpose(kernel))
                factor[key] = u * s  # (n1, k)
            else:
                factor[key] = tf.transpose(kernel)  # (n1, n0)
                s = singular_values(factor[key], via_gram=via_gram)
            spectra[key] = tf.broadcast_to(s, tf.stack([batch, tf.size(s)]))
        else:
            visit(link.parent)
            parent_key = id(link.parent)
            inp, deriv = _apply_with_derivative(link.stages, pre[parent_key])
            f = factor[parent_key]
            g = deriv[:, :, None] * f  # (B, n_p, k)
            k = tf.shape(f)[-1]
            if shrink and _may_have_exact_zeros(link.stages):
                factor[key] = _shrink_by_active_rows(kernel, g, deriv, k)
            else:
                factor[key] = tf.einsum("pc,bpk->bck", kernel, g)
            spectra[key] = singular_values(factor[key], via_gram=via_gram)
        out = tf.linalg.matmul(inp, kernel)
        pre[key] = out + bias if bias is not None else out

    result = {}
    for name, link in links.items():
        visit(link)
        result[name] = spectra[id(link)]
    return result
