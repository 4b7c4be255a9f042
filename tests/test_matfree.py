"""The exact matrix-free engine against float64 finite-difference Jacobians.

Convolutions, depthwise/separable convolutions, pooling, BatchNormalization,
residual additions and attention blocks; forward and reverse products; many
blocks of directions in flight; the reduction through a constant first layer;
float64 computation; the memory budget; margins, spectral statistics and
retracing.
"""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank.matfree import forward_spectra, reverse_spectra
from tests.reference import (
    finite_difference_jacobians,
    numpy_ranks,
)


def gaussian(n, *shape, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


def _randomise_batchnorm(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape),
            ])


def conv1d_pool():
    inp = keras.Input((10, 2))
    h = keras.layers.Conv1D(3, 3, padding="same", activation="tanh", name="c1")(inp)
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.Conv1D(4, 2, activation="tanh", name="c2")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h))


def conv2d_bn_residual():
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="c1")(inp)
    h = keras.layers.BatchNormalization()(h)
    r = keras.layers.Conv2D(3, 3, padding="same", name="c2")(h)
    h = keras.layers.Activation("tanh")(keras.layers.Add()([h, r]))
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(5, name="head")(h))


def depthwise_separable():
    inp = keras.Input((6, 6, 3))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="tanh", name="dw")(inp)
    h = keras.layers.SeparableConv2D(4, 2, activation="tanh", name="sep")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h))


def attention_block():
    inp = keras.Input((4, 5))
    h = keras.layers.Dense(6, name="proj")(inp)
    a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="mha")(h, h)
    h = keras.layers.LayerNormalization()(keras.layers.Add()([h, a]))
    f = keras.layers.Dense(8, activation="gelu", name="ffn")(h)
    return keras.Model(inp, keras.layers.Dense(6, name="out")(f))


def dense_root_layernorm():
    # A constant first layer (Rescaling -> Dense, n1 < n0) below a LayerNorm,
    # which the analytic Dense path cannot traverse.
    inp = keras.Input((20,))
    h = keras.layers.Rescaling(0.5)(inp)
    h = keras.layers.Dense(6, activation="tanh", name="root")(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.Dense(10, activation="tanh", name="mid")(h)
    return keras.Model(inp, keras.layers.Dense(4, name="head")(h))


def conv_root_strided():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.ZeroPadding2D(1)(inp)
    h = keras.layers.Conv2D(2, 3, strides=3, activation="tanh", name="root")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2D(4, 2, activation="tanh", name="c2")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(h))


MODELS = {
    "conv1d_pool": conv1d_pool,
    "conv2d_bn_residual": conv2d_bn_residual,
    "depthwise_separable": depthwise_separable,
    "attention_block": attention_block,
    "dense_root_layernorm": dense_root_layernorm,
    "conv_root_strided": conv_root_strided,
}


def build(name, seed=0):
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    _randomise_batchnorm(model, seed)
    return model


def check(model, x, result, *, eps_dtype=np.float32, **tol):
    names = list(result.per_sample)
    ref = finite_difference_jacobians(model, x, names)
    for name in names:
        expected = numpy_ranks(ref[name], eps_dtype=eps_dtype, **tol)
        np.testing.assert_array_equal(result.per_sample[name], expected, err_msg=name)
    return ref


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", ["exact", "autodiff-forward", "autodiff-reverse"])
def test_exact_method_matches_finite_difference_reference(name, method):
    model = build(name)
    x = gaussian(3, *model.input_shape[1:])
    est = klr.LocalRankEstimator(model, method=method, directions_per_pass=5)
    result = est(x)[0]
    assert set(est.plans) == set(result.per_sample)
    assert all(p.method == "exact" for p in est.plans.values())
    assert 0 < est.directions_in_flight <= 5  # several blocks per sample
    check(model, x, result)
    frame = result.to_frame()
    assert set(frame["method"]) == {"exact"}
    assert (frame["upper"] == frame["mean"]).all()


@pytest.mark.parametrize("name", ["dense_root_layernorm", "conv_root_strided"])
def test_constant_first_layer_reduces_the_directions(name):
    model = build(name, seed=2)
    n0 = int(np.prod(model.input_shape[1:]))
    root = model.get_layer("root")
    n1 = int(np.prod(root.output.shape[1:]))
    assert n1 < n0
    est = klr.LocalRankEstimator(model)
    assert est._root is not None and est._root.tap.name == "root"
    for plan in est.plans.values():
        assert plan.directions == n1
    x = gaussian(4, *model.input_shape[1:], seed=3)
    result = est(x)[0]
    check(model, x, result)
    assert result.to_frame().set_index("layer")["directions"].eq(n1).all()
    # The constant layer's rank is the same for every sample.
    assert len(set(result.per_sample["root"])) == 1


