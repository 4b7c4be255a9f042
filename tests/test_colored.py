"""Colored (compressed) forward mode of spatially local layers.

References: float64 Jacobians by central differences (`tests.reference`, no
automatic differentiation), `numpy.linalg.matrix_rank`'s rule on them, and
receptive fields composed by hand.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import keras
import keras_localrank as klr
from keras_localrank import colored, host_linalg
from keras_localrank.graph import cast_model, functional_graph
from keras_localrank.jacobians import preactivations
from keras_localrank.spectra import HOST_LAPACK_MIN_ORDER
from keras_localrank.taps import select_taps, tap_inputs_model
from tests.reference import finite_difference_jacobians, numpy_ranks

L = keras.layers


def _conv2d_chain():
    # Channel bottleneck (1 filter): rank(J_c2) <= 64 < n0 = 128.
    inp = keras.Input((8, 8, 2))
    h = L.Conv2D(1, 3, padding="same", activation="tanh")(inp)
    h = L.Conv2D(4, 3, padding="same", activation="tanh", name="c2")(h)
    h = L.Flatten()(h)
    return keras.Model(inp, L.Dense(3, name="head")(h))


def _strided_pooling():
    inp = keras.Input((11, 10, 2))
    h = L.Conv2D(6, 3, strides=2, padding="same", activation="tanh")(inp)
    h = L.BatchNormalization()(h)
    h = L.MaxPooling2D(2, strides=1, padding="valid")(h)
    h = L.Conv2D(16, 2, dilation_rate=2, padding="same", activation="tanh", name="c2")(h)
    h = L.AveragePooling2D(2, padding="same")(h)
    return keras.Model(inp, L.Conv2D(48, 2, padding="same", name="c3")(h))


def _residual_depthwise():
    inp = keras.Input((7, 6, 2))
    h = L.Conv2D(6, 3, padding="same", activation="tanh")(inp)
    d = L.DepthwiseConv2D(3, padding="same", activation="tanh", name="dw")(h)
    h = L.Add()([h, d])
    h = L.ZeroPadding2D(((1, 0), (0, 2)))(h)
    h = L.SeparableConv2D(8, 3, padding="valid", activation="tanh", name="sep")(h)
    c = L.Concatenate()([L.Cropping2D(((1, 0), (0, 1)))(h), L.Cropping2D(((0, 1), (1, 0)))(h)])
    return keras.Model(inp, L.Conv2D(8, 1, name="pointwise")(c))


def _conv1d():
    inp = keras.Input((20, 2))
    h = L.Conv1D(4, 3, padding="causal", activation="tanh")(inp)
    h = L.MaxPooling1D(2)(h)
    h = L.LayerNormalization()(h)
    h = L.Conv1D(8, 3, strides=2, padding="same", dilation_rate=1, activation="tanh", name="c2")(h)
    return keras.Model(inp, L.Conv1D(12, 2, padding="valid", name="c3")(h))


MODELS = {
    "conv2d_chain": _conv2d_chain,
    "strided_pooling": _strided_pooling,
    "residual_depthwise": _residual_depthwise,
    "conv1d": _conv1d,
}


def _build(name, seed=0):
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    # Non-trivial inference statistics for BatchNormalization.
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            rng = np.random.default_rng(seed)
            layer.set_weights([rng.uniform(0.5, 2, w.shape) for w in layer.get_weights()])
    shape = tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(seed + 1).standard_normal((3, *shape)).astype("float32")
    return model, x


def _colored_products(model, x):
    """`{tap: (coloring, [B, n_l, n0] recovered Jacobian)}` in float64."""
    m64 = cast_model(model, "float64")
    model_input = functional_graph(m64).inputs[0]
    out = {}
    for tap in select_taps(m64).taps:
        coloring = colored.tap_coloring(model_input, tap, tap.call.output_shape)
        if coloring is None:
            continue
        inputs_model = tap_inputs_model(m64, [tap])
        products = colored.colored_products(
            lambda z, im=inputs_model, t=tap: preactivations(im, [t], z),
            tf.constant(x, tf.float64),
            tf.constant(coloring.directions()),
            block=5,
        )
        out[tap.name] = (coloring, products)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_colored_jacobian_gram_and_ranks_equal_explicit(name):
    model, x = _build(name)
    found = _colored_products(model, x)
    assert len(found) >= 2  # every conv of these nets has a local Jacobian
    estimator = klr.LocalRankEstimator(model, method="exact")
    plans = estimator.plans
    ref = finite_difference_jacobians(model, x.astype(np.float64), list(plans))
    # The recovered Jacobian and the sparse Gram, entrywise.
    for tap_name, (coloring, products) in found.items():
        jac = colored.recover_jacobian(products, coloring).numpy()
        scale = np.abs(ref[tap_name]).max()
        np.testing.assert_allclose(jac, ref[tap_name], atol=1e-7 * scale, err_msg=tap_name)
        index, valid = coloring.indices()
        gram = colored.colored_gram(products, index, valid, coloring).numpy()
        expected = np.einsum("bri,brj->bij", ref[tap_name], ref[tap_name])
        np.testing.assert_allclose(gram, expected, atol=1e-7 * scale**2, err_msg=tap_name)
        # The same Gram from the recovered rows (BLAS on the host).
        rows = colored.colored_gram(products, index, valid, coloring, recovered=True).numpy()
        np.testing.assert_allclose(rows, expected, atol=1e-7 * scale**2, err_msg=tap_name)
    # The estimator's ranks: numpy's rule on the explicit Jacobians.
    local = [n for n, p in plans.items() if p.mode == "colored"]
    assert local, plans
    result = estimator(x)[0]
    frame = result.to_frame().set_index("layer")
    for tap_name, jac in ref.items():
        expected = numpy_ranks(jac, eps_dtype=np.float32)
        np.testing.assert_array_equal(result.per_sample[tap_name], expected, err_msg=tap_name)
        if tap_name in local:
            assert frame.loc[tap_name, "mode"] == "colored"
            assert frame.loc[tap_name, "directions"] == plans[tap_name].directions
            assert plans[tap_name].directions < x[0].size


def test_gram_in_several_position_blocks(monkeypatch):
    model, x = _build("strided_pooling")
    tap_name, (coloring, products) = next(iter(_colored_products(model, x).items()))
    index, valid = coloring.indices()
    whole = colored.colored_gram(products, index, valid, coloring).numpy()
    # Blocks of 4 positions (the last one padded): the same Gram.
    monkeypatch.setattr(colored, "LOCAL_GRAM_BYTES", 4 * 8 * coloring.num_colors**2)
    assert colored.positions_per_block(coloring) == 4
    assert coloring.positions % 4 != 0
    blocks = colored.colored_gram(products, index, valid, coloring).numpy()
    np.testing.assert_allclose(blocks, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())


def test_recovered_rows_gram_in_several_position_blocks(monkeypatch):
    model, x = _build("strided_pooling")
    tap_name, (coloring, products) = next(iter(_colored_products(model, x).items()))
    index, valid = coloring.indices()
    whole = colored.colored_gram(products, index, valid, coloring).numpy()
    channels = int(products.shape[-1]) // coloring.positions
    # Blocks of 4 positions (the last one padded): the same Gram.
    monkeypatch.setattr(colored, "LOCAL_GRAM_BYTES", 4 * 12 * channels * coloring.input_dim)
    assert colored.positions_per_rows_block(coloring, channels) == 4
    assert coloring.positions % 4 != 0
    blocks = colored.colored_gram(products, index, valid, coloring, recovered=True).numpy()
    np.testing.assert_allclose(blocks, whole, rtol=1e-12, atol=1e-12 * np.abs(whole).max())
    assert host_linalg.open_grams() == []


def test_recovered_rows_are_chosen_for_wide_windows_and_give_numpy_ranks(monkeypatch):
    model, x = _build("strided_pooling")
    n0 = x[0].size
    assert n0 >= HOST_LAPACK_MIN_ORDER
    plans = klr.LocalRankEstimator(model, method="exact").plans
    local = [n for n, p in plans.items() if p.mode == "colored"]
    coloring = next(iter(_colored_products(model, x).values()))[0]
    # The choice follows the cost model: many colours -> recovered rows.
    wide = dataclasses.replace(coloring, periods=tuple(s for s in coloring.input_shape[:-1]))
    assert colored.recovered_rows_are_cheaper(wide, rows=wide.units)
    assert not colored.recovered_rows_are_cheaper(
        dataclasses.replace(coloring, periods=(1,) * len(coloring.periods)), rows=10**6
    )
    # Every colored layer forced onto recovered rows: numpy's ranks.
    monkeypatch.setattr(colored, "SCATTER_ENTRY_MACS", 1e12)
    updates = []
    update = host_linalg.gram_update
    monkeypatch.setattr(host_linalg, "gram_update", lambda *a: updates.append(1) or update(*a))
    estimator = klr.LocalRankEstimator(model, method="exact")
    assert [n for n, p in estimator.plans.items() if p.mode == "colored"] == local
    result = estimator(x)[0]
    assert updates  # the rows went through the host Gram
    ref = finite_difference_jacobians(model, x.astype(np.float64), list(estimator.plans))
    for tap_name, jac in ref.items():
        expected = numpy_ranks(jac, eps_dtype=np.float32)
        np.testing.assert_array_equal(result.per_sample[tap_name], expected, err_msg=tap_name)


def test_colored_spectra_equal_dense_forward_mode():
    model, x = _build("residual_depthwise")
    fast = klr.LocalRankEstimator(model, method="exact")(x)[0]
    dense = klr.LocalRankEstimator(model, method="autodiff-forward")(x)[0]
    assert {i.mode for i in dense.layers} == {"forward"}
    assert "colored" in {i.mode for i in fast.layers}
    for tap_name in fast.per_sample:
        np.testing.assert_array_equal(fast.per_sample[tap_name], dense.per_sample[tap_name])
        for attr in ("effective_rank_per_sample", "stable_rank_per_sample"):
            np.testing.assert_allclose(
                getattr(fast, attr)[tap_name], getattr(dense, attr)[tap_name], rtol=1e-5
            )


def test_receptive_window_composed_by_hand():
    # keras.io MNIST convnet: conv 3 -> pool 2 -> conv 3: window 8, stride 2.
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(32, 3, activation="relu"),
        L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"),
        L.MaxPooling2D(2),
        L.Flatten(),
        L.Dense(10),
    ])
    taps = {t.name: t for t in select_taps(model).taps}
    model_input = functional_graph(model).inputs[0]
    first, second, head = (taps[layer.name] for layer in model.layers if layer.weights)
    assert colored.receptive_window(model_input, first) == colored.Window((1, 1), (0, 0), (2, 2))
    assert colored.receptive_window(model_input, second) == colored.Window((2, 2), (0, 0), (7, 7))
    assert colored.receptive_window(model_input, head) is None  # Flatten: not local
    coloring = colored.tap_coloring(model_input, second, second.call.output_shape)
    assert coloring.num_colors == 64
    # Structural, not numerical: a kernel of zeros keeps the same window.
    model.layers[2].set_weights([np.zeros_like(w) for w in model.layers[2].get_weights()])
    assert colored.receptive_window(model_input, second) == colored.Window((2, 2), (0, 0), (7, 7))
    # `same` padding with stride 2 on an odd size: TensorFlow pads 1 before.
    inp = keras.Input((9, 9, 1))
    out = L.Conv2D(2, 3, strides=2, padding="same")(inp)
    tap = select_taps(keras.Model(inp, out)).taps[0]
    assert colored.receptive_window(inp, tap) == colored.Window((2, 2), (-1, -1), (1, 1))


def test_unsupported_layer_falls_back():
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, padding="same", activation="tanh", name="before")(inp)
    h = L.UpSampling2D(2)(h)  # not analysed: full dependence assumed
    h = L.Conv2D(4, 3, padding="same", activation="tanh", name="after")(h)
    keras.utils.set_random_seed(0)
    model = keras.Model(inp, h)
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 2)).astype("float32")
    result = klr.local_rank(model, x, method="exact")
    frame = result.to_frame().set_index("layer")
    assert frame.loc["before", "mode"] == "colored"
    assert frame.loc["after", "mode"] in ("forward", "reverse")
    assert frame.loc["after", "directions"] == 72
    ref = finite_difference_jacobians(model, x.astype(np.float64), ["after"])
    np.testing.assert_array_equal(
        result.per_sample["after"], numpy_ranks(ref["after"], eps_dtype=np.float32)
    )


def test_float64_and_forced_modes_keep_dense_products():
    model, x = _build("conv2d_chain")
    for kwargs in ({"dtype": "float64"}, {"method": "autodiff-reverse"}):
        plans = klr.LocalRankEstimator(model, **kwargs).plans
        assert "colored" not in {p.mode for p in plans.values()}, kwargs


def test_memory_budget_bounds_colored_plan():
    model, x = _build("strided_pooling")
    free = klr.LocalRankEstimator(model, method="exact")
    assert free.plans["c2"].mode == "colored"
    need = free._colored_bytes(free._work_taps["c2"])
    budget = 2 * need + 64 * free._per_replica_bytes
    tight = klr.LocalRankEstimator(model, ["c2"], method="exact", memory_budget=budget)
    assert tight.plans["c2"].mode == "colored"
    assert tight.batch_size < free.batch_size
    assert tight.estimated_peak_bytes <= budget
    np.testing.assert_array_equal(tight(x)[0].per_sample["c2"], free(x)[0].per_sample["c2"])
    # A budget below one sample's colored Gram: the dense products are used.
    small = klr.LocalRankEstimator(model, ["c2"], method="exact", memory_budget=need // 2)
    assert small.plans["c2"].mode != "colored"
    assert small.estimated_peak_bytes <= need // 2


def test_recovered_rows_in_a_graph_with_a_batch_of_unknown_size(monkeypatch):
    # `measure_tensor` traced for any batch size (as in a custom training
    # loop) once failed on recovered rows: the flattened layer outputs lose
    # their static width when the batch size is unknown (the width now comes
    # from the plan).
    model, x = _build("strided_pooling")
    monkeypatch.setattr(colored, "SCATTER_ENTRY_MACS", 1e12)
    estimator = klr.LocalRankEstimator(model, method="exact")
    assert any(estimator._recovered.values())
    measure = tf.function(
        estimator.measure_tensor,
        input_signature=[tf.TensorSpec([None, *x.shape[1:]], tf.float32)],
    )
    graph = measure(tf.constant(x))
    eager = estimator(x)[0]
    for name, ranks in eager.per_sample.items():
        np.testing.assert_array_equal(graph[name][0][0].numpy(), ranks, err_msg=name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_window_gram_on_the_host_equals_explicit(name, monkeypatch):
    # The local Grams added to their windows' blocks of J^T J (strided views
    # of the Gram, no scatter) against the float64 reference, for 1-D and
    # 2-D inputs, strides, dilation, pooling, padding, depthwise and
    # separable layers; then the estimator's ranks through that path.
    model, x = _build(name)
    found = _colored_products(model, x)
    ref = finite_difference_jacobians(model, x.astype(np.float64), list(found))
    for tap_name, (coloring, products) in found.items():
        assert coloring.windows is not None, tap_name
        gram = host_linalg.window_gram(products.numpy(), coloring.windows, coloring.input_shape)
        expected = np.einsum("bri,brj->bij", ref[tap_name], ref[tap_name])
        scale = np.abs(ref[tap_name]).max() ** 2
        np.testing.assert_allclose(gram, expected, atol=1e-7 * scale, err_msg=tap_name)
    monkeypatch.setattr(colored, "WINDOW_MIN_COLOURS", 0)
    used = []
    window = host_linalg.window_gram
    monkeypatch.setattr(host_linalg, "window_gram", lambda *a: used.append(1) or window(*a))
    estimator = klr.LocalRankEstimator(model, method="exact")
    result = estimator(x)[0]
    on_host = x[0].size >= HOST_LAPACK_MIN_ORDER
    assert bool(used) == on_host
    for tap_name, jac in ref.items():
        expected = numpy_ranks(jac, eps_dtype=np.float32)
        np.testing.assert_array_equal(result.per_sample[tap_name], expected, err_msg=tap_name)


def test_window_gram_splits_one_sample_over_the_cores(monkeypatch):
    # One sample, positions in several blocks (a small block size), two
    # partial Grams: the same Gram as one worker alone.
    model, x = _build("strided_pooling")
    coloring, products = _colored_products(model, x[:1])["c3"]
    p = products.numpy()
    monkeypatch.setattr(host_linalg, "WINDOW_BLOCK_BYTES", 8 * 50 * 50)
    monkeypatch.setattr(host_linalg, "_workers", lambda: 2)
    split = host_linalg.window_gram(p, coloring.windows, coloring.input_shape)
    monkeypatch.setattr(host_linalg, "_workers", lambda: 1)
    alone = host_linalg.window_gram(p, coloring.windows, coloring.input_shape)
    np.testing.assert_allclose(split, alone, rtol=0, atol=1e-12 * np.abs(alone).max())
    np.testing.assert_allclose(split, np.swapaxes(split, 1, 2), rtol=0, atol=0)
