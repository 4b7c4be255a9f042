"""Colored (compressed) forward mode for spatially local Jacobians.

A convolution reached from the input through spatially local layers
(convolutions, pooling, padding, cropping, element-wise layers, residual
adds, channel concatenations) has a sparse Jacobian: the output at spatial
position `o` depends only on the input positions in a window

    [S_i * o_i + lo_i, S_i * o_i + hi_i]   (one interval per spatial axis),

of size `R_i = hi_i - lo_i + 1`. Colouring each input coordinate by its
position modulo `R_i` on every spatial axis and by its channel (Curtis, Powell
& Reid 1974) gives colours whose coordinates never meet in one window: each
row of `J` has at most one non-zero of each colour. One Jacobian-vector
product per colour (the sum of that colour's basis vectors) then recovers
every entry: `J[row, j] = (J v_c)[row]` for the unique input `j` of colour
`c` in the row's window. `prod(R_i) * channels` products replace `n0`.

The window is derived from the layers' configurations (kernel sizes, strides,
dilations, padding), never from numerical zeros at a probe point: a layer
this module does not understand gives no window, and the caller falls back
to dense products.

The Gram `J^T J` (`n0 x n0`) is assembled without any `n_l x n0` matrix:
rows at one output position share one window, so the local Grams
`V_o^T V_o` (`V_o`: the `C_out x colours` block of position `o`) are formed
in float64 and scattered into `J^T J` by a segment sum over in-window pairs.
That scatter costs `P * colours^2` entries whatever the channels; when the
windows cover much of the input (many colours), recovering the Jacobian's
rows for a block of positions at a time and adding them to a Gram held on
the host by BLAS `dsyrk` (`rows * n0^2 / 2` multiply-adds) is cheaper
(`recovered_rows_are_cheaper`): on ResNet50 at 32x32, 4.8 s -> 1.1 s for
`conv2_block2_2_conv` (2,187 colours, 64 positions).

Plain functions (graph analysis in NumPy at plan time, products and Grams on
tensors inside `tf.function`).

References:
    Curtis, Powell & Reid, "On the estimation of sparse Jacobian matrices",
    IMA J. Appl. Math. 13 (1974), https://doi.org/10.1093/imamat/13.1.117.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import keras
import numpy as np
import tensorflow as tf

from keras_localrank import host_linalg
from keras_localrank.graph import producer
from keras_localrank.matfree import (
    gram_singular_values,
    host_open,
    host_take,
    host_update,
    jvp,
    on_host,
    zeros,
)
from keras_localrank.taps import INFERENCE_IDENTITY_LAYERS, Tap

__all__ = [
    "Window",
    "Coloring",
    "receptive_window",
    "tap_coloring",
    "colored_products",
    "colored_gram",
    "positions_per_block",
    "recovered_rows_are_cheaper",
    "colored_jacobian_gram",
    "colored_spectra",
    "recover_jacobian",
]


def _classes(*names):
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


#: Layers with a kernel window: (kernel_size, strides, dilation_rate, padding).
_WINDOW_LAYERS = _classes(
    "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D",
    "SeparableConv1D", "SeparableConv2D",
)
_POOLING_LAYERS = _classes(
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
)
_PADDING_LAYERS = _classes("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D")
_CROPPING_LAYERS = _classes("Cropping1D", "Cropping2D", "Cropping3D")
#: Element-wise at inference (or mixing channels at one position only).
_POINTWISE_LAYERS = (
    *INFERENCE_IDENTITY_LAYERS,
    *_classes(
        "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "BatchNormalization",
        "Rescaling", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    ),
)
#: Merges of same-shaped tensors (element-wise).
_MERGE_LAYERS = _classes("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")


@dataclasses.dataclass(frozen=True)
class Window:
    """Input positions read by output position `o`, per spatial axis `i`:
    `[stride[i] * o[i] + lo[i], stride[i] * o[i] + hi[i]]`."""

    stride: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(h - lo + 1 for lo, h in zip(self.lo, self.hi))

    @classmethod
    def identity(cls, rank: int) -> Window:
        return cls((1,) * rank, (0,) * rank, (0,) * rank)

    def then(self, kernel, strides, dilation, pad_before) -> Window:
        """The window after a layer whose output `o` reads its input positions
        `[s * o - pad, s * o - pad + (k - 1) * d]` on each axis."""
        stride, lo, hi = [], [], []
        for big_s, a, b, k, s, d, p in zip(
            self.stride, self.lo, self.hi, kernel, strides, dilation, pad_before
        ):
            stride.append(big_s * s)
            lo.append(a - big_s * p)
            hi.append(b + big_s * ((k - 1) * d - p))
        return Window(tuple(stride), tuple(lo), tuple(hi))


def _union(windows: list[Window]) -> Window | None:
    if len({w.stride for w in windows}) != 1:
        return None  # branches with different strides: not one window shape
    lo = tuple(map(min, zip(*(w.lo for w in windows))))
    hi = tuple(map(max, zip(*(w.hi for w in windows))))
    return Window(windows[0].stride, lo, hi)


def _same_pad(n: int, k: int, s: int, d: int) -> int:
    """Padding before the first position for `padding="same"` (TensorFlow's rule)."""
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2


def _spatial(shape) -> tuple[int, ...] | None:
    dims = tuple(shape[1:-1])
    return None if any(d is None for d in dims) else dims


def _kernel_geometry(layer, in_spatial, rank):
    """`(kernel, strides, dilation, pad_before)` of a windowed layer, or None."""
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    if isinstance(layer, _WINDOW_LAYERS):
        kernel, strides = tuple(layer.kernel_size), tuple(layer.strides)
        dilation = tuple(layer.dilation_rate)
    else:
        kernel, strides = tuple(layer.pool_size), tuple(layer.strides)
        dilation = (1,) * rank
    if not len(kernel) == len(strides) == len(dilation) == rank:
        return None
    padding = str(layer.padding).lower()
    if padding == "valid":
        pad = (0,) * rank
    elif padding == "same":
        pad = tuple(
            _same_pad(n, k, s, d) for n, k, s, d in zip(in_spatial, kernel, strides, dilation)
        )
    elif padding == "causal" and rank == 1:
        pad = ((kernel[0] - 1) * dilation[0],)
    else:
        return None
    return kernel, strides, dilation, pad


def _pairs(value, rank):
    """`((before, after), ...)` from a padding/cropping config."""
    if rank == 1 and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (tuple(value),)
    return tuple(tuple(v) for v in value)


def _is_channel_axis(axis, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return [a % (rank + 2) for a in axes] == [rank + 1]


def _layer_window(layer, window: Window, in_shape, rank: int) -> Window | None:
    """The window of a single-input layer's output, from its input's window."""
    in_spatial = _spatial(in_shape)
    if in_spatial is None or len(in_spatial) != rank:
        return None
    if isinstance(layer, (*_WINDOW_LAYERS, *_POOLING_LAYERS)):
        geometry = _kernel_geometry(layer, in_spatial, rank)
        return None if geometry is None else window.then(*geometry)
    if isinstance(layer, (*_PADDING_LAYERS, *_CROPPING_LAYERS)):
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return None
        padding = isinstance(layer, _PADDING_LAYERS)
        pairs = _pairs(layer.padding if padding else layer.cropping, rank)
        before = tuple(p[0] if padding else -p[0] for p in pairs)
        return window.then((1,) * rank, (1,) * rank, (1,) * rank, before)
    if isinstance(layer, _POINTWISE_LAYERS):
        if isinstance(layer, keras.layers.BatchNormalization) and getattr(
            layer, "renorm", False
        ):
            return None
        return window
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.Softmax)):
        return window if _is_channel_axis(layer.axis, rank) else None
    if isinstance(layer, keras.layers.Dense):
        return window  # applied to the channel axis at every position
    from keras_localrank.layers import RankProbe

    if isinstance(layer, RankProbe):
        return window
    return None


