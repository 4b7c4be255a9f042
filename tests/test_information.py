"""Information estimators against closed forms and independent references.

References used:
- the linear Gaussian channel `X ~ N(0, Sigma)`, `T = A X + N(0, s^2 I)`:
  `I = 1/2 log det(I + A Sigma A^T / s^2)`, and the large-sample limits of the
  pairwise bounds for it (derived in docs/information.md);
- a Monte-Carlo evaluation of `I(X;T)` and `I(T;Y)` for a finite Gaussian
  mixture, whose densities are exact (NumPy, no package code);
- explicit float64 Jacobians (`tests/reference.py`) for the Gaussian channel;
- hand-computed entropies for binning.
"""

from __future__ import annotations

import glob
import math

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy.special import logsumexp

from keras_localrank import LocalRankCallback, plotting
from keras_localrank import information as info
from keras_localrank.names import information_key
from keras_localrank.jacobians import preactivation_jacobians
from keras_localrank.spectra import singular_values
from keras_localrank.taps import select_taps, tap_inputs_model
from tests.reference import reference_jacobians


def _by_name(estimates):
    return {(e.quantity, e.estimator, e.parameter_value): e for e in estimates}


def _pairwise_limits(eigenvalues):
    """Large-N limits of the KL upper and Bhattacharyya lower bound for a
    linear Gaussian channel, from the eigenvalues of `A Sigma A^T / s^2`."""
    lam = np.asarray(eigenvalues)
    upper = 0.5 * np.sum(np.log1p(lam) + lam / (1 + lam))
    q = lam / 4
    lower = 0.5 * np.sum(np.log1p(q) + q / (1 + q))
    return upper, lower


# -- noise injection: closed form of the linear Gaussian channel -----------------


def test_pairwise_bounds_bracket_linear_gaussian_channel():
    # 2000 samples; tolerance 0.1 nats on the limits is ~5 standard errors of
    # the per-sample average (per-sample std <= ~1 nat).
    rng = np.random.default_rng(0)
    d, n = 3, 2000
    a = rng.normal(size=(4, d))
    root = rng.normal(size=(d, d))
    cov = root @ root.T / d + 0.5 * np.eye(d)
    x = rng.multivariate_normal(np.zeros(d), cov, size=n)
    sigmas = (0.5, 1.0, 2.0)
    got = _by_name(info.pairwise_information(x @ a.T, sigmas))
    assert len(got) == 2 * len(sigmas)
    for s in sigmas:
        exact = info.gaussian_channel_closed_form(a, s, cov)
        lam = np.linalg.eigvalsh(a @ cov @ a.T / s**2)
        assert exact == pytest.approx(0.5 * np.log1p(lam).sum(), rel=1e-12)
        upper, lower = got[(info.IXT, "kl_upper", s)], got[(info.IXT, "bd_lower", s)]
        assert (upper.kind, lower.kind) == ("upper_bound", "lower_bound")
        assert upper.parameter == "sigma" and upper.num_samples == n
        assert lower.nats < exact < upper.nats, (s, lower.nats, exact, upper.nats)
        upper_limit, lower_limit = _pairwise_limits(lam)
        assert upper.nats == pytest.approx(upper_limit, abs=0.1)
        assert lower.nats == pytest.approx(lower_limit, abs=0.1)
        assert upper.bits == pytest.approx(upper.nats / math.log(2))


def _mixture_mc(h, labels, sigma, draws, rng):
    """Monte-Carlo `I(X;T)` and `I(T;Y)` for `X` uniform over rows of `h`,
    `T = h_X + N(0, sigma^2 I)`, `Y = labels[X]`: mean and standard error."""
    n, d = h.shape
    idx = rng.integers(n, size=draws)
    t = h[idx] + sigma * rng.normal(size=(draws, d))
    log_k = -((t[:, None, :] - h[None, :, :]) ** 2).sum(-1) / (2 * sigma**2)  # + const
    log_p = logsumexp(log_k, axis=1) - math.log(n)
    log_cond_x = log_k[np.arange(draws), idx]
    same = labels[None, :] == labels[idx][:, None]
    log_cond_y = logsumexp(np.where(same, log_k, -np.inf), axis=1) - np.log(same.sum(1))
    ixt, ity = log_cond_x - log_p, log_cond_y - log_p
    return (ixt.mean(), ixt.std() / math.sqrt(draws)), (ity.mean(), ity.std() / math.sqrt(draws))


