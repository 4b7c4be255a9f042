"""keras_localrank.vib: builder, presets, information terms, local rank of a VIB."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank import datasets, vib
from keras_localrank.layers import GaussianBottleneck, SampleAverage


def _model(beta=1e-3, **kwargs):
    keras.utils.set_random_seed(0)
    kwargs = {"encoder_units": (12, 10), "bottleneck_units": 4, **kwargs}
    return vib.build_vib_classifier((3, 3), 3, beta=beta, seed=0, **kwargs)


def _x(n=40, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 3)).astype("float32")


def test_builder_structure_and_names():
    model = _model()
    names = [layer.name for layer in model.layers]
    for name in ("encoder_1", "encoder_2", "bottleneck_mean", "bottleneck_scale",
                 "bottleneck", "decoder", "sample_average"):
        assert name in names
    assert model.output.shape == (None, 3)
    assert vib.find_bottleneck(model).beta == 1e-3
    assert vib.encoder_layer_names(model) == ["encoder_1", "encoder_2"]
    assert vib.mean_head_name(model) == "bottleneck_mean"
    probs = model.predict(_x(), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_presets():
    paper = vib.PRESETS["paper_mnist"]
    assert paper.encoder_units == (1024, 1024) and paper.bottleneck_units == 256
    assert paper.learning_rate == 1e-4 and paper.batch_size == 100
    assert paper.decay_rate == 0.97 and paper.decay_epochs == 2
    assert vib.get_preset("small", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="preset='nope'"):
        vib.get_preset("nope")
    with pytest.raises(ValueError, match="Unknown VIBConfig fields"):
        vib.get_preset("small", epoch=3)
    with pytest.raises(ValueError, match="encoder_units"):
        vib.VIBConfig(encoder_units=(0,))


@pytest.mark.parametrize("beta,error", [(-0.5, ValueError), (float("nan"), ValueError),
                                        ("big", TypeError)])
def test_builder_rejects_bad_beta(beta, error):
    with pytest.raises(error, match="beta"):
        vib.build_vib_classifier((4,), 2, beta=beta)


def test_information_quantities_against_numpy():
    """Near-deterministic posterior (sigma = floor) makes CE computable by hand."""
    model = _model()
    scale_head = model.get_layer("bottleneck_scale")
    scale_head.kernel.assign(np.zeros(scale_head.kernel.shape))
    scale_head.bias.assign(np.full(scale_head.bias.shape, -60.0))  # softplus ~ 0
    x = _x(60)
    y = np.arange(60) % 3
    y[:5] = 0  # a non-uniform label distribution
    info = vib.information_quantities(model, x, y, active_threshold=0.5)

    encoder = keras.Model(model.input, model.get_layer("bottleneck_mean").output)
    mean = np.asarray(encoder(x), np.float64)
    sigma = 1e-4 + np.log1p(np.exp(-60.0 - 5.0))
    kl_dim = -np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5
    np.testing.assert_allclose(info.rate_per_dimension, kl_dim.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(info.rate, kl_dim.sum(axis=1).mean(), rtol=1e-4)
    w, b = (np.asarray(v, np.float64) for v in model.get_layer("decoder").get_weights())
    logits = mean @ w + b
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ce = -log_p[np.arange(60), y].mean()
    counts = np.bincount(y) / 60
    h_y = -(counts * np.log(counts)).sum()
    np.testing.assert_allclose(info.label_entropy, h_y, rtol=1e-12)
    np.testing.assert_allclose(info.cross_entropy, ce, rtol=1e-4)
    np.testing.assert_allclose(info.izy_lower_bound, h_y - ce, rtol=1e-4, atol=1e-6)
    assert info.accuracy == pytest.approx((log_p.argmax(axis=1) == y).mean())
    assert info.num_samples == 12


def test_active_dimensions_counts_the_informative_ones():
    """Zero mean-head columns and unit scale give exactly zero KL in those dimensions."""
    model = _model()
    head = model.get_layer("bottleneck_mean")
    kernel = head.kernel.numpy()
    kernel[:, 2:] = 0.0
    head.kernel.assign(kernel)
    head.bias.assign(np.zeros(4))
    scale_head = model.get_layer("bottleneck_scale")
    scale_head.kernel.assign(np.zeros(scale_head.kernel.shape))
    unit = np.log(np.expm1(1.0 - 1e-4)) + 5.0  # softplus(b - 5) + 1e-4 == 1
    scale_head.bias.assign(np.full(4, unit))
    info = vib.information_quantities(model, _x(), np.arange(40) % 3, active_threshold=1e-6)
    assert info.active_dimensions == 2
    np.testing.assert_allclose(info.rate_per_dimension[2:], 0.0, atol=1e-6)


def test_information_quantities_input_errors():
    model = _model()
    with pytest.raises(ValueError, match="same length"):
        vib.information_quantities(model, _x(10), np.zeros(9, int))
    with pytest.raises(TypeError, match="integer labels"):
        vib.information_quantities(model, _x(10), np.zeros(10))
    with pytest.raises(ValueError, match="labels"):
        vib.information_quantities(model, _x(10), np.full(10, 7))
    with pytest.raises(ValueError, match="exactly one GaussianBottleneck"):
        vib.find_bottleneck(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))


def _numpy_ranks(sub_model, x, atol=None):
    """Reference: float32 autodiff Jacobians ranked by numpy.linalg.matrix_rank."""
    xt = tf.constant(x.reshape(len(x), -1))
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = sub_model(tf.reshape(xt, (-1, 3, 3)))
    jac = tape.batch_jacobian(out, xt).numpy()
    if atol is None:
        return np.linalg.matrix_rank(jac)
    return np.array([(np.linalg.svd(j, compute_uv=False) > atol).sum() for j in jac])


def test_local_rank_of_encoder_and_bottleneck_mean_against_numpy():
    model = _model()
    head = model.get_layer("bottleneck_mean")
    kernel = head.kernel.numpy()
    kernel[:, 1] = kernel[:, 0]  # rank-3 mean head: caps the bottleneck-mean rank at 3
    head.kernel.assign(kernel)
    x = _x(30)
    exact, robust = vib.vib_local_rank(model, x)
    assert exact.layer_names == ["encoder_1", "encoder_2", "bottleneck_mean"]
    for name in exact.layer_names:
        sub = keras.Model(model.input, model.get_layer(name).output)  # linear heads
        if name != "bottleneck_mean":  # measure the pre-activation
            layer = model.get_layer(name)
            sub = keras.Model(model.input, layer.input @ layer.kernel + layer.bias)
        np.testing.assert_array_equal(exact.per_sample[name], _numpy_ranks(sub, x))
        np.testing.assert_array_equal(robust.per_sample[name], _numpy_ranks(sub, x, 1e-2))
    assert exact.per_sample["bottleneck_mean"].max() == 3


def test_local_rank_with_a_bottleneck_that_owns_its_heads():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="encoder")(inputs)
    z = GaussianBottleneck(3, name="bottleneck")(h)
    model = keras.Model(inputs, SampleAverage()(keras.layers.Dense(2, activation="softmax")(z)))
    x = np.random.default_rng(0).normal(size=(20, 6)).astype("float32")
    (exact,) = vib.vib_local_rank(model, x, tolerances=(klr.Tolerance(),))
    assert exact.layer_names == ["encoder", "mean"]
    assert 0 < exact.mean["mean"] <= 3


def test_builder_save_load_round_trip(tmp_path):
    model = _model(beta=0.0625)
    vib.compile_vib_classifier(model, vib.get_preset("small"), steps_per_epoch=1)
    model.fit(_x(), np.arange(40) % 3, epochs=1, verbose=0)
    path = tmp_path / "vib.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert vib.find_bottleneck(loaded).beta == 0.0625
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    x, y = _x(30, seed=5), np.arange(30) % 3
    before = vib.information_quantities(model, x, y)
    after = vib.information_quantities(loaded, x, y)
    assert after.rate == pytest.approx(before.rate, rel=1e-6)
    (lr_before,) = vib.vib_local_rank(model, x, tolerances=(klr.Tolerance(),))
    (lr_after,) = vib.vib_local_rank(loaded, x, tolerances=(klr.Tolerance(),))
    assert lr_before.mean == lr_after.mean


def test_large_beta_collapses_tiny_beta_stays_informative():
    """Gaussian inputs exercise every input direction, so the KL shrinks the whole
    mean Jacobian: robust local rank of the bottleneck mean -> 0 at large beta."""
    data = datasets.gaussian_task(n_train=512, n_test=256, dim=8, k=2, seed=0)
    config = vib.get_preset(
        "small", encoder_units=(16,), bottleneck_units=4, epochs=30, batch_size=64,
        learning_rate=1e-2,
    )
    found = {}
    for beta in (1e-4, 100.0):
        keras.utils.set_random_seed(0)
        model = vib.build_vib_classifier(
            (8,), 4, beta=beta, encoder_units=(16,), bottleneck_units=4,
            scale_shift=0.0, seed=0,
        )
        vib.compile_vib_classifier(model, config, steps_per_epoch=8)
        model.fit(data.x_train, data.y_train, epochs=30, batch_size=64, verbose=0)
        info = vib.information_quantities(model, data.x_test, data.y_test)
        _, robust = vib.vib_local_rank(
            model, data.x_test[:100], tolerances=(klr.Tolerance(), klr.Tolerance(atol=0.1))
        )
        found[beta] = (info, robust.mean["bottleneck_mean"])
    info, rank = found[100.0]
    assert info.rate < 0.01 and info.active_dimensions == 0
    assert rank <= 0.5
    assert info.accuracy < 0.4  # chance is 0.25: the label information is gone
    info, rank = found[1e-4]
    assert info.rate > 5 and info.active_dimensions >= 2
    assert info.accuracy > 0.85 and info.izy_lower_bound > 0.8
    assert rank >= 2  # the task needs two directions