def receptive_window(model_input, tap: Tap) -> Window | None:
    """The input window of the tap's pre-activation, or None (not local).

    Derived structurally from layer configurations along every path from
    `model_input` to the tap (never from numerical values). None when any
    layer on a path is not understood (full dependence assumed), when the
    tensors are not channels-last with the input's number of spatial axes,
    or when branches merge with different strides.

    Args:
        model_input: the differentiated `KerasTensor` (a model input).
        tap: a top-level tap (its `input` is a tensor of the same graph).
    """
    shape = tuple(model_input.shape)
    rank = len(shape) - 2
    if rank < 1 or tap.input is None or _spatial(shape) is None:
        return None
    memo: dict[int, Window | None] = {}

    def window_of(tensor):
        if tensor is model_input:
            return Window.identity(rank)
        key = id(tensor)
        if key in memo:
            return memo[key]
        memo[key] = None  # cycle guard
        result = None
        op, node = producer(tensor)
        if op is not None and not isinstance(op, keras.Model) and len(tensor.shape) == rank + 2:
            inputs = list(node.input_tensors)
            if len(inputs) == 1:
                w = window_of(inputs[0])
                if w is not None:
                    result = _layer_window(op, w, inputs[0].shape, rank)
            elif isinstance(op, (*_MERGE_LAYERS, keras.layers.Concatenate)):
                same = all(tuple(t.shape[1:-1]) == tuple(tensor.shape[1:-1]) for t in inputs)
                channel = not isinstance(op, keras.layers.Concatenate) or _is_channel_axis(
                    op.axis, rank
                )
                if same and channel:
                    windows = [window_of(t) for t in inputs]
                    if all(w is not None for w in windows):
                        result = _union(windows)
        memo[key] = result
        return result

    inner = window_of(tap.input)
    if inner is None:
        return None
    return _layer_window(tap.layer, inner, tap.input.shape, rank)


