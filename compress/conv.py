"""Factorized convolutions: the maths of three rewrites and their stock layers.

A `Conv1D`/`Conv2D` kernel `W` has shape `(*kernel_size, c_in, c_out)`. Each
rewrite replaces the layer by a chain of stock convolutions (the last one
keeps the layer's name, bias and activation), so a rewritten model loads
with plain `keras.models.load_model`:

- **channel** (`k x k, r` then `1 x 1, r -> c_out`): the output channels are
  projected on `r` orthonormal directions `U_r` (`c_out x r`): kernels
  `W x_out U_r` and `U_r^T`. With `U_r` the leading eigenvectors of the
  covariance of the pre-activation channels over positions and samples (the
  data-aware method) and `m` its mean, the bias is `m - (m - b) U_r U_r^T`:
  exact at `r = c_out`. With `U_r` from the SVD of `W` reshaped to
  `(prod(kernel_size) c_in) x c_out` it is the data-free weight SVD.
- **spatial** (Jaderberg, Vedaldi & Zisserman 2014): `k_h x 1` (`c_in -> r`)
  then `1 x k_w` (`r -> c_out`), from the SVD of `W` rearranged to
  `(k_h c_in) x (k_w c_out)`; Conv2D only.
- **tucker2** (Kim et al. 2016): `1 x 1` (`c_in -> r_in`), `k x k`
  (`r_in -> r_out`), `1 x 1` (`r_out -> c_out`), the Tucker-2 decomposition
  of `W` along its channel modes (HOSVD refined by alternating least
  squares, HOOI).

Strides, padding (`"valid"`, `"same"`, and `"causal"` for Conv1D) and
dilation are carried by the convolution that sees the original spatial
window; the others are `1 x 1` or act along one axis only, so every rewrite
is exact at full rank.

References:
    Jaderberg, Vedaldi & Zisserman, "Speeding up Convolutional Neural
    Networks with Low Rank Expansions", https://arxiv.org/abs/1405.3866
    Kim et al., "Compression of Deep Convolutional Neural Networks for Fast
    and Low Power Mobile Applications", https://arxiv.org/abs/1511.06530
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import keras
import numpy as np

from compress.costs import LayerShape
from compress.graph import Part, rebuild

__all__ = [
    "CONV_SCHEMES",
    "ConvFactors",
    "channel_projection_factors",
    "channel_svd_factors",
    "conv_positions",
    "factorize_convs",
    "factorized_shapes",
    "spatial_factors",
    "spatial_matrix",
    "tucker2_factors",
    "tucker2_in_rank",
]

#: Names of the convolution rewrites.
CONV_SCHEMES = ("channel", "spatial", "tucker2")


@dataclasses.dataclass
class ConvFactors:
    """The kernels of one rewritten convolution.

    Attributes:
        scheme: one of `CONV_SCHEMES`.
        kernels: the kernels of the chain, first to last (two for
            `"channel"` and `"spatial"`, three for `"tucker2"`).
        bias: the bias of the last layer (None for a layer without bias).
    """

    scheme: str
    kernels: tuple[np.ndarray, ...]
    bias: np.ndarray | None = None

    @property
    def rank(self) -> int:
        """The inner width (`r`, or `r_out` for Tucker-2)."""
        return int(self.kernels[-1].shape[-2])


def _spatial_ndim(kernel) -> int:
    return kernel.ndim - 2


def _pointwise(matrix: np.ndarray, ndim: int) -> np.ndarray:
    """A `(1, ..., 1, a, b)` kernel from an `a x b` matrix."""
    return matrix.reshape((1,) * ndim + matrix.shape)


def channel_projection_factors(
    kernel: np.ndarray, bias: np.ndarray | None, basis: np.ndarray, mean: np.ndarray
) -> ConvFactors:
    """Project a convolution's output channels on the orthonormal columns `basis`.

    Args:
        kernel: `(*kernel_size, c_in, c_out)`.
        bias: `(c_out,)` or None.
        basis: `(c_out, r)` orthonormal columns.
        mean: `(c_out,)` mean pre-activation on the data (used with a bias).

    Returns:
        A `"channel"` `ConvFactors`: `(*kernel_size, c_in, r)` and
        `(1, ..., r, c_out)` kernels and the bias `m - (m - b) U U^T`.
    """
    dtype = kernel.dtype
    w = kernel.astype(np.float64)
    u = basis.astype(np.float64)
    reduce = np.tensordot(w, u, axes=([-1], [0]))
    expand = _pointwise(u.T, _spatial_ndim(kernel))
    new_bias = None
    if bias is not None:
        m = np.asarray(mean, dtype=np.float64)
        new_bias = (m - ((m - bias.astype(np.float64)) @ u) @ u.T).astype(dtype)
    return ConvFactors("channel", (reduce.astype(dtype), expand.astype(dtype)), new_bias)


def kernel_matrix(kernel: np.ndarray) -> np.ndarray:
    """The kernel as a `(prod(kernel_size) c_in) x c_out` matrix."""
    return kernel.reshape(-1, kernel.shape[-1])


def channel_svd_factors(kernel: np.ndarray, bias: np.ndarray | None, rank: int) -> ConvFactors:
    """Data-free channel factors from the truncated SVD of `kernel_matrix(kernel)`."""
    u, s, vt = np.linalg.svd(kernel_matrix(kernel).astype(np.float64), full_matrices=False)
    reduce = (u[:, :rank] * s[:rank]).reshape(kernel.shape[:-1] + (rank,))
    expand = _pointwise(vt[:rank], _spatial_ndim(kernel))
    return ConvFactors(
        "channel", (reduce.astype(kernel.dtype), expand.astype(kernel.dtype)), bias
    )


def spatial_matrix(kernel: np.ndarray) -> np.ndarray:
    """A Conv2D kernel rearranged to `(k_h c_in) x (k_w c_out)`."""
    if kernel.ndim != 4:
        raise ValueError(
            "Spatial factorization needs a Conv2D kernel (k_h, k_w, c_in, c_out). "
            f"Received: kernel of shape {kernel.shape}."
        )
    kh, kw, cin, cout = kernel.shape
    return kernel.transpose(0, 2, 1, 3).reshape(kh * cin, kw * cout)


def spatial_factors(kernel: np.ndarray, bias: np.ndarray | None, rank: int) -> ConvFactors:
    """`k_h x 1` then `1 x k_w` kernels from the truncated SVD of `spatial_matrix`.

    Args:
        kernel: `(k_h, k_w, c_in, c_out)`.
        bias: `(c_out,)` or None (kept on the second layer).
        rank: inner width `r`, at most `min(k_h c_in, k_w c_out)`.

    Returns:
        A `"spatial"` `ConvFactors` with kernels `(k_h, 1, c_in, r)` and
        `(1, k_w, r, c_out)`.
    """
    matrix = spatial_matrix(kernel)  # validates the kernel's rank-4 shape
    kh, kw, cin, cout = kernel.shape
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    vertical = (u[:, :rank] * root).reshape(kh, cin, rank)[:, None]  # (kh, 1, cin, r)
    horizontal = (root[:, None] * vt[:rank]).reshape(rank, kw, cout).transpose(1, 0, 2)[None]
    return ConvFactors(
        "spatial", (vertical.astype(kernel.dtype), horizontal.astype(kernel.dtype)), bias
    )


def _leading(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def tucker2_in_rank(rank: int, c_in: int, c_out: int) -> int:
    """The input rank paired with output rank `rank` (same fraction of the channels)."""
    return int(min(c_in, max(1, round(rank * c_in / c_out))))


def tucker2_factors(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    rank_out: int,
    rank_in: int | None = None,
    *,
    iterations: int = 5,
) -> ConvFactors:
    """Tucker-2 decomposition of a convolution kernel along its channel modes.

    `W ~ G x_in U_in x_out U_out` with `U_in` (`c_in x r_in`) and `U_out`
    (`c_out x r_out`) orthonormal: HOSVD, then `iterations` sweeps of HOOI.

    Args:
        kernel: `(*kernel_size, c_in, c_out)`.
        bias: `(c_out,)` or None (kept on the last layer).
        rank_out: `r_out` <= c_out.
        rank_in: `r_in` <= c_in. Default None: `tucker2_in_rank(rank_out, ...)`.
        iterations: HOOI sweeps. Default 5.

    Returns:
        A `"tucker2"` `ConvFactors` with kernels `(1.., c_in, r_in)`,
        `(*kernel_size, r_in, r_out)`, `(1.., r_out, c_out)`.
    """
    cin, cout = kernel.shape[-2:]
    if rank_in is None:
        rank_in = tucker2_in_rank(rank_out, cin, cout)
    nd = _spatial_ndim(kernel)
    w = kernel.astype(np.float64)

    def unfold_in(t):  # c_in x (rest)
        return np.moveaxis(t, -2, 0).reshape(t.shape[-2], -1)

    def unfold_out(t):  # c_out x (rest)
        return np.moveaxis(t, -1, 0).reshape(t.shape[-1], -1)

    u_in = _leading(unfold_in(w), rank_in)
    u_out = _leading(unfold_out(w), rank_out)
    for _ in range(iterations):
        u_in = _leading(unfold_in(np.tensordot(w, u_out, axes=([-1], [0]))), rank_in)
        projected = np.moveaxis(np.tensordot(w, u_in, axes=([-2], [0])), -1, -2)
        u_out = _leading(unfold_out(projected), rank_out)
    core = np.tensordot(w, u_in, axes=([-2], [0]))  # (..., c_out, r_in)
    core = np.tensordot(core, u_out, axes=([-2], [0]))  # (..., r_in, r_out)
    kernels = (_pointwise(u_in, nd), core, _pointwise(u_out.T, nd))
    return ConvFactors("tucker2", tuple(k.astype(kernel.dtype) for k in kernels), bias)


def conv_positions(layer) -> tuple[int, int]:
    """`(input positions, output positions)` per sample of a built conv layer."""
    inp = math.prod(int(d) for d in layer.input.shape[1:-1])
    out = math.prod(int(d) for d in layer.output.shape[1:-1])
    return inp, out


def factorized_shapes(layer, scheme: str, rank: int) -> tuple[LayerShape, ...]:
    """The `LayerShape`s of `layer` rewritten with `scheme` at `rank`."""
    kernel = tuple(int(d) for d in layer.kernel.shape)
    nd = len(kernel) - 2
    cin, cout = kernel[-2:]
    pos_in, pos_out = conv_positions(layer)
    bias = cout if layer.use_bias else 0
    if scheme == "channel":
        return (
            LayerShape(kernel[:-1] + (rank,), pos_out, 0),
            LayerShape((1,) * nd + (rank, cout), pos_out, bias),
        )
    if scheme == "spatial":
        kh, kw = kernel[:2]
        mid = int(layer.output.shape[1]) * int(layer.input.shape[2])
        return (
            LayerShape((kh, 1, cin, rank), mid, 0),
            LayerShape((1, kw, rank, cout), pos_out, bias),
        )
    if scheme == "tucker2":
        r_in = tucker2_in_rank(rank, cin, cout)
        return (
            LayerShape((1,) * nd + (cin, r_in), pos_in, 0),
            LayerShape(kernel[:-2] + (r_in, rank), pos_out, 0),
            LayerShape((1,) * nd + (rank, cout), pos_out, bias),
        )
    raise ValueError(f"Expected `scheme` in {CONV_SCHEMES}. Received: scheme={scheme!r}")


def _part(layer, name, kernel, bias, *, strides, padding, dilation, last):
    nd = kernel.ndim - 2
    config = layer.get_config()
    config.update(
        name=name,
        filters=int(kernel.shape[-1]),
        kernel_size=tuple(int(d) for d in kernel.shape[:nd]),
        strides=tuple(strides),
        padding=padding,
        dilation_rate=tuple(dilation),
        groups=1,
        use_bias=bias is not None,
    )
    if not last:
        config.update(activation="linear", activity_regularizer=None, bias_regularizer=None)
    new = layer.__class__.from_config(config)
    return Part(new, [kernel] + ([bias] if bias is not None else []))


def _check_factors(layer, f: ConvFactors) -> None:
    kernel = tuple(layer.kernel.shape)
    nd = len(kernel) - 2
    want = {"channel": 2, "spatial": 2, "tucker2": 3}.get(f.scheme)
    if want is None:
        raise ValueError(f"Expected `scheme` in {CONV_SCHEMES}. Received: scheme={f.scheme!r}")
    ks = [np.asarray(k) for k in f.kernels]
    ok = len(ks) == want and all(k.ndim == nd + 2 for k in ks)
    if ok:
        ok = ks[0].shape[-2] == kernel[-2] and ks[-1].shape[-1] == kernel[-1]
        ok &= all(a.shape[-1] == b.shape[-2] for a, b in zip(ks, ks[1:]))
        if f.scheme == "channel":
            ok &= ks[0].shape[:nd] == kernel[:nd] and ks[1].shape[:nd] == (1,) * nd
        elif f.scheme == "spatial":
            ok &= nd == 2 and ks[0].shape[:2] == (kernel[0], 1) and ks[1].shape[:2] == (
                1,
                kernel[1],
            )
        else:
            ok &= ks[1].shape[:nd] == kernel[:nd] and ks[0].shape[:nd] == (1,) * nd
            ok &= ks[2].shape[:nd] == (1,) * nd
    has_bias = f.bias is not None
    if not ok or has_bias != bool(layer.use_bias):
        raise ValueError(
            f"Expected {f.scheme!r} factors matching layer {layer.name!r} with kernel "
            f"{kernel} and use_bias={layer.use_bias}. Received: kernels "
            f"{[k.shape for k in ks]} and bias {None if f.bias is None else np.shape(f.bias)}."
        )


def conv_parts(layer, f: ConvFactors) -> list[Part]:
    """The chain of stock layers that replaces `layer` (the last keeps its name)."""
    _check_factors(layer, f)
    nd = len(layer.kernel.shape) - 2
    strides, dilation, padding = tuple(layer.strides), tuple(layer.dilation_rate), layer.padding
    one = (1,) * nd
    point = {"strides": one, "padding": "valid", "dilation": one}
    name = layer.name
    if f.scheme == "channel":
        a, b = f.kernels
        return [
            _part(layer, f"{name}_reduce", a, None, strides=strides, padding=padding,
                  dilation=dilation, last=False),
            _part(layer, name, b, f.bias, last=True, **point),
        ]
    if f.scheme == "spatial":
        v, h = f.kernels
        return [
            _part(layer, f"{name}_vertical", v, None, strides=(strides[0], 1), padding=padding,
                  dilation=(dilation[0], 1), last=False),
            _part(layer, name, h, f.bias, strides=(1, strides[1]), padding=padding,
                  dilation=(1, dilation[1]), last=True),
        ]
    first, core, last = f.kernels
    return [
        _part(layer, f"{name}_in", first, None, last=False, **point),
        _part(layer, f"{name}_core", core, None, strides=strides, padding=padding,
              dilation=dilation, last=False),
        _part(layer, name, last, f.bias, last=True, **point),
    ]


def factorize_convs(model: keras.Model, factors: Mapping[str, ConvFactors]) -> keras.Model:
    """Replace convolution layers by chains of stock convolutions.

    Args:
        model: a built functional or Sequential model (not modified).
        factors: `{conv layer name: ConvFactors}`.

    Returns:
        A new functional model; the last layer of each chain keeps the
        original name, the others are named `<name>_reduce`,
        `<name>_vertical`, `<name>_in` and `<name>_core`.

    Raises:
        ValueError: factors that do not match their layer, a bad scheme.
    """
    parts = {name: conv_parts(model.get_layer(name), f) for name, f in factors.items()}
    return rebuild(model, replace=parts)