@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_pairwise_bounds_bracket_mixture_information(sigma):
    # The bounds are exact statements about the finite mixture: check them
    # against its information computed by Monte Carlo (4 standard errors).
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [20, 12, 8])
    h = rng.normal(size=(40, 2)) + 1.5 * labels[:, None]
    (ixt, ixt_se), (ity, ity_se) = _mixture_mc(h, labels, sigma, 40_000, rng)
    got = _by_name(info.pairwise_information(h, sigma, labels=labels))
    assert got[(info.IXT, "bd_lower", sigma)].nats <= ixt + 4 * ixt_se
    assert got[(info.IXT, "kl_upper", sigma)].nats >= ixt - 4 * ixt_se
    assert got[(info.ITY, "lower", sigma)].nats <= ity + 4 * ity_se
    assert got[(info.ITY, "upper", sigma)].nats >= ity - 4 * ity_se
    assert got[(info.ITY, "kl", sigma)].kind == "estimate"
    assert got[(info.ITY, "upper", sigma)].kind == "upper_bound"
    assert got[(info.ITY, "lower", sigma)].kind == "lower_bound"
    # Bhattacharyya <= KL for each entropy, so the orderings are fixed.
    for q in ("kl", "bd", "lower"):
        assert got[(info.ITY, q, sigma)].nats <= got[(info.ITY, "upper", sigma)].nats + 1e-12


def test_pairwise_limits_in_sigma_and_chunking():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(50, 4)).astype("float32")
    labels = np.array(["a", "b"] * 25)
    # Tiny noise: samples are told apart, I(X;T) -> log N and I(T;Y) -> H(Y).
    for e in info.pairwise_information(h, 1e-4, labels=labels):
        expected = math.log(50) if e.quantity == info.IXT else math.log(2)
        assert e.nats == pytest.approx(expected, abs=1e-9), e
    # Huge noise: nothing gets through.
    for e in info.pairwise_information(h, 1e4, labels=labels):
        assert abs(e.nats) < 1e-6, e
    # Chunking and the input precision do not change the result.
    whole = info.pairwise_information(h, 0.7, labels=labels, chunk_size=1000)
    chunked = info.pairwise_information(h.astype("float64"), 0.7, labels=labels, chunk_size=7)
    np.testing.assert_allclose([e.nats for e in whole], [e.nats for e in chunked], rtol=1e-12)
    assert info.kl_upper_bound(h, 0.7) == whole[0]
    assert info.bhattacharyya_lower_bound(h, 0.7) == whole[1]
    assert whole[0].label == "kl_upper@sigma=0.7"


# -- local Gaussian channel --------------------------------------------------------


def _jacobian_singular_values(model, x):
    """Singular values of every tap's pre-activation Jacobian (package path)."""
    taps = select_taps(model).taps
    jacs = preactivation_jacobians(tap_inputs_model(model, taps), taps, tf.constant(x))
    return {t.name: singular_values(j).numpy() for t, j in zip(taps, jacs)}


def test_gaussian_channel_equals_closed_form_for_linear_layer():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 3))
    model = keras.Sequential(
        [keras.Input((3,), dtype="float64"),
         keras.layers.Dense(5, use_bias=False, dtype="float64", name="linear")]
    )
    model.layers[0].set_weights([a.T])
    x = rng.normal(size=(6, 3))
    s = _jacobian_singular_values(model, x)["linear"]
    for sigma in (0.1, 1.0, 3.0):
        per_sample = info.gaussian_channel_information(s, sigma).numpy()
        np.testing.assert_allclose(
            per_sample, info.gaussian_channel_closed_form(a, sigma), rtol=1e-12
        )
        estimate = info.gaussian_channel_estimate(per_sample, sigma)
        assert (estimate.estimator, estimate.parameter, estimate.num_samples) == (
            "gaussian_channel", "sigma", 6
        )
        stat = info.gaussian_channel_stat(sigma)
        np.testing.assert_allclose(stat(tf.constant(s)).numpy(), per_sample, rtol=1e-15)
    # Zero padding (the reduced spectra of the fast path) adds nothing.
    padded = np.concatenate([s, np.zeros((6, 4))], axis=1)
    np.testing.assert_allclose(
        info.gaussian_channel_information(padded, 0.5), info.gaussian_channel_information(s, 0.5)
    )


