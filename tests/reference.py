"""An independent float64 reference: explicit Jacobians built by hand.

For a Sequential chain of layers, each layer's *linear part* is turned into an
explicit float64 matrix by applying it to the standard basis (exact for a
linear map), activation derivatives come from closed-form NumPy formulas, and
the chain rule multiplies them out. No automatic differentiation and no code
of the package is involved beyond the Keras layers' forward computation.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from scipy.special import erf

SQRT2 = math.sqrt(2.0)


def _sigmoid(p):
    return 1.0 / (1.0 + np.exp(-p))


#: d act / d p, in closed form.
DERIVATIVES = {
    "linear": lambda p: np.ones_like(p),
    "relu": lambda p: (p > 0).astype(np.float64),
    "tanh": lambda p: 1.0 - np.tanh(p) ** 2,
    "sigmoid": lambda p: _sigmoid(p) * (1 - _sigmoid(p)),
    "softplus": _sigmoid,
    "softsign": lambda p: 1.0 / (1.0 + np.abs(p)) ** 2,
    "elu": lambda p: np.where(p > 0, 1.0, np.exp(p)),
    "leaky_relu": lambda p: np.where(p > 0, 1.0, 0.2),
    "swish": lambda p: _sigmoid(p) + p * _sigmoid(p) * (1 - _sigmoid(p)),
    "silu": lambda p: _sigmoid(p) + p * _sigmoid(p) * (1 - _sigmoid(p)),
    "gelu": lambda p: 0.5 * (1 + erf(p / SQRT2)) + p * np.exp(-0.5 * p**2) / math.sqrt(
        2 * math.pi
    ),
}

ACTIVATIONS = {
    "linear": lambda p: p,
    "relu": lambda p: np.maximum(p, 0),
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "softplus": lambda p: np.logaddexp(0, p),
    "softsign": lambda p: p / (1.0 + np.abs(p)),
    "elu": lambda p: np.where(p > 0, p, np.expm1(np.minimum(p, 0))),
    "leaky_relu": lambda p: np.where(p > 0, p, 0.2 * p),
    "swish": lambda p: p * _sigmoid(p),
    "silu": lambda p: p * _sigmoid(p),
    "gelu": lambda p: 0.5 * p * (1 + erf(p / SQRT2)),
}


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", "linear")
    if name not in DERIVATIVES:
        raise NotImplementedError(f"reference has no derivative for {name}")
    return name


def _linear_part(layer, in_shape):
    """Explicit float64 matrix of the layer's pre-activation minus its bias.

    Weights are copied into float64 NumPy and the layer's own `call` is run
    by Keras in float64 on the standard basis of its input space.
    """
    config = {**layer.get_config(), "dtype": "float64", "activation": "linear"}
    if "use_bias" in config:
        config["use_bias"] = False
    if "bias_axes" in config:
        config["bias_axes"] = None
    copy = layer.__class__.from_config(config)
    n_in = math.prod(in_shape)
    basis = np.eye(n_in).reshape((n_in, *in_shape))
    copy.build((None, *in_shape))
    weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
    if _has_bias(layer):
        weights = weights[:-1]
    copy.set_weights(weights)
    out = np.asarray(copy(basis))  # (n_in, *out_shape): column i = L e_i
    return out.reshape(n_in, -1).T  # (n_out, n_in)


def _has_bias(layer) -> bool:
    return getattr(layer, "bias", None) is not None


def _bias(layer, out_shape):
    if not _has_bias(layer):
        return np.zeros(math.prod(out_shape))
    b = np.asarray(layer.get_weights()[-1], np.float64)
    return np.broadcast_to(b, out_shape).reshape(-1)


def reference_jacobians(model: keras.Sequential, x: np.ndarray) -> dict[str, np.ndarray]:
    """`{layer name: [N, n_l, n0]}` float64 pre-activation Jacobians.

    Supports Sequential chains of layers with kernels (Dense, EinsumDense,
    convolutions; bias last in `get_weights`) and element-wise activations
    from `DERIVATIVES`, plus Flatten.
    """
    x = np.asarray(x, np.float64)
    n, n0 = len(x), math.prod(x.shape[1:])
    in_shape = x.shape[1:]
    h = x.reshape(n, -1)
    jac = np.broadcast_to(np.eye(n0), (n, n0, n0)).copy()  # d h / d x
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Flatten):
            in_shape = (math.prod(in_shape),)
            continue
        out_shape = tuple(layer.compute_output_shape((None, *in_shape))[1:])
        lin = _linear_part(layer, in_shape)
        p = h @ lin.T + _bias(layer, out_shape)
        jp = np.einsum("oi,nij->noj", lin, jac)
        out[layer.name] = jp
        name = _activation_name(layer)
        h = ACTIVATIONS[name](p)
        jac = DERIVATIVES[name](p)[:, :, None] * jp
        in_shape = out_shape
    return out


def numpy_ranks(jacobians: np.ndarray, *, atol=None, rtol=None, eps_dtype=np.float64):
    """Per-sample ranks with `numpy.linalg.matrix_rank`'s tolerance rule.

    `eps_dtype` picks the `eps` of the default `rtol` (the precision the
    measured Jacobian was computed in). With `atol`, the threshold is
    `max(atol, rtol * sigma_max)` (`rtol` 0 unless given), as in
    `torch.linalg.matrix_rank`; numpy has no `atol`, so that case uses the
    singular values from `numpy.linalg.svd`.
    """
    m, n = jacobians.shape[1:]
    if atol is None:
        if rtol is None:
            rtol = np.finfo(eps_dtype).eps * max(m, n)
        return np.array([np.linalg.matrix_rank(j, rtol=rtol) for j in jacobians])
    s = np.linalg.svd(jacobians, compute_uv=False)
    tol = np.maximum(atol, (rtol or 0.0) * s.max(axis=1))
    return (s > tol[:, None]).sum(axis=1)


# -- general graphs: a float64 forward pass written by hand --------------------
#
# For models that are not Sequential chains (nested models, shared layers,
# several inputs, embeddings, attention), a test writes the forward pass by
# hand with float64 copies of the model's layers (`float64_layer`) and plain
# TensorFlow ops (`attention_projections` spells out multi-head attention),
# returning every pre-activation; `function_jacobians` differentiates it in
# float64. The package's graph reading and capture are not involved.


def float64_layer(layer, *input_shapes, linear: bool = True):
    """A float64 copy of `layer` with the same weights.

    Args:
        layer: a built Keras layer.
        *input_shapes: per-sample input shape(s) to build the copy on.
        linear: replace the activation by the identity (the copy then
            returns the pre-activation). Default True.
    """
    import tensorflow as tf  # noqa: F401  (float64 kernels)

    config = {**layer.get_config(), "dtype": "float64"}
    if linear and "activation" in config:
        config["activation"] = "linear"
    copy = layer.__class__.from_config(config)
    copy.build(*[(None, *s) for s in input_shapes])
    copy.set_weights([np.asarray(w, np.float64) for w in layer.get_weights()])
    return copy


def activation_fn(layer):
    """The layer's own activation (a Keras function on tensors)."""
    return getattr(layer, "activation", None) or keras.activations.linear


