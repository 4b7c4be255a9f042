"""MAC counts of `compress.macs`, checked against counts worked out by hand."""

import keras
import pytest

from compress.macs import count_macs, einsum_macs, layer_macs, uncounted_layers

L = keras.layers


def _model(input_shape, *layers):
    x = inputs = keras.Input(input_shape)
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize(
    "input_shape, layer, expected",
    [
        # Dense 6 -> 5 on a vector; then at 7 positions of a sequence.
        ((6,), L.Dense(5, name="l"), 6 * 5),
        ((7, 6), L.Dense(5, name="l"), 7 * 6 * 5),
        # Conv2D 3x3, 4 -> 8 channels, on 10x10: 'valid' gives 8x8 outputs.
        ((10, 10, 4), L.Conv2D(8, 3, name="l"), 8 * 8 * 3 * 3 * 4 * 8),
        # 'same' with stride 2: ceil(10 / 2) = 5 per side.
        ((10, 10, 4), L.Conv2D(8, 3, strides=2, padding="same", name="l"), 5 * 5 * 9 * 4 * 8),
        # Dilation 2 widens a 3x3 kernel to 5x5: 10 - 4 = 6 per side.
        ((10, 10, 4), L.Conv2D(8, 3, dilation_rate=2, name="l"), 6 * 6 * 9 * 4 * 8),
        # Groups=2: each filter sees 4 / 2 = 2 input channels.
        ((10, 10, 4), L.Conv2D(8, 3, groups=2, name="l"), 8 * 8 * 9 * 2 * 8),
        # Conv1D kernel 5, stride 3 on length 20: floor((20 - 5) / 3) + 1 = 6.
        ((20, 3), L.Conv1D(4, 5, strides=3, name="l"), 6 * 5 * 3 * 4),
        # Conv3D 2x2x2 on 4x4x4x2 -> 3x3x3 outputs of 5 filters.
        ((4, 4, 4, 2), L.Conv3D(5, 2, name="l"), 27 * 8 * 2 * 5),
        # Depthwise 3x3, multiplier 2, 'same' on 6x6x3.
        ((6, 6, 3), L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="l"),
         36 * 9 * 3 * 2),
        # Separable: depthwise 3x3 (6x6 'same') plus 1x1 from 3 to 7 channels.
        ((6, 6, 3), L.SeparableConv2D(7, 3, padding="same", name="l"), 36 * (9 * 3 + 3 * 7)),
        # Transposed 3x3, stride 2: every one of 4x4 inputs scatters 3*3*3*5 MACs.
        ((4, 4, 3), L.Conv2DTranspose(5, 3, strides=2, name="l"), 16 * 9 * 3 * 5),
        # BatchNorm: one per element; pooling: window size per output element.
        ((6, 6, 3), L.BatchNormalization(name="l"), 6 * 6 * 3),
        ((6, 6, 3), L.LayerNormalization(name="l"), 6 * 6 * 3),
        ((6, 6, 3), L.MaxPooling2D(2, name="l"), 3 * 3 * 3 * 4),
        ((6, 6, 3), L.AveragePooling2D(3, strides=1, name="l"), 4 * 4 * 3 * 9),
        ((6, 6, 3), L.GlobalAveragePooling2D(name="l"), 6 * 6 * 3),
        # EinsumDense (T=7, d=6) -> (T, 2 heads, 4).
        ((7, 6), L.EinsumDense("abc,cde->abde", output_shape=(None, 2, 4), name="l"),
         7 * 6 * 2 * 4),
        ((6,), L.EinsumDense("...b,bc->...c", output_shape=5, name="l"), 6 * 5),
        # TimeDistributed: 7 steps x the wrapped layer (it was left uncounted).
        ((7, 6), L.TimeDistributed(L.Dense(5), name="l"), 7 * 6 * 5),
        ((3, 10, 10, 4), L.TimeDistributed(L.Conv2D(8, 3), name="l"), 3 * 8 * 8 * 9 * 4 * 8),
    ],
)
def test_layer_macs_by_hand(input_shape, layer, expected):
    model = _model(input_shape, layer)
    assert layer_macs(model) == {"l": expected}
    assert count_macs(model) == expected


def test_channels_first_conv_counts_spatial_positions():
    model = _model((4, 10, 10), L.Conv2D(8, 3, data_format="channels_first", name="l"))
    assert count_macs(model) == 8 * 8 * 9 * 4 * 8


