"""Tests of the convnet rewrites: factorized convolutions, BatchNorm folding,
channel pruning, conv floors, cost budgets, and their errors.

References are independent: the original Keras model's outputs (every
rewrite must compute the same function), NumPy SVDs and
`numpy.linalg.matrix_rank` of kernels built with a known rank, and MAC
counts of the rebuilt model by the registry's per-layer rule.
"""

import os

import keras
import numpy as np
import pytest

from compress import (
    ConvFactors,
    EnergyFraction,
    GreedyParamFraction,
    InfeasibleBudgetError,
    ParamFraction,
    conv_channel_floors,
    count_macs,
    count_params,
    factorize_convs,
    fold_batchnorm,
    local_rank_compress,
    prune_constant_channels,
    weight_factorize,
)
from compress.channels import remove_channels
from compress.conv import (
    channel_projection_factors,
    channel_svd_factors,
    spatial_factors,
    tucker2_factors,
)
from compress.costs import mac_cost, param_cost
from compress.registry import rewritable_layers
from compress.statistics import calibration_statistics

RNG = np.random.default_rng(0)


def _run(model, x):
    """The model's outputs at inference (a direct call: no predict loop to trace)."""
    return keras.ops.convert_to_numpy(model(x, training=False))

CONVS = {
    "conv2d_same_strided": (
        lambda: keras.layers.Conv2D(
            6, (3, 2), strides=(2, 1), padding="same", activation="relu", name="c"
        ),
        (9, 8, 4),
    ),
    "conv2d_valid_dilated": (
        lambda: keras.layers.Conv2D(
            6, 3, dilation_rate=(2, 1), padding="valid", activation="tanh", name="c"
        ),
        (9, 8, 4),
    ),
    "conv2d_same_dilated_nobias": (
        lambda: keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same", use_bias=False,
                                    name="c"),
        (7, 9, 3),
    ),
    "conv1d_same_strided": (
        lambda: keras.layers.Conv1D(5, 3, strides=2, padding="same", name="c"),
        (11, 3),
    ),
    "conv1d_causal_dilated": (
        lambda: keras.layers.Conv1D(5, 3, dilation_rate=2, padding="causal", activation="relu",
                                    name="c"),
        (11, 3),
    ),
}


def _single_conv(key, seed=0):
    keras.utils.set_random_seed(seed)
    make, shape = CONVS[key]
    inp = keras.Input(shape)
    out = keras.layers.Flatten()(make()(inp))
    model = keras.Model(inp, out)
    layer = model.get_layer("c")
    if layer.use_bias:
        layer.bias.assign(RNG.normal(size=layer.bias.shape).astype("float32"))
    return model, RNG.normal(size=(6,) + shape).astype("float32")


def _full_rank_factors(layer, scheme, x_model, x):
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    cin, cout = kernel.shape[-2:]
    if scheme == "projection":  # the data-aware factors, on the measured basis
        st = calibration_statistics(x_model, x, [layer.name])[layer.name]
        _, basis = np.linalg.eigh(st.covariance + np.outer(st.mean, st.mean))
        return channel_projection_factors(kernel, bias, basis[:, ::-1], st.mean)
    if scheme == "channel_svd":
        return channel_svd_factors(kernel, bias, cout)
    if scheme == "tucker2":
        return tucker2_factors(kernel, bias, cout, cin)
    kh, kw = kernel.shape[:2]
    return spatial_factors(kernel, bias, min(kh * cin, kw * cout))


@pytest.mark.parametrize("key", sorted(CONVS))
@pytest.mark.parametrize("scheme", ["projection", "channel_svd", "tucker2", "spatial"])
def test_full_rank_conv_rewrites_are_exact(key, scheme):
    model, x = _single_conv(key)
    layer = model.get_layer("c")
    if scheme == "spatial" and len(layer.kernel.shape) != 4:
        with pytest.raises(ValueError, match="Conv2D kernel"):
            _full_rank_factors(layer, scheme, model, x)
        return
    new = factorize_convs(model, {"c": _full_rank_factors(layer, scheme, model, x)})
    assert len(new.layers) == len(model.layers) + (2 if scheme == "tucker2" else 1)
    np.testing.assert_allclose(
        _run(new, x), _run(model, x), atol=2e-5, rtol=1e-5
    )


