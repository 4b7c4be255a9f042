"""Graph coverage: nested models, shared layers, several inputs, embeddings,
attention, recurrent layers; every measured rank against explicit float64
Jacobians of a forward pass written by hand (tests/reference.py)."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank.layers import RankProbe
from keras_localrank.taps import select_taps
from tests.reference import (
    activation_fn,
    attention_projections,
    finite_difference_jacobians,
    float64_layer,
    function_jacobians,
    numpy_ranks,
)


def gaussian(n, *shape, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


def measure(model, x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return klr.local_rank(model, x, **kwargs)


def assert_ranks(result, jacobians, eps_dtype=np.float32):
    assert set(result.per_sample) == set(jacobians)
    for name, jac in jacobians.items():
        np.testing.assert_array_equal(
            result.per_sample[name], numpy_ranks(jac, eps_dtype=eps_dtype), err_msg=name
        )


def randomize_batchnorm(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 2, gamma.shape), rng.normal(size=beta.shape),
                rng.normal(size=mean.shape), rng.uniform(0.5, 2, var.shape),
            ])


# -- nested models --------------------------------------------------------------


def nested_model():
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu", name="conv")(inner_in)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, activation="tanh", name="dense")(h)
    base = keras.Model(inner_in, h, name="base")
    block = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="tanh", name="dense")],
        name="block",
    )
    inp = keras.Input((5, 5, 2))
    out = keras.layers.Dense(3, name="head")(block(base(inp)))
    model = keras.Model(inp, out)
    randomize_batchnorm(model)
    return model, base, block


def test_nested_models_are_measured_layer_by_layer():
    model, base, block = nested_model()
    x = gaussian(6, 5, 5, 2)
    result = measure(model, x)
    conv = float64_layer(base.get_layer("conv"), (5, 5, 2))
    bn = float64_layer(base.get_layer("bn"), (3, 3, 3))
    dense = float64_layer(base.get_layer("dense"), (27,))
    block_dense = float64_layer(block.get_layer("dense"), (6,))
    head = float64_layer(model.get_layer("head"), (4,))

    def forward(x):
        p_conv = conv(x)
        h = tf.reshape(bn(tf.nn.relu(p_conv), training=False), [-1, 27])
        p_dense = dense(h)
        p_block = block_dense(tf.tanh(p_dense))
        return {
            "base/conv": p_conv, "base/dense": p_dense, "block/dense": p_block,
            "head": head(tf.tanh(p_block)),
        }

    assert_ranks(result, function_jacobians(forward, x))
    assert result.skipped == {}
    # A nested model's name (or object) selects every measurable call inside it.
    assert [t.name for t in select_taps(model, ["base"]).taps] == ["base/conv", "base/dense"]
    assert [t.name for t in select_taps(model, [block]).taps] == ["block/dense"]


def test_nested_model_in_float64_keeps_call_names():
    model, _, _ = nested_model()
    result = measure(model, gaussian(3, 5, 5, 2), dtype="float64")
    assert list(result.per_sample) == ["base/conv", "base/dense", "block/dense", "head"]


# -- shared layers ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "autodiff"])
def test_each_call_of_a_shared_layer_is_measured(method):
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    narrow = keras.layers.Dense(6, activation="relu", name="narrow")
    h = shared(narrow(shared(inp)))
    out = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inp, out)
    # Few active ReLU units before the second call: its rank is capped by them.
    narrow.set_weights([narrow.get_weights()[0], np.full(6, -0.6, "float32")])
    x = gaussian(8, 6)
    result = measure(model, x, method=method)
    s64 = float64_layer(shared, (6,))
    nar = float64_layer(narrow, (6,))
    head = float64_layer(model.get_layer("head"), (6,))

    def forward(x):
        p0 = s64(x)
        p_n = nar(tf.tanh(p0))
        p1 = s64(tf.nn.relu(p_n))
        return {"shared@0": p0, "narrow": p_n, "shared@1": p1, "head": head(tf.tanh(p1))}

    jacobians = function_jacobians(forward, x)
    assert_ranks(result, jacobians)
    assert result.mean["shared@1"] < result.mean["shared@0"]


def test_shared_layer_with_different_input_shapes():
    keras.utils.set_random_seed(2)
    conv = keras.layers.Conv1D(2, 3, activation="relu", name="conv")
    inp = keras.Input((8, 2))
    a = conv(inp)
    b = conv(keras.layers.MaxPooling1D(2)(inp))
    out = keras.layers.Dense(3, name="head")(keras.layers.Concatenate(axis=1)([a, b]))
    model = keras.Model(inp, out)
    x = gaussian(5, 8, 2)
    result = measure(model, x)
    c64 = float64_layer(conv, (8, 2))
    head = float64_layer(model.get_layer("head"), (8, 2))

    def forward(x):
        pa = c64(x)
        pb = c64(tf.nn.max_pool1d(x, 2, 2, "VALID"))
        h = tf.concat([tf.nn.relu(pa), tf.nn.relu(pb)], axis=1)
        return {"conv@0": pa, "conv@1": pb, "head": head(h)}

    assert_ranks(result, function_jacobians(forward, x))
    assert [info.units for info in result.layers] == [12, 4, 24]


# -- several inputs ----------------------------------------------------------------


def two_input_model(structure="list"):
    """`structure="dict"` builds it on a dict of inputs, keys not in sorted
    order (Keras then orders `model.inputs` by key)."""
    keras.utils.set_random_seed(3)
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    ha = keras.layers.Dense(4, activation="tanh", name="da")(a)
    hb = keras.layers.Dense(3, activation="tanh", name="db")(b)
    h = keras.layers.Multiply()([keras.layers.Concatenate()([ha, hb]),
                                 keras.layers.Concatenate()([hb, ha])])
    out = keras.layers.Dense(6, name="head")(h)
    return keras.Model({"b": b, "a": a} if structure == "dict" else [a, b], out)


@pytest.mark.parametrize("structure", ["list", "dict"])
@pytest.mark.parametrize("wrt", ["a", 0])
def test_several_inputs_other_inputs_held_at_their_values(wrt, structure):
    model = two_input_model(structure)
    xa, xb = gaussian(6, 5, seed=1), gaussian(6, 3, seed=2)
    result = measure(model, {"b": xb, "a": xa} if structure == "dict" else [xa, xb], wrt=wrt)
    da = float64_layer(model.get_layer("da"), (5,))
    db = float64_layer(model.get_layer("db"), (3,))
    head = float64_layer(model.get_layer("head"), (7,))
    hb = tf.tanh(db(tf.constant(xb, tf.float64)))

    def forward(x):
        pa = da(x)
        ha = tf.tanh(pa)
        h = tf.concat([ha, hb], 1) * tf.concat([hb, ha], 1)
        return {"da": pa, "head": head(h)}

    assert_ranks(result, function_jacobians(forward, xa))
    assert set(result.skipped) == {"db"}  # it does not depend on `a`
    by_dict = measure(model, {"b": xb, "a": xa}, wrt=wrt)
    np.testing.assert_array_equal(by_dict.per_sample["head"], result.per_sample["head"])


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_second_input_and_float64(structure):
    model = two_input_model(structure)
    xa, xb = gaussian(4, 5, seed=1), gaussian(4, 3, seed=2)
    result = measure(model, [xa, xb], wrt="b", dtype="float64")
    assert list(result.per_sample) == ["db", "head"]
    assert result.layers[0].input_dim == 3
    da = float64_layer(model.get_layer("da"), (5,))
    db = float64_layer(model.get_layer("db"), (3,))
    head = float64_layer(model.get_layer("head"), (7,))
    ha = tf.tanh(da(tf.constant(xa, tf.float64)))

    def forward(x):
        pb = db(x)
        hb = tf.tanh(pb)
        return {"db": pb, "head": head(tf.concat([ha, hb], 1) * tf.concat([hb, ha], 1))}

    assert_ranks(result, function_jacobians(forward, xb), eps_dtype=np.float64)


# -- integer inputs: with respect to an embedding -------------------------------------


def text_model():
    keras.utils.set_random_seed(4)
    tokens = keras.Input((7,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(30, 4, name="embedding")(tokens)
    h = keras.layers.Conv1D(5, 3, activation="relu", name="conv")(e)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(tokens, out)


@pytest.mark.parametrize("mode", ["autodiff-reverse", "autodiff-forward"])
def test_embedding_model_measured_with_respect_to_the_embedding(mode):
    model = text_model()
    tokens = np.random.default_rng(0).integers(0, 30, size=(6, 7))
    result = measure(model, tokens, wrt="embedding", method=mode)
    table = model.get_layer("embedding").get_weights()[0].astype(np.float64)
    conv = float64_layer(model.get_layer("conv"), (7, 4))
    head = float64_layer(model.get_layer("head"), (5,))

    def forward(e):
        p = conv(e)
        return {"conv": p, "head": head(tf.reduce_mean(tf.nn.relu(p), axis=1))}

    assert_ranks(result, function_jacobians(forward, table[tokens]))
    assert result.layers[0].input_dim == 28
    assert set(result.skipped) == {"embedding"}


def uint8_image_model():
    keras.utils.set_random_seed(4)
    images = keras.Input((6, 6, 1), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255, name="scale")(images)
    h = keras.layers.Conv2D(2, 3, activation="relu", name="conv")(h)
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    return keras.Model(images, out)


@pytest.mark.parametrize(
    "build, tokens, advice",
    [
        (text_model, np.random.default_rng(0).integers(0, 30, size=(3, 7)), "embedding"),
        (
            uint8_image_model,
            np.random.default_rng(0).integers(0, 256, size=(3, 6, 6, 1)).astype("uint8"),
            "scale",
        ),
    ],
)
def test_integer_input_error_advice_works(build, tokens, advice):
    model = build()
    with pytest.raises(TypeError, match=f"wrt='{advice}'") as info:
        klr.local_rank(model, tokens)
    assert str(info.value).split("e.g. ")[1].rstrip(".") == f"wrt='{advice}'"
    result = measure(model, tokens, wrt=advice)  # the advice, followed
    assert list(result.per_sample) == ["conv", "head"]


def variable_length_text_model(length=None):
    """Token ids of any length (`length=None`) -> embedding -> two convolutions
    along the sequence -> pooled head."""
    keras.utils.set_random_seed(14)
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(30, 4, name="embedding")(tokens)
    h = keras.layers.Conv1D(5, 3, padding="same", activation="relu", name="conv")(e)
    h = keras.layers.Conv1D(3, 2, activation="relu", name="conv2")(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model(tokens, out)


def _text_reference(model, tokens):
    """Float64 Jacobians of the pre-activations with respect to the embedding
    output, by a forward pass written by hand at the length of `tokens`."""
    length = tokens.shape[1]
    table = model.get_layer("embedding").get_weights()[0].astype(np.float64)
    conv = float64_layer(model.get_layer("conv"), (length, 4))
    conv2 = float64_layer(model.get_layer("conv2"), (length, 5))
    head = float64_layer(model.get_layer("head"), (3,))

    def forward(e):
        p = conv(e)
        p2 = conv2(tf.nn.relu(p))
        return {"conv": p, "conv2": p2, "head": head(tf.reduce_mean(tf.nn.relu(p2), axis=1))}

    return function_jacobians(forward, table[tokens])


@pytest.mark.parametrize("mode", ["autodiff-reverse", "autodiff-forward"])
def test_variable_length_text_model_measured_wrt_embedding_at_the_length_of_x(mode):
    # `wrt="embedding"` on `keras.Input((None,), "int32")` raised "Expected `wrt`
    # to name a layer with a fully defined output shape": the embedding's shape
    # was read without the length of the samples.
    from keras_localrank.memory import activation_elements

    model = variable_length_text_model()
    rng = np.random.default_rng(0)
    for length in (9, 6):  # two lengths on one model: one measurement each
        tokens = rng.integers(0, 30, size=(5, length)).astype("int32")
        result = measure(model, tokens, wrt="embedding", method=mode)
        assert_ranks(result, _text_reference(model, tokens))
        assert result.skipped == {"embedding": "its output is the differentiated tensor (`wrt`)"}
        assert [info.units for info in result.layers] == [5 * length, 3 * (length - 1), 2]
        assert {info.input_dim for info in result.layers} == {4 * length}
        assert result.per_sample["conv2"].min() < 3 * (length - 1)  # not all at the bound
        fixed = variable_length_text_model(length)
        fixed.set_weights(model.get_weights())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            estimator = klr.LocalRankEstimator(
                model, wrt="embedding", input_shape=(length,), method=mode
            )
        assert estimator.selection.input_shape == (length, 4)
        assert estimator.selection.open_input_shape == (length,)
        assert activation_elements(model, (length,)) == activation_elements(fixed)


def test_variable_length_text_model_other_lengths_and_bad_shapes_give_clear_errors():
    model = variable_length_text_model()
    tokens = np.random.default_rng(1).integers(0, 30, size=(3, 8)).astype("int32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        estimator = klr.LocalRankEstimator(model, wrt="embedding", input_shape=(8,))
    assert_ranks(estimator(tokens)[0], _text_reference(model, tokens))
    # Like a float `(None, d)` model: one length per estimator.
    with pytest.raises(ValueError, match=r"Expected `x` of shape \(N, 8\).*shape \(3, 5\)"):
        estimator(tokens[:, :5])
    with pytest.raises(ValueError, match=r"Expected `x` of shape \(N, 8\).*shape \(3, 5\)"):
        estimator.samples_tensor(tokens[:, :5])
    with pytest.raises(ValueError, match=r"`input_shape=`.*'tokens' \(None,\)"):
        klr.LocalRankEstimator(model, wrt="embedding")
    for bad in [(8, 4), (0,), 8, ("a",)]:
        with pytest.raises(ValueError, match=r"`input_shape`.*'tokens'.*Received: input_shape="):
            klr.LocalRankEstimator(model, wrt="embedding", input_shape=bad)


def test_variable_length_text_model_from_the_command_line_and_the_callback(tmp_path):
    from keras_localrank.cli import Config, run

    model = variable_length_text_model()
    tokens = np.random.default_rng(2).integers(0, 30, size=(4, 7)).astype("int32")
    before = {
        name: numpy_ranks(jac, eps_dtype=np.float32).mean()
        for name, jac in _text_reference(model, tokens).items()
    }
    path, data = str(tmp_path / "text.keras"), str(tmp_path / "tokens.npz")
    model.save(path)
    np.savez(data, x=tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        frame = run(Config(model=path, data=data, samples=4, wrt="embedding"),
                    echo=lambda s: None)
        assert dict(zip(frame["layer"], frame["mean"])) == pytest.approx(before)
        model.compile("sgd", "mse")
        callback = klr.LocalRankCallback(tokens, wrt="embedding")
        model.fit(tokens, np.zeros((4, 2)), epochs=1, verbose=0, callbacks=[callback])
    measured = {row["layer"]: row["mean"] for row in callback.trace if row["kind"] == "exact"}
    want = {
        name: numpy_ranks(jac, eps_dtype=np.float32).mean()
        for name, jac in _text_reference(model, tokens).items()  # the trained weights
    }
    assert measured == pytest.approx(want)


# -- attention ---------------------------------------------------------------------


def encoder_block(seq=4, dim=6):
    keras.utils.set_random_seed(5)
    x = keras.Input((seq, dim))
    att = keras.layers.MultiHeadAttention(2, 2, name="mha")(x, x)
    h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([x, att]))
    f = keras.layers.Dense(8, activation="relu", name="ffn1")(h)
    out = keras.layers.Dense(dim, name="ffn2")(f)
    return keras.Model(x, out)


@pytest.mark.parametrize("mode", ["autodiff-reverse", "autodiff-forward"])
def test_attention_projections_are_measured(mode):
    model = encoder_block()
    x = gaussian(4, 4, 6)
    result = measure(model, x, method=mode)
    mha = model.get_layer("mha")
    ln = float64_layer(model.get_layer("ln"), (4, 6))
    ffn1 = float64_layer(model.get_layer("ffn1"), (4, 6))
    ffn2 = float64_layer(model.get_layer("ffn2"), (4, 8))

    def forward(x):
        parts = attention_projections(mha, x, x)
        p1 = ffn1(ln(x + parts["attention_output"]))
        out = {f"mha/{k}": v for k, v in parts.items()}
        out.update({"ffn1": p1, "ffn2": ffn2(activation_fn(model.get_layer("ffn1"))(p1))})
        return out

    assert_ranks(result, function_jacobians(forward, x))
    assert result.skipped == {}
    assert [t.name for t in select_taps(model, ["mha"]).taps] == [
        "mha/query", "mha/key", "mha/value", "mha/attention_output"]


# -- honesty: what is not measured is listed, and the advice works ---------------------


def test_recurrent_layer_is_listed_and_a_probe_after_it_is_measured():
    keras.utils.set_random_seed(6)
    x_in = keras.Input((2, 2))
    # unroll=True: batch_jacobian through a while loop takes ~50 s to trace.
    h = keras.layers.LSTM(3, return_sequences=True, unroll=True, name="lstm")(x_in)
    out = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(x_in, out)
    x = gaussian(3, 2, 2)
    with pytest.warns(UserWarning, match="lstm"):
        selection = select_taps(model)
    assert "RankProbe" in selection.skipped["lstm"]
    assert [t.name for t in selection.taps] == ["head"]
    # The advice: a RankProbe after the LSTM measures its output. n0 = 4 is
    # smaller than the measured outputs, which would pick forward mode; the
    # estimator must use reverse mode through the recurrent loop.
    h = RankProbe(name="probe")(model.get_layer("lstm").output)
    probed = keras.Model(x_in, model.get_layer("head")(keras.layers.Flatten()(h)))
    result = measure(probed, x)
    assert [(info.method, info.mode) for info in result.layers] == [("exact", "reverse")] * 2
    lstm = float64_layer(model.get_layer("lstm"), (2, 2), linear=False)
    head = float64_layer(model.get_layer("head"), (6,))

    def forward(x):
        h = lstm(x)
        return {"probe": h, "head": head(tf.reshape(h, [-1, 6]))}

    assert_ranks(result, function_jacobians(forward, x))


def test_subclassed_inner_model_is_listed():
    class Inner(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    keras.utils.set_random_seed(7)
    inp = keras.Input((4,))
    out = keras.layers.Dense(2, name="head")(Inner()(inp))
    model = keras.Model(inp, out)
    with pytest.warns(UserWarning, match="subclassed"):
        result = klr.local_rank(model, gaussian(3, 4))
    (name,) = result.skipped
    assert "subclassed model" in result.skipped[name]
    assert list(result.per_sample) == ["head"]


# -- errors ------------------------------------------------------------------------


def test_bad_wrt_values_give_clear_errors():
    model = two_input_model()
    x = [gaussian(3, 5), gaussian(3, 3)]
    with pytest.raises(ValueError, match="several float inputs.*'a'.*'b'"):
        klr.local_rank(model, x)
    with pytest.raises(ValueError, match=r"Expected `wrt` in \[0, 1\].*Received: wrt=2"):
        klr.local_rank(model, x, wrt=2)
    with pytest.raises(TypeError, match="Received: wrt=True of type bool"):
        klr.local_rank(model, x, wrt=True)
    with pytest.raises(TypeError, match="Received: wrt=1.5 of type float"):
        klr.local_rank(model, x, wrt=1.5)
    with pytest.raises(ValueError, match="Unknown `wrt`. Received: wrt='c'.*'da'"):
        klr.local_rank(model, x, wrt="c")
    with pytest.raises(ValueError, match="one array per model input"):
        klr.local_rank(model, x[:1], wrt="a")
    with pytest.raises(ValueError, match=r"Expected `x` keys \['a', 'b'\]"):
        klr.local_rank(model, {"a": x[0]}, wrt="a")
    with pytest.raises(ValueError, match="same non-zero number of samples"):
        klr.local_rank(model, [x[0], x[1][:2]], wrt="a")
    text = text_model()
    with pytest.raises(ValueError, match="float tensor.*'tokens'.*wrt='embedding'"):
        klr.local_rank(text, np.zeros((2, 7), "int32"), wrt="tokens")


def test_wrt_naming_a_shared_layer_lists_its_calls():
    keras.utils.set_random_seed(8)
    tokens = keras.Input((3,), dtype="int32")
    emb = keras.layers.Embedding(10, 2, name="emb")
    h = keras.layers.Concatenate()([emb(tokens), emb(tokens[:, ::-1])])
    model = keras.Model(tokens, keras.layers.Dense(2, name="head")(h))
    x = np.random.default_rng(0).integers(0, 10, size=(3, 3))
    with pytest.raises(ValueError, match=r"\['emb@0', 'emb@1'\]"):
        klr.local_rank(model, x, wrt="emb")
    result = measure(model, x, wrt="emb@1")
    assert list(result.per_sample) == ["head"] and result.layers[0].input_dim == 6


# -- command line -------------------------------------------------------------------


def test_cli_two_input_model_clear_error_and_text_model_with_wrt(tmp_path):
    from keras_localrank.cli import Config, run

    path = str(tmp_path / "two.keras")
    two_input_model().save(path)
    with pytest.raises(ValueError, match=r"one input.*\['a', 'b'\].*wrt=name"):
        run(Config(model=path, data="gaussian", samples=2), echo=lambda s: None)
    text = str(tmp_path / "text.keras")
    text_model().save(text)
    data = str(tmp_path / "tokens.npz")
    np.savez(data, x=np.random.default_rng(0).integers(0, 30, size=(4, 7)).astype("int32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        frame = run(Config(model=text, data=data, samples=4, wrt="embedding"),
                    echo=lambda s: None)
    assert list(frame["layer"]) == ["conv", "head"]


# -- convolution family, traversed layers --------------------------------------------


def test_depthwise_separable_transpose_with_bn_residual_pooling_padding():
    keras.utils.set_random_seed(9)
    x_in = keras.Input((4, 4, 2))
    a = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x_in)
    a = keras.layers.BatchNormalization(name="bn")(a)
    b = keras.layers.Add()([x_in, a])
    c = keras.layers.SeparableConv2D(3, 3, padding="same", activation="tanh", name="sep")(b)
    d = keras.layers.Conv2DTranspose(2, 2, strides=2, activation="relu", name="tconv")(c)
    e = keras.layers.AveragePooling2D(2)(keras.layers.ZeroPadding2D(1)(d))
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(e))
    model = keras.Model(x_in, out)
    randomize_batchnorm(model)
    x = gaussian(5, 4, 4, 2)
    result = measure(model, x)
    dw = float64_layer(model.get_layer("dw"), (4, 4, 2))
    bn = float64_layer(model.get_layer("bn"), (4, 4, 2))
    sep = float64_layer(model.get_layer("sep"), (4, 4, 2))
    tconv = float64_layer(model.get_layer("tconv"), (4, 4, 3))
    head = float64_layer(model.get_layer("head"), (50,))

    def forward(x):
        p_dw = dw(x)
        p_sep = sep(x + bn(tf.nn.relu(p_dw), training=False))
        p_t = tconv(tf.tanh(p_sep))
        h = tf.pad(tf.nn.relu(p_t), [[0, 0], [1, 1], [1, 1], [0, 0]])
        h = tf.nn.avg_pool2d(h, 2, 2, "VALID")
        return {"dw": p_dw, "sep": p_sep, "tconv": p_t, "head": head(tf.reshape(h, [-1, 50]))}

    assert_ranks(result, function_jacobians(forward, x))
    assert result.skipped == {}


def test_convnext_layer_scale_is_traversed_not_listed():
    from keras.src.applications.convnext import LayerScale

    keras.utils.set_random_seed(10)
    x_in = keras.Input((3, 3, 2))
    p = keras.layers.Conv2D(2, 1, activation="gelu", name="pw")(x_in)
    scale = LayerScale(1.0, 2, name="layer_scale")
    h = keras.layers.Add()([x_in, scale(p)])
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(x_in, out)
    scale.set_weights([np.array([0.5, -2.0])])
    x = gaussian(4, 3, 3, 2)
    result = measure(model, x)
    pw = float64_layer(model.get_layer("pw"), (3, 3, 2))
    head = float64_layer(model.get_layer("head"), (18,))

    def forward(x):
        p_pw = pw(x)
        h = x + tf.nn.gelu(p_pw, approximate=False) * tf.constant([0.5, -2.0], tf.float64)
        return {"pw": p_pw, "head": head(tf.reshape(h, [-1, 18]))}

    assert_ranks(result, function_jacobians(forward, x))
    assert result.skipped == {}


def test_time_distributed_layers_are_measured_at_every_step():
    keras.utils.set_random_seed(10)
    TD = keras.layers.TimeDistributed
    x_in = keras.Input((5, 4))
    h = TD(keras.layers.Dense(3, activation="relu"), name="td")(x_in)
    h = TD(keras.layers.Dense(6, activation="tanh"), name="td2")(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(x_in, out)
    frames_in = keras.Input((2, 4, 4, 1))
    f = TD(keras.layers.Conv2D(2, 3, activation="relu"), name="tdconv")(frames_in)
    frames = keras.Model(frames_in, keras.layers.Dense(3, name="fhead")(keras.layers.Flatten()(f)))
    x, v = gaussian(4, 5, 4), gaussian(3, 2, 4, 4, 1)
    before = model(x).numpy()
    result, framed = measure(model, x), measure(frames, v)
    assert result.skipped == {} and framed.skipped == {}
    td = float64_layer(model.get_layer("td").layer, (4,))
    td2 = float64_layer(model.get_layer("td2").layer, (3,))
    head = float64_layer(model.get_layer("head"), (30,))
    conv = float64_layer(frames.get_layer("tdconv").layer, (4, 4, 1))
    fhead = float64_layer(frames.get_layer("fhead"), (16,))

    def forward(x):  # a Dense applies to the last axis: every step at once
        p1 = td(x)
        p2 = td2(tf.nn.relu(p1))
        return {"td": p1, "td2": p2, "head": head(tf.reshape(tf.tanh(p2), [-1, 30]))}

    def forward_frames(v):
        p = tf.reshape(conv(tf.reshape(v, [-1, 4, 4, 1])), [-1, 2, 2, 2, 2])
        return {"tdconv": p, "fhead": fhead(tf.reshape(tf.nn.relu(p), [-1, 16]))}

    assert_ranks(result, function_jacobians(forward, x))
    assert_ranks(framed, function_jacobians(forward_frames, v))
    # The pre-activation: 5 steps x 3 units, whatever the ReLU after it does.
    np.testing.assert_array_equal(result.per_sample["td"], 15)
    # The wrapped layer's activation is restored after the measurement.
    np.testing.assert_array_equal(model(x).numpy(), before)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_models_are_measured_in_the_compute_dtype(policy):
    # bfloat16 layer inputs were refused as "non-float" (a dtype-name check).
    keras.utils.set_random_seed(11)
    keras.mixed_precision.set_global_policy(policy)
    try:
        x_in = keras.Input((6, 2))
        h = keras.layers.Conv1D(4, 3, activation="relu", name="conv")(x_in)
        out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
        model = keras.Model(x_in, out)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    x = gaussian(4, 6, 2)
    result = measure(model, x)
    assert result.skipped == {}
    conv = float64_layer(model.get_layer("conv"), (6, 2))
    head = float64_layer(model.get_layer("head"), (16,))

    def forward(x):
        p = conv(x)
        return {"conv": p, "head": head(tf.reshape(tf.nn.relu(p), [-1, 16]))}

    assert_ranks(result, function_jacobians(forward, x))


def _sequence_model(length):
    """Conv1D over a sequence inside a nested base, then a transformer block."""
    keras.utils.set_random_seed(12)
    base_in = keras.Input((length, 3))
    b = keras.layers.Conv1D(4, 3, padding="same", activation="relu", name="bconv")(base_in)
    base = keras.Model(base_in, b, name="base")
    x_in = keras.Input((length, 3))
    h = base(x_in)
    a = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="ln")(keras.layers.Add()([h, a]))
    f = keras.layers.Dense(6, activation="gelu", name="ff")(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling1D()(f))
    return keras.Model(x_in, out)


def test_variable_length_models_are_measured_at_the_length_of_the_data():
    # Layers whose built output shape has an undefined (None) axis were all
    # skipped ("output shape ... is not fully defined"), and the memory plan
    # counted that axis as 1.
    from keras_localrank.memory import activation_elements

    model, fixed = _sequence_model(None), _sequence_model(5)
    fixed.set_weights(model.get_weights())
    x = gaussian(3, 5, 3)
    result = measure(model, x)
    assert result.skipped == {}
    want = measure(fixed, x)
    assert set(result.per_sample) == set(want.per_sample)
    assert len(result.per_sample) == 7  # bconv, 4 attention projections, ff, head
    for name in want.per_sample:
        np.testing.assert_array_equal(result.per_sample[name], want.per_sample[name], name)
    frame, fixed_frame = result.to_frame(), want.to_frame()
    np.testing.assert_array_equal(frame["units"], fixed_frame["units"])
    assert activation_elements(model, (5, 3)) == activation_elements(fixed)
    assert activation_elements(model, (9, 3)) > activation_elements(fixed)
    # The ranks themselves, against float64 finite differences of the model
    # (robust ranks: the LayerNorm's null direction sits at the numpy rule's
    # threshold, where float32 and float64 computations may disagree).
    names = ["mha/query", "mha/value", "mha/attention_output", "ff", "head"]
    robust = measure(model, x, atol=0.01)
    ref = finite_difference_jacobians(model, x, names)
    for name in names:
        np.testing.assert_array_equal(
            robust.per_sample[name], numpy_ranks(ref[name], atol=0.01), name
        )
    assert robust.per_sample["ff"].min() < 15  # not all at the bound


@pytest.mark.parametrize("method", ["autodiff-reverse", "autodiff-forward"])
def test_nested_model_in_float64_is_float64_throughout(method):
    # The float64 copy kept the nested model's float32 inputs: reverse mode
    # cast the gradients to float32 at that boundary, and the float64 rule
    # counted the rounding as rank (ff: 15 of 15 instead of the active units).
    keras.utils.set_random_seed(12)
    base_in = keras.Input((5, 3))
    conv = keras.layers.Conv1D(2, 3, padding="same", activation="relu", name="bconv")
    base = keras.Model(base_in, conv(base_in), name="base")
    x_in = keras.Input((5, 3))
    model = keras.Model(x_in, keras.layers.Dense(6, name="ff")(base(x_in)))
    x = gaussian(4, 5, 3)
    result = measure(model, x, method=method, dtype="float64")
    conv64 = float64_layer(conv, (5, 3))
    ff64 = float64_layer(model.get_layer("ff"), (5, 2))

    def forward(x):
        p = conv64(x)
        return {"base/bconv": p, "ff": ff64(tf.nn.relu(p))}

    assert_ranks(result, function_jacobians(forward, x), eps_dtype=np.float64)


def test_variable_length_text_model_from_a_dict_or_list_of_token_ids():
    """The length is read from `x` given as `{input name: ids}` or `[ids]`
    too (it was read only from an array, and both raised "pass
    `input_shape=`")."""
    model = variable_length_text_model()
    tokens = np.random.default_rng(3).integers(0, 30, size=(4, 7)).astype("int32")
    want = klr.local_rank(model, tokens, wrt="embedding")
    name = model.inputs[0].name
    for x in ({name: tokens}, [tokens]):
        got = klr.local_rank(model, x, wrt="embedding")
        for layer, ranks in want.per_sample.items():
            np.testing.assert_array_equal(got.per_sample[layer], ranks)