def test_layer_not_behind_the_root_keeps_all_directions():
    keras.utils.set_random_seed(1)
    inp = keras.Input((12,))
    root = keras.layers.Dense(3, activation="tanh", name="root")(inp)
    side = keras.layers.Dense(4, activation="tanh", name="side")(inp)
    h = keras.layers.LayerNormalization()(keras.layers.Concatenate()([root, side]))
    model = keras.Model(inp, keras.layers.Dense(7, name="head")(h))
    est = klr.LocalRankEstimator(model, method="exact")
    plans = est.plans
    assert plans["root"].directions == 3 and plans["head"].directions == 12
    x = gaussian(4, 12)
    check(model, x, est(x)[0])


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_float64_uses_float64_eps(mode):
    model = build("conv2d_bn_residual", seed=3)
    x = gaussian(2, 6, 6, 2)
    result = klr.local_rank(
        model, x, dtype="float64", method=f"autodiff-{mode}", memory_budget=2**22
    )
    check(model, x, result, eps_dtype=np.float64)


def test_blocked_gram_equals_numpy_singular_values():
    # Plain functions: a linear map with known matrix, every branch of the
    # accumulation (rows smaller / columns smaller, Gram / SVD).
    rng = np.random.default_rng(0)
    for m, n in [(5, 9), (9, 5)]:
        a = rng.standard_normal((2, m, n))
        x = tf.constant(rng.standard_normal((2, n)))

        def fn(z, a=a):  # per-sample linear map: z [N, n] -> [N, m], sample-wise
            reps = tf.shape(z)[0] // 2
            mats = tf.repeat(tf.constant(a), reps, axis=0)
            return [tf.einsum("bmn,bn->bm", mats, z)]

        expected = np.sort(np.linalg.svd(a, compute_uv=False), axis=-1)
        for use_gram in (True, False):
            fw = forward_spectra(fn, x, None, [m], block=2, use_gram=use_gram)[0]
            rv = reverse_spectra(fn, x, None, m, block=3, use_gram=use_gram)
            for got in (fw, rv):
                got = np.sort(got.numpy(), axis=-1)[:, -min(m, n):]
                np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_memory_budget_bounds_directions_in_flight_and_peak():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(2, 3, strides=2, activation="tanh"),
        keras.layers.Conv2D(2, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])
    n0 = 16 * 16 * 3
    budget = 2**18
    full = sum(int(np.prod(layer.output.shape[1:])) for layer in model.layers
               if not isinstance(layer, keras.layers.Flatten)) * n0 * 4
    assert full > budget  # one sample's Jacobians alone would not fit
    est = klr.LocalRankEstimator(model, memory_budget=budget, method="exact")
    assert est.batch_size >= 1
    assert 1 <= est.directions_in_flight < n0
    assert est.estimated_peak_bytes <= budget
    # The passes really carry at most batch * in-flight replicas (recorded
    # from the static shapes while the measurement is traced).
    import keras_localrank.matfree as matfree

    seen = []
    original = matfree.jvp

    def spy(fn, x, directions, **options):
        seen.append((x.shape[0], directions.shape[1]))
        return original(fn, x, directions, **options)

    x = gaussian(2, 16, 16, 3)
    matfree.jvp = spy
    try:
        est(x)
    finally:
        matfree.jvp = original
    assert seen
    for samples, directions in seen:
        assert directions <= est.batch_size * est.directions_in_flight
        if samples is not None and samples > 1:
            assert directions <= est.directions_in_flight
    result = est(x)[0]
    ref = klr.local_rank(model, x, method="autodiff-forward", memory_budget=2**31)
    for name in ref.per_sample:
        np.testing.assert_array_equal(result.per_sample[name], ref.per_sample[name])


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_growth_stays_within_budget():
    # 64 samples of a model whose forward-mode Jacobians would need ~3 GB at
    # once (3072 replicas per sample) and ~11 MB each to hold.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(4, 3, strides=2, activation="tanh"),
        keras.layers.Conv2D(4, 3, strides=2, activation="tanh"),
    ])
    budget = 64 * 2**20
    est = klr.LocalRankEstimator(model, memory_budget=budget)
    assert est.estimated_peak_bytes <= budget
    x = gaussian(64, 32, 32, 3)
    est(x[:1])  # trace and warm the allocator
    start = _rss()
    peak = start
    import threading

    stop = threading.Event()

    def poll():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            stop.wait(0.002)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        est(x[:8])
    finally:
        stop.set()
        thread.join()
    assert (peak - start) <= budget


