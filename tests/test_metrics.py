"""`metrics.LocalRank` on the layer specs `local_rank(layers=...)` resolves to
other call names: shared layers (`sh@k`), layers inside nested models
(`enc/inner_d`), nested models named as a whole."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from tests.reference import float64_layer, function_jacobians, numpy_ranks

L = keras.layers


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((12, 6)).astype("float32")


def accumulated(metric, x):
    """The metric's result after two batches, updated inside `tf.function`."""
    update = tf.function(metric.update_state)
    update(x[:5])
    update(x[5:])
    return float(metric.result())


def shared_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    shared = L.Dense(6, activation="relu", name="sh")
    return keras.Model(inp, L.Dense(2, name="out")(shared(shared(inp)))), shared


def nested_model(*inner_layers):
    """input -> Dense(6, relu) "pre" -> Sequential "enc" of `inner_layers` -> Dense(2)."""
    keras.utils.set_random_seed(1)
    enc = keras.Sequential([keras.Input((6,)), *inner_layers], name="enc")
    inp = keras.Input((6,))
    h = L.Dense(6, activation="relu", name="pre")(inp)
    return keras.Model(inp, L.Dense(2, name="head")(enc(h))), enc


def test_shared_layer_is_measured_per_call(x):
    # `local_rank` measures the two calls of `sh` as `sh@0`, `sh@1`; the
    # metric, a scalar, refused nothing at construction and died in
    # update_state with KeyError: 'sh'.
    model, shared = shared_model()
    expected = klr.local_rank(model, x, layers=["sh"]).mean
    assert sorted(expected) == ["sh@0", "sh@1"]
    for spec in ("sh", shared):
        with pytest.raises(ValueError, match=r"layer='sh'.*\['sh@0', 'sh@1'\]"):
            klr.metrics.LocalRank(model, spec)
    # Independent reference: the two calls' pre-activations written out in float64.
    sh64 = float64_layer(shared, (6,))

    def forward(t):
        first = sh64(t)
        return {"sh@0": first, "sh@1": sh64(tf.nn.relu(first))}

    jacobians = function_jacobians(forward, x)
    for call in ("sh@0", "sh@1"):
        metric = klr.metrics.LocalRank(model, call)
        result = accumulated(metric, x)
        assert metric.name == f"local_rank/{call}" and metric.layer_name == call
        assert result == pytest.approx(expected[call])
        assert result == pytest.approx(numpy_ranks(jacobians[call], eps_dtype=np.float32).mean())
    assert expected["sh@1"] < expected["sh@0"]  # the calls differ: no single "sh" rank


def test_layer_object_inside_a_nested_model(x):
    model, enc = nested_model(L.Dense(5, activation="relu", name="inner_d"))
    inner = enc.get_layer("inner_d")
    expected = klr.local_rank(model, x, layers=[inner]).mean
    assert list(expected) == ["enc/inner_d"]
    metric = klr.metrics.LocalRank(model, inner, atol=1e-3)
    robust = klr.local_rank(model, x, layers=[inner], atol=1e-3).mean["enc/inner_d"]
    assert accumulated(metric, x) == pytest.approx(robust)
    assert metric.name == "robust_local_rank/enc/inner_d"  # the callback's key
    exact = klr.metrics.LocalRank(model, inner)
    assert accumulated(exact, x) == pytest.approx(expected["enc/inner_d"])
    # Independent reference: d inner_d / d x = W_inner^T diag(relu'(pre)) W_pre^T.
    pre64 = float64_layer(model.get_layer("pre"), (6,))
    inner64 = float64_layer(inner, (6,))
    jacobians = function_jacobians(lambda t: {"d": inner64(tf.nn.relu(pre64(t)))}, x)
    reference = numpy_ranks(jacobians["d"], eps_dtype=np.float32).mean()
    assert expected["enc/inner_d"] == pytest.approx(reference)
    assert 0 < reference < 5  # rank-deficient samples: the check is not the bound


def test_nested_model_name_with_one_or_several_layers(x):
    model, _ = nested_model(L.Dense(5, activation="relu", name="inner_d"))
    expected = klr.local_rank(model, x, layers=["enc"]).mean
    assert list(expected) == ["enc/inner_d"]
    metric = klr.metrics.LocalRank(model, "enc")
    assert accumulated(metric, x) == pytest.approx(expected["enc/inner_d"])
    assert metric.name == "local_rank/enc/inner_d"

    model, enc = nested_model(L.Dense(5, activation="relu", name="inner_d"),
                              L.Dense(3, activation="tanh", name="inner_e"))
    expected = klr.local_rank(model, x, layers=["enc"]).mean
    assert list(expected) == ["enc/inner_d", "enc/inner_e"]
    for spec in ("enc", enc):
        with pytest.raises(ValueError, match=r"\['enc/inner_d', 'enc/inner_e'\]"):
            klr.metrics.LocalRank(model, spec)
    for call in expected:
        assert accumulated(klr.metrics.LocalRank(model, call), x) == pytest.approx(expected[call])


@pytest.mark.parametrize(
    "layer,error,match",
    [
        (3, TypeError, "layer=3"),
        ("nope", ValueError, "'nope'"),
    ],
)
def test_bad_layer(layer, error, match):
    model, _ = shared_model()
    with pytest.raises(error, match=match):
        klr.metrics.LocalRank(model, layer)


def test_randomized_layer_is_refused_when_the_metric_is_built():
    """A layer planned for the randomized method was skipped by
    `measure_tensor`, and `update_state` raised a bare `KeyError`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="h"),
                              keras.layers.Dense(2, name="out")])
    with pytest.raises(ValueError, match="randomized"):
        klr.metrics.LocalRank(model, "h", atol=0.1, method="randomized")