@pytest.mark.parametrize("r", [1, 3])
def test_gaussian_channel_saturates_with_rank(r):
    # A linear bottleneck of width r caps the rank of every later Jacobian at
    # r: as sigma -> 0 the information grows like r/2 * log(1/sigma^2).
    keras.utils.set_random_seed(r)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="float64"),
            keras.layers.Dense(r, dtype="float64", name="bottleneck"),
            keras.layers.Dense(8, activation="tanh", dtype="float64", name="wide"),
            keras.layers.Dense(5, dtype="float64", name="out"),
        ]
    )
    x = np.random.default_rng(r).normal(size=(16, 6))
    reference = reference_jacobians(model, x)
    package = _jacobian_singular_values(model, x)
    for name in ("wide", "out"):
        s_ref = np.linalg.svd(reference[name], compute_uv=False)
        np.testing.assert_allclose(np.sort(package[name]), np.sort(s_ref), atol=1e-10)
        assert (np.linalg.matrix_rank(reference[name]) == r).all()
        small, smaller = (
            info.gaussian_channel_information(s_ref, sigma).numpy().mean()
            for sigma in (1e-4, 1e-6)
        )
        slope = (smaller - small) / math.log(1e-4**2 / 1e-6**2)
        assert slope == pytest.approx(r / 2, abs=1e-6)


# -- binning -----------------------------------------------------------------------------


def test_binning_on_a_discrete_toy():
    # Patterns with probabilities 1/2, 1/4, 1/8, 1/8: H = 1.75 bits.
    patterns = np.array([[0.2, 0.3]] * 4 + [[1.2, 0.3]] * 2 + [[0.4, 1.6]] + [[2.5, 2.5]])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ixt, ity = info.binned_information(patterns, labels=labels, bin_width=1.0)
    assert (ixt.quantity, ity.quantity) == (info.IXT, info.ITY)
    assert ixt.bits == pytest.approx(1.75, abs=1e-12)
    assert ixt.label == "binning@bin_width=1"
    # Y = 0 holds exactly the first pattern: H(Y)=1 bit, H(Y|T)=0, I(T;Y) = 1 bit.
    assert ity.bits == pytest.approx(1.0, abs=1e-12)
    # Two bins over [-1, 1] see only signs: here one pattern, no information.
    (signs,) = info.binned_information(patterns, num_bins=2, value_range=(-1.0, 1.0))
    assert signs.nats == pytest.approx(0.0, abs=1e-12) and signs.parameter == "num_bins"
    # Fine bins tell the 5 distinct rows apart: H = log N over distinct rows.
    rows = np.random.default_rng(4).normal(size=(5, 3))
    (fine,) = info.binned_information(rows, num_bins=10_000)
    assert fine.nats == pytest.approx(math.log(5), abs=1e-12)
    (coarse,) = info.binned_information(rows, num_bins=1)
    assert coarse.nats == pytest.approx(0.0, abs=1e-12)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_sigma_value(sigma):
    h = np.ones((4, 2))
    for call in (
        lambda: info.pairwise_information(h, sigma),
        lambda: info.pairwise_information(h, [1.0, sigma]),
        lambda: info.kl_upper_bound(h, sigma),
        lambda: info.gaussian_channel_information(np.ones((2, 2)), sigma),
        lambda: info.gaussian_channel_stat(sigma),
    ):
        with pytest.raises(ValueError, match="sigma"):
            call()


def test_bad_inputs():
    h = np.random.default_rng(5).normal(size=(6, 2))
    with pytest.raises(TypeError, match="sigma"):
        info.pairwise_information(h, "0.1")
    with pytest.raises(ValueError, match="sigma"):
        info.pairwise_information(h, [])
    bad = h.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite `h`"):
        info.pairwise_information(bad, 0.1)
    with pytest.raises(ValueError, match="finite `h`"):
        info.binned_information(bad * np.inf, bin_width=1.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        info.pairwise_information(h[:1], 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        info.pairwise_information(np.ones((4, 2), dtype=int), 0.1)
    with pytest.raises(ValueError, match="one entry per sample"):
        info.pairwise_information(h, 0.1, labels=[0, 1])
    with pytest.raises(ValueError, match="shape"):
        info.pairwise_information(h, 0.1, labels=np.eye(6))
    with pytest.raises(TypeError, match="chunk_size"):
        info.pairwise_information(h, 0.1, chunk_size=2.5)
    with pytest.raises(ValueError, match="exactly one"):
        info.binned_information(h, num_bins=3, bin_width=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        info.binned_information(h)
    with pytest.raises(ValueError, match="bin_width"):
        info.binned_information(h, bin_width=0.0)
    with pytest.raises(ValueError, match="num_bins"):
        info.binned_information(h, num_bins=0)
    with pytest.raises(ValueError, match="value_range"):
        info.binned_information(h, num_bins=3, value_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="per_sample"):
        info.gaussian_channel_estimate([1.0, np.nan], 0.1)


# -- the callback ------------------------------------------------------------------------


def _events(log_dir):
    tags = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def _tiny_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="relu", name="hidden"),
         keras.layers.Dense(3, name="logits")]
    )
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(96, 5)).astype("float32")
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    return x, y