def test_margin_and_near_threshold_match_reference():
    model = build("conv1d_pool", seed=4)
    x = gaussian(5, 10, 2, seed=5)
    atol = 0.05
    result = klr.local_rank(model, x, atol=atol)
    ref = check(model, x, result, atol=atol)
    for name, jac in ref.items():
        s = np.linalg.svd(jac, compute_uv=False)
        ratio = np.abs(s - atol) / atol
        np.testing.assert_allclose(
            result.margin_per_sample[name], ratio.min(axis=1), rtol=1e-3, atol=1e-5
        )
        # Singular values beyond the Jacobian's smaller side are not counted.
        np.testing.assert_array_equal(
            result.near_threshold_per_sample[name], (ratio <= 0.1).sum(axis=1)
        )
    frame = result.to_frame()
    assert {"margin", "near_threshold"} <= set(frame.columns)


def test_spectral_stats_hook_matches_reference():
    model = build("depthwise_separable", seed=5)
    x = gaussian(3, 6, 6, 3, seed=6)
    sigma = 0.3

    def info(s):
        s = tf.cast(s, tf.float64)
        return 0.5 * tf.reduce_sum(tf.math.log1p(tf.square(s) / sigma**2), axis=-1)

    est = klr.LocalRankEstimator(model, spectral_stats={"gauss_info": info})
    result = est(x)[0]
    ref = finite_difference_jacobians(model, x, list(result.per_sample))
    for name, jac in ref.items():
        s = np.linalg.svd(jac, compute_uv=False)
        expected = 0.5 * np.log1p(s**2 / sigma**2).sum(axis=1)
        np.testing.assert_allclose(result.stats["gauss_info"][name], expected, rtol=1e-4)
    frame = result.to_frame().set_index("layer")
    for name in ref:
        assert frame.loc[name, "gauss_info"] == pytest.approx(
            result.stats["gauss_info"][name].mean()
        )


def test_repeated_local_rank_calls_do_not_retrace(caplog):
    model = build("conv2d_bn_residual")
    x = gaussian(12, 6, 6, 2)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for i in range(7):
            klr.local_rank(model, x[: 3 + i])
    assert "retracing" not in caplog.text
    estimators = model._keras_localrank_estimators
    (est,) = estimators.values()
    assert est.trace_count <= 2


def test_measuring_many_models_in_a_row_does_not_warn_about_retracing(caplog):
    # Each estimator traces its own functions once; TensorFlow pooled the
    # statistics of all estimators' functions (one code object) and warned
    # from the sixth model on.
    x = gaussian(3, 6, 6, 2)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(7):
            model = build("conv2d_bn_residual")
            klr.local_rank(model, x)
    assert "retracing" not in caplog.text


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(memory_budget=0), ValueError),
        (dict(memory_budget=1.5e9), TypeError),
        (dict(memory_budget="2GB"), TypeError),
        (dict(memory_budget=64), ValueError),  # too small for one sample
        (dict(failure_probability=0.0), ValueError),
        (dict(failure_probability=1.0), ValueError),
        (dict(failure_probability=float("nan")), ValueError),
        (dict(failure_probability="low"), TypeError),
        (dict(seed=-1), ValueError),
        (dict(seed=1.5), TypeError),
        (dict(sketch_block=0), ValueError),
        (dict(power_iterations=-1), ValueError),
        (dict(directions_per_pass=0), ValueError),
        (dict(method="svd"), ValueError),
        (dict(method="randomized"), ValueError),  # no atol
        (dict(spectral_stats=[len]), TypeError),
        (dict(spectral_stats={"x": 3}), TypeError),
        (dict(spectral_stats={"mean": tf.reduce_sum}), ValueError),
        (dict(spectral_stats={"": tf.reduce_sum}), TypeError),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error):
    model = build("conv1d_pool")
    name = next(iter(kwargs))
    with pytest.raises(error, match=name if name != "spectral_stats" else "spectral_stats"):
        klr.LocalRankEstimator(model, **kwargs)


def test_exact_method_too_large_for_budget_says_what_to_do():
    model = build("conv2d_bn_residual")
    with pytest.raises(ValueError, match="memory_budget"):
        klr.LocalRankEstimator(model, method="exact", memory_budget=20_000)
