"""Tracking and the CLI on convnets, attention and multi-input models: the
callback, the metric and `python -m keras_localrank` give the ranks of
explicit float64 finite-difference Jacobians, through the same per-layer
engine choice (colored forward mode, attention projections) as `local_rank`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank.cli import Config, run
from tests.reference import finite_difference_jacobians, numpy_ranks

ATOL = 1e-2


def residual_convnet():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="conv1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    y = keras.layers.Conv2D(4, 3, padding="same", name="conv2")(h)
    h = keras.layers.Activation("tanh")(keras.layers.Add()([h, y]))
    h = keras.layers.AveragePooling2D(2)(h)
    outputs = keras.layers.Dense(10, name="head")(keras.layers.Flatten()(h))
    return keras.Model(inputs, outputs)


def attention_block(length=4):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((length, 6))
    att = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
    h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([inputs, att]))
    f = keras.layers.Dense(8, activation="tanh", name="ffn")(h)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(f))
    return keras.Model(inputs, outputs)


def digits(n):
    data = klr.datasets.digits()
    return data.x_train[:n].reshape(n, 8, 8, 1), data.y_train[:n], data.x_test


def reference_means(model, x, layers, atol=None):
    jac = finite_difference_jacobians(model, x.astype(np.float64), layers)
    return {
        name: float(np.mean(numpy_ranks(j, atol=atol, eps_dtype=np.float32)))
        for name, j in jac.items()
    }


def test_callback_on_a_residual_convnet_matches_float64_jacobians():
    model = residual_convnet()
    x, y, _ = digits(64)
    probe = x[:6]
    cb = klr.LocalRankCallback(probe, ["conv1", "conv2", "head"], atol=ATOL)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=1, batch_size=16, callbacks=[cb], verbose=0)
    # The engine's own choice for a convolution behind a convolution
    # (`method="auto"`, as in `local_rank`): colored forward mode.
    assert cb._estimator.plans["conv2"].mode == "colored"
    exact = reference_means(model, probe, ["conv1", "conv2", "head"])
    robust = reference_means(model, probe, ["conv1", "conv2", "head"], atol=ATOL)
    for name in exact:
        assert history.history[f"local_rank/{name}"][-1] == pytest.approx(exact[name])
        assert history.history[f"robust_local_rank/{name}"][-1] == pytest.approx(robust[name])


@pytest.mark.parametrize("length", [4, None])
def test_callback_and_metric_on_attention_projections(length):
    # length None: a model on keras.Input((None, 6)), which the callback
    # refused ("undefined dimensions": it did not pass the probe's shape).
    model = attention_block(length)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4, 6)).astype("float32")
    y = rng.integers(0, 3, 32)
    probe = x[:5]
    names = ["mha/query", "ffn"]
    cb = klr.LocalRankCallback(probe, names, atol=ATOL, exact=False)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=1, batch_size=8, callbacks=[cb], verbose=0)
    robust = reference_means(model, probe, names, atol=ATOL)
    for name in names:
        assert history.history[f"robust_local_rank/{name}"][-1] == pytest.approx(robust[name])
    metric = klr.metrics.LocalRank(
        model, "ffn", atol=ATOL, memory_budget=2**26, input_shape=(4, 6)
    )
    metric.update_state(probe[:3])
    metric.update_state(probe[3:])
    assert float(metric.result()) == pytest.approx(robust["ffn"], abs=1e-6)


def test_callback_with_wrt_on_a_two_input_model():
    keras.utils.set_random_seed(0)
    a, b = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    h = keras.layers.Dense(6, activation="tanh", name="h")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], keras.layers.Dense(2, name="out")(h))
    rng = np.random.default_rng(1)
    xa, xb = (rng.standard_normal((24, d)).astype("float32") for d in (5, 3))
    y = rng.standard_normal((24, 2)).astype("float32")
    cb = klr.LocalRankCallback([xa[:4], xb[:4]], ["h"], wrt="a", max_samples=3)
    model.compile("sgd", "mse")
    history = model.fit([xa, xb], y, epochs=1, batch_size=8, callbacks=[cb], verbose=0)
    expected = klr.local_rank(model, [xa[:3], xb[:3]], layers=["h"], wrt="a")
    assert cb.trace[-1]["mean"] == pytest.approx(expected.mean["h"])
    assert history.history["local_rank/h"][-1] == pytest.approx(expected.mean["h"])
    # d h / d a of a tanh layer: rank min(6, 5) = 5 at generic points.
    assert expected.mean["h"] == 5
    # The metric takes the same `wrt` (it measured one float input only).
    metric = klr.metrics.LocalRank(model, "h", wrt="a")
    tf.function(metric.update_state)({"b": xb[:2], "a": xa[:2]})  # graph mode, dict
    metric.update_state([xa[2:3], xb[2:3]])
    assert float(metric.result()) == pytest.approx(expected.mean["h"])


def test_metric_on_a_text_model_with_respect_to_the_embedding():
    keras.utils.set_random_seed(2)
    tokens = keras.Input((6,), dtype="int32")
    e = keras.layers.Embedding(20, 3, name="embedding")(tokens)
    h = keras.layers.Conv1D(4, 3, activation="relu", name="conv")(e)
    model = keras.Model(tokens, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))
    ids = np.random.default_rng(3).integers(0, 20, size=(7, 6))
    metric = klr.metrics.LocalRank(model, "conv", wrt="embedding", atol=ATOL)
    update = tf.function(metric.update_state)
    update(ids[:4])
    update(ids[4:])
    expected = klr.local_rank(model, ids, layers=["conv"], wrt="embedding", atol=ATOL)
    assert float(metric.result()) == pytest.approx(expected.mean["conv"])
    kernel = model.get_layer("conv").get_weights()[0].astype(np.float64)  # [3, 3, 4]
    # d conv / d embedding: a banded (16 x 18) matrix built from the kernel.
    jac = np.zeros((4, 4, 6, 3))
    for t in range(4):
        for k in range(3):
            jac[t, :, t + k, :] = kernel[k].T
    rank = np.sum(np.linalg.svd(jac.reshape(16, 18), compute_uv=False) > ATOL)
    assert expected.mean["conv"] == rank  # linear in the embedding: one rank


def test_cli_measures_a_saved_convnet(tmp_path):
    model = residual_convnet()
    path = tmp_path / "convnet.keras"
    model.save(path)
    frame = run(Config(model=str(path), data="digits", samples=5, atol=ATOL,
                       output=str(tmp_path / "t.csv")), echo=lambda s: None)
    _, _, x_test = digits(1)
    x = x_test[:5].reshape(5, 8, 8, 1)
    robust = reference_means(model, x, ["conv1", "conv2", "head"], atol=ATOL)
    rows = frame[frame["kind"] == "robust"] if "kind" in frame else frame
    got = dict(zip(rows["layer"], rows["mean"]))
    for name, value in robust.items():
        assert got[name] == pytest.approx(value)


def test_callback_on_a_text_model_with_wrt_the_embedding():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((5,), dtype="int32")
    e = keras.layers.Embedding(20, 3, name="embedding")(tokens)
    h = keras.layers.Dense(4, activation="tanh", name="h")(keras.layers.Flatten()(e))
    model = keras.Model(tokens, keras.layers.Dense(2, name="out")(h))
    ids = np.random.default_rng(2).integers(0, 20, (16, 5)).astype("int32")
    y = np.random.default_rng(3).integers(0, 2, 16)
    cb = klr.LocalRankCallback(ids[:4], ["h"], wrt="embedding")
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(ids, y, epochs=1, batch_size=8, callbacks=[cb], verbose=0)
    expected = klr.local_rank(model, ids[:4], layers=["h"], wrt="embedding")
    assert history.history["local_rank/h"][-1] == pytest.approx(expected.mean["h"])
    assert expected.mean["h"] == 4  # d h / d embedding: 4 x 15, tanh, generic points