def test_multi_head_attention_by_hand():
    # Self-attention on T=5 tokens of width d=8, 2 heads of key_dim 3, value_dim 4.
    t, d, h, dk, dv = 5, 8, 2, 3, 4
    x = keras.Input((t, d))
    y = L.MultiHeadAttention(h, dk, value_dim=dv, name="mha")(x, x)
    model = keras.Model(x, y)
    expected = (
        t * d * h * dk  # query
        + t * d * h * dk  # key
        + t * d * h * dv  # value
        + t * t * h * dk  # scores
        + t * t * h * dv  # weighted sum
        + t * h * dv * d  # output projection
    )
    assert layer_macs(model) == {"mha": expected}


def test_cross_attention_uses_both_lengths():
    tq, tk, d, h, dk = 3, 6, 4, 2, 5
    q, v = keras.Input((tq, d)), keras.Input((tk, d))
    y = L.MultiHeadAttention(h, dk, name="mha")(q, v)
    model = keras.Model([q, v], y)
    expected = tq * d * h * dk + 2 * tk * d * h * dk + 2 * tq * tk * h * dk + tq * h * dk * d
    assert count_macs(model) == expected


def test_small_convnet_total_and_free_layers():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, activation="relu", name="c1"),  # 6x6x(9*1*4)
            L.MaxPooling2D(2, name="p"),  # 3x3x4 outputs, window 4
            L.Flatten(),
            L.Dropout(0.5),
            L.Dense(10, name="d"),  # 36 -> 10
            L.Softmax(),
        ]
    )
    assert layer_macs(model) == {"c1": 36 * 36, "p": 36 * 4, "d": 360}
    assert count_macs(model) == 36 * 36 + 144 + 360


def test_shared_layer_counts_every_call_and_nested_models_recurse():
    dense = L.Dense(3, name="shared")
    a, b = keras.Input((4,)), keras.Input((4,))
    inner = keras.Sequential([keras.Input((3,)), L.Dense(2, name="inner_dense")], name="inner")
    out = inner(L.Add()([dense(a), dense(b)]))
    model = keras.Model([a, b], out)
    assert layer_macs(model) == {"shared": 2 * 12, "inner/inner_dense": 6}


def test_unknown_layers_with_weights_are_named():
    model = _model(
        (5, 4, 3), L.TimeDistributed(L.LSTM(2), name="td_rnn"),
        L.LSTM(2, name="rnn"), L.Dense(1, name="d"),
    )
    assert uncounted_layers(model) == ["rnn", "td_rnn"]
    assert layer_macs(model) == {"d": 2}


def test_report_names_the_layers_left_out_of_the_macs(tmp_path):
    from compress.report import write_report

    row = {"params": 10, "macs": 4, "accuracy": 0.5, "macs_uncounted": ["rnn"]}
    paths = write_report({"model": "m", "original": row, "rows": []}, str(tmp_path), plots=False)
    text = open(paths["markdown"]).read()
    assert "no counting rule covers: `rnn`" in text


def test_einsum_macs_ellipsis_and_batch():
    assert einsum_macs("...b,bc->...c", (None, 3, 4), (4, 5)) == 3 * 4 * 5
    assert einsum_macs("abc,cd->abd", (None, 3, 4), (4, 5)) == 3 * 4 * 5


def test_low_rank_layers_count_both_factors():
    from compress.attention_layers import LowRankEinsumDense, LowRankMultiHeadAttention
    from compress.layers import LowRankDense

    model = _model((7, 6), LowRankEinsumDense(output_dims=(2, 4), rank=3, name="l"))
    assert count_macs(model) == 7 * (6 * 3 + 3 * 2 * 4)
    model = _model((6,), LowRankDense(5, 2, name="l"))
    assert count_macs(model) == 6 * 2 + 2 * 5
    t, d, h, dk = 5, 8, 2, 3
    x = keras.Input((t, d))
    mha = LowRankMultiHeadAttention(h, dk, projection_ranks={"query": 2}, name="mha")
    model = keras.Model(x, mha(x, x))
    query = t * (d * 2 + 2 * h * dk)  # d -> 2 -> (h, dk) at each token
    rest = 2 * t * d * h * dk + 2 * t * t * h * dk + t * h * dk * d
    assert count_macs(model) == query + rest