@dataclasses.dataclass(frozen=True, eq=False)
class Coloring:
    """A colouring of the input coordinates for one tap.

    Attributes:
        window: the tap's receptive window.
        input_shape: `(N_1, ..., N_d, C)`, the per-sample input shape.
        output_shape: `(M_1, ..., M_d, C_out)`, the tap's per-sample output shape.
        periods: colours per spatial axis, `min(R_i, N_i)`.
    """

    window: Window
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    periods: tuple[int, ...]

    @property
    def num_colors(self) -> int:
        return math.prod(self.periods) * self.input_shape[-1]

    @property
    def positions(self) -> int:
        """`P`, output positions."""
        return math.prod(self.output_shape[:-1])

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def units(self) -> int:
        return math.prod(self.output_shape)

    def color_ids(self) -> np.ndarray:
        """`[n0]` colour of every input coordinate (C order over the input shape)."""
        spatial, channels = self.input_shape[:-1], self.input_shape[-1]
        grids = np.meshgrid(*(np.arange(n) for n in spatial), np.arange(channels), indexing="ij")
        residues = [g % t for g, t in zip(grids[:-1], self.periods)]
        color = np.ravel_multi_index((*residues, grids[-1]), (*self.periods, channels))
        return color.reshape(-1).astype(np.int32)

    def directions(self) -> np.ndarray:
        """`[num_colors, n0]` 0/1 rows: the sum of each colour's basis vectors."""
        return np.eye(self.num_colors, dtype=np.float32)[:, self.color_ids()]

    @functools.cached_property
    def windows(self) -> list | None:
        """`[(colours, box)]` per output position for `host_linalg.window_gram`:
        the valid colours in row-major order of the inputs they read, and the
        box of the input grid they cover (one slice per spatial axis). None when
        some position's inputs are not a full box with all channels."""
        index, valid = self.indices()
        spatial, channels = self.input_shape[:-1], self.input_shape[-1]
        windows = []
        for idx, ok in zip(index, valid):
            colours = np.flatnonzero(ok)
            order = np.argsort(idx[colours], kind="stable")
            colours, flat = colours[order], idx[colours][order]
            coords = np.unravel_index(flat // channels, spatial)
            box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
            sizes = [s.stop - s.start for s in box]
            grid = np.arange(int(np.prod(spatial))).reshape(spatial)[box]
            expected = (grid[..., None] * channels + np.arange(channels)).reshape(-1)
            if len(flat) != math.prod(sizes) * channels or not np.array_equal(flat, expected):
                return None
            windows.append((colours.astype(np.int64), box))
        return windows

    def indices(self) -> tuple[np.ndarray, np.ndarray]:
        """`(index, valid)`, both `[P, num_colors]`: the flat input index that
        colour `c` reads at output position `p`, and whether it exists."""
        spatial, channels = self.input_shape[:-1], self.input_shape[-1]
        out_spatial = self.output_shape[:-1]
        o = np.stack(np.meshgrid(*(np.arange(m) for m in out_spatial), indexing="ij"), -1)
        o = o.reshape(-1, len(spatial))  # [P, d]
        r = np.stack(np.meshgrid(*(np.arange(t) for t in self.periods), indexing="ij"), -1)
        r = r.reshape(-1, len(spatial))  # [colours per channel, d]
        pos, valid = [], np.ones((len(o), len(r)), bool)
        for i, (n, t) in enumerate(zip(spatial, self.periods)):
            start = self.window.stride[i] * o[:, i] + self.window.lo[i]  # [P]
            if t >= n:  # every position has its own colour on this axis
                p = np.broadcast_to(r[None, :, i], valid.shape)
            else:
                p = start[:, None] + (r[None, :, i] - start[:, None]) % t
            valid &= (p >= 0) & (p < n)
            pos.append(np.clip(p, 0, n - 1))
        index = np.ravel_multi_index(tuple(pos), spatial)  # [P, colours per channel]
        index = index[:, :, None] * channels + np.arange(channels)  # [P, r, C]
        valid = np.repeat(valid[:, :, None], channels, axis=2)
        return index.reshape(len(o), -1), valid.reshape(len(o), -1)


def tap_coloring(model_input, tap: Tap, output_shape) -> Coloring | None:
    """The colouring of a tap, or None when its Jacobian is not known to be local.

    Args:
        model_input: the differentiated `KerasTensor` (a model input).
        tap: the tap.
        output_shape: the tap's per-sample output shape `(M_1, ..., M_d, C_out)`.
    """
    window = receptive_window(model_input, tap)
    if window is None:
        return None
    input_shape = tuple(model_input.shape[1:])
    output_shape = tuple(output_shape)
    if len(output_shape) != len(input_shape):
        return None
    periods = tuple(min(r, n) for r, n in zip(window.size, input_shape[:-1]))
    return Coloring(window, input_shape, output_shape, periods)


def colored_products(
    fn, x: tf.Tensor, directions: tf.Tensor, *, block: int
) -> tf.Tensor:
    """`J(x) v_c` for every colour `c`, `block` colours in flight per pass.

    Args:
        fn: maps `[N, *input_shape]` inputs to a one-element list `[[N, n_l]]`.
        x: `[B, *input_shape]` points.
        directions: `[num_colors, n0]` colour rows (`Coloring.directions`).
        block: colours per pass (`B * block` replicas in flight).

    Returns:
        `[B, num_colors, n_l]` products, in `x.dtype`.
    """
    num_colors, n0 = int(directions.shape[0]), int(directions.shape[1])
    num = -(-num_colors // block)
    padded = tf.reshape(
        tf.pad(tf.cast(directions, x.dtype), [[0, num * block - num_colors], [0, 0]]),
        [num, block, n0],
    )
    batch = tf.shape(x)[0]
    stored = tf.TensorArray(x.dtype, size=num, element_shape=None)

    def body(i, s):
        v = tf.broadcast_to(padded[i], tf.stack([batch, block, n0]))
        return i + 1, s.write(i, jvp(fn, x, v)[0])

    _, stored = tf.while_loop(
        lambda i, _: i < num, body, (tf.constant(0), stored), parallel_iterations=1
    )
    t = tf.transpose(stored.stack(), [1, 0, 2, 3])  # [B, num, block, n_l]
    shape = tf.shape(t)
    return tf.reshape(t, [shape[0], shape[1] * shape[2], shape[3]])[:, :num_colors]


#: Colours from which `colored_gram` adds the local Grams on the host by
#: `host_linalg.window_gram` (outside XLA, from order `HOST_LAPACK_MIN_ORDER`
#: up) instead of TensorFlow's segment sum. Measured on one input of
#: ResNet50 / MobileNetV2 at 32x32 and the CIFAR-size CNN (second calls,
#: quiet machine): 147 colours x 256 positions 0.06-0.37 s against 0.15-0.16
#: s (fresh pages of two `n0 x n0` buffers dominate); 363 x 64: 0.075 against
#: 0.25-0.30 s; 1,083 x 64: 0.20-0.27 s against 0.90-1.13 s (recovered rows
#: 0.70-0.76 s); 972 x 64 (8 inputs): 0.18 against 1.06 s per input.
WINDOW_MIN_COLOURS = 256


def window_gram_applies(coloring: Coloring) -> bool:
    """Whether `colored_gram` sums this coloring's local Grams on the host
    (`host_linalg.window_gram`) when not recovering rows."""
    return (
        coloring.num_colors >= WINDOW_MIN_COLOURS
        and on_host([coloring.input_dim])
        and coloring.windows is not None
    )


def window_macs(coloring: Coloring, rows: int) -> int:
    """Multiply-adds of the local Grams of `rows` output rows (`window_gram`)."""
    channels = rows // coloring.positions
    return channels * sum(len(colours) ** 2 for colours, _ in coloring.windows)


#: Bytes of float64 local Grams formed per sample at once by `colored_gram`.
LOCAL_GRAM_BYTES = 2**26


def positions_per_block(coloring: Coloring) -> int:
    """Output positions whose local Grams are formed at once (bounded memory)."""
    per_position = 8 * coloring.num_colors**2
    return int(max(1, min(coloring.positions, LOCAL_GRAM_BYTES // per_position)))


#: Multiply-adds of the host Gram update (BLAS `dsyrk`, ~38 G/s on one core)
#: that take as long as scattering one local-Gram entry (~16 ns), measured on
#: ResNet50's colored layers at 32x32.
SCATTER_ENTRY_MACS = 600


def recovered_rows_are_cheaper(coloring: Coloring, rows: int) -> bool:
    """Whether `colored_gram(..., recovered=True)` (`rows * n0^2 / 2`
    multiply-adds) is expected to beat the local Grams, summed on the host
    (`window_gram_applies`: their multiply-adds) or scattered by TensorFlow
    (`P * colours^2` entries), for a layer of `rows` output rows."""
    dense = rows * coloring.input_dim**2 / 2
    if window_gram_applies(coloring):
        return dense < window_macs(coloring, rows)
    return dense < SCATTER_ENTRY_MACS * coloring.positions * coloring.num_colors**2


def positions_per_rows_block(coloring: Coloring, channels: int, itemsize: int = 4) -> int:
    """Output positions whose recovered rows (`channels` per position, in the
    compute dtype and the float64 copy the host update makes) are formed at
    once: at most `LOCAL_GRAM_BYTES` per sample."""
    per_position = (itemsize + 8) * channels * coloring.input_dim
    return int(max(1, min(coloring.positions, LOCAL_GRAM_BYTES // per_position)))


def _recovered_gram(products, index, valid, coloring: Coloring, rows: int) -> tf.Tensor:
    """`J^T J` from the Jacobian's `rows` rows, recovered for a block of
    output positions at a time and added to a float64 Gram held on the host."""
    nc, positions, n0 = coloring.num_colors, coloring.positions, coloring.input_dim
    channels = rows // positions
    block = positions_per_rows_block(coloring, channels, products.dtype.size)
    num = -(-positions // block)
    pad = num * block - positions
    batch = tf.shape(products)[0]
    v = tf.reshape(products, [batch, nc, positions, channels])
    v = tf.pad(tf.transpose(v, [2, 1, 3, 0]), [[0, pad], [0, 0], [0, 0], [0, 0]])
    v = tf.reshape(v, [num, block, nc, channels, batch])  # [blocks, P_b, colours, C, B]
    index = tf.reshape(tf.pad(tf.cast(index, tf.int32), [[0, pad], [0, 0]]), [num, block, nc])
    valid = tf.reshape(tf.pad(tf.cast(valid, tf.bool), [[0, pad], [0, 0]]), [num, block, nc])
    local = tf.broadcast_to(tf.range(block)[:, None], [block, nc])

    def body(i, keys):
        data = tf.where(valid[i][:, :, None, None], v[i], tf.zeros_like(v[i]))
        where = tf.stack([local, index[i]], axis=-1)  # [P_b, colours, 2]
        dense = tf.scatter_nd(where, data, tf.stack([block, n0, channels, batch]))
        rows = tf.reshape(tf.transpose(dense, [3, 0, 2, 1]), tf.stack([batch, -1, n0]))
        return i + 1, host_update(keys, [rows])

    _, keys = tf.while_loop(
        lambda i, _: i < num,
        body,
        (tf.constant(0), host_open(batch, [n0])),
        parallel_iterations=1,
    )
    return host_take(keys, n0)


def colored_gram(
    products: tf.Tensor,
    index: tf.Tensor,
    valid: tf.Tensor,
    coloring: Coloring,
    *,
    recovered: bool = False,
    rows: int | None = None,
) -> tf.Tensor:
    """`J^T J` (`[B, n0, n0]`, float64) from the colour products.

    The local Grams `V_p^T V_p` of blocks of output positions are added into
    `J^T J`: on the host, each to its window's block of the Gram
    (`window_gram_applies`, `host_linalg.window_gram`), else by a segment
    sum over in-window input pairs `(i, j)` with at most `LOCAL_GRAM_BYTES`
    of them per sample at once. With `recovered`, the Jacobian's rows of
    blocks of positions are recovered instead and added to a Gram on the
    host (BLAS; outside XLA only).

    Args:
        products: `[B, num_colors, n_l]` from `colored_products` (`n_l` may
            be the thin rows of a pointwise layer: any channels per position).
        index, valid: `Coloring.indices()` (`[P, num_colors]`).
        coloring: the colouring.
        recovered: recover rows (see `recovered_rows_are_cheaper`).
        rows: `n_l` of the products (default: their static last dimension,
            unknown in a graph traced for a batch of unknown size).
    """
    if recovered:
        rows = rows or products.shape[-1]
        if rows is None:
            raise ValueError(
                "colored_gram(recovered=True) needs `rows` for products of unknown width."
            )
        return _recovered_gram(products, index, valid, coloring, int(rows))
    if window_gram_applies(coloring):
        n0 = coloring.input_dim
        gram = tf.numpy_function(
            lambda p: host_linalg.window_gram(p, coloring.windows, coloring.input_shape),
            [products],
            tf.float64,
            stateful=False,
        )
        return tf.ensure_shape(gram, [None, n0, n0])
    nc, positions = coloring.num_colors, coloring.positions
    n0 = coloring.input_dim
    block = positions_per_block(coloring)
    num = -(-positions // block)
    pad = num * block - positions
    batch = tf.shape(products)[0]
    v = tf.reshape(tf.cast(products, tf.float64), [batch, nc, positions, -1])
    v = tf.pad(tf.transpose(v, [2, 0, 1, 3]), [[0, pad], [0, 0], [0, 0], [0, 0]])
    v = tf.reshape(v, [num, block, batch, nc, -1])  # [blocks, P_b, B, colours, C_out]
    wide = n0 * n0 >= 2**31 - 1
    itype = tf.int64 if wide else tf.int32
    index = tf.reshape(tf.pad(tf.cast(index, itype), [[0, pad], [0, 0]]), [num, block, nc])
    valid = tf.reshape(tf.pad(tf.cast(valid, tf.bool), [[0, pad], [0, 0]]), [num, block, nc])
    dump = tf.constant(n0 * n0, itype)

    def body(i, acc):
        vi = v[i]
        local = tf.linalg.matmul(vi, vi, transpose_b=True)  # [P_b, B, colours, colours]
        data = tf.transpose(local, [0, 2, 3, 1])  # [P_b, colours, colours, B]
        seg = index[i][:, :, None] * tf.constant(n0, itype) + index[i][:, None, :]
        ok = valid[i][:, :, None] & valid[i][:, None, :]
        seg = tf.reshape(tf.where(ok, seg, dump), [-1])
        data = tf.reshape(data, tf.stack([-1, batch]))
        return i + 1, acc + tf.math.unsorted_segment_sum(data, seg, n0 * n0 + 1)

    init = zeros(tf.stack([n0 * n0 + 1, batch]), tf.float64)
    _, acc = tf.while_loop(
        lambda i, _: i < num,
        body,
        (tf.constant(0), init),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([n0 * n0 + 1, None])),
        parallel_iterations=1,
    )
    return tf.reshape(tf.transpose(acc[: n0 * n0]), tf.stack([batch, n0, n0]))


def colored_jacobian_gram(
    fn,
    x: tf.Tensor,
    coloring: Coloring,
    tables,
    *,
    block: int,
    recovered: bool = False,
    rows: int | None = None,
) -> tf.Tensor:
    """`J^T J` (`[B, n0, n0]`, float64) of a local tap's Jacobian by colored
    forward mode.

    Args:
        fn: maps `[N, *input_shape]` inputs to `[[N, n_l]]`.
        x: `[B, *input_shape]` points.
        coloring: the tap's colouring.
        tables: `(color_ids, index, valid)` tensors from
            `Coloring.color_ids()` and `Coloring.indices()`.
        block: colours per pass.
        recovered, rows: see `colored_gram`.
    """
    color_ids, index, valid = tables
    directions = tf.transpose(tf.one_hot(color_ids, coloring.num_colors, dtype=x.dtype))
    products = colored_products(fn, x, directions, block=block)
    return colored_gram(products, index, valid, coloring, recovered=recovered, rows=rows)


def colored_spectra(
    fn, x: tf.Tensor, coloring: Coloring, tables, *, record=None, **options
) -> tf.Tensor:
    """Exact singular values (`[B, n0]`, float64, from the Gram `J^T J`) of a
    local tap's Jacobian by colored forward mode, or its rank record with a
    rule `record` (see `matfree.gram_singular_values`); arguments and
    keyword options `block`, `recovered`, `rows` as
    `colored_jacobian_gram`."""
    return gram_singular_values(colored_jacobian_gram(fn, x, coloring, tables, **options), record)


def recover_jacobian(products: tf.Tensor, coloring: Coloring) -> tf.Tensor:
    """The dense Jacobian `[B, n_l, n0]` recovered from the colour products
    (for checks and small layers; the Gram path never forms it).

    Entry `(row, j)` with `row = (p, u)` (output position `p`, channel `u`)
    and `j` the input of colour `c` in the window of `p` is
    `products[:, c, row]`; every other entry is structurally zero.
    """
    index, valid = coloring.indices()
    nc, positions = coloring.num_colors, coloring.positions
    c_out = coloring.output_shape[-1]
    n0 = coloring.input_dim
    batch = tf.shape(products)[0]
    v = tf.reshape(products, [batch, nc, positions, c_out])
    v = tf.transpose(v, [0, 2, 3, 1])  # [B, P, C_out, colours]
    rows = np.arange(positions)[:, None, None] * c_out + np.arange(c_out)[None, :, None]
    flat = rows * n0 + index[:, None, :]  # [P, C_out, colours]
    keep = np.broadcast_to(valid[:, None, :], flat.shape)
    values = tf.boolean_mask(tf.transpose(tf.reshape(v, [batch, -1])), keep.reshape(-1))
    ids = flat.reshape(-1)[keep.reshape(-1)]
    dense = tf.math.unsorted_segment_sum(values, ids, positions * c_out * n0)
    return tf.reshape(tf.transpose(dense), [batch, positions * c_out, n0])