def _low_rank_conv_model(rank, *, cin=3, cout=8, padding="same", seed=1):
    """Conv2D whose kernel matrix `(3*3*cin) x cout` has rank `rank` by construction."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inp = keras.Input((8, 8, cin))
    h = keras.layers.Conv2D(cout, 3, padding=padding, activation="relu", name="c")(inp)
    h = keras.layers.Conv2D(4, 3, padding="valid", activation="relu", name="d")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    a = rng.normal(size=(9 * cin, rank))
    b = rng.normal(size=(rank, cout))
    layer = model.get_layer("c")
    layer.kernel.assign((a @ b).reshape(3, 3, cin, cout).astype("float32") * 0.3)
    layer.bias.assign(rng.normal(size=cout).astype("float32") * 0.1)
    return model


def test_conv_with_known_channel_rank_is_compressed_to_it_without_loss():
    rank = 3
    model = _low_rank_conv_model(rank)
    kernel = keras.ops.convert_to_numpy(model.get_layer("c").kernel)
    assert np.linalg.matrix_rank(kernel.reshape(-1, 8)) == rank  # float32 eps: stored precision
    x = RNG.normal(size=(64, 8, 8, 3)).astype("float32")
    out = local_rank_compress(
        model, x, EnergyFraction(1.0), layers=["c"], floor=False, prune=False
    )
    assert out.ranks == {"c": rank}
    assert out.model.get_layer("c_reduce").kernel.shape == (3, 3, 3, rank)
    assert out.model.get_layer("c").kernel.shape == (1, 1, rank, 8)
    np.testing.assert_allclose(
        _run(out.model, x), _run(model, x), atol=1e-4, rtol=1e-4
    )
    assert count_params(out.model) < count_params(model)


def test_conv_channel_floor_of_known_rank_first_layer():
    # First layer, 'valid' padding: the channels at one position are K^T applied
    # to one input patch, so their Jacobian (data-shaped with full-rank data)
    # has rank rank(K) at every position.
    rank = 2
    model = _low_rank_conv_model(rank, padding="valid")
    kernel = keras.ops.convert_to_numpy(model.get_layer("c").kernel)
    expected = np.linalg.matrix_rank(kernel.reshape(-1, 8))
    x = RNG.normal(size=(6, 8, 8, 3)).astype("float32")
    floors, skipped = conv_channel_floors(model, x, ["c"], rtol=1e-3, positions_per_axis=2)
    assert skipped == {}
    assert floors == {"c": expected} and expected == rank
    # Too costly to measure: named, with floor 1 implied, never silent.
    floors, skipped = conv_channel_floors(model, x, ["c"], max_entries=10)
    assert floors == {} and "max_entries" in skipped["c"]


def _bn_model(kind):
    keras.utils.set_random_seed(2)
    if kind == "dense":
        inp = keras.Input((5,))
        h = keras.layers.Dense(4, use_bias=False, name="lin")(inp)
    elif kind == "conv1d":
        inp = keras.Input((9, 3))
        h = keras.layers.Conv1D(4, 3, strides=2, padding="same", name="lin")(inp)
    elif kind == "depthwise":
        inp = keras.Input((6, 6, 2))
        h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="lin")(inp)
    else:
        inp = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="lin")(inp)
    h = keras.layers.BatchNormalization(name="bn", epsilon=1e-2)(h)
    out = keras.layers.Activation("relu", name="act")(h)
    model = keras.Model(inp, out)
    bn = model.get_layer("bn")
    n = bn.gamma.shape[0]
    bn.gamma.assign(RNG.normal(size=n).astype("float32"))
    bn.beta.assign(RNG.normal(size=n).astype("float32"))
    bn.moving_mean.assign(RNG.normal(size=n).astype("float32"))
    bn.moving_variance.assign(RNG.uniform(0.2, 3.0, size=n).astype("float32"))
    x = RNG.normal(size=(5,) + tuple(inp.shape[1:])).astype("float32")
    return model, x


@pytest.mark.parametrize("kind", ["dense", "conv1d", "conv2d", "depthwise"])
def test_batchnorm_folding_is_exact(kind):
    model, x = _bn_model(kind)
    folded, record = fold_batchnorm(model)
    assert record.folded == {"bn": "lin"} and record.skipped == {}
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in folded.layers)
    assert folded.get_layer("lin").use_bias
    np.testing.assert_allclose(
        _run(folded, x), _run(model, x), atol=1e-5, rtol=1e-5
    )
    assert len(model.layers) == len(folded.layers) + 1  # the input model is untouched


def test_batchnorm_that_cannot_fold_is_named():
    inp = keras.Input((6, 6, 2))
    h = keras.layers.BatchNormalization(name="bn_in")(inp)  # no layer before it
    h = keras.layers.Conv2D(3, 3, activation="relu", name="c")(h)
    h = keras.layers.BatchNormalization(name="bn_after_act")(h)
    model = keras.Model(inp, h)
    new, record = fold_batchnorm(model)
    assert new is model and record.folded == {}
    assert "InputLayer" in record.skipped["bn_in"]
    assert "activation" in record.skipped["bn_after_act"]


def _residual_with_dead_channels():
    """Stem -> [conv a -> BN -> relu -> conv b -> BN] + stem -> relu -> conv c -> head.

    BN of `a` is set so that channels 1 and 3 of `a` are constant after the
    ReLU (0 and 0.7); `c` has a constant channel 2 (0.5 after ReLU).
    """
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)  # own stream: the counts below must not depend on order
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inp)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn0")(h))
    a = keras.layers.Conv2D(5, 3, padding="same", name="a")(h)
    a = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="bna")(a))
    b = keras.layers.Conv2D(6, 3, padding="valid", name="b")(a)
    b = keras.layers.BatchNormalization(name="bnb")(b)
    h = keras.layers.Cropping2D(1)(h)
    h = keras.layers.ReLU()(keras.layers.Add(name="add")([h, b]))
    c = keras.layers.Conv2D(4, 3, padding="valid", activation="relu", name="c")(h)
    c = keras.layers.MaxPooling2D()(c)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(c))
    model = keras.Model(inp, out)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, size=n).astype("float32"))
            layer.beta.assign(rng.normal(size=n).astype("float32"))
            layer.gamma.assign(rng.normal(size=n).astype("float32"))
    bna = model.get_layer("bna")  # live channels: standardized, active half the time
    bna.moving_mean.assign(np.zeros(5, "float32"))
    bna.moving_variance.assign(np.ones(5, "float32"))
    bna.gamma.assign(np.array([1.0, 0.0, 1.0, 0.0, 1.0], "float32"))
    bna.beta.assign(np.array([0.0, -1.0, 0.0, 0.7, 0.0], "float32"))
    c = model.get_layer("c")
    kernel, bias = c.kernel.numpy(), c.bias.numpy()
    kernel = np.abs(kernel)  # its input is >= 0 (after ReLU): live channels stay active
    kernel[..., 2] = 0.0
    bias[:] = [0.1, 0.1, 0.5, 0.1]
    c.kernel.assign(kernel)
    c.bias.assign(bias)
    return model, rng.normal(size=(32, 8, 8, 3)).astype("float32")


@pytest.mark.parametrize("fold_first", [True, False])
def test_dead_channel_pruning_next_to_a_residual_add_is_exact(fold_first):
    model, x = _residual_with_dead_channels()
    work = fold_batchnorm(model)[0] if fold_first else model
    pruned, record = prune_constant_channels(work, x)
    # `a` (inside the block, into a 'valid' conv) loses both constant channels,
    # including the non-zero one; `c` (through MaxPooling and Flatten) loses one.
    assert record.removed == {"a": 2, "c": 1}
    assert pruned.get_layer("a").kernel.shape[-1] == 3
    assert pruned.get_layer("b").kernel.shape[-2] == 3
    assert pruned.get_layer("head").kernel.shape[0] == 2 * 2 * 3  # positions x channels
    if not fold_first:
        assert pruned.get_layer("bna").gamma.shape == (3,)
    # The stem and `b` feed the residual sum: kept, and said so.
    assert "Add" in record.skipped["b"] and "2 layers" in record.skipped["stem"]
    np.testing.assert_allclose(
        _run(pruned, x), _run(model, x), atol=2e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="Add"):
        remove_channels(work, {"b": {0: 0.0}})


def test_nonzero_constant_into_a_padded_conv_is_kept_and_noted():
    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 6, 2))
    a = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="a")(inp)
    b = keras.layers.Conv2D(2, 3, padding="same", name="b")(a)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(b))
    model = keras.Model(inp, out)
    layer = model.get_layer("a")
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    kernel[..., :2] = 0.0
    bias[:2] = [0.0, 0.4]  # channel 0 dead (0), channel 1 constant 0.4
    layer.kernel.assign(kernel)
    layer.bias.assign(bias)
    blay = model.get_layer("b")
    kb, bb = blay.kernel.numpy(), blay.bias.numpy()
    kb[..., 1] = 0.0  # `b` channel 1: the constant -0.3, through GAP into Dense
    bb[1] = -0.3
    blay.kernel.assign(kb)
    blay.bias.assign(bb)
    x = RNG.normal(size=(16, 6, 6, 2)).astype("float32")
    pruned, record = prune_constant_channels(model, x)
    assert record.removed == {"a": 1, "b": 1}
    assert record.skipped == {"a": "1 constant channel(s) kept: consumer pads ('same')"}
    assert pruned.get_layer("a").kernel.shape[-1] == 2
    assert pruned.get_layer("head").kernel.shape == (1, 2)
    np.testing.assert_allclose(
        _run(pruned, x), _run(model, x), atol=1e-5, rtol=1e-5
    )


def _small_resnet(seed=5):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((10, 10, 2))
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(h)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(a)
    h = keras.layers.ReLU()(keras.layers.Add()([h, b]))
    c = keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="c")(h)
    d = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(c)
    g = keras.layers.GlobalAveragePooling2D()(d)
    return keras.Model(inp, keras.layers.Dense(3, name="head")(g))


@pytest.mark.parametrize("method", ["local_rank", "weight_svd", "spatial", "tucker2"])
def test_compressed_convnets_round_trip_through_keras_files(tmp_path, method):
    model = _small_resnet()
    x = RNG.normal(size=(24, 10, 10, 2)).astype("float32")
    if method == "local_rank":
        out = local_rank_compress(model, x, 0.6, floor=False)
    else:
        scheme = {"weight_svd": "channel"}.get(method, method)
        out = weight_factorize(model, 0.6, scheme=scheme)
    assert out.method == method and out.ranks
    assert out.skipped == {"dw": "DepthwiseConv2D layers are not rewritten by this method"}
    assert count_params(out.model) <= 0.6 * count_params(model)
    path = os.path.join(tmp_path, "m.keras")
    out.model.save(path)
    loaded = keras.models.load_model(path)  # stock layers only: no custom objects
    np.testing.assert_allclose(
        _run(loaded, x), _run(out.model, x), atol=1e-6
    )


@pytest.mark.parametrize("cost", ["params", "macs"])
def test_budget_in_params_or_macs_is_met_and_priced_like_the_model(cost):
    model = _small_resnet()
    x = RNG.normal(size=(32, 10, 10, 2)).astype("float32")
    y = RNG.integers(0, 3, size=32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    count = count_macs if cost == "macs" else count_params
    out = local_rank_compress(
        model, x, GreedyParamFraction(0.5), floor=False, cost=cost,
        evaluate=lambda m: float(loss(y, m.predict_on_batch(x))),
    )
    assert out.budget_kind == cost
    assert count(out.model) <= 0.5 * count(model)
    assert count(out.model) > 0.3 * count(model)  # the budget is spent, not wasted
    with pytest.raises(InfeasibleBudgetError, match="Impossible budget"):
        local_rank_compress(model, x, ParamFraction(0.01), floor=False, cost=cost)


@pytest.mark.parametrize("scheme", ["channel", "spatial", "tucker2"])
def test_factorized_shapes_price_layers_like_the_registry_counts(scheme):
    # The per-layer prices a policy uses (LayerShapes) must add up to the
    # counts of the model actually built (count_params, count_macs).
    from compress.weight_only import _conv_candidate

    model = _small_resnet()
    convs = ["stem", "a", "b", "c"]
    out = weight_factorize(model, EnergyFraction(0.6), scheme=scheme, layers=convs, fold_bn=False)
    assert set(out.ranks) == set(convs)
    for fn, counter in ((param_cost, count_params), (mac_cost, count_macs)):
        expected = counter(model)
        for name, rank in out.ranks.items():
            c = _conv_candidate(model.get_layer(name), scheme)
            expected += sum(fn(s) for s in c.factor_shapes(rank))
            expected -= sum(fn(s) for s in c.original_shapes())
        assert counter(out.model) == expected


def test_layers_it_cannot_rewrite_are_named_and_bad_input_is_rejected():
    inp = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(inp)
    h = keras.layers.Conv2DTranspose(4, 3, name="transposed")(h)
    h = keras.layers.SeparableConv2D(4, 3, name="separable")(h)
    h = keras.layers.Conv2D(3, 1, name="ok")(h)
    model = keras.Model(inp, h)
    dense, convs, skipped = rewritable_layers(model)
    assert dense == [] and [la.name for la in convs] == ["ok"]
    assert "groups=2" in skipped["grouped"]
    assert "Conv2DTranspose" in skipped["transposed"]
    assert "SeparableConv2D" in skipped["separable"]
    layer = model.get_layer("ok")
    with pytest.raises(ValueError, match="factors matching layer 'ok'"):
        factorize_convs(
            model, {"ok": ConvFactors("channel", (np.zeros((3, 3, 4, 2)), np.zeros((1, 1, 2, 3))),
                                      np.zeros(3))}
        )
    with pytest.raises(ValueError, match="scheme"):
        factorize_convs(model, {"ok": ConvFactors("cp", (np.zeros((1, 1, 4, 3)),), None)})
    with pytest.raises(ValueError, match="scheme"):
        weight_factorize(model, 0.5, scheme="cp")
    with pytest.raises(ValueError, match="cost"):
        local_rank_compress(model, RNG.normal(size=(4, 6, 6, 4)).astype("float32"), 0.5,
                            cost="flops")
    assert layer.kernel.shape == (1, 1, 4, 3)


def _transfer_model():
    """`head(block(base(x)), block(base(x)))` with one call of `base`: a
    functional base with a BatchNorm, a Sequential block called twice, and a
    name (`head`) used both inside the block and outside."""
    keras.utils.set_random_seed(3)
    b_in = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(16, 3, name="c")(b_in)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    base = keras.Model(b_in, keras.layers.GlobalAveragePooling2D()(h), name="base")
    block = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(12, activation="relu", name="head")], name="blk"
    )
    inp = keras.Input((6, 6, 4))
    h = base(inp)
    h = keras.layers.Concatenate()([block(h), block(h)])
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    bn = base.get_layer("bn")
    bn.set_weights([RNG.uniform(0.5, 2, 16), RNG.normal(size=16), RNG.normal(size=16),
                    RNG.uniform(0.5, 2, 16)])
    return model


def test_flatten_nested_inlines_the_base_with_the_same_function(tmp_path):
    from compress.graph import flatten_nested

    model = _transfer_model()
    flat = flatten_nested(model)
    base = model.get_layer("base")
    concatenate = model.layers[-2]
    assert [la.name for la in flat.layers[1:]] == [
        *(la.name for la in base.layers[1:]), "blk_head", concatenate.name, "head"
    ]
    assert not any(isinstance(la, keras.Model) for la in flat.layers)
    assert count_params(flat) == count_params(model)
    x = RNG.normal(size=(5, 6, 6, 4)).astype("float32")
    np.testing.assert_array_equal(flat.predict(x, verbose=0), model.predict(x, verbose=0))
    flat.save(tmp_path / "flat.keras")
    loaded = keras.models.load_model(tmp_path / "flat.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert flatten_nested(flat) is flat
    assert model.get_layer("base").get_layer("c").kernel.shape == (3, 3, 4, 16)  # untouched


def test_layers_inside_a_nested_base_are_rewritten():
    model = _transfer_model()
    x = RNG.normal(size=(64, 6, 6, 4)).astype("float32")
    out = local_rank_compress(model, x, 0.7, floor=False)
    assert out.folded == {"bn": "c"}
    assert "c" in out.ranks and "base" not in out.skipped
    assert "inlined" in out.notes["base"]
    assert count_params(out.model) <= 0.7 * count_params(model)
    svd = weight_factorize(model, 0.6)
    assert "c" in svd.ranks and "base" not in svd.skipped


def test_calibration_statistics_of_a_strided_valid_conv_match_numpy():
    # Regression: rows were counted on the layer's input (9 x 8 positions),
    # not on its output (4 x 3 for this strided 'valid' conv).
    keras.utils.set_random_seed(6)
    inp = keras.Input((9, 8, 2))
    out = keras.layers.Conv2D(3, 3, strides=2, padding="valid", activation="relu", name="c")(inp)
    model = keras.Model(inp, out)
    x = RNG.normal(size=(10, 9, 8, 2)).astype("float32")
    layer = model.get_layer("c")
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    patches = np.stack(  # independent pre-activation: explicit windows
        [
            x[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :].reshape(10, -1)
            for i in range(4)
            for j in range(3)
        ],
        axis=1,
    ).astype(np.float64)
    pre = (patches @ kernel.reshape(-1, 3) + bias).reshape(-1, 3)
    st = calibration_statistics(model, x, ["c"], batch_size=4)["c"]
    assert st.count == 10 * 4 * 3
    np.testing.assert_allclose(st.mean, pre.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(st.covariance, np.cov(pre, rowvar=False, bias=True), atol=1e-5)
    np.testing.assert_allclose(st.out_max, np.maximum(pre, 0).max(axis=0), atol=1e-5)
    np.testing.assert_allclose(st.input_mean, x.reshape(-1, 2).mean(axis=0), atol=1e-6)


def test_greedy_allocation_spends_a_mac_budget_where_positions_are_many():
    # Two convolutions with the same kernel and spectrum; `wide` runs at 64
    # output positions, `narrow` at 1. Each rank dropped costs the same loss, so
    # per MAC saved the greedy step must cut `wide` only; per parameter the
    # two are alike.
    from compress.policies import Candidate

    spectrum = np.ones(8)
    wide, narrow = (
        Candidate(name, 36, 8, True, spectrum, kernel_shape=(3, 3, 4, 8), positions=p)
        for name, p in (("wide", 64), ("narrow", 1))
    )

    def loss(ranks):
        return sum(8 - r for r in ranks.values()) / 16

    full = {"macs": sum(mac_cost(s) for c in (wide, narrow) for s in c.original_shapes())}
    ranks = GreedyParamFraction(0.7).select(
        [wide, narrow], fixed_params=0, original_params=full["macs"], evaluate=loss,
        cost_fn=mac_cost,
    )
    assert ranks["narrow"] == 8 and ranks["wide"] < 8
    spent = sum(c.cost(ranks[c.name], mac_cost) for c in (wide, narrow))
    assert spent <= 0.7 * full["macs"]
    # By hand: rank r costs 64 * r * (36 + 8) MACs against 64 * 36 * 8 dense.
    assert wide.cost(3, mac_cost) == 64 * 3 * 44 and wide.cost(7, mac_cost) == 64 * 288
