"""Tolerance semantics against numpy.linalg.matrix_rank, and every input error."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank.spectra import Tolerance, rank_from_singular_values


def matrices_with_spectrum(rng, m, n, spectrum):
    u = np.linalg.qr(rng.standard_normal((m, m)))[0][:, : len(spectrum)]
    v = np.linalg.qr(rng.standard_normal((n, n)))[0][:, : len(spectrum)]
    return (u * spectrum) @ v.T


SPECTRA = [
    [5.0, 1.0, 1e-3, 1e-5, 1e-9],
    [1.0, 0.5, 0.25, 0.125],
    [3.0, 3.0, 2e-6, 1e-7],
]


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize(
    "atol,rtol", [(None, None), (None, 1e-2), (1e-4, None), (0.0, 0.0), (1e-4, 0.3)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rank_rule_matches_numpy(spectrum, atol, rtol, dtype):
    rng = np.random.default_rng(0)
    mats = np.stack([matrices_with_spectrum(rng, 7, 9, spectrum) for _ in range(3)]).astype(dtype)
    s = np.linalg.svd(mats, compute_uv=False)
    got = rank_from_singular_values(
        tf.constant(s), Tolerance(atol=atol, rtol=rtol), shape=(7, 9), dtype=dtype
    ).numpy()
    if atol is None:
        r = rtol if rtol is not None else np.finfo(dtype).eps * 9
        expected = [np.linalg.matrix_rank(a, rtol=r) for a in mats]
    else:  # torch's rule max(atol, rtol * sigma_max); numpy's `tol` when rtol is 0
        expected = [
            np.linalg.matrix_rank(a, tol=max(atol, (rtol or 0.0) * np.linalg.norm(a, 2)))
            for a in mats
        ]
    np.testing.assert_array_equal(got, expected)


def test_float32_jacobian_ranked_with_float64_eps_reports_noise_as_rank():
    """The pitfall in DESIGN.md: eps must be that of the computed precision."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 8)) @ rng.standard_normal((8, 64))  # rank 8
    a32 = a.astype(np.float32)
    s = np.linalg.svd(a32, compute_uv=False)  # float32 rounding noise ~1e-6
    assert np.linalg.matrix_rank(a32) == 8  # numpy uses float32 eps for float32
    as64 = tf.constant(s.astype(np.float64))
    wrong = rank_from_singular_values(as64, Tolerance(), shape=(64, 64), dtype="float64")
    right = rank_from_singular_values(as64, Tolerance(), shape=(64, 64), dtype="float32")
    assert int(right) == 8
    assert int(wrong) > 8


def test_effective_and_stable_rank_closed_forms():
    s = tf.constant([[4.0, 2.0, 2.0, 0.0]], tf.float64)
    p = np.array([0.5, 0.25, 0.25])
    assert klr.effective_rank(s).numpy()[0] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert klr.stable_rank(s).numpy()[0] == pytest.approx((16 + 4 + 4) / 16)


# ---- errors -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu", name="h"),
         keras.layers.Dense(2, name="out")]
    )


X = np.ones((5, 4), np.float32)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (np.full((3, 4), np.nan, np.float32), ValueError, "NaN or Inf"),
        (np.array([[0, 1, 2, np.inf]], np.float32), ValueError, "first at index 0"),
        (np.zeros((0, 4), np.float32), ValueError, "non-empty"),
        (np.ones((3, 5), np.float32), ValueError, r"shape \(3, 5\)"),
        (np.ones((3, 4), np.int64), TypeError, "dtype int64"),
        (np.array([["a"] * 4]), TypeError, "floating-point"),
        ((row for row in X), TypeError, r"type generator .*np\.concatenate"),
        (iter(X), TypeError, "iterator"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0]], TypeError, "type list"),
        (tf.data.Dataset.from_tensor_slices(X), ValueError,
         r"single samples, element shape \(4,\); call `x.batch\(batch_size\)`"),
        (tf.data.Dataset.from_tensor_slices((X, np.zeros(5))), ValueError,
         r"single samples.*batch\("),
    ],
)
def test_bad_x(model, x, error, match):
    with pytest.raises(error, match=match):
        klr.local_rank(model, x)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"atol": -1.0}, ValueError, "atol=-1"),
        ({"rtol": -0.5}, ValueError, "rtol=-0.5"),
        ({"atol": float("nan")}, ValueError, "atol=nan"),
        ({"atol": "1e-2"}, TypeError, "atol='1e-2'"),
        ({"layers": ["nope"]}, ValueError, "'nope'"),
        ({"layers": [3]}, TypeError, "Received: 3"),
        ({"layers": []}, ValueError, "`layers` is empty"),
        ({"method": "magic"}, ValueError, "method='magic'"),
        ({"batch_size": 0}, ValueError, "batch_size=0"),
        ({"dtype": "float16"}, ValueError, "dtype='float16'"),
        ({"max_samples": 2.5}, TypeError, "max_samples=2.5"),
        ({"max_samples": "3"}, TypeError, "max_samples='3'"),
        ({"max_samples": 0}, ValueError, "max_samples=0"),
        ({"verbose": "yes"}, TypeError, "verbose='yes'"),
        ({"verbose": -1}, ValueError, "verbose=-1"),
    ],
)
def test_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        klr.local_rank(model, X, **kwargs)


