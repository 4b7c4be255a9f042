"""The engine against explicit float64 Jacobians and networks of known rank."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from tests.reference import numpy_ranks, reference_jacobians

ACTIVATIONS = ["relu", "tanh", "sigmoid", "softplus", "elu", "leaky_relu", "gelu", "swish"]


def mlp(n0, widths, activation, *, seed=0, last_activation=None, dtype=None):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((n0,), dtype=dtype)]
    for i, w in enumerate(widths):
        act = activation if i < len(widths) - 1 else last_activation
        layers.append(keras.layers.Dense(w, activation=act, dtype=dtype, name=f"d{i}"))
    return keras.Sequential(layers)


def gaussian(n, *shape, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


def check_against_reference(model, x, result, *, eps_dtype, **tol):
    ref = reference_jacobians(model, x)
    assert set(result.per_sample) == set(ref)
    for name, jac in ref.items():
        expected = numpy_ranks(jac, eps_dtype=eps_dtype, **tol)
        np.testing.assert_array_equal(result.per_sample[name], expected, err_msg=name)


# Widths chosen so ranks are informative: a narrow layer below wide ones.
WIDTHS = [12, 5, 16, 9]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("method", ["analytic", "autodiff-reverse", "autodiff-forward"])
def test_dense_chain_matches_float64_reference(activation, method):
    model = mlp(10, WIDTHS, activation)
    x = gaussian(24, 10)
    result = klr.local_rank(model, x, method=method)
    check_against_reference(model, x, result, eps_dtype=np.float32)
    # The narrow layer caps everything above it.
    assert result.max["d2"] <= 5 and result.max["d3"] <= 5


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("method", ["analytic", "autodiff"])
def test_float64_computation_uses_float64_eps(activation, method):
    model = mlp(10, WIDTHS, activation)
    x = gaussian(16, 10)
    result = klr.local_rank(model, x, dtype="float64", method=method)
    assert result.dtype == "float64"
    check_against_reference(model, x, result, eps_dtype=np.float64)


@pytest.mark.parametrize("atol,rtol", [(1e-2, None), (0.5, None), (None, 0.1), (0.3, 0.05)])
def test_tolerances_match_numpy_rule(atol, rtol):
    model = mlp(10, WIDTHS, "tanh", seed=3)
    x = gaussian(20, 10)
    result = klr.local_rank(model, x, atol=atol, rtol=rtol)
    check_against_reference(model, x, result, eps_dtype=np.float32, atol=atol, rtol=rtol)


CONV_MODELS = {
    "conv1d_causal": lambda: keras.Sequential(
        [
            keras.Input((12, 2)),
            keras.layers.Conv1D(3, 3, padding="causal", activation="relu"),
            keras.layers.Conv1D(2, 2, dilation_rate=2, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    ),
    "conv2d": lambda: keras.Sequential(
        [
            keras.Input((7, 7, 2)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.Conv2D(4, 3, padding="same", strides=2, activation="elu"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="relu"),
        ]
    ),
    "conv3d": lambda: keras.Sequential(
        [
            keras.Input((4, 4, 4, 1)),
            keras.layers.Conv3D(2, 2, activation="softplus"),
            keras.layers.Conv3D(2, 2, activation="relu"),
        ]
    ),
    "einsum": lambda: keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.EinsumDense("ab,bc->ac", output_shape=6, bias_axes="c", activation="tanh"),
            keras.layers.EinsumDense("ab,bc->ac", output_shape=8, activation="relu"),
            keras.layers.Dense(3),
        ]
    ),
}


@pytest.mark.parametrize("name", sorted(CONV_MODELS))
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_conv_and_einsum_layers_match_reference(name, mode):
    keras.utils.set_random_seed(0)
    model = CONV_MODELS[name]()
    x = gaussian(6, *model.input_shape[1:])
    result = klr.local_rank(model, x, method=f"autodiff-{mode}")
    check_against_reference(model, x, result, eps_dtype=np.float32)


def test_linear_bottleneck_caps_later_layers_at_its_width():
    keras.utils.set_random_seed(0)
    model = mlp(30, [40, 3, 40, 25], "tanh", last_activation="tanh")
    model.get_layer("d1").activation = keras.activations.linear  # bottleneck, width 3
    result = klr.local_rank(model, gaussian(32, 30))
    assert result.mean["d0"] == 30
    for name in ("d1", "d2", "d3"):
        np.testing.assert_array_equal(result.per_sample[name], 3)


def test_relu_caps_next_layer_at_active_units():
    model = mlp(40, [20, 30, 7], "relu", seed=5)
    x = gaussian(64, 40)
    hidden = keras.Model(model.inputs[0], model.get_layer("d0").output)(x).numpy()
    active = (hidden > 0).sum(axis=1)
    assert 0 < active.min() < 20  # the cap is informative
    result = klr.local_rank(model, x)
    np.testing.assert_array_equal(result.per_sample["d1"], active)
    assert np.all(result.per_sample["d2"] <= np.minimum(active, 7))


def test_zero_weights_give_rank_zero():
    model = mlp(8, [6, 6], "tanh")
    model.layers[1].kernel.assign(np.zeros((6, 6), "float32"))
    result = klr.local_rank(model, gaussian(10, 8))
    assert result.mean["d0"] == 6
    assert result.mean["d1"] == 0
    assert result.effective_rank["d1"] == 0 and result.stable_rank["d1"] == 0


def test_paths_agree_on_a_trained_network():
    model = mlp(20, [32, 32, 32, 4], "relu", seed=2)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ds = klr.datasets.gaussian_task(n_train=256, n_test=64, dim=20, k=2)
    model.fit(ds.x_train, ds.y_train, epochs=3, batch_size=32, verbose=0)
    analytic = klr.local_rank(model, ds.x_test, method="analytic")
    autodiff = klr.local_rank(model, ds.x_test, method="autodiff-reverse")
    for name in analytic.per_sample:
        np.testing.assert_array_equal(analytic.per_sample[name], autodiff.per_sample[name])
        np.testing.assert_allclose(
            analytic.effective_rank_per_sample[name],
            autodiff.effective_rank_per_sample[name],
            rtol=1e-4,
        )


def test_branches_and_shared_input_functional_model():
    keras.utils.set_random_seed(4)
    inp = keras.Input((9,))
    a = keras.layers.Dense(4, activation="relu", name="a")(inp)
    b = keras.layers.Dense(3, activation="tanh", name="b")(inp)
    a2 = keras.layers.Dense(6, name="a2")(a)  # on the analytic forest
    c = keras.layers.Dense(8, name="c")(keras.layers.Concatenate()([a, b]))  # autodiff
    model = keras.Model(inp, [a2, c])
    x = gaussian(20, 9)
    auto = klr.local_rank(model, x)
    methods = {info.name: info.method for info in auto.layers}
    assert methods["a2"] == "analytic" and methods["c"] == "exact"
    # By hand: J_c = W_c^T [diag(relu'(p_a)) W_a^T ; diag(tanh'(p_b)) W_b^T].
    wa, ba = model.get_layer("a").get_weights()
    wb, bb = model.get_layer("b").get_weights()
    wc = model.get_layer("c").get_weights()[0]
    x64 = x.astype(np.float64)
    pa, pb = x64 @ wa + ba, x64 @ wb + bb
    da, db = (pa > 0).astype(float), 1 - np.tanh(pb) ** 2
    jac = np.concatenate(
        [da[:, :, None] * wa.T[None], db[:, :, None] * wb.T[None]], axis=1
    )
    jc = np.einsum("ko,nkj->noj", wc.astype(np.float64), jac)
    np.testing.assert_array_equal(auto.per_sample["c"], numpy_ranks(jc, eps_dtype=np.float32))
    ja2 = np.einsum("ko,nkj->noj", model.get_layer("a2").get_weights()[0], jac[:, :4])
    np.testing.assert_array_equal(auto.per_sample["a2"], numpy_ranks(ja2, eps_dtype=np.float32))
    forced = klr.local_rank(model, x, method="autodiff")
    for name in auto.per_sample:
        np.testing.assert_array_equal(auto.per_sample[name], forced.per_sample[name])


@pytest.mark.parametrize("method", ["analytic", "autodiff"])
def test_jit_compile_gives_the_same_numbers(method):
    model = mlp(16, [24, 24, 5], "relu", seed=7)
    x = gaussian(40, 16)
    plain = klr.local_rank(model, x, method=method, batch_size=16)
    xla = klr.local_rank(model, x, method=method, batch_size=16, jit_compile=True)
    for name in plain.per_sample:
        np.testing.assert_array_equal(plain.per_sample[name], xla.per_sample[name])


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_chunk_size_does_not_change_numbers(batch_size):
    model = mlp(12, [10, 10, 3], "relu", seed=8)
    x = gaussian(33, 12)
    ref = klr.local_rank(model, x, batch_size=33)
    got = klr.local_rank(model, x, batch_size=batch_size)
    for name in ref.per_sample:
        np.testing.assert_array_equal(ref.per_sample[name], got.per_sample[name])
        np.testing.assert_allclose(
            ref.stable_rank_per_sample[name], got.stable_rank_per_sample[name], rtol=1e-5
        )


@pytest.mark.parametrize("method", ["analytic", "autodiff"])
def test_mirrored_strategy_agrees_with_single_device(method):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) >= 2, "conftest splits the CPU into two logical devices"
    strategy = tf.distribute.MirroredStrategy(devices[:2])
    with strategy.scope():
        model = mlp(12, [10, 10, 3], "relu", seed=9)
    single = mlp(12, [10, 10, 3], "relu", seed=9)
    single.set_weights(model.get_weights())
    x = gaussian(30, 12)
    estimator = klr.LocalRankEstimator(model, method=method, batch_size=8)
    assert estimator._strategy is strategy
    dist = estimator(x)[0]
    ref = klr.local_rank(single, x, method=method)
    for name in ref.per_sample:
        np.testing.assert_array_equal(ref.per_sample[name], dist.per_sample[name])


def test_several_tolerances_in_one_pass_and_statistics():
    model = mlp(10, WIDTHS, "tanh", seed=3)
    x = gaussian(25, 10)
    est = klr.LocalRankEstimator(
        model, tolerances=(klr.Tolerance(), klr.Tolerance(atol=0.5))
    )
    exact, robust = est(x)
    assert est.trace_count == 1
    est(x)
    assert est.trace_count == 1
    ref_robust = klr.local_rank(model, x, atol=0.5)
    for name in exact.per_sample:
        np.testing.assert_array_equal(robust.per_sample[name], ref_robust.per_sample[name])
        assert np.all(robust.per_sample[name] <= exact.per_sample[name])
        v = exact.per_sample[name]
        assert exact.mean[name] == pytest.approx(v.mean())
        assert exact.std[name] == pytest.approx(v.std(ddof=1))
        assert exact.stderr[name] == pytest.approx(v.std(ddof=1) / np.sqrt(len(v)))
        assert exact.min[name] == v.min() and exact.max[name] == v.max()
    frame = exact.to_frame()
    assert list(frame["layer"]) == ["d0", "d1", "d2", "d3"]
    assert list(frame["bound"]) == [10, 5, 10, 9]
    for column in ("class", "units", "mean", "std", "stderr", "min", "max",
                   "effective_rank", "stable_rank"):
        assert column in frame


def test_layers_by_name_or_object_and_dataset_input(tmp_path):
    model = mlp(10, WIDTHS, "relu")
    x = gaussian(12, 10)
    by_name = klr.local_rank(model, x, layers=["d1"])
    by_obj = klr.local_rank(model, x, layers=[model.get_layer("d3")])
    assert list(by_name.per_sample) == ["d1"]
    assert list(by_obj.per_sample) == ["d3"]
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(12))).batch(5)
    from_ds = klr.local_rank(model, ds)
    np.testing.assert_array_equal(
        from_ds.per_sample["d1"], by_name.per_sample["d1"]
    )
    by_name.save(tmp_path / "t.csv")
    by_name.save(tmp_path / "t.json")
    assert (tmp_path / "t.csv").read_text().startswith("layer,class,units")


def test_unmeasurable_layer_is_skipped_with_warning():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    shared = keras.layers.Dense(6, name="shared")
    h = shared(shared(inp))
    out = keras.layers.Dense(2, name="head")(keras.layers.Dropout(0.1, name="drop")(h))
    model = keras.Model(inp, out)
    with pytest.warns(UserWarning, match="drop"):
        result = klr.local_rank(model, gaussian(5, 6), layers=["shared", "drop", "head"])
    # A shared layer is measured once per call (`layer@k`).
    assert list(result.per_sample) == ["shared@0", "shared@1", "head"]
    assert set(result.skipped) == {"drop"}


def test_progress_bar_only_when_verbose(capsys):
    model = mlp(12, [10, 3], "relu", seed=8)
    x = gaussian(20, 12)
    klr.local_rank(model, x, batch_size=5)
    assert capsys.readouterr().out == ""
    klr.local_rank(model, x, batch_size=5, verbose=1)
    assert "4/4" in capsys.readouterr().out
