"""The matrix-free engine (exact Gram in blocks, constant first layer,
certified randomized sketch) on graphs beyond one input: several inputs with
the others held at their sample values, nested models, an intermediate
`wrt`. Ranks against explicit float64 Jacobians of forward passes written by
hand (tests/reference.py) and, where the rank is known by construction,
against that closed form."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from tests.reference import float64_layer, function_jacobians, numpy_ranks


def estimator(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # layers not depending on `wrt`
        return klr.LocalRankEstimator(model, **kwargs)


def assert_ranks(result, jacobians):
    assert set(result.per_sample) == set(jacobians)
    for name, jac in jacobians.items():
        np.testing.assert_array_equal(result.per_sample[name], numpy_ranks(jac), err_msg=name)


def assert_contains(result, jacobians, atol):
    """The certified interval `[rank, upper]` holds the exact robust rank."""
    for name, jac in jacobians.items():
        true = (np.linalg.svd(jac, compute_uv=False) > atol).sum(axis=1)
        low, high = result.per_sample[name], result.upper_per_sample[name]
        assert np.all(low <= true) and np.all(true <= high), (name, low, true, high)


# -- two inputs, a constant first layer, the held input gating a later layer -------


def two_input_root_model():
    keras.utils.set_random_seed(3)
    a = keras.Input((6,), name="a")
    b = keras.Input((3,), name="b")
    r = keras.layers.Dense(4, activation="tanh", name="root")(keras.layers.Rescaling(0.5)(a))
    hb = keras.layers.Dense(4, activation="relu", use_bias=False, name="db")(b)
    m = keras.layers.Dense(5, activation="tanh", name="mid")(keras.layers.Multiply()([r, hb]))
    out = keras.layers.Dense(3, name="head")(keras.layers.Concatenate()([m, a]))
    model = keras.Model([a, b], out)
    kernel, bias = model.get_layer("root").get_weights()
    kernel[:, 3] = kernel[:, 0]  # K_1 has rank 3: units 0 and 3 are equal
    model.get_layer("root").set_weights([kernel, bias])
    # hb = relu(b0, b1, b2, b2): the held input switches units of r off.
    model.get_layer("db").set_weights([np.array(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], np.float32)])
    return model


def two_input_data():
    xa = np.random.default_rng(0).standard_normal((6, 6)).astype("float32")
    xb = np.array(
        [[1, 1, 1], [-1, 1, 1], [1, -1, -1], [-1, -1, 1], [2, -1, -1], [-1, -1, -1]],
        np.float32,
    )
    return xa, xb


def two_input_reference(model, xa, xb):
    root = float64_layer(model.get_layer("root"), (6,))
    mid = float64_layer(model.get_layer("mid"), (4,))
    head = float64_layer(model.get_layer("head"), (11,))
    hb = tf.nn.relu(tf.constant(xb, tf.float64) @ model.get_layer("db").get_weights()[0])

    def forward(x):
        pr = root(0.5 * x)
        pm = mid(tf.tanh(pr) * hb)
        return {"root": pr, "mid": pm, "head": head(tf.concat([tf.tanh(pm), x], 1))}

    return function_jacobians(forward, xa)


@pytest.mark.parametrize("method", ["exact", "autodiff-forward", "autodiff-reverse"])
def test_held_input_with_constant_first_layer_and_small_blocks(method):
    model = two_input_root_model()
    xa, xb = two_input_data()
    # 3 directions per pass (blocks of the 4-row basis and of the 6 inputs),
    # 4 samples per chunk (the second chunk padded).
    est = estimator(model, wrt="a", method=method, directions_per_pass=3, batch_size=4)
    plans = est.plans
    assert set(plans) == {"root", "mid", "head"}  # db does not depend on `a`
    assert plans["root"].directions == 4 and plans["mid"].directions == 4  # reduced
    assert plans["head"].directions == 6  # `a` also reaches it directly
    result = est([xa, xb])[0]
    assert_ranks(result, two_input_reference(model, xa, xb))
    # By construction: rows 0 and 3 of K_1 are equal, unit i of r is kept
    # where hb_i > 0, and W_mid (4 x 5) keeps the rank.
    on = xb > 0
    expected = (on[:, 0] | on[:, 2]).astype(int) + on[:, 1] + on[:, 2]
    np.testing.assert_array_equal(result.per_sample["mid"], expected)
    np.testing.assert_array_equal(result.per_sample["root"], [3] * 6)


def test_held_input_randomized_interval_contains_exact_rank():
    model = two_input_root_model()
    xa, xb = two_input_data()
    atol = 0.05
    est = estimator(
        model, wrt="a", method="randomized", tolerances=(klr.Tolerance(atol=atol),),
        sketch_block=2, batch_size=4, seed=1,
    )
    result = est([xa, xb])[0]
    assert {p.method for p in est.plans.values()} == {"randomized"}
    assert_contains(result, two_input_reference(model, xa, xb), atol)


# -- a nested model on the differentiated input, a held input gating the head -------


def nested_two_input_model():
    keras.utils.set_random_seed(5)
    inner_in = keras.Input((4, 4, 1))
    h = keras.layers.Conv2D(3, 2, activation="tanh", name="conv")(inner_in)
    base = keras.Model(inner_in, keras.layers.Flatten()(h), name="base")
    a = keras.Input((4, 4, 1), name="a")
    b = keras.Input((5,), name="b")
    gate = keras.layers.Dense(27, activation="relu", name="db")(b)
    h = keras.layers.Multiply()([base(a), gate])
    return keras.Model([a, b], keras.layers.Dense(6, name="head")(h))


def nested_reference(model, xa, xb):
    conv = float64_layer(model.get_layer("base").get_layer("conv"), (4, 4, 1))
    db = float64_layer(model.get_layer("db"), (5,), linear=False)
    head = float64_layer(model.get_layer("head"), (27,))
    gate = db(tf.constant(xb, tf.float64))

    def forward(x):
        pc = conv(x)
        return {"base/conv": pc, "head": head(tf.reshape(tf.tanh(pc), [-1, 27]) * gate)}

    return function_jacobians(forward, xa)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_nested_model_with_held_input(method):
    model = nested_two_input_model()
    rng = np.random.default_rng(2)
    xa = rng.standard_normal((3, 4, 4, 1)).astype("float32")
    xb = rng.standard_normal((3, 5)).astype("float32")
    xb[1] = -np.abs(xb[1])  # some gates open, some shut: ranks differ per sample
    reference = nested_reference(model, xa, xb)
    if method == "exact":
        est = estimator(model, wrt="a", method="exact", directions_per_pass=5)
        assert_ranks(est([xa, xb])[0], reference)
    else:
        atol = 0.05
        est = estimator(
            model, wrt="a", method="randomized", tolerances=(klr.Tolerance(atol=atol),),
            sketch_block=3, seed=0,
        )
        assert_contains(est({"a": xa, "b": xb})[0], reference, atol)


# -- an intermediate `wrt` (an embedding) with a constant first layer after it ------


def text_root_model():
    keras.utils.set_random_seed(7)
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(20, 4, name="embedding")(tokens)
    h = keras.layers.Dense(6, activation="tanh", name="root")(keras.layers.Flatten()(e))
    h = keras.layers.Dense(8, activation="tanh", name="mid")(h)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(h))


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_embedding_wrt_with_constant_first_layer(method):
    model = text_root_model()
    tokens = np.random.default_rng(0).integers(0, 20, size=(4, 5))
    table = model.get_layer("embedding").get_weights()[0].astype(np.float64)
    root = float64_layer(model.get_layer("root"), (20,))
    mid = float64_layer(model.get_layer("mid"), (6,))
    head = float64_layer(model.get_layer("head"), (8,))

    def forward(e):
        pr = root(tf.reshape(e, [-1, 20]))
        pm = mid(tf.tanh(pr))
        return {"root": pr, "mid": pm, "head": head(tf.tanh(pm))}

    reference = function_jacobians(forward, table[tokens])
    if method == "exact":
        est = estimator(model, wrt="embedding", method="exact", directions_per_pass=4)
        assert est.plans["mid"].directions == 6 and est.plans["head"].directions == 6
        assert_ranks(est(tokens)[0], reference)
    else:
        atol = 0.02
        est = estimator(
            model, wrt="embedding", method="randomized",
            tolerances=(klr.Tolerance(atol=atol),), sketch_block=2,
        )
        assert_contains(est(tokens)[0], reference, atol)
