"""Forward-mode products by each layer's own linear map: the primal once per
sample, the tangents of all directions as one batch, no `ForwardAccumulator`
over the directions.

For a network made of the layers in `LINEARIZED_LAYERS`, the derivative of
every layer at its input is a linear map known in closed form: a
convolution or `Dense` layer applies its kernel (no bias), batch
normalisation at inference scales each channel by `gamma / sqrt(var + eps)`,
an elementwise activation multiplies by its derivative at the primal,
max pooling picks the tangent at the primal's maximum, rescaling and
normalisation scale it, a product follows the product rule, and padding,
average pooling, flattening, reshaping, adding and concatenating are linear
already. The walk
below runs the model's graph once with *dual* values: the primal `[B, ...]`
is computed by the layers themselves, and the tangents `[B * d, ...]`
(sample `b`, direction `i` at row `b * d + i`) by those linear maps, the `d`
directions folded into the batch axis.

This is what `tf.vectorized_map` over a `ForwardAccumulator` computes, with
a fraction of its graph: pfor turns every per-operation JVP function of the
accumulator into a function of its own (one ResNet50 JVP at 32x32: 12,702
graph nodes, against one node or a few per layer here).

Plain functions on tensors; usable inside `tf.function`.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from keras_localrank.graph import functional_graph, is_nested_model
from keras_localrank.taps import CONV_LAYERS, preactivation

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "LINEARIZED_LAYERS",
    "Dual",
    "has_kernel_map",
    "kernel_map",
    "linearizable",
    "pushforward",
]


def _activation(name):
    return getattr(keras.activations, name, None)


#: Activations applied value by value (their derivative is a diagonal,
#: taken at the primal by a `ForwardAccumulator` with unit tangents).
#: Softmax and log-softmax have a rule of their own; a layer with any other
#: activation (a user's function) is not linearized.
ELEMENTWISE_ACTIVATIONS = tuple(
    fn
    for fn in map(
        _activation,
        (
            "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "sigmoid",
            "hard_sigmoid", "tanh", "swish", "silu", "hard_swish", "hard_silu", "mish",
            "softplus", "softsign", "exponential", "celu", "hard_tanh", "log_sigmoid",
            "squareplus", "sparse_plus", "sparse_sigmoid", "tanh_shrink", "soft_shrink",
            "hard_shrink",
        ),
    )
    if fn is not None
)

_L = keras.layers
#: Layers that are linear in their input and have no offset: applied to the
#: tangents as they are.
_LINEAR = (
    _L.ZeroPadding1D,
    _L.ZeroPadding2D,
    _L.ZeroPadding3D,
    _L.AveragePooling1D,
    _L.AveragePooling2D,
    _L.AveragePooling3D,
    _L.GlobalAveragePooling1D,
    _L.GlobalAveragePooling2D,
    _L.GlobalAveragePooling3D,
    _L.Flatten,
    _L.Reshape,
    _L.Add,
    _L.Concatenate,
)
#: Layers computing `activation(K a + b)` with a kernel map `K`: Dense
#: and every convolution (exact types; not `EinsumDense`).
_KERNEL = (_L.Dense, *CONV_LAYERS)
_SOFTMAX = (keras.activations.softmax, keras.activations.log_softmax)

#: Layer classes (exact types: a subclass may change `call`) the walk
#: linearizes; each is checked against explicit float64 Jacobians in
#: tests/test_linearize.py.
LINEARIZED_LAYERS = (
    _L.InputLayer,
    *_KERNEL,
    _L.BatchNormalization,
    _L.Activation,
    _L.ReLU,
    _L.MaxPooling2D,
    _L.GlobalMaxPooling2D,
    _L.Dropout,
    _L.Rescaling,
    _L.Normalization,
    _L.Multiply,
    *_LINEAR,
)


class Dual:
    """A primal value `[B, ...]` and its tangents `[B * d, ...]`."""

    __slots__ = ("primal", "tangent")

    def __init__(self, primal, tangent):
        self.primal = primal
        self.tangent = tangent


def _supported(layer, xla: bool) -> bool:
    if type(layer) not in LINEARIZED_LAYERS:
        return False
    if isinstance(layer, _KERNEL) and not has_kernel_map(layer):
        return False
    if isinstance(layer, (*_KERNEL, _L.Activation)):
        return layer.activation in ELEMENTWISE_ACTIVATIONS or layer.activation in _SOFTMAX
    if isinstance(layer, _L.MaxPooling2D) and xla:
        return False  # `max_pool_with_argmax` has no XLA kernel
    if isinstance(layer, (_L.MaxPooling2D, _L.GlobalMaxPooling2D)):
        return layer.data_format == "channels_last"
    if isinstance(layer, _L.BatchNormalization):
        return isinstance(layer.axis, int)
    if isinstance(layer, _L.Rescaling):  # per-channel scales move for channels_first
        scale = tf.convert_to_tensor(layer.scale)
        return scale.shape.rank == 0 or keras.config.image_data_format() == "channels_last"
    if isinstance(layer, _L.Normalization):
        return layer.built
    return True


def has_kernel_map(layer) -> bool:
    """True when `kernel_map` gives the derivative of `layer`'s
    pre-activation (a Dense or convolution layer of an exact listed type,
    not quantized)."""
    return type(layer) in _KERNEL and getattr(layer, "quantization_mode", None) is None


def linearizable(model, *, xla: bool = False) -> bool:
    """True when every operation of `model` (nested models included) is a
    `LINEARIZED_LAYERS` layer the walk supports: an elementwise activation
    or softmax, channels-last max pooling (not under XLA, `xla=True`: its
    argmax has no XLA kernel), no quantized kernel. The operations, not
    `model.layers`: a functional model's `keras.ops` calls are operations
    that are not layers."""
    if not is_nested_model(model):
        return False  # a subclassed model's `call` may do anything
    for op in functional_graph(model).operations:
        if is_nested_model(op):
            if not linearizable(op, xla=xla):
                return False
        elif not _supported(op, xla):
            return False
    return True


def _times(t, factor, d):
    """`t` `[B * d, ...]` times `factor` `[B, ...]` (each sample's factor
    applied to its `d` directions), broadcast (either may have size-1 axes,
    as `Multiply`'s factors), as `[B * d, ...]`."""
    shape = tf.shape(t)
    folded = tf.reshape(t, tf.concat([[-1, d], shape[1:]], 0))
    product = folded * tf.expand_dims(tf.cast(factor, t.dtype), 1)
    return tf.reshape(product, tf.concat([[-1], tf.shape(product)[2:]], 0))


def _activation_tangent(fn, z, dz, d):
    """Tangent of `fn(z)` for tangents `dz` `[B * d, ...]` of `z` `[B, ...]`."""
    dz = tf.cast(dz, z.dtype)
    if fn in _SOFTMAX:  # softmax over the last axis: s * (dz - <s, dz>)
        s = tf.nn.softmax(z, axis=-1)
        shape = tf.shape(dz)
        folded = tf.reshape(dz, tf.concat([[-1, d], shape[1:]], 0))
        s = tf.expand_dims(s, 1)
        centred = folded - tf.reduce_sum(s * folded, axis=-1, keepdims=True)
        out = centred * s if fn is keras.activations.softmax else centred
        return tf.reshape(out, shape)
    with tf.autodiff.ForwardAccumulator(z, tf.ones_like(z)) as acc:
        y = fn(z)
    derivative = acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return _times(dz, derivative, d)


@contextlib.contextmanager
def _kernel_only(layer):
    """Temporarily drop a convolution's bias and activation."""
    saved = layer.use_bias, layer.activation
    layer.use_bias, layer.activation = False, keras.activations.linear
    try:
        yield
    finally:
        layer.use_bias, layer.activation = saved


def kernel_map(layer, t):
    """The kernel map of a Dense or convolution layer (`LINEARIZED_LAYERS`)
    applied to `t`, without bias or activation: the derivative of the
    layer's pre-activation, by the layer's own `call` (strides, padding,
    dilation, groups, LoRA)."""
    t = tf.cast(t, layer.compute_dtype)
    if isinstance(layer, _L.Dense):
        return keras.ops.matmul(t, layer.kernel)
    with _kernel_only(layer):
        return layer.call(t)


def _max_pool_tangent(layer, x, t, d):
    """Tangent of channels-last `MaxPooling2D`: the tangent at the argmax."""
    _, argmax = tf.nn.max_pool_with_argmax(
        x,
        ksize=layer.pool_size,
        strides=layer.strides,
        padding=layer.padding.upper(),
        include_batch_in_index=False,
    )
    shape = tf.shape(argmax)
    return _gather(t, tf.reshape(argmax, [shape[0], -1]), d, shape)


def _global_max_tangent(layer, x, t, d):
    """Tangent of channels-last `GlobalMaxPooling2D`."""
    shape = tf.shape(x)
    channels = shape[-1]
    flat = tf.reshape(x, [shape[0], -1, channels])
    position = tf.argmax(flat, axis=1, output_type=tf.int64)  # [B, C]
    index = position * tf.cast(channels, tf.int64) + tf.range(channels, dtype=tf.int64)
    out = [shape[0], 1, 1, channels] if layer.keepdims else [shape[0], channels]
    return _gather(t, index, d, tf.stack(out))


def _gather(t, index, d, out_shape):
    """`t` `[B * d, ...]` at the per-sample flat positions `index` `[B, m]`,
    shaped `[B * d, *out_shape[1:]]`."""
    folded = tf.reshape(t, tf.stack([tf.shape(index)[0], d, -1]))
    picked = tf.gather(folded, index, axis=2, batch_dims=1)  # [B, d, m]
    return tf.reshape(picked, tf.concat([[-1], tf.cast(out_shape[1:], tf.int32)], 0))


def _apply(layer, args, kwargs, d):
    """Output (a Dual) of one call of a supported layer on Dual arguments."""
    primal = keras.tree.map_structure(lambda v: v.primal if isinstance(v, Dual) else v, args)
    tangent = keras.tree.map_structure(lambda v: v.tangent if isinstance(v, Dual) else v, args)
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    if isinstance(layer, _L.Dropout):
        return Dual(primal[0], tangent[0])
    if isinstance(layer, _LINEAR):
        return Dual(layer(*primal, **kwargs), layer(*tangent, **kwargs))
    x, t = primal[0], tangent[0]
    if isinstance(layer, _KERNEL):
        z = preactivation(layer, x)
        dz = kernel_map(layer, t)
        if layer.activation is keras.activations.linear:
            return Dual(z, dz)
        return Dual(layer.activation(z), _activation_tangent(layer.activation, z, dz, d))
    if isinstance(layer, _L.BatchNormalization):
        y = layer(x, training=False)
        scale = tf.math.rsqrt(tf.cast(layer.moving_variance, y.dtype) + layer.epsilon)
        if layer.scale:
            scale = scale * tf.cast(layer.gamma, y.dtype)
        shape = [1] * t.shape.rank
        shape[layer.axis % t.shape.rank] = -1
        return Dual(y, tf.cast(t, y.dtype) * tf.reshape(scale, shape))
    if isinstance(layer, _L.Multiply):  # product rule over the factors
        xs = [tf.cast(v, layer.compute_dtype) for v in primal[0]]
        ts = [tf.cast(v, layer.compute_dtype) for v in tangent[0]]
        terms = []
        for i, ti in enumerate(ts):
            others = [v for j, v in enumerate(xs) if j != i]
            factor = others[0]
            for v in others[1:]:
                factor = factor * v
            terms.append(_times(ti, factor, d))
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return Dual(layer(primal[0]), total)
    x = tf.cast(x, layer.compute_dtype)
    t = tf.cast(t, layer.compute_dtype)
    if isinstance(layer, _L.Rescaling):
        return Dual(layer.call(x), t * tf.cast(layer.scale, t.dtype))
    if isinstance(layer, _L.Normalization):
        std = tf.maximum(tf.sqrt(tf.cast(layer.variance, t.dtype)), keras.config.epsilon())
        return Dual(layer.call(x), t * std if layer.invert else t / std)
    if isinstance(layer, _L.Activation):
        return Dual(layer.call(x), _activation_tangent(layer.activation, x, t, d))
    if isinstance(layer, _L.ReLU):
        return Dual(layer.call(x), _activation_tangent(layer.call, x, t, d))
    if isinstance(layer, _L.MaxPooling2D):
        return Dual(layer.call(x), _max_pool_tangent(layer, x, t, d))
    if isinstance(layer, _L.GlobalMaxPooling2D):
        return Dual(layer.call(x), _global_max_tangent(layer, x, t, d))
    raise TypeError(f"Layer {layer.name!r} of type {type(layer).__name__} is not linearized.")


class _Done(Exception):
    """Every wanted call input has been captured."""


def _walk(graph, inputs, d, wanted, counters, captured):
    """Run `graph` on Dual `inputs` in Keras's own order (deepest nodes
    first); record the Dual input of wanted calls.

    wanted: `{id(layer): {call index: slot}}`; counters: calls seen so far
    per layer id (counted as `graph.CaptureModel` counts them); captured:
    `{slot: Dual}`.
    """
    values = {id(k): v for k, v in zip(graph.inputs, inputs)}
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(k) not in values for k in node.input_tensors):
                continue
            layer = node.operation
            args, kwargs = node.arguments.fill_in(values)
            k = counters.get(id(layer), 0)
            counters[id(layer)] = k + 1
            slot = wanted.get(id(layer), {}).get(k)
            if slot is not None:
                captured[slot] = args[0]
                if len(captured) == sum(len(s) for s in wanted.values()):
                    raise _Done
            if is_nested_model(layer):
                inner = functional_graph(layer)
                outputs = _walk(inner, keras.tree.flatten(args), d, wanted, counters, captured)
            else:
                outputs = _apply(layer, args, kwargs, d)
            for tensor, value in zip(node.outputs, keras.tree.flatten(outputs)):
                values[id(tensor)] = value
    return [values[id(k)] for k in graph.outputs]