def test_callback_keys_reach_history_csvlogger_trace_and_tensorboard(toy, tmp_path):
    from keras_localrank.information_callback import InformationCallback

    x, y = toy
    model = _tiny_classifier()
    cb = InformationCallback(
        x[:40], y[:40], sigma=[0.1, 1.0], num_bins=10, gaussian_channel=True,
        log_dir=tmp_path / "tb", trace_path=tmp_path / "trace.csv",
    )
    csv = tmp_path / "log.csv"
    rank_cb = LocalRankCallback(x[:40])
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                        callbacks=[rank_cb, cb, keras.callbacks.CSVLogger(str(csv))])
    assert "information/kl_upper@sigma=0.1/hidden" in cb.keys
    assert "label_information/kl@sigma=1/logits" in cb.keys
    assert "information/binning@num_bins=10/hidden" in cb.keys
    assert "information/gaussian_channel@sigma=0.1/logits" in cb.keys
    # 2 layers x (2 sigmas x (2 + 4 with labels) + 2 binning + 2 Gaussian channel)
    assert len(cb.keys) == 2 * (2 * 6 + 2 + 2)
    logged = pd.read_csv(csv)
    for key in cb.keys:
        assert len(history.history[key]) == 2 and all(
            isinstance(v, float) and math.isfinite(v) for v in history.history[key]
        )
        np.testing.assert_allclose(logged[key], history.history[key])
    # The last values are the estimators applied by hand to the final weights:
    # pre-activations x W + b, and the Jacobian spectrum of each layer.
    w1, b1, w2, b2 = (np.asarray(v, np.float64) for v in model.get_weights())
    xs = x[:40].astype(np.float64)
    pre_hidden = xs @ w1 + b1
    pre_logits = np.maximum(pre_hidden, 0) @ w2 + b2
    for name, h in (("hidden", pre_hidden), ("logits", pre_logits)):
        expected = info.pairwise_information(h, [0.1, 1.0], labels=y[:40])
        expected += info.binned_information(h, labels=y[:40], num_bins=10)
        for e in expected:
            key = information_key(name, e.quantity, e.label)
            assert history.history[key][-1] == pytest.approx(e.nats, rel=1e-5, abs=1e-6), key
    jac_logits = np.einsum("oh,nh,hi->noi", w2.T, (pre_hidden > 0).astype(float), w1.T)
    s = np.linalg.svd(jac_logits, compute_uv=False)
    expected = info.gaussian_channel_information(s, 0.1).numpy().mean()
    assert history.history["information/gaussian_channel@sigma=0.1/logits"][-1] == pytest.approx(
        expected, rel=1e-5
    )
    trace = pd.read_csv(tmp_path / "trace.csv")
    assert len(trace) == 2 * len(cb.keys)
    assert set(trace["quantity"]) == {info.IXT, info.ITY}
    tags = _events(tmp_path / "tb")
    assert len(tags["information/kl_upper@sigma=0.1/hidden"]) == 2
    # The information plane reads the trace (from memory or its CSV).
    curves = plotting.information_curves(trace, ixt="bd_lower@sigma=1", ity="kl@sigma=0.1")
    assert list(curves.columns) == ["step", "layer", "ixt", "ity"] and len(curves) == 4
    last = curves[curves["step"] == curves["step"].max()].set_index("layer")
    assert last.loc["logits", "ixt"] == history.history["information/bd_lower@sigma=1/logits"][-1]
    assert last.loc["hidden", "ity"] == history.history["label_information/kl@sigma=0.1/hidden"][-1]
    png = tmp_path / "plane.png"
    plotting.plot_information_plane(cb.trace_frame(), png, ranks=rank_cb.trace_frame())
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="Present"):
        plotting.information_curves(trace, ixt="kl_upper@sigma=0.3")


