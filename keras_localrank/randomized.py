r"""Certified randomized robust rank: adaptive range finder with a posterior bound.

For an operator `A` (`m x n`, here a Jacobian `J_l(x)`, per sample) known only
through products `A V` and `A^T U`, `certified_sketch` grows an orthonormal
basis `Q` of an approximate range of `A` block by block, each block refined
by power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 on the blocks of
the adaptive Alg. 4.2), until the posterior test of Alg. 4.2,

    ||(I - Q Q^T) A|| <= 10 sqrt(2 / pi) max_{i <= r} ||(I - Q Q^T) A w_i||

(`w_i` fresh Gaussian vectors; it holds with probability at least
`1 - 10^-r`), certifies a residual `eps <= target` for every sample.

With `B = Q^T A` and `R = (I - Q Q^T) A`, `A^T A = B^T B + R^T R`, so by
Weyl's inequalities

    s_i(B) <= s_i(A) <= sqrt(s_i(B)^2 + eps^2),

and the robust rank `#{s_i(A) > t}` lies in

    [#{s_i(B) > t},  #{s_i(B) > sqrt(t^2 - eps^2)}]      (eps < t),

with probability at least `1 - delta`. The lower end is the estimate; the
interval is the error statement. `delta` is spent over all test rounds (union
bound): the number of probes `r` per round is chosen so that
`rounds * 10^-r <= delta`. The test runs when the basis has grown by a
quarter since the last one (and at the memory cap), not after every block:
with the small blocks that large models afford (1-2 directions in flight),
testing every block cost more products than growing the basis.

References:
    Halko, Martinsson & Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix
    decompositions", SIAM Review 53(2), 2011, https://arxiv.org/abs/0909.4061
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from keras_localrank.spectra import symmetric_eigenvalues

__all__ = ["SketchResult", "certified_sketch", "probes_per_round", "robust_rank_interval"]

#: `10 sqrt(2 / pi)`, the constant of the posterior bound (HMT 2011, eq. 4.3).
BOUND_CONSTANT = 10.0 * math.sqrt(2.0 / math.pi)

Operator = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class SketchResult:
    """What `certified_sketch` found, per sample.

    Attributes:
        singular_values: `[B, q]` float64 singular values of `Q^T A`.
        residual_bound: `[B]` certified bound on `||(I - Q Q^T) A||_2` (at
            rounding level when `Q` spans the whole smaller dimension).
        sketch_size: `q`, the basis size reached (same for the whole batch).
        failure_probability: `delta`, the probability that some bound fails.
        rounds: test rounds run.
    """

    singular_values: np.ndarray
    residual_bound: np.ndarray
    sketch_size: int
    failure_probability: float
    rounds: int


def probes_per_round(failure_probability: float, max_rounds: int) -> int:
    """Gaussian test vectors per round so that `max_rounds * 10^-r <= delta`."""
    return max(1, math.ceil(math.log10(max_rounds / failure_probability)))


#: A test round runs once the basis is this much larger than at the last one.
TEST_GROWTH = 1.25


def planned_test_sizes(block: int, cap: int, growth: float = TEST_GROWTH) -> list[int]:
    """Basis sizes at which the posterior test may run, in order.

    The first test after the first block; then whenever the basis has grown
    by at least `growth` (and by one block), and at `cap`. Their number bounds
    the test rounds of the union bound.
    """
    sizes, size = [], min(block, cap)
    while True:
        sizes.append(size)
        if size >= cap:
            return sizes
        size = _next_test_size(size, block, cap, growth)


def _next_test_size(size: int, block: int, cap: int, growth: float = TEST_GROWTH) -> int:
    """The basis size of the test after one at `size`: grown by `growth`
    and by one block, at most `cap`."""
    return min(cap, max(size + block, math.ceil(size * growth)))


def _project_out(y: tf.Tensor, q: tf.Tensor) -> tf.Tensor:
    """Rows of `y` minus their components in the row span of `q` (twice)."""
    if q.shape[1] == 0:
        return y
    for _ in range(2):
        y = y - tf.linalg.matmul(tf.linalg.matmul(y, q, transpose_b=True), q)
    return y


def _orthonormal_rows(y: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """Orthonormal rows spanning `y`'s rows; rows that are numerically
    dependent (relative to `scale [B]`) are set to zero, so the result is
    orthonormal-or-zero and never adds a spurious direction."""
    qy, r = tf.linalg.qr(tf.linalg.matrix_transpose(y))
    diag = tf.abs(tf.linalg.diag_part(r))  # [B, b]
    keep = tf.cast(diag > 1e-10 * scale[:, None], y.dtype)
    return tf.linalg.matrix_transpose(qy) * keep[:, :, None]


def _row_scale(y: tf.Tensor) -> tf.Tensor:
    norms = tf.norm(y, axis=-1)
    return tf.maximum(tf.reduce_max(norms, axis=-1), 1e-300)


def certified_sketch(
    matvec: Operator,
    rmatvec: Operator,
    *,
    batch: int,
    shape: tuple[int, int],
    target: float,
    failure_probability: float = 1e-3,
    block: int = 8,
    power_iterations: int = 1,
    seed: int = 0,
    max_size: int | None = None,
    max_block: int | None = None,
) -> SketchResult:
    """Grow a range basis of `A` until its residual is certified `<= target`.

    Args:
        matvec: `V [B, d, n] -> A V` as `[B, d, m]` (rows are `A v_i`).
        rmatvec: `U [B, d, m] -> A^T U` as `[B, d, n]`.
        batch: `B`, independent operators handled in lockstep.
        shape: `(m, n)` of each operator.
        target: the residual every sample must reach (e.g. `atol / 2`).
        failure_probability: `delta`, total over all test rounds. Default 1e-3.
        block: basis vectors added per round, and the most vectors per
            product (the directions in flight). Default 8.
        power_iterations: power iterations per block. Default 1.
        seed: seed of the Gaussian test matrices (NumPy generator). Default 0.
        max_size: stop growing the basis at this many vectors (a memory cap);
            samples not certified by then keep a residual bound above
            `target` (an honest, wider interval). Default None: `min(m, n)`.
        max_block: let the block double every round up to this width (a
            high robust rank then takes `O(log)` rounds instead of `rank /
            block`; the union bound over rounds still holds, since there are
            fewer of them). Default None: a fixed `block`.

    Returns:
        A `SketchResult`; the basis stops growing at `min(m, n)` vectors (or
        `max_size`).
    """
    m, n = shape
    max_rank = min(m, n)
    cap = max_rank if max_size is None else max(1, min(max_rank, int(max_size)))
    max_rounds = len(planned_test_sizes(block, cap))
    probes = probes_per_round(failure_probability, max_rounds)
    next_test = min(block, cap)
    rng = np.random.default_rng(seed)

    def apply(op, v):
        return tf.cast(op(tf.constant(v) if isinstance(v, np.ndarray) else v), tf.float64)

    q = tf.zeros([batch, 0, m], tf.float64)
    bound = np.full(batch, np.inf)
    rounds = 0  # test rounds
    grown = 0  # blocks added
    widest = block if max_block is None else max(block, int(max_block))
    while q.shape[1] < cap:
        b = min(block * 2**grown, widest, cap - q.shape[1])
        grown += 1
        y = apply(matvec, rng.standard_normal((batch, b, n)))
        for _ in range(power_iterations):
            scale = _row_scale(y)
            y = _orthonormal_rows(_project_out(y, q), scale)
            z = apply(rmatvec, y)
            z = _orthonormal_rows(z, _row_scale(z))
            y = apply(matvec, z)
        scale = _row_scale(y)
        y = _project_out(_orthonormal_rows(_project_out(y, q), scale), q)
        q = tf.concat([q, y], axis=1)
        if q.shape[1] < next_test:
            continue
        next_test = _next_test_size(q.shape[1], block, cap)
        rounds += 1
        # The test vectors, at most `block` per product (the memory plan
        # budgets `block` directions in flight).
        tests = rng.standard_normal((batch, probes, n))
        norms = [
            np.linalg.norm(_project_out(apply(matvec, tests[:, i : i + b]), q).numpy(), axis=-1)
            for i in range(0, probes, b)
        ]
        bound = BOUND_CONSTANT * np.max(np.concatenate(norms, axis=-1), axis=-1)
        if np.all(bound <= target):
            break
    # B = Q^T A, assembled row block by row block: rows of A^T Q.
    parts = [apply(rmatvec, q[:, i : i + widest]) for i in range(0, q.shape[1], widest)]
    small = tf.concat(parts, axis=1) if parts else tf.zeros([batch, 0, n], tf.float64)
    if parts:  # float64 Gram in the smaller dimension
        gram = tf.linalg.matmul(small, small, transpose_a=small.shape[1] > n,
                                transpose_b=small.shape[1] <= n)
        s = tf.sqrt(tf.maximum(symmetric_eigenvalues(gram), 0.0)).numpy()
    else:
        s = np.zeros((batch, 0))
    return SketchResult(
        singular_values=s,
        residual_bound=np.asarray(bound, np.float64),
        sketch_size=int(q.shape[1]),
        failure_probability=float(min(1.0, max(rounds, 1) * 10.0**-probes)),
        rounds=rounds,
    )


def robust_rank_interval(
    singular_values: np.ndarray, residual_bound: np.ndarray, atol: float, max_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """`[low, high]` bounds on `#{s_i(A) > atol}` from a certified sketch.

    Args:
        singular_values: `[B, q]` singular values of `Q^T A`.
        residual_bound: `[B]` bounds `eps` on `||(I - Q Q^T) A||`.
        atol: the threshold.
        max_rank: `min(m, n)`, the rank bound when `eps >= atol`.

    Returns:
        `(low, high)`, int64 `[B]` arrays.
    """
    s = np.asarray(singular_values)
    eps = np.asarray(residual_bound)
    low = (s > atol).sum(axis=-1)
    inner = np.sqrt(np.maximum(atol**2 - eps**2, 0.0))
    high = (s > inner[:, None]).sum(axis=-1)
    high = np.where(eps < atol, high, max_rank)
    return low.astype(np.int64), high.astype(np.int64)
