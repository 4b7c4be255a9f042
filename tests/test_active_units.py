"""Active units, dead units, the active-unit rank bound and the rank deficit.

References: NumPy float64 forward passes (active = non-zero derivative of the
activation, written out per activation), `numpy.linalg.matrix_rank` of
explicit float64 Jacobians (`tests.reference`), and networks whose bound and
rank are known by construction.
"""

import glob
import math

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank import names
from keras_localrank.active_units import active_units, decompose_drop
from tests.reference import numpy_ranks, reference_jacobians

N0 = 10


def _set(layer, kernel, bias):
    layer.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])


def forced_dead_model(rng):
    """d1 (relu, 8): units 0-2 dead (bias -100), 3-7 always on (bias +100);
    d2 (relu, 7) all on; d3 (linear, 6). Inputs in [-1, 1]^10."""
    model = keras.Sequential(
        [
            keras.Input((N0,)),
            keras.layers.Dense(8, activation="relu", name="d1"),
            keras.layers.Dense(7, activation="relu", name="d2"),
            keras.layers.Dense(6, name="d3"),
        ]
    )
    b1 = np.array([-100.0] * 3 + [100.0] * 5)
    _set(model.get_layer("d1"), rng.normal(size=(N0, 8)), b1)
    _set(model.get_layer("d2"), rng.normal(size=(8, 7)) * 0.1, np.full(7, 100.0))
    _set(model.get_layer("d3"), rng.normal(size=(7, 6)), np.zeros(6))
    return model


@pytest.mark.parametrize("method", ["analytic", "exact"])
@pytest.mark.parametrize("atol", [None, 1e-3])
def test_forced_dead_units_give_the_known_bound_and_zero_deficit(method, atol):
    rng = np.random.default_rng(0)
    model = forced_dead_model(rng)
    x = rng.uniform(-1, 1, size=(32, N0)).astype("float32")
    result = klr.local_rank(model, x, method=method, atol=atol, dtype="float64")
    frame = result.to_frame().set_index("layer")
    # d1: 5 live units of 8; d2: all 7; d3 (linear): all 6.
    assert frame["active_units"].to_dict() == {"d1": 5.0, "d2": 7.0, "d3": 6.0}
    assert frame["dead_units"].to_dict() == {"d1": 3.0, "d2": 0.0, "d3": 0.0}
    # bound: min(n_l, n0, active units of every earlier layer).
    assert frame["rank_bound"].to_dict() == {"d1": 8.0, "d2": 5.0, "d3": 5.0}
    assert frame["mean"].to_dict() == {"d1": 8.0, "d2": 5.0, "d3": 5.0}
    assert frame["rank_deficit"].to_dict() == {"d1": 0.0, "d2": 0.0, "d3": 0.0}
    assert result.active_skipped == {}


def test_planted_bottleneck_with_all_units_alive_gives_bound_width_and_rank_k():
    rng = np.random.default_rng(1)
    k = 2
    model = keras.Sequential(
        [
            keras.Input((N0,)),
            keras.layers.Dense(8, activation="relu", name="wide"),
            keras.layers.Dense(6, activation="relu", name="planted"),
            keras.layers.Dense(7, name="after"),
        ]
    )
    _set(model.get_layer("wide"), rng.normal(size=(N0, 8)), np.full(8, 100.0))
    # Small integers times 2**-7: exactly rank k in float32 too.
    low_rank = rng.integers(-2, 3, size=(8, k)) @ rng.integers(-2, 3, size=(k, 6)) / 128
    assert np.linalg.matrix_rank(low_rank) == k
    _set(model.get_layer("planted"), low_rank, np.full(6, 100.0))
    _set(model.get_layer("after"), rng.normal(size=(6, 7)), np.zeros(7))
    x = rng.uniform(-1, 1, size=(24, N0)).astype("float32")
    result = klr.local_rank(model, x, dtype="float64")
    assert result.dead_units == {"wide": 0.0, "planted": 0.0, "after": 0.0}
    assert result.active_units == {"wide": 8.0, "planted": 6.0, "after": 7.0}
    # "after": bound = min(7, 10, 8, 6) = 6, the planted layer's width; rank = k.
    assert result.rank_bound == {"wide": 8.0, "planted": 6.0, "after": 6.0}
    assert result.mean == {"wide": 8.0, "planted": float(k), "after": float(k)}
    assert result.rank_deficit == {"wide": 0.0, "planted": 6.0 - k, "after": 6.0 - k}
    # The ranks themselves against explicit float64 Jacobians.
    jac = reference_jacobians(model, x.astype(np.float64))
    np.testing.assert_array_equal(numpy_ranks(jac["after"]), result.per_sample["after"])