def test_callback_output_representation_and_bad_arguments(toy):
    from keras_localrank.information_callback import InformationCallback, LayerRepresentations

    x, y = toy
    model = _tiny_classifier()
    reps = LayerRepresentations(model, ["hidden"], representation="output")
    got = reps(reps.check_samples(x))["hidden"]
    w1, b1 = (np.asarray(v, np.float64) for v in model.layers[0].get_weights())
    np.testing.assert_allclose(got, np.maximum(x @ w1 + b1, 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Nothing to log"):
        InformationCallback(x, bounds=False)
    with pytest.raises(ValueError, match="at most one"):
        InformationCallback(x, num_bins=3, bin_width=0.1)
    with pytest.raises(ValueError, match="sigma"):
        InformationCallback(x, sigma=[0.1, 0.0])
    with pytest.raises(ValueError, match="one entry per sample"):
        InformationCallback(x, y[:10])
    with pytest.raises(ValueError, match="representation"):
        InformationCallback(x, representation="post")
    with pytest.raises(ValueError, match="finite `x`"):
        InformationCallback(np.full((4, 5), np.nan, "float32"))


def test_callback_gaussian_channel_over_chunks_with_different_active_units():
    # Regression: the Dense-chain path shrinks factors to the active ReLU
    # units, so samples carry spectra of different widths; the per-sample
    # values must still match the explicit Jacobians.
    from keras_localrank.information_callback import InformationCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, activation="relu", name="gate"),
         keras.layers.Dense(3, name="out")]
    )
    model.compile("sgd", "mse")
    model.layers[0].set_weights([np.eye(4, dtype="float32"), np.zeros(4, "float32")])
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(20, 4))).astype("float32") + 0.1
    x[:8, 2:] *= -1  # first chunk of 8: two active units; later chunks: four
    cb = InformationCallback(x, sigma=[0.05, 2.0], bounds=False, gaussian_channel=True,
                             chunk_size=8)
    cb.set_model(model)
    cb.on_train_begin()
    got = {(e.parameter_value, layer): e.nats for layer, es in cb.measure().items() for e in es}
    w2 = np.asarray(model.layers[1].get_weights()[0], np.float64)
    jac = np.einsum("oh,nh->noh", w2.T, (x > 0).astype(np.float64))
    s = np.linalg.svd(jac, compute_uv=False)
    for sigma in (0.05, 2.0):
        expected = info.gaussian_channel_information(s, sigma).numpy().mean()
        assert got[(sigma, "out")] == pytest.approx(expected, rel=1e-6)
        gate = info.gaussian_channel_information(np.ones((20, 4)), sigma).numpy().mean()
        assert got[(sigma, "gate")] == pytest.approx(gate, rel=1e-6)


def test_information_mlp_study_runs_on_a_tiny_config(tmp_path):
    from experiments.information_mlp import Config, train_and_evaluate

    config = Config(widths=(8, 8), n_train=64, epochs=2, probe_samples=32, measurements=4,
                    sigmas=(1.0,), num_bins=5)
    summary = train_and_evaluate(config, str(tmp_path))
    assert sorted(summary["layers"]) == ["hidden0", "hidden1", "logits"]
    entry = summary["layers"]["hidden1"]
    assert {"robust_local_rank@0.01", "kl_upper@sigma=1", "gaussian_channel@sigma=1"} <= set(entry)
    information = pd.read_csv(tmp_path / "information.csv")
    ranks = pd.read_csv(tmp_path / "rank.csv")
    # Both callbacks measured at the same steps, the first before training.
    assert sorted(set(information["step"])) == sorted(set(ranks["step"]))
    assert information["step"].min() == 0
    assert (tmp_path / "information_plane_sigma=1.png").stat().st_size > 1000


def test_callback_trace_continues_across_fit_calls_and_callback_instances(toy, tmp_path):
    from keras_localrank.information_callback import InformationCallback

    x, y = toy
    model = _tiny_classifier()
    trace = tmp_path / "trace.json"
    first = InformationCallback(x[:16], sigma=1.0, trace_path=trace)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[first])
    # A new callback on the same file (a restarted script) continues the trace
    # at the optimizer's step, without repeating a step.
    second = InformationCallback(x[:16], sigma=1.0, trace_path=trace,
                                 measure_on_train_begin=True)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[second])
    frame = second.trace_frame()
    assert sorted(set(frame["step"])) == [3, 6, 9]
    assert len(frame) == 3 * 2 * 2  # steps x layers x (kl_upper, bd_lower)
    # A fresh model restarts at step 0: rows from later steps are dropped.
    third = InformationCallback(x[:16], sigma=1.0, trace_path=trace)
    _tiny_classifier().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[third])
    assert sorted(set(third.trace_frame()["step"])) == [3]
