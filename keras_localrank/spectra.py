"""From singular values to ranks: numerical rank, robust rank, effective and stable rank.

Plain functions on tensors, usable inside `tf.function` (and under XLA). The
tolerance rule is exactly that of `numpy.linalg.matrix_rank` and
`torch.linalg.matrix_rank`:

    tol = max(atol, rtol * sigma_max)

with `rtol = eps(dtype) * max(m, n)` when neither `atol` nor `rtol` is given,
and `rtol = 0` when only `atol` is given. `eps` is the machine epsilon of the
dtype the matrix was *computed* in.

References:
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
    Roy & Vetterli, "The effective rank: a measure of effective
    dimensionality", EUSIPCO 2007.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from keras_localrank import host_linalg

__all__ = [
    "Tolerance",
    "singular_values",
    "symmetric_eigenvalues",
    "tolerance_threshold",
    "rank_from_singular_values",
    "rank_record",
    "record_spec",
    "symmetric_records",
    "effective_rank",
    "stable_rank",
]


def _check_nonnegative(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(
            f"Expected `{name}` to be a float or None. Received: {name}={value!r}"
        )
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"Expected `{name}` >= 0 and finite. Received: {name}={value}")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A rank tolerance rule, `tol = max(atol, rtol * sigma_max)`.

    Args:
        atol: absolute threshold on singular values. Default None (0).
        rtol: relative threshold. Default None: `eps * max(m, n)` when `atol`
            is also None, else 0 (the `numpy.linalg.matrix_rank` rule).

    Raises:
        ValueError: if `atol` or `rtol` is negative, NaN or infinite.
        TypeError: if either is not a number.
    """

    atol: float | None = None
    rtol: float | None = None

    def __post_init__(self):
        _check_nonnegative("atol", self.atol)
        _check_nonnegative("rtol", self.rtol)

    @property
    def is_default(self) -> bool:
        """True when this is the default (noise-level) numerical rank rule."""
        return self.atol is None and self.rtol is None

    def relative(self, dtype, m: int, n: int) -> float:
        """The effective `rtol` for an `m x n` matrix computed in `dtype`."""
        if self.rtol is not None:
            return float(self.rtol)
        if self.atol is not None:
            return 0.0
        return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps) * max(m, n)

    def label(self) -> str:
        """A short name: `exact` for the default rule, else the thresholds."""
        if self.is_default:
            return "exact"
        parts = []
        if self.atol is not None:
            parts.append(f"atol={self.atol:g}")
        if self.rtol is not None:
            parts.append(f"rtol={self.rtol:g}")
        return ",".join(parts)


#: Symmetric matrices of at least this order are solved by the host's LAPACK.
HOST_LAPACK_MIN_ORDER = 128