def attention_projections(mha, query, value, key=None):
    """Multi-head attention spelled out in float64 TensorFlow ops.

    Args:
        mha: a built `keras.layers.MultiHeadAttention` (no masks, no gate,
            dropout 0).
        query, value, key: `[N, T, d]` float64 tensors (key defaults to value).

    Returns:
        `{"query", "key", "value", "attention_output": pre-activations}`;
        the last is also the layer's output.
    """
    import tensorflow as tf

    key = value if key is None else key
    q_dense = float64_layer(mha._query_dense, tuple(query.shape[1:]))
    k_dense = float64_layer(mha._key_dense, tuple(key.shape[1:]))
    v_dense = float64_layer(mha._value_dense, tuple(value.shape[1:]))
    q, k, v = q_dense(query), k_dense(key), v_dense(value)  # [N, T, heads, dim]
    scores = tf.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(float(q.shape[-1]))
    weights = tf.nn.softmax(scores, axis=-1)
    attended = tf.einsum("nhqk,nkhd->nqhd", weights, v)
    o_dense = float64_layer(mha._output_dense, tuple(attended.shape[1:]))
    return {"query": q, "key": k, "value": v, "attention_output": o_dense(attended)}


def function_jacobians(fn, x) -> dict[str, np.ndarray]:
    """`{name: [N, n_l, n0]}` float64 Jacobians of a hand-written forward pass.

    Args:
        fn: maps a float64 `[N, *shape]` tensor to `{name: [N, ...]}`
            pre-activations.
        x: `[N, *shape]` values of the differentiated tensor.
    """
    import tensorflow as tf

    x = tf.constant(np.asarray(x, np.float64))
    n, n0 = int(x.shape[0]), math.prod(x.shape[1:])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        outs = {name: tf.reshape(p, [n, -1]) for name, p in fn(x).items()}
    jacobians = {
        name: tape.batch_jacobian(p, x).numpy().reshape(n, -1, n0) for name, p in outs.items()
    }
    del tape
    return jacobians