def _numpy_active(kind, p):
    if kind == "relu":
        return p > 0
    if kind == "relu6":
        return (p > 0) & (p < 6)
    return np.ones_like(p, dtype=bool)  # tanh, linear: derivative never 0


def test_counts_agree_with_numpy_forward_pass():
    """Natural dead units, relu6, a separate ReLU layer after a linear Dense
    and a tanh layer; every count against a float64 NumPy forward pass."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((N0,))
    h = keras.layers.Dense(12, activation="relu", name="r1")(inputs)
    h = keras.layers.Dense(9, name="lin")(h)
    h = keras.layers.ReLU(name="relu_layer")(h)
    h = keras.layers.Dense(8, activation="relu6", name="r6")(h)
    h = keras.layers.Dense(7, activation="tanh", name="t")(h)
    out = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(3)
    for name in ("r1", "lin", "r6"):  # shift biases so some units die
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        _set(layer, kernel * 2, rng.normal(size=bias.shape) - 0.8)
    x = rng.normal(size=(50, N0)).astype("float32")

    acts = {"r1": "relu", "lin": "relu", "r6": "relu6", "t": "tanh", "out": "linear"}
    fns = {
        "relu": lambda p: np.maximum(p, 0),
        "relu6": lambda p: np.clip(p, 0, 6),
        "tanh": np.tanh,
        "linear": lambda p: p,
    }
    a = x.astype(np.float64)
    active, order = {}, ["r1", "lin", "r6", "t", "out"]
    for name in order:
        kernel, bias = (w.astype(np.float64) for w in model.get_layer(name).get_weights())
        p = a @ kernel + bias
        active[name] = _numpy_active(acts[name], p)
        a = fns[acts[name]](p)
    expected_active = {n: active[n].sum(axis=1) for n in order}
    expected_dead = {n: float((~active[n].any(axis=0)).sum()) for n in order}
    bound, running = {}, np.full(len(x), N0)
    for name in order:
        units = model.get_layer(name).units
        bound[name] = np.minimum(running, units)
        running = np.minimum(running, expected_active[name])

    got = active_units(model, x, dtype="float64", batch_size=16)  # several chunks
    result = klr.local_rank(model, x, dtype="float64", batch_size=16)
    assert got.skipped == {} and result.active_skipped == {}
    assert sum(expected_dead.values()) > 0  # the test exercises dead units
    assert any((expected_active[n] < model.get_layer(n).units).any() for n in order)
    for name in order:
        np.testing.assert_array_equal(got.active_per_sample[name], expected_active[name])
        np.testing.assert_array_equal(result.active_per_sample[name], expected_active[name])
        np.testing.assert_array_equal(got.bound_per_sample[name], bound[name])
        np.testing.assert_array_equal(result.bound_per_sample[name], bound[name])
        assert got.dead[name] == result.dead_units[name] == expected_dead[name]
        # The bound holds per sample.
        assert (result.per_sample[name] <= bound[name]).all()


def test_layers_off_a_dense_chain_get_nan_and_a_reason():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, out)
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype("float32")
    result = klr.local_rank(model, x)
    assert set(result.active_skipped) == {"conv", "head"}
    frame = result.to_frame()
    assert frame[["active_units", "dead_units", "rank_bound", "rank_deficit"]].isna().all().all()
    assert not frame["mean"].isna().any()


def test_decompose_drop_splits_exactly():
    d = decompose_drop(100.0, 40.0, 100.0, 50.0)
    assert (d.drop, d.dead, d.low_rank) == (60.0, 50.0, 10.0)
    assert d.dead_fraction == pytest.approx(5 / 6) and d.verdict == "mostly dead units"
    assert decompose_drop(100.0, 40.0, 100.0, 95.0).verdict == "mostly low-rank structure"
    assert decompose_drop(100.0, 40.0, 100.0, 70.0).verdict == "both"
    assert decompose_drop(100.0, 99.8, 100.0, 90.0).verdict == "no drop"
    assert math.isnan(decompose_drop(10.0, 10.0, 10.0, 10.0).dead_fraction)
    assert "dead units 50.0, 83%" in d.line("h1")


def test_bad_input_errors():
    model = forced_dead_model(np.random.default_rng(0))
    x = np.zeros((4, N0), np.float32)
    with pytest.raises(ValueError, match="NaN"):
        active_units(model, np.full((4, N0), np.nan, np.float32))
    with pytest.raises(TypeError):
        active_units(model, np.zeros((4, N0), np.int32))
    with pytest.raises(ValueError, match="dtype"):
        active_units(model, x, dtype="float16")
    with pytest.raises(ValueError, match="batch_size"):
        active_units(model, x, batch_size=0)
    with pytest.raises(ValueError, match="rank_ref"):
        decompose_drop(float("nan"), 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="mostly"):
        decompose_drop(2.0, 1.0, 1.0, 1.0, mostly=0.4)
    with pytest.raises(TypeError, match="active_units"):
        klr.LocalRankCallback(x, active_units="yes")


def _events(log_dir):
    tags = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_callback_keys_reach_history_csv_trace_and_tensorboard(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((N0,)), keras.layers.Dense(12, activation="relu", name="h0"),
         keras.layers.Dense(3, name="out")]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, N0)).astype("float32")
    y = rng.integers(0, 3, size=64)
    cb = klr.LocalRankCallback(
        x[:16], atol=[0.01, 0.1], active_units=True, trace_path=tmp_path / "trace.csv",
        log_dir=tmp_path / "own",
    )
    csv = tmp_path / "log.csv"
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                        callbacks=[cb, keras.callbacks.CSVLogger(str(csv))])
    unit_keys = [
        "active_units/h0", "active_units/out", "dead_units/h0", "dead_units/out",
        "rank_bound/h0", "rank_bound/out", "rank_deficit/h0", "rank_deficit/out",
        "robust_rank_deficit@0.01/h0", "robust_rank_deficit@0.01/out",
        "robust_rank_deficit@0.1/h0", "robust_rank_deficit@0.1/out",
    ]
    assert cb.keys[-len(unit_keys):] == unit_keys
    logged = pd.read_csv(csv)
    final = klr.local_rank(model, x[:16], atol=0.1)
    for key in unit_keys:
        assert len(history.history[key]) == 2
        np.testing.assert_allclose(logged[key], history.history[key])
    assert history.history["rank_bound/out"][-1] == final.rank_bound["out"]
    assert history.history["robust_rank_deficit@0.1/out"][-1] == final.rank_deficit["out"]
    assert history.history["active_units/h0"][-1] == final.active_units["h0"]
    trace = pd.read_csv(tmp_path / "trace.csv")
    assert {"active_units", "dead_units", "rank_bound", "rank_deficit"} <= set(trace)
    last = trace[(trace["step"] == trace["step"].max()) & (trace["layer"] == "out")]
    np.testing.assert_allclose(
        last["rank_bound"] - last["mean"], last["rank_deficit"], atol=1e-12
    )
    tags = _events(tmp_path / "own")
    for key in unit_keys:
        assert len(tags[key]) == 2, key
    # Off by default: no new keys, the trace keeps its columns.
    assert not any(k.startswith(names.RANK_BOUND) for k in klr.LocalRankCallback(x).keys)


def test_not_counted_layers_say_why():
    model = forced_dead_model(np.random.default_rng(0))
    x = np.random.default_rng(1).uniform(-1, 1, size=(8, N0)).astype("float32")
    (result,) = klr.LocalRankEstimator(model, count_active=False)(x)
    assert result.active_skipped == dict.fromkeys(["d1", "d2", "d3"], "count_active=False")
    assert math.isnan(result.rank_bound["d2"]) and math.isnan(result.dead_units["d2"])
    # Two inputs, one held: the chain is not fed by a single input.
    a, b = keras.Input((4,)), keras.Input((3,))
    h = keras.layers.Dense(5, activation="relu", name="h")(keras.layers.Concatenate()([a, b]))
    two = keras.Model([a, b], keras.layers.Dense(2, name="o")(h))
    rng = np.random.default_rng(2)
    xa, xb = (rng.normal(size=(6, n)).astype("float32") for n in (4, 3))
    result = klr.local_rank(two, [xa, xb], wrt=0)
    assert result.active_skipped == dict.fromkeys(["h", "o"], "several model inputs")
    assert np.isnan(result.to_frame()["rank_bound"]).all()


def test_chosen_layers_warn_only_about_themselves():
    """Counting units selects every Dense layer of the model to find which feeds
    which; that selection must not repeat the warning about unmeasurable layers
    (a VIB's sampled decoder) when the user chose the layers."""
    import warnings

    from keras_localrank import vib

    model = vib.build_vib_classifier((N0,), 3, encoder_units=(6, 5), bottleneck_units=2, seed=0)
    x = np.random.default_rng(0).normal(size=(5, N0)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (result,) = vib.vib_local_rank(model, x, tolerances=(klr.Tolerance(),))
    assert [str(w.message) for w in caught if "measured" in str(w.message)] == []
    assert result.active_skipped == {}
    expected = np.mean(np.minimum(5, result.active_per_sample["encoder_1"]))
    assert result.rank_bound["encoder_2"] == expected