def test_batched_dataset_and_max_samples(model):
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    from_dataset = klr.local_rank(model, tf.data.Dataset.from_tensor_slices(x).batch(3),
                                  max_samples=7)
    from_array = klr.local_rank(model, x[:7])
    for name, ranks in from_array.per_sample.items():
        np.testing.assert_array_equal(from_dataset.per_sample[name], ranks)


def test_not_a_model():
    with pytest.raises(TypeError, match="keras.Model"):
        klr.local_rank(lambda x: x, X)


def test_unbuilt_model():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="unbuilt"):
        klr.local_rank(model, X)


def test_several_float_inputs_need_wrt():
    a, b = keras.Input((2,)), keras.Input((2,))
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    with pytest.raises(ValueError, match="several float inputs.*pass `wrt`"):
        klr.local_rank(model, X)


def test_no_measurable_layer():
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Activation("tanh")(inp))
    with pytest.raises(ValueError, match="no measurable layer"):
        klr.local_rank(model, X)


def test_integer_model_input():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Dense(2)(keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32"))(inp))
    model = keras.Model(inp, h)
    with pytest.raises(TypeError, match="float input"):
        klr.local_rank(model, X)


def test_analytic_method_refuses_layers_it_cannot_do():
    inp = keras.Input((3, 4))
    model = keras.Model(inp, keras.layers.Conv1D(2, 2, name="conv")(inp))
    with pytest.raises(ValueError, match="'conv'"):
        klr.local_rank(model, np.ones((2, 3, 4), np.float32), method="analytic")


def test_save_rejects_unknown_suffix(model, tmp_path):
    with pytest.raises(ValueError, match="table.txt"):
        klr.local_rank(model, X).save(tmp_path / "table.txt")


@pytest.mark.parametrize("order", [5, 200])
def test_symmetric_eigenvalues_match_numpy_eagerly_in_graphs_and_under_xla(order):
    from keras_localrank.spectra import symmetric_eigenvalues

    rng = np.random.default_rng(order)
    a = rng.normal(size=(3, order, order + 2))
    grams = a @ np.swapaxes(a, 1, 2)
    expected = np.linalg.eigvalsh(grams)

    @tf.function(input_signature=[tf.TensorSpec([None, order, order], tf.float64)])
    def graph(g):
        return symmetric_eigenvalues(g)

    @tf.function(jit_compile=True)
    def compiled(g):  # a tf.numpy_function cannot run here: TF's op is used
        return symmetric_eigenvalues(g)

    for out in (symmetric_eigenvalues(tf.constant(grams)), graph(tf.constant(grams)),
                compiled(tf.constant(grams))):
        assert out.shape == (3, order)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9 * expected.max())
    assert graph.get_concrete_function().structured_outputs.shape.as_list() == [None, order]


def test_symmetric_eigenvalues_of_unknown_order_handle_empty_matrices():
    from keras_localrank.spectra import symmetric_eigenvalues

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float64)])
    def unknown(g):  # order unknown at trace time: the host's LAPACK path
        return symmetric_eigenvalues(g)

    assert unknown(tf.zeros((2, 0, 0), tf.float64)).numpy().shape == (2, 0)
    assert unknown(tf.zeros((0, 3, 3), tf.float64)).numpy().shape == (0, 3)
    g = np.diag([3.0, 1.0, 2.0])[None]
    np.testing.assert_allclose(unknown(tf.constant(g)).numpy(), [[1.0, 2.0, 3.0]])