def pushforward(model, x, directions, calls=None):
    """Values and forward products at chosen points of a `linearizable`
    model with one input.

    Args:
        model: the model.
        x: `[B, *input_shape]` points.
        directions: `[B, d, n0]` directions (flattened input space).
        calls: None for the model's outputs; else `(layer, call index)`
            pairs (the index among the layer's calls in one call of the
            model, nested models included) whose *inputs* are wanted.

    Returns:
        One `Dual` per output or call: the value at `x` (`[B, ...]`) and the
        Jacobian-vector products with the directions (`[B * d, ...]`, sample
        `b`, direction `i` at row `b * d + i`).
    """
    d = tf.shape(directions)[1]
    t = tf.reshape(tf.cast(directions, x.dtype), tf.concat([[-1], tf.shape(x)[1:]], 0))
    graph = functional_graph(model)
    if calls is None:
        return _walk(graph, [Dual(x, t)], d, {}, {}, {})
    wanted: dict = {}
    for slot, (layer, index) in enumerate(calls):
        wanted.setdefault(id(layer), {})[index] = slot
    captured: dict = {}
    try:
        _walk(graph, [Dual(x, t)], d, wanted, {}, captured)
    except _Done:
        pass
    missing = [layer.name for slot, (layer, _) in enumerate(calls) if slot not in captured]
    if missing:
        raise RuntimeError(f"Calls of layers {missing} were not run by the model.")
    return [captured[slot] for slot in range(len(calls))]
