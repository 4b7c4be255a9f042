"""Forward products by the layers' own linear maps (`keras_localrank.linearize`)
against explicit float64 Jacobians, on models using every linearized layer
class; the estimator's choice of that path; and the size of its graph."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank import linearize
from keras_localrank.jacobians import Preactivations
from keras_localrank.linearize import LINEARIZED_LAYERS, linearizable, pushforward
from keras_localrank.matfree import jvp
from keras_localrank.taps import select_taps, tap_inputs_model
from tests.reference import _float64_clone, finite_difference_jacobians, function_jacobians
from tests.reference import numpy_ranks
from tests.test_matfree import _randomise_batchnorm, gaussian

L = keras.layers


def _models():
    """Models that together use every class of `LINEARIZED_LAYERS`."""
    inp = keras.Input((9, 9, 3))
    h = L.Rescaling(0.5, offset=0.1)(inp)
    h = L.Normalization(mean=[0.1, -0.2, 0.3], variance=[0.5, 1.0, 2.0])(h)
    h = L.ZeroPadding2D(1)(h)
    h = L.Conv2D(4, 3, activation="relu", name="c1")(h)
    h = L.BatchNormalization()(h)
    h = L.Activation("tanh")(h)
    gate = L.Dense(4, activation="sigmoid")(L.GlobalAveragePooling2D()(h))
    h = L.Multiply()([h, L.Reshape((1, 1, 4))(gate)])  # a squeeze-and-excitation block
    h = L.ReLU(max_value=6.0, negative_slope=0.1)(L.Add()([h, L.Conv2D(4, 1)(h)]))
    h = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, activation="gelu")(h)
    h = L.SeparableConv2D(4, 3, padding="same", activation="swish")(h)
    h = L.Conv2DTranspose(4, 3, strides=2, activation="sigmoid")(h)
    h = L.Concatenate()([L.MaxPooling2D(3, strides=2, padding="same")(h),
                         L.AveragePooling2D(3, strides=2, padding="same")(h)])
    h = L.Dropout(0.3)(h)
    two_d = keras.Model(inp, [
        L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(h)),
        L.GlobalMaxPooling2D(keepdims=True)(h),
        L.Dense(5, activation="log_softmax", name="head")(L.Flatten()(h)),
        L.Activation("softmax")(h),
    ])
    _randomise_batchnorm(two_d)
    one_d = keras.Sequential([
        keras.Input((8, 2)), L.ZeroPadding1D(1), L.Conv1D(3, 3, activation="tanh"),
        L.DepthwiseConv1D(2, activation="elu"), L.SeparableConv1D(3, 2, activation="selu"),
        L.Conv1DTranspose(2, 2, strides=2, activation="softplus"), L.AveragePooling1D(2),
        L.Dense(4, activation="mish"), L.GlobalAveragePooling1D(), L.Dense(3),
    ])
    three_d = keras.Sequential([
        keras.Input((4, 4, 4, 1)), L.ZeroPadding3D(1), L.Conv3D(2, 2, activation="tanh"),
        L.Conv3DTranspose(2, 2, activation="sigmoid"), L.AveragePooling3D(2),
        L.GlobalAveragePooling3D(), L.Dense(3),
    ])
    return [two_d, one_d, three_d]


def _types(model):
    out = set()
    for layer in model.layers:
        out |= _types(layer) if isinstance(layer, keras.Model) else {type(layer)}
    return out


def test_the_models_use_every_linearized_layer_class():
    used = set().union(*(_types(m) for m in _models())) | {L.InputLayer}
    assert set(LINEARIZED_LAYERS) <= used, set(LINEARIZED_LAYERS) - used


@pytest.mark.parametrize("index", [0, 1, 2], ids=["2d", "1d", "3d"])
def test_pushforward_matches_float64_jacobian_products(index):
    """Values and products of every output, in a `tf.function`, against the
    model itself and explicit float64 Jacobians times the directions, and
    against the repeated-sample `ForwardAccumulator` products."""
    keras.utils.set_random_seed(index)
    model = _models()[index]
    assert linearizable(model)
    x = gaussian(2, *model.inputs[0].shape[1:], seed=index)
    n0 = int(np.prod(x.shape[1:]))
    v = gaussian(2, 5, n0, seed=10 + index)

    def fn(z):
        outputs = tf.nest.flatten(model(z, training=False))
        return [tf.reshape(o, [tf.shape(o)[0], -1]) for o in outputs]

    @tf.function
    def linear(x, v):
        duals = pushforward(model, x, v)
        shape = tf.stack([tf.shape(x)[0], tf.shape(v)[1], -1])
        return [d.primal for d in duals], [tf.reshape(d.tangent, shape) for d in duals]

    primal, products = linear(tf.constant(x), tf.constant(v))
    repeated = tf.function(lambda x, v: jvp(fn, x, v))(tf.constant(x), tf.constant(v))
    # TensorFlow has no float64 CPU kernel for AvgPool3D: the 3-D model's
    # reference is float32 reverse mode (independent of forward products).
    ref = model if index == 2 else _float64_clone(model)
    jacobians = function_jacobians(
        lambda z: dict(enumerate(tf.nest.flatten(ref(z, training=False)))), x)
    values = tf.nest.flatten(model(x, training=False))
    assert len(products) == len(jacobians) == len(values)
    for j, (value, got, rep) in enumerate(zip(values, products, repeated)):
        np.testing.assert_allclose(primal[j].numpy(), value.numpy(), rtol=1e-6, atol=1e-6)
        want = np.einsum("bln,bdn->bdl", jacobians[j], v.astype(np.float64))
        scale = np.abs(want).max()
        assert scale > 0
        np.testing.assert_allclose(got.numpy(), want, atol=1e-5 * scale, rtol=0)
        np.testing.assert_allclose(got.numpy(), rep.numpy(), atol=1e-6 * scale, rtol=0)


def test_max_pooling_tangent_follows_the_maximum():
    """Max pooling's product is the tangent at each window's maximum: a
    planted maximum per window, and unit directions."""
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 1, 0, 0] = x[0, 0, 3, 0] = x[0, 3, 1, 0] = x[0, 2, 2, 0] = 1.0
    model = keras.Sequential([keras.Input((4, 4, 1)), L.MaxPooling2D(2)])
    v = np.eye(16, dtype=np.float32)[None]
    dual = pushforward(model, tf.constant(x), tf.constant(v))[0]
    got = dual.tangent.numpy().reshape(16, 4)  # direction i: which window took it
    want = np.zeros((16, 4), np.float32)
    for window, pixel in enumerate([1 * 4 + 0, 0 * 4 + 3, 3 * 4 + 1, 2 * 4 + 2]):
        want[pixel, window] = 1.0
    np.testing.assert_array_equal(got, want)


def test_linearizable_only_for_supported_layers():
    for model in _models():
        assert linearizable(model)
    inp = keras.Input((8, 8, 3))
    base = _models()[0]
    nested = keras.Model(base.inputs, L.Dense(2)(L.Flatten()(base(base.inputs[0])[3])))
    assert linearizable(nested)
    seq = keras.Input((4, 6))
    assert not linearizable(keras.Model(seq, L.MultiHeadAttention(2, 3)(seq, seq)))
    assert not linearizable(keras.Sequential([inp, L.LayerNormalization()]))
    # an activation that is not elementwise, or unknown
    assert not linearizable(keras.Sequential([inp, L.Dense(3, activation=lambda z: z ** 2)]))
    assert not linearizable(keras.Sequential([inp, L.MaxPooling2D(data_format="channels_first")]))
    plain = keras.Input((6,))
    h = L.Dense(4)(plain)
    assert not linearizable(keras.Model(plain, L.Dense(2)(keras.ops.sin(h) + h)))

    class MyConv(L.Conv2D):  # a subclass may change `call`
        pass

    assert not linearizable(keras.Sequential([inp, MyConv(2, 3)]))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = L.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x) ** 2

    assert not linearizable(Sub())


def _nested_shared():
    """A base model nested in another, its inner conv measured, and a layer
    called twice: the captured calls are found by their call index."""
    inner_in = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same", activation="tanh", name="inner_conv")(inner_in)
    base = keras.Model(inner_in, L.BatchNormalization()(h), name="base")
    inp = keras.Input((6, 6, 2))
    shared = L.Conv2D(3, 3, padding="same", activation="tanh", name="shared")
    a = shared(base(inp))
    b = shared(L.Conv2D(3, 1, name="mix")(a))
    out = L.Dense(4, name="head")(L.Flatten()(L.Add()([a, b])))
    model = keras.Model(inp, out)
    _randomise_batchnorm(base, seed=3)
    return model


def test_preactivations_tangents_of_nested_and_shared_calls():
    """`Preactivations.tangents` through a `CaptureModel` (taps inside a
    nested model and a shared layer's two calls) equal the repeated-sample
    products of the same function."""
    keras.utils.set_random_seed(5)
    model = _nested_shared()
    taps = select_taps(model).taps
    assert {"base/inner_conv", "shared@0", "shared@1", "head"} <= {t.name for t in taps}
    fn = Preactivations(tap_inputs_model(model, taps), taps)
    assert fn.linearized
    x = tf.constant(gaussian(2, 6, 6, 2, seed=6))
    v = tf.constant(gaussian(2, 7, 72, seed=7))
    got = tf.function(fn.tangents)(x, v)
    want = tf.function(lambda x, v: jvp(lambda z: fn(z), x, v))(x, v)
    for g, w in zip(got, want):
        scale = np.abs(w.numpy()).max()
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-6 * scale, rtol=0)


def test_estimator_linearizes_only_where_supported():
    """The estimator's forward products go through the linear maps for a
    convnet (nested and shared calls included) and not for an attention
    block; the ranks equal numpy's on float64 finite-difference Jacobians."""
    import keras_localrank.matfree as matfree

    keras.utils.set_random_seed(3)
    conv = keras.Sequential([keras.Input((8, 8, 2)), L.Conv2D(3, 3, activation="tanh", name="a"),
                             L.Conv2D(4, 3, activation="tanh", name="b"), L.Flatten(),
                             L.Dense(6, name="d")])
    seq = keras.Input((4, 6))
    attention = keras.Model(seq, L.Dense(3, name="out")(L.MultiHeadAttention(2, 3)(seq, seq)))
    seen = []
    original = matfree.jvp

    def spy(fn, x, directions):
        seen.append(getattr(fn, "linearized", False))
        return original(fn, x, directions)

    x = gaussian(3, 8, 8, 2, seed=4)
    matfree.jvp = spy
    try:
        est = klr.LocalRankEstimator(conv, method="exact")
        assert est.linearized_tangents
        result = est(x)[0]
        assert seen and all(seen)
        seen.clear()
        nested = _nested_shared()
        est_nested = klr.LocalRankEstimator(nested, method="exact")
        assert est_nested.linearized_tangents
        nested_result = est_nested(gaussian(2, 6, 6, 2, seed=8))[0]
        assert seen and all(seen)
        seen.clear()
        est_att = klr.LocalRankEstimator(attention, method="exact")
        assert not est_att.linearized_tangents
        est_att(gaussian(2, 4, 6, seed=5))
        assert not any(seen)
    finally:
        matfree.jvp = original
    ref = finite_difference_jacobians(conv, x, ["a", "b", "d"])
    for name in ("a", "b", "d"):
        want = numpy_ranks(ref[name], eps_dtype=np.float32)
        np.testing.assert_array_equal(result.per_sample[name], want)
    assert set(nested_result.per_sample) >= {"base/inner_conv", "shared@0", "shared@1", "head"}


def _graph_nodes(fn, *args):
    graph = tf.function(fn, autograph=False).get_concrete_function(*args).graph
    graph_def = graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def test_linearized_products_keep_the_graph_small():
    """The products' graph is a small multiple of the forward pass's: one
    node or a few per layer. `tf.vectorized_map` over a `ForwardAccumulator`
    (the earlier path) converted every per-operation JVP function into a
    function of its own: on this residual convnet its graph had over 5
    times the forward pass's nodes (ResNet50 at 32x32: 12,702 against
    1,834), and its tracing kept ~300 MiB more on ResNet50."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(inp)))
    for _ in range(3):
        r = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(h)))
        h = L.ReLU()(L.Add()([h, L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(r))]))
    model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling2D()(h)))
    x = tf.zeros([1, 16, 16, 3])
    v = tf.zeros([1, 4, 768])
    forward = _graph_nodes(lambda x: model(x, training=False), x)
    products = _graph_nodes(lambda x, v: [d.tangent for d in pushforward(model, x, v)], x, v)

    def vmapped(x, v):  # the earlier path, for the comparison in the docstring
        def one(t):
            with tf.autodiff.ForwardAccumulator(x, t) as acc:
                y = model(x, training=False)
            return acc.jvp(y)

        return tf.vectorized_map(one, tf.reshape(tf.transpose(v, [1, 0, 2]), [4, 1, 16, 16, 3]))

    earlier = _graph_nodes(vmapped, x, v)
    assert products <= 3 * forward, (products, forward)
    assert earlier > 5 * forward, (earlier, forward)


def test_kernel_map_drops_bias_and_activation_only_while_called():
    layer = L.Conv2D(3, 3, activation="relu", use_bias=True)
    layer.build((None, 5, 5, 2))
    layer.bias.assign(np.ones(3, np.float32))
    t = gaussian(2, 5, 5, 2, seed=1)
    got = linearize.kernel_map(layer, tf.constant(t)).numpy()
    want = tf.nn.conv2d(t, layer.kernel, 1, "VALID").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert layer.use_bias and layer.activation is keras.activations.relu


def test_forward_mode_through_softsign():
    """TensorFlow registers no gradient for `SoftsignGrad`, so forward mode
    (which differentiates an op's gradient) failed through `softsign`
    ("gradient registry has no entry for: SoftsignGrad"), on the linearized
    path and on repeated samples alike. Products of both against the closed
    form `1 / (1 + |z|)^2` (tests/reference.py)."""
    from tests.reference import reference_jacobians

    keras.utils.set_random_seed(2)
    mlp = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="softsign", name="a"),
                            L.Dense(5, activation="softsign", name="b"), L.Dense(3, name="c")])
    x = gaussian(3, 6, seed=3)
    v = gaussian(3, 4, 6, seed=4)
    ref = reference_jacobians(mlp, x)
    taps = select_taps(mlp).taps
    fn = Preactivations(tap_inputs_model(mlp, taps), taps)
    assert fn.linearized
    linear = fn.tangents(tf.constant(x), tf.constant(v))
    repeated = jvp(lambda z: fn(z), tf.constant(x), tf.constant(v))
    for tap, lin, rep in zip(taps, linear, repeated):
        want = np.einsum("bln,bdn->bdl", ref[tap.name], v.astype(np.float64))
        np.testing.assert_allclose(lin.numpy(), want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(rep.numpy(), want, atol=1e-5, rtol=1e-5)
    result = klr.local_rank(mlp, x, method="exact")
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(
            result.per_sample[name], numpy_ranks(ref[name], eps_dtype=np.float32))


def test_max_pooling_under_xla_uses_repeated_samples():
    """`max_pool_with_argmax` has no XLA kernel: with `jit_compile=True` a
    model with `MaxPooling2D` is not linearized (it failed with "No
    registered 'MaxPoolWithArgmax' OpKernel for XLA_CPU_JIT"), and its ranks
    equal those measured without XLA."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10, 10, 1)),
                              L.Conv2D(3, 3, activation="tanh", name="conv"),
                              L.MaxPooling2D(),
                              L.Conv2D(3, 3, activation="tanh", name="conv2"),
                              L.Flatten(), L.Dense(3, name="head")])
    assert linearizable(model) and not linearizable(model, xla=True)
    x = gaussian(2, 10, 10, 1, seed=1)
    est = klr.LocalRankEstimator(model, method="exact", jit_compile=True)
    assert not est.linearized_tangents
    jit = est(x)[0]
    plain = klr.local_rank(model, x, method="exact")
    for name in ("conv", "conv2", "head"):
        np.testing.assert_array_equal(jit.per_sample[name], plain.per_sample[name])


@pytest.mark.parametrize(
    "activation", [getattr(f, "__name__", str(f)) for f in linearize.ELEMENTWISE_ACTIVATIONS]
)
def test_every_listed_activation_against_float64_jacobians(activation):
    """Each elementwise activation's products (a Dense layer, then an
    `Activation` layer) against float64 reverse-mode Jacobians."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((5,))
    h = L.Dense(6, activation=activation, name="a")(inp)
    model = keras.Model(inp, L.Dense(3, name="b")(L.Activation(activation)(h)))
    assert linearizable(model)
    x = gaussian(3, 5, seed=5)
    v = gaussian(3, 4, 5, seed=6)
    duals = pushforward(model, tf.constant(x), tf.constant(v))
    m64 = _float64_clone(model)
    jacobian = function_jacobians(lambda z: {0: m64(z, training=False)}, x)[0]
    want = np.einsum("bln,bdn->bdl", jacobian, v.astype(np.float64))
    np.testing.assert_allclose(
        duals[0].tangent.numpy().reshape(3, 4, 3), want, atol=1e-5 * np.abs(want).max() + 1e-7
    )
