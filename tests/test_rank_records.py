"""Ranks without singular values: `LocalRankEstimator(spectrum=False)`.

The exact path then counts `#{sigma_i > tol}` by the inertia of the shifted
Gram (`host_linalg.rank_record`) instead of its eigenvalues. References:
float64 Jacobians by central differences and `numpy.linalg.matrix_rank`'s
rule (`tests.reference`), and the spectrum path of the same estimator.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_localrank as klr
from keras_localrank import host_linalg
from keras_localrank.spectra import HOST_LAPACK_MIN_ORDER, Tolerance
from tests.reference import finite_difference_jacobians, numpy_ranks

L = keras.layers


def _model():
    # n0 = 144: the Grams of `c1` (144) and `wide` (130) are solved on the
    # host, those of `c2` (36) and the head (3) in TensorFlow. The strided
    # one-channel `c2` (36 values) caps the later ranks at 36 < 130.
    keras.utils.set_random_seed(3)
    inp = keras.Input((12, 12, 1))
    h = L.Conv2D(2, 3, padding="same", activation="tanh", name="c1")(inp)
    h = L.Conv2D(1, 3, strides=2, padding="same", activation="tanh", name="c2")(h)
    h = L.Flatten()(h)
    h = L.Dense(130, activation="tanh", name="wide")(h)
    model = keras.Model(inp, L.Dense(3, name="head")(h))
    x = np.random.default_rng(4).standard_normal((3, 12, 12, 1)).astype("float32")
    return model, x


def _cutting_atol(jacobians) -> float:
    """An absolute threshold inside the spectrum of every sample: the
    geometric mean of the smallest largest and the largest 12th largest
    singular value."""
    s = np.linalg.svd(jacobians, compute_uv=False)
    return float(np.sqrt(s[:, 0].min() * s[:, 11].max()))


@pytest.mark.parametrize("method", ["exact", "autodiff-forward", "autodiff-reverse"])
def test_counted_ranks_equal_numpy_ranks_and_the_spectrum_path(method, monkeypatch):
    model, x = _model()
    assert 144 >= HOST_LAPACK_MIN_ORDER and 130 >= HOST_LAPACK_MIN_ORDER
    names = ["c1", "c2", "wide", "head"]
    ref = finite_difference_jacobians(model, x.astype(np.float64), names)
    atol = _cutting_atol(ref["wide"])
    tolerances = (Tolerance(), Tolerance(atol=atol))
    records = []
    record = host_linalg.rank_record
    monkeypatch.setattr(
        host_linalg, "rank_record", lambda *a, **k: records.append(1) or record(*a, **k)
    )
    counted = klr.LocalRankEstimator(
        model, names, tolerances=tolerances, method=method, spectrum=False
    )(x)
    assert records  # the host counted some layers without eigenvalues
    spectral = klr.LocalRankEstimator(model, names, tolerances=tolerances, method=method)(x)
    for j, tol in enumerate(tolerances):
        for name in names:
            expected = numpy_ranks(ref[name], atol=tol.atol, eps_dtype=np.float32)
            np.testing.assert_array_equal(counted[j].per_sample[name], expected, err_msg=name)
            np.testing.assert_array_equal(spectral[j].per_sample[name], expected, err_msg=name)
        assert 0 < counted[1].mean["wide"] < counted[0].mean["wide"] <= 36
        np.testing.assert_allclose(
            counted[j].stable_rank_per_sample["wide"],
            spectral[j].stable_rank_per_sample["wide"],
            rtol=1e-6,
        )
        frame = counted[j].to_frame().set_index("layer")
        assert frame[["effective_rank", "margin", "near_threshold"]].isna().all().all()
        assert (frame["method"] == "exact").all()


def test_spectrum_option_is_checked():
    model, _ = _model()
    with pytest.raises(TypeError, match="spectrum"):
        klr.LocalRankEstimator(model, spectrum="no")
    with pytest.raises(ValueError, match="spectral_stats"):
        klr.LocalRankEstimator(
            model, spectrum=False, spectral_stats={"top": lambda s: s[:, 0]}
        )


def test_local_rank_passes_spectrum_and_keeps_analytic_layers_whole():
    # A Dense chain is measured analytically (its own spectrum, cheap):
    # spectrum=False leaves it unchanged.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), L.Dense(5, activation="relu"), L.Dense(4)]
    )
    x = np.random.default_rng(0).standard_normal((8, 6)).astype("float32")
    whole = klr.local_rank(model, x)
    counted = klr.local_rank(model, x, spectrum=False)
    assert counted.to_frame()["method"].eq("analytic").all()
    for name in whole.per_sample:
        np.testing.assert_array_equal(counted.per_sample[name], whole.per_sample[name])
        np.testing.assert_allclose(
            counted.effective_rank_per_sample[name], whole.effective_rank_per_sample[name]
        )


def test_metric_counts_ranks_in_a_graph_with_a_batch_of_unknown_size():
    # The metric needs ranks only: it counts them (on the host for `c1`,
    # Gram of order 144; in TensorFlow for `wide`), inside a traced step.
    from keras_localrank.metrics import LocalRank

    model, x = _model()
    atol = _cutting_atol(finite_difference_jacobians(model, x.astype(np.float64), ["wide"])["wide"])
    exact = LocalRank(model, "c1")
    robust = LocalRank(model, "wide", atol=atol)
    assert exact._estimator.spectrum is False

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 12, 1], tf.float32)])
    def step(z):
        exact.update_state(z)
        robust.update_state(z)

    step(x)
    assert float(exact.result()) == klr.local_rank(model, x, layers=["c1"]).mean["c1"]
    expected = klr.local_rank(model, x, layers=["wide"], atol=atol).mean["wide"]
    assert 0 < expected < 36
    np.testing.assert_allclose(float(robust.result()), expected, rtol=1e-6)


def test_callback_logs_counted_ranks():
    model, x = _model()
    model.compile(optimizer="sgd", loss="mse")
    y = np.zeros((len(x), 3), "float32")
    cb = klr.LocalRankCallback(x, layers=["c1", "wide"], atol=0.05, spectrum=False)
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    after = klr.local_rank(model, x, layers=["c1", "wide"], atol=0.05)
    for name in ("c1", "wide"):
        assert history.history[f"robust_local_rank/{name}"][-1] == pytest.approx(after.mean[name])
    assert cb._estimator.spectrum is False
    with pytest.raises(ValueError, match="information"):
        klr.LocalRankCallback(x, information=1.0, spectrum=False)
    with pytest.raises(TypeError, match="spectrum"):
        klr.LocalRankCallback(x, spectrum=0)