def _float64_clone(model: keras.Model) -> keras.Model:
    """The same functional model computing in float64 (weights copied)."""

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float64"})

    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype="float64")
    copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    copy.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return copy


def _linear_copy(layer, in_shape):
    """A float64 copy of `layer` with its activation removed (same weights)."""
    config = dict(layer.get_config())
    if "activation" in config:
        config["activation"] = "linear"
    if isinstance(layer, keras.layers.TimeDistributed):  # the wrapped layer's
        inner = dict(config["layer"])
        inner["config"] = {**inner["config"], "activation": "linear"}
        config["layer"] = inner
    copy = layer.__class__.from_config(config)
    copy.build((None, *in_shape))
    copy.set_weights([np.asarray(w, np.float64) for w in layer.get_weights()])
    return copy


def finite_difference_jacobians(
    model: keras.Model, x: np.ndarray, names, *, step: float = 1e-6
) -> dict[str, np.ndarray]:
    """`{name: [N, n_l, n0]}` float64 pre-activation Jacobians of any functional
    model by central differences (no automatic differentiation).

    The model is cloned in float64; each named layer's pre-activation is its
    float64 copy with the activation removed, applied to the layer's input;
    `mha/<part>` names a projection of a `MultiHeadAttention` call (see
    `attention_projections`).
    Truncation error is `O(step^2)` and rounding `O(eps64 / step)`, both far
    below any float32 rank threshold; use smooth activations (or inputs away
    from kinks) in the models this checks.
    """
    m64 = _float64_clone(model)
    # One pre-activation function per name, on the float64 tensors it reads:
    # a layer's input, or the query/value/key of a `MultiHeadAttention` call
    # for its projections `mha/<part>` (spelled out by `attention_projections`).
    sources, fns = [], []
    for name in names:
        outer, _, part = name.partition("/")
        layer = m64.get_layer(outer)
        if part:
            if not isinstance(layer, keras.layers.MultiHeadAttention):
                raise ValueError(f"No finite-difference reference for {name!r}.")
            args = layer._inbound_nodes[0].arguments
            bound = dict(zip(("query", "value", "key"), args.args))
            bound.update({k: v for k, v in args.kwargs.items() if k in ("query", "value", "key")})
            if bound.get("key") is None:
                bound["key"] = bound["value"]
            start = len(sources)
            sources += [bound["query"], bound["value"], bound["key"]]
            fns.append(
                lambda t, s=start, m=layer, p=part: attention_projections(
                    m, t[s], t[s + 1], t[s + 2]
                )[p]
            )
        else:
            linear = _linear_copy(layer, tuple(layer.input.shape[1:]))
            start = len(sources)
            fns.append(lambda t, s=start, lin=linear: lin(t[s]))
            sources.append(layer.input)
    feats = keras.Model(m64.inputs[0], sources)

    def pre(z):
        inputs = feats(z, training=False)
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        return [np.asarray(fn(inputs)).reshape(len(z), -1) for fn in fns]

    x = np.asarray(x, np.float64)
    shape = x.shape[1:]
    n0 = math.prod(shape)
    out = {name: [] for name in names}
    eye = np.eye(n0).reshape((n0, *shape)) * step
    for sample in x:
        plus = pre(sample[None] + eye)
        minus = pre(sample[None] - eye)
        for name, p, m in zip(names, plus, minus):
            out[name].append(((p - m) / (2 * step)).T)  # [n_l, n0]
    return {name: np.stack(v) for name, v in out.items()}
