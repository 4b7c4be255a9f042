"""Thin rows of pointwise layers (`keras_localrank.thin`): their Gram against
the layer's explicit float64 Jacobian, where they apply, and measurements
through them against finite-difference Jacobians and `numpy` ranks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank.taps import preactivation
from keras_localrank.thin import thin_factor, thin_rows, thin_width
from tests.reference import finite_difference_jacobians, numpy_ranks


def _jacobian(fn, a):
    with tf.GradientTape() as tape:
        tape.watch(a)
        out = tf.reshape(fn(a), [a.shape[0], -1])
    return tape.batch_jacobian(out, a).numpy().reshape(a.shape[0], out.shape[1], -1)


def _built(layer, shape):
    layer.build((None, *shape))
    rng = np.random.default_rng(0)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.get_weights()])
    return layer


POINTWISE = {
    "dense_on_a_sequence": (lambda: keras.layers.Dense(9, dtype="float64"), (4, 3)),
    "conv1d_stride3_valid": (
        lambda: keras.layers.Conv1D(8, 1, strides=3, dtype="float64"), (7, 2)
    ),
    "conv2d_stride2_same_odd": (
        lambda: keras.layers.Conv2D(12, 1, strides=2, padding="same", dtype="float64"),
        (5, 7, 3),
    ),
    "conv3d_mixed_strides": (
        lambda: keras.layers.Conv3D(6, 1, strides=(1, 2, 2), dtype="float64"), (3, 5, 4, 2)
    ),
}


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_thin_rows_have_the_gram_of_the_layer_jacobian(name):
    make, shape = POINTWISE[name]
    layer = _built(make(), shape)
    a = tf.constant(np.random.default_rng(1).normal(size=(2, *shape)))
    full = _jacobian(lambda t: preactivation(layer, t), a)
    thin = _jacobian(lambda t: thin_rows(layer, t, thin_factor(layer)), a)
    units = full.shape[1]
    assert thin.shape[1] == thin_width(layer, units) < units
    for f, t in zip(full, thin):
        np.testing.assert_allclose(t.T @ t, f.T @ f, atol=1e-10 * np.abs(f.T @ f).max())
        np.testing.assert_allclose(
            np.linalg.svd(t, compute_uv=False)[: t.shape[0]],
            np.linalg.svd(f, compute_uv=False)[: t.shape[0]],
            rtol=1e-10,
            atol=1e-12,
        )


def test_thin_rows_use_the_effective_kernel_of_a_lora_layer():
    layer = _built(keras.layers.Dense(10, dtype="float64"), (4,))
    layer.enable_lora(2)
    rng = np.random.default_rng(2)
    layer.lora_kernel_b.assign(rng.normal(size=layer.lora_kernel_b.shape))
    a = tf.constant(rng.normal(size=(1, 4)))
    full = _jacobian(lambda t: preactivation(layer, t), a)[0]
    thin = _jacobian(lambda t: thin_rows(layer, t, thin_factor(layer)), a)[0]
    np.testing.assert_allclose(thin.T @ thin, full.T @ full, rtol=1e-10, atol=1e-10)


class _Doubled(keras.layers.Conv2D):
    def call(self, inputs):
        return 2.0 * super().call(inputs)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: keras.layers.Dense(3), (4,)),  # not wider than its input
        (lambda: keras.layers.Dense(4), (4,)),
        (lambda: keras.layers.Conv2D(8, 3), (5, 5, 2)),  # not pointwise
        (lambda: keras.layers.Conv2D(8, 1, data_format="channels_first"), (2, 5, 5)),
        (lambda: keras.layers.Conv2D(8, 1, groups=2), (5, 5, 2)),
        (lambda: keras.layers.DepthwiseConv2D(1, depth_multiplier=4), (5, 5, 2)),
        (lambda: keras.layers.SeparableConv2D(8, 1), (5, 5, 2)),
        (lambda: keras.layers.Conv2DTranspose(8, 1), (5, 5, 2)),
        (lambda: _Doubled(8, 1), (5, 5, 2)),  # a call of its own
    ],
)
def test_thin_rows_apply_only_to_plain_pointwise_layers_wider_than_their_input(make, shape):
    layer = make()
    layer.build((None, *shape))
    units = int(np.prod(layer.compute_output_shape((None, *shape))[1:]))
    assert thin_width(layer, units) is None


def test_quantized_dense_is_not_thinned():
    layer = keras.layers.Dense(8)
    layer.build((None, 4))
    assert thin_width(layer, 8) == 4
    layer.quantize("int8")
    assert thin_width(layer, 8) is None


def bottleneck():
    inp = keras.Input((5, 6))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(45, activation="tanh", name="mix")(h)
    h = keras.layers.Reshape((3, 5, 3))(h)
    h = keras.layers.Conv2D(24, 1, strides=2, padding="same", activation="tanh", name="expand")(h)
    h = keras.layers.Reshape((6, 24))(h)
    h = keras.layers.Dense(2, activation="tanh", name="narrow")(h)
    return keras.Model(inp, keras.layers.Dense(40, name="up")(h))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", ["exact", "autodiff-forward", "autodiff-reverse"])
def test_thin_measurement_matches_finite_difference_ranks(method, dtype):
    keras.utils.set_random_seed(3)
    model = bottleneck()
    x = np.random.default_rng(4).normal(size=(3, 5, 6)).astype("float32")
    # float64: a fixed atol, since the float64 default threshold sits below
    # the reference's finite-difference error (~1e-10).
    tol = {"atol": 1e-6} if dtype == "float64" else {}
    est = klr.LocalRankEstimator(
        model,
        method=method,
        dtype=dtype,
        directions_per_pass=7,
        tolerances=[klr.Tolerance(**tol)],
    )
    result = est(x)[0]
    frame = result.to_frame().set_index("layer")
    # Pointwise layers wider than their input form c_in / c_out of the rows.
    assert frame.loc["expand", "rows"] == 6 * 3 and frame.loc["expand", "units"] == 6 * 24
    assert frame.loc["up", "rows"] == 6 * 2 and frame.loc["up", "units"] == 6 * 40
    assert frame.loc["narrow", "rows"] == frame.loc["narrow", "units"] == 12
    ref = finite_difference_jacobians(model, x, list(result.per_sample))
    for name, jac in ref.items():
        np.testing.assert_array_equal(
            result.per_sample[name], numpy_ranks(jac, eps_dtype=np.float32, **tol), err_msg=name
        )
    # Spectral summaries come from the same singular values as the layer's own.
    s = np.linalg.svd(ref["up"], compute_uv=False)
    p = s / s.sum(axis=1, keepdims=True)
    effective = np.exp(-(p * np.log(np.where(p > 0, p, 1))).sum(axis=1))
    np.testing.assert_allclose(result.effective_rank_per_sample["up"], effective, rtol=1e-5)
    stable = (s**2).sum(axis=1) / s[:, 0] ** 2
    np.testing.assert_allclose(result.stable_rank_per_sample["up"], stable, rtol=1e-5)


def test_thin_rows_follow_weights_changed_after_planning():
    """The estimator is planned once and reused (callbacks, metrics): the
    thin factor must come from the current kernel at every measurement."""
    keras.utils.set_random_seed(5)
    model = bottleneck()
    x = np.random.default_rng(6).normal(size=(2, 5, 6)).astype("float32")
    est = klr.LocalRankEstimator(model, method="exact")
    before = est(x)[0].per_sample["expand"]
    np.testing.assert_array_equal(before, [18, 18])
    expand = model.get_layer("expand")
    kernel, bias = expand.get_weights()
    kernel[:, :, 1:, :] = 0.0  # one input channel of three left: rank 6
    expand.set_weights([kernel, bias])
    result = est(x)[0]
    ref = finite_difference_jacobians(model, x, ["expand"])["expand"]
    expected = numpy_ranks(ref, eps_dtype=np.float32)
    np.testing.assert_array_equal(expected, [6, 6])
    np.testing.assert_array_equal(result.per_sample["expand"], expected)