def in_xla_context() -> bool:
    """Whether ops built now are compiled by XLA (`jit_compile=True`, also of
    an enclosing function), where a `tf.numpy_function` cannot run."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # be safe: TensorFlow's own op works everywhere
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _host_solves(gram: tf.Tensor) -> bool:
    """Whether these symmetric matrices are solved by the host's LAPACK:
    outside XLA, of order `HOST_LAPACK_MIN_ORDER` and up (or unknown)."""
    order = gram.shape[-1]
    return (order is None or order >= HOST_LAPACK_MIN_ORDER) and not in_xla_context()


def symmetric_eigenvalues(gram: tf.Tensor) -> tf.Tensor:
    """Eigenvalues of a batch of symmetric float64 matrices `[..., n, n]`.

    From order `HOST_LAPACK_MIN_ORDER` up (or unknown order), the host's
    LAPACK solves them, one matrix per core: `numpy.linalg.eigvalsh` was
    1.5-1.7x faster per matrix than `tf.linalg.eigvalsh` on CPU (784: 0.054 s
    against 0.081 s; 3072: 2.8 s against 4.6 s), and `host_linalg.eigvalsh`'s
    two-stage solver is 1.5x faster again at 3072. The
    eigen-solve is the largest per-sample cost of the exact path once the
    Jacobian products are cheap. It runs as a `tf.numpy_function`; under
    XLA (`jit_compile`, e.g. a `LocalRank` metric inside a compiled step)
    `tf.linalg.eigvalsh` is used instead.
    """
    if not _host_solves(gram):
        return tf.linalg.eigvalsh(gram)
    values = tf.numpy_function(host_linalg.eigvalsh_batch, [gram], tf.float64, stateful=False)
    values.set_shape(gram.shape[:-1])
    return values


def singular_values(matrices: tf.Tensor, *, via_gram: bool = False) -> tf.Tensor:
    """Singular values of a batch of matrices, `[..., m, n] -> [..., min(m, n)]`.

    Args:
        matrices: `[..., m, n]` float tensor.
        via_gram: for float32 input, compute the eigenvalues of the float64
            Gram matrix of the smaller side instead of a float32 SVD. The
            symmetric eigensolver's absolute error is `eps64 * sigma_max^2`,
            so singular values come out accurate to about `1.5e-8 * sigma_max`,
            below float32 SVD's own rounding (`~1e-7 * sigma_max`) and far
            below any rank threshold of a float32 matrix; it is about twice as
            fast on CPU. Needs float64 support (not on TPU). Default False.

    Returns:
        Singular values (float64 when `via_gram`), unsorted when `via_gram`.
    """
    if not via_gram or matrices.dtype != tf.float32:
        return tf.linalg.svd(matrices, compute_uv=False)
    m64 = tf.cast(matrices, tf.float64)

    def eig(tall: bool):
        gram = tf.linalg.matmul(m64, m64, transpose_a=tall, transpose_b=not tall)
        return tf.sqrt(tf.maximum(symmetric_eigenvalues(gram), 0.0))

    rows, cols = matrices.shape[-2], matrices.shape[-1]
    if rows is not None and cols is not None:
        return eig(rows >= cols)
    shape = tf.shape(matrices)
    return tf.cond(shape[-2] >= shape[-1], lambda: eig(True), lambda: eig(False))


def tolerance_threshold(
    singular_values: tf.Tensor, tolerance: Tolerance, *, shape: tuple[int, int], dtype
) -> tf.Tensor:
    """Per-matrix threshold `max(atol, rtol * sigma_max)`.

    Args:
        singular_values: `[..., k]` singular values (any order).
        tolerance: the rule.
        shape: `(m, n)`, the shape of the matrices the values come from; it
            sets the default `rtol` (the reduced matrices of the fast path
            must pass the shape of the true Jacobian here).
        dtype: the dtype the matrices were computed in (sets `eps`).

    Returns:
        A `[...]` tensor of thresholds, in the dtype of `singular_values`.
    """
    s = singular_values
    sigma_max = tf.reduce_max(s, axis=-1) if s.shape[-1] != 0 else tf.zeros(
        tf.shape(s)[:-1], s.dtype
    )
    rtol = tf.constant(tolerance.relative(dtype, *shape), s.dtype)
    atol = tf.constant(float(tolerance.atol or 0.0), s.dtype)
    return tf.maximum(atol, rtol * sigma_max)


def rank_from_singular_values(
    singular_values: tf.Tensor, tolerance: Tolerance, *, shape: tuple[int, int], dtype
) -> tf.Tensor:
    """Numerical rank: the number of singular values above the threshold.

    Args:
        singular_values: `[..., k]` singular values.
        tolerance: the rule (see `Tolerance`).
        shape: `(m, n)` of the original matrices.
        dtype: dtype the matrices were computed in.

    Returns:
        An int32 `[...]` tensor of ranks.

    Example:
        >>> s = tf.constant([[3.0, 1.0, 1e-9]])
        >>> int(rank_from_singular_values(s, Tolerance(), shape=(3, 3),
        ...                               dtype="float32")[0])
        2
    """
    tol = tolerance_threshold(singular_values, tolerance, shape=shape, dtype=dtype)
    above = singular_values > tol[..., None]
    return tf.reduce_sum(tf.cast(above, tf.int32), axis=-1)


def record_spec(tolerances, *, shape: tuple[int, int], dtype) -> np.ndarray:
    """`[T, 2]` float64 `(atol, rtol)` of each rule for `shape` matrices
    computed in `dtype`: what a rank record counts (see `rank_record`)."""
    return np.array(
        [[float(t.atol or 0.0), t.relative(dtype, *shape)] for t in tolerances], np.float64
    ).reshape(-1, 2)


def rank_record(singular_values: tf.Tensor, spec: np.ndarray) -> tf.Tensor:
    """`[..., 2 + T]`: `sigma_max`, `sum sigma_i^2` and, for each rule
    `spec[t] = (atol, rtol)`, the rank `#{sigma_i > max(atol, rtol *
    sigma_max)}` (as `rank_from_singular_values`), as float64.

    The record is what the exact path keeps when the spectrum is not wanted
    (`LocalRankEstimator(spectrum=False)`): on the host it is computed
    without eigenvalues (`host_linalg.rank_record`); here from them."""
    s = tf.cast(singular_values, tf.float64)
    top = tf.reduce_max(s, axis=-1) if s.shape[-1] != 0 else tf.zeros(tf.shape(s)[:-1], s.dtype)
    spec = np.asarray(spec, np.float64).reshape(-1, 2)
    thr = tf.maximum(spec[:, 0], spec[:, 1] * top[..., None])  # [..., T]
    counts = tf.reduce_sum(tf.cast(s[..., None, :] > thr[..., None], tf.float64), axis=-1)
    return tf.concat([top[..., None], tf.reduce_sum(s * s, axis=-1)[..., None], counts], -1)


def symmetric_records(gram: tf.Tensor, spec: np.ndarray) -> tf.Tensor:
    """Rank records `[..., 2 + T]` of a batch of float64 Grams `[..., n, n]`
    (the squared singular values are their eigenvalues): on the host's
    LAPACK without eigenvalues from order `HOST_LAPACK_MIN_ORDER` up (see
    `host_linalg.rank_record`), else from `symmetric_eigenvalues`."""
    spec = np.asarray(spec, np.float64).reshape(-1, 2)
    if not _host_solves(gram):
        return rank_record(tf.sqrt(tf.maximum(symmetric_eigenvalues(gram), 0.0)), spec)
    values = tf.numpy_function(
        host_linalg.records_batch, [gram, tf.constant(spec)], tf.float64, stateful=False
    )
    values.set_shape(gram.shape[:-2].concatenate([2 + len(spec)]))
    return values


def effective_rank(singular_values: tf.Tensor) -> tf.Tensor:
    """Effective rank: `exp(H(p))`, `p = s / sum(s)` (Roy & Vetterli 2007).

    A matrix of zeros has effective rank 0 by convention.

    Args:
        singular_values: `[..., k]` non-negative singular values.

    Returns:
        A `[...]` float tensor.
    """
    s = singular_values
    total = tf.reduce_sum(s, axis=-1, keepdims=True)
    p = tf.math.divide_no_nan(s, total)
    entropy = -tf.reduce_sum(tf.math.multiply_no_nan(tf.math.log(p), p), axis=-1)
    return tf.where(total[..., 0] > 0, tf.exp(entropy), tf.zeros_like(entropy))


def stable_rank(singular_values: tf.Tensor) -> tf.Tensor:
    """Stable rank: `||J||_F^2 / ||J||_2^2 = sum(s^2) / max(s)^2` (0 for J = 0).

    Args:
        singular_values: `[..., k]` non-negative singular values.

    Returns:
        A `[...]` float tensor.
    """
    s = singular_values
    frob = tf.reduce_sum(tf.square(s), axis=-1)
    spec = tf.square(tf.reduce_max(s, axis=-1))
    return tf.math.divide_no_nan(frob, spec)
