"""GaussianBottleneck / SampleAverage against closed-form NumPy references."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_localrank.layers import GaussianBottleneck, SampleAverage


def _softplus(v):
    return np.log1p(np.exp(v))


def _kl_numpy(mean, raw, *, shift, floor, prior_loc=None, prior_scale=None):
    """KL(N(mean, s^2) || N(loc, p^2)) per example, by hand in float64."""
    s = _softplus(raw + shift) + floor
    loc = np.zeros(mean.shape[-1]) if prior_loc is None else prior_loc
    p = np.ones(mean.shape[-1]) if prior_scale is None else prior_scale
    per_dim = np.log(p / s) + (s**2 + (mean - loc) ** 2) / (2 * p**2) - 0.5
    return per_dim.sum(axis=-1)


@pytest.fixture
def known_inputs():
    rng = np.random.default_rng(3)
    mean = rng.normal(size=(6, 5))
    raw = rng.normal(scale=2.0, size=(6, 5))
    return mean, raw


@pytest.mark.parametrize("shift,floor", [(-5.0, 1e-4), (0.0, 0.0), (1.5, 0.1)])
def test_added_kl_equals_closed_form(known_inputs, shift, floor):
    mean, raw = known_inputs
    layer = GaussianBottleneck(5, beta=0.37, scale_shift=shift, scale_floor=floor)
    layer([mean.astype("float32"), raw.astype("float32")])
    expected = _kl_numpy(mean, raw, shift=shift, floor=floor)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), 0.37 * expected.mean(), rtol=2e-5)
    np.testing.assert_allclose(float(layer.rate_tracker.result()), expected.mean(), rtol=2e-5)
    per_dim = layer.kl_per_dimension([mean.astype("float32"), raw.astype("float32")])
    np.testing.assert_allclose(np.sum(per_dim, axis=1), expected, rtol=2e-5)


def test_learnable_prior_kl_equals_closed_form(known_inputs):
    mean, raw = known_inputs
    layer = GaussianBottleneck(5, beta=1.0, learnable_prior=True, scale_floor=0.0)
    layer.build([(None, 5), (None, 5)])
    loc = np.linspace(-1, 1, 5)
    raw_p = np.linspace(-0.5, 2.0, 5)
    layer.prior_loc.assign(loc)
    layer.prior_raw_scale.assign(raw_p)
    layer([mean.astype("float32"), raw.astype("float32")])
    expected = _kl_numpy(
        mean, raw, shift=-5.0, floor=0.0, prior_loc=loc, prior_scale=_softplus(raw_p)
    )
    np.testing.assert_allclose(float(layer.losses[0]), expected.mean(), rtol=2e-5)


def test_beta_scales_added_loss_exactly(known_inputs):
    mean, raw = (a.astype("float32") for a in known_inputs)
    reference = _kl_numpy(*known_inputs, shift=-5.0, floor=1e-4).mean()
    losses = {}
    for beta in (0.0, 1e-3, 0.5, 7.0):
        layer = GaussianBottleneck(5, beta=beta)
        assert layer.beta == beta
        layer([mean, raw])
        losses[beta] = float(layer.losses[0])
    assert losses[0.0] == 0.0
    for beta in (1e-3, 0.5, 7.0):
        np.testing.assert_allclose(losses[beta], beta * reference, rtol=2e-5)
    # Same float32 KL, scaled by beta: the ratios are exact up to one rounding.
    np.testing.assert_allclose(losses[7.0] / 7.0, losses[0.5] / 0.5, rtol=1e-6)


def test_sample_is_reparameterised(known_inputs):
    """dz/dmean = 1 and dz/draw = eps * sigmoid(raw + shift), eps = (z - mean) / s."""
    mean = tf.Variable(known_inputs[0].astype("float32"))
    raw = tf.Variable(known_inputs[1].astype("float32"))
    layer = GaussianBottleneck(5, beta=0.0, train_samples=3, scale_shift=0.5, seed=1)
    with tf.GradientTape() as tape:
        z = layer([mean, raw], training=True)
        total = tf.reduce_sum(z)
    g_mean, g_raw = tape.gradient(total, [mean, raw])
    z = z.numpy()
    assert z.shape == (6, 3, 5)
    s = _softplus(known_inputs[1] + 0.5) + 1e-4
    eps = (z - known_inputs[0][:, None, :]) / s[:, None, :]
    sigmoid = 1 / (1 + np.exp(-(known_inputs[1] + 0.5)))
    np.testing.assert_allclose(g_mean.numpy(), np.full((6, 5), 3.0), rtol=1e-6)
    np.testing.assert_allclose(g_raw.numpy(), eps.sum(axis=1) * sigmoid, rtol=1e-3, atol=1e-5)
    assert np.abs(eps).max() > 0.1  # real noise was drawn


def test_gradients_reach_the_encoder_through_the_sample():
    """With beta = 0 the only path from the encoder to the loss is the sample z."""
    inputs = keras.Input((7,))
    h = keras.layers.Dense(6, activation="tanh", name="encoder")(inputs)
    z = GaussianBottleneck(3, beta=0.0, scale_shift=0.0, seed=0, name="bottleneck")(h)
    out = SampleAverage()(keras.layers.Dense(2, activation="softmax")(z))
    model = keras.Model(inputs, out)
    x = np.random.default_rng(0).normal(size=(16, 7)).astype("float32")
    y = np.arange(16) % 2
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
        loss = tf.reduce_mean(loss)
    bottleneck = model.get_layer("bottleneck")
    watched = [
        model.get_layer("encoder").kernel,
        bottleneck.mean_dense.kernel,
        bottleneck.scale_dense.kernel,
    ]
    for grad in tape.gradient(loss, watched):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0


def test_samples_per_mode_and_their_statistics():
    mean = np.array([[0.0, 3.0], [-2.0, 1.0]], "float32")
    raw = np.array([[0.0, 1.0], [-1.0, 2.0]], "float32")
    layer = GaussianBottleneck(2, train_samples=2, eval_samples=20000, scale_shift=0.0, seed=4)
    assert layer([mean, raw], training=True).shape == (2, 2, 2)
    z = layer([mean, raw], training=False).numpy()
    assert z.shape == (2, 20000, 2)
    s = _softplus(raw.astype(np.float64)) + 1e-4
    np.testing.assert_allclose(z.mean(axis=1), mean, atol=4 * s.max() / math.sqrt(20000))
    np.testing.assert_allclose(z.std(axis=1), s, rtol=0.03)


def test_sample_average():
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    np.testing.assert_allclose(SampleAverage()(x), x.mean(axis=1))
    assert SampleAverage().compute_output_shape((None, None, 4)) == (None, 4)


def test_metric_rate_is_reported_by_fit():
    inputs = keras.Input((4,))
    z = GaussianBottleneck(2, beta=1e-2, name="bottleneck")(keras.layers.Dense(3)(inputs))
    model = keras.Model(inputs, SampleAverage()(keras.layers.Dense(2, activation="softmax")(z)))
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(np.ones((8, 4), "float32"), np.zeros(8), epochs=1, verbose=0)
    assert history.history["rate"][0] > 0


@pytest.mark.parametrize("beta", [-1.0, -1e-9, float("nan"), float("inf")])
def test_bad_beta_value(beta):
    with pytest.raises(ValueError, match=r"`beta` >= 0.*beta="):
        GaussianBottleneck(4, beta=beta)


@pytest.mark.parametrize("beta", ["0.1", None, True, [0.1], np.array([0.1])])
def test_bad_beta_type(beta):
    with pytest.raises(TypeError, match=r"`beta`.*real number.*beta="):
        GaussianBottleneck(4, beta=beta)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"units": 0}, ValueError, "units.*units=0"),
        ({"units": 2.5}, TypeError, "units.*units=2.5"),
        ({"units": 4, "eval_samples": 0}, ValueError, "eval_samples=0"),
        ({"units": 4, "scale_floor": -1.0}, ValueError, "scale_floor=-1.0"),
        ({"units": 4, "scale_shift": float("nan")}, ValueError, "scale_shift=nan"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GaussianBottleneck(**kwargs)


def test_pair_with_wrong_width():
    layer = GaussianBottleneck(4)
    with pytest.raises(ValueError, match="units=4"):
        layer([np.zeros((2, 4), "float32"), np.zeros((2, 3), "float32")])


@pytest.mark.parametrize("learnable_prior", [False, True])
def test_standalone_save_load_round_trip(tmp_path, learnable_prior):
    inputs = keras.Input((5,))
    z = GaussianBottleneck(
        3, beta=0.125, learnable_prior=learnable_prior, eval_samples=4, name="bottleneck"
    )(keras.layers.Dense(6, name="encoder")(inputs))
    model = keras.Model(inputs, SampleAverage()(keras.layers.Dense(2, activation="softmax")(z)))
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.default_rng(1).normal(size=(10, 5)).astype("float32")
    model.fit(x, np.arange(10) % 2, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("bottleneck")
    assert isinstance(layer, GaussianBottleneck)
    assert layer.beta == 0.125 and layer.eval_samples == 4
    assert layer.learnable_prior is learnable_prior
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    features = loaded.get_layer("encoder")(x)
    original = model.get_layer("bottleneck")
    np.testing.assert_allclose(
        layer.kl_per_dimension(features), original.kl_per_dimension(features), rtol=1e-6
    )
