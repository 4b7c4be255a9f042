"""Matrix-free Jacobian products, batched over probe directions, and exact Grams.

`J v` comes from forward mode (`tf.autodiff.ForwardAccumulator`) and `J^T u`
from reverse mode, for many directions at once: each sample is repeated once
per direction (the direction axis is folded into the batch axis), so memory is
set by the number of directions *in flight*, not by the size of `J`.

`forward_spectra` and `reverse_spectra` push a fixed set of directions through
the network in blocks inside one `tf.while_loop` and return the exact singular
values of every measured Jacobian. The Gram matrix is formed in the smaller of
the two dimensions, in float64; when the block products arrive along the
larger dimension the Gram is accumulated block by block (`F F^T = sum_b F_b
F_b^T`) and the Jacobian is never held, otherwise the reduced Jacobian is
assembled and its Gram formed at the end. float64 computations (and XLA) keep
the SVD of the assembled matrix instead, since a Gram squares the condition
number and float64's own rank threshold lies below what it resolves.

Plain functions on tensors; usable inside `tf.function`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from keras_localrank import memory
from keras_localrank.spectra import symmetric_eigenvalues

__all__ = [
    "jvp",
    "vjp",
    "forward_spectra",
    "reverse_spectra",
    "gram_singular_values",
    "zeros",
]

#: `fn(x) -> list of [N, n_l]` flattened outputs (pre-activations).
OutputsFn = Callable[[tf.Tensor], Sequence[tf.Tensor]]


def jvp(fn: OutputsFn, x: tf.Tensor, directions: tf.Tensor) -> list[tf.Tensor]:
    """Jacobian-vector products of every output of `fn`, many directions at once.

    Args:
        fn: maps `[N, *input_shape]` inputs to a list of `[N, n_l]` outputs.
        x: `[B, *input_shape]` points.
        directions: `[B, d, n0]` directions (flattened input space).

    Returns:
        One `[B, d, n_l]` tensor per output: `J_l(x_b) v_{b,i}`.
    """
    batch = tf.shape(x)[0]
    d = tf.shape(directions)[1]
    repeated = tf.repeat(x, d, axis=0)  # sample b, direction i at b * d + i
    tangents = tf.reshape(tf.cast(directions, x.dtype), tf.shape(repeated))
    with tf.autodiff.ForwardAccumulator(repeated, tangents) as acc:
        outputs = fn(repeated)
    out = []
    for o in outputs:
        t = acc.jvp(o, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        out.append(tf.reshape(t, [batch, d, -1]))
    return out


def vjp(fn: OutputsFn, x: tf.Tensor, cotangents: tf.Tensor, *, index: int = 0) -> tf.Tensor:
    """Vector-Jacobian products of one output of `fn`, many cotangents at once.

    Args:
        fn: maps `[N, *input_shape]` inputs to a list of `[N, n_l]` outputs.
        x: `[B, *input_shape]` points.
        cotangents: `[B, d, n_l]` vectors in the output space of output `index`.
        index: which output of `fn`. Default 0.

    Returns:
        `[B, d, n0]`: `J_l(x_b)^T u_{b,i}`.
    """
    batch = tf.shape(x)[0]
    d = tf.shape(cotangents)[1]
    repeated = tf.repeat(x, d, axis=0)
    with tf.GradientTape() as tape:
        tape.watch(repeated)
        out = fn(repeated)[index]
    grad = tape.gradient(
        out,
        repeated,
        output_gradients=tf.reshape(tf.cast(cotangents, out.dtype), tf.shape(out)),
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    return tf.reshape(grad, [batch, d, -1])


def gram_singular_values(gram: tf.Tensor) -> tf.Tensor:
    """Singular values from a float64 Gram matrix: `sqrt(max(eig, 0))`."""
    return tf.sqrt(tf.maximum(symmetric_eigenvalues(gram), 0.0))


def _block_source(basis: tf.Tensor | None, size: int, block: int, dtype):
    """A function `i -> [block, n]` giving the `i`-th block of direction rows,
    and the number of blocks. `basis` None means the identity of size `size`,
    generated block by block (never materialised)."""
    num = -(-size // block)
    if basis is None:
        offsets = tf.range(block)
        return (lambda i: tf.one_hot(i * block + offsets, size, dtype=dtype)), num
    pad = num * block - size
    padded = tf.reshape(tf.pad(tf.cast(basis, dtype), [[0, pad], [0, 0]]), [num, block, -1])
    return (lambda i: padded[i]), num


def _finish(stored, k: int, *, use_gram: bool) -> tf.Tensor:
    """Singular values of the matrix assembled from stored blocks.

    `stored` stacks `[num_blocks, B, block, m]`; the assembled matrix is
    `[B, num_blocks * block, m]`, truncated to `k` rows. With `use_gram`
    its `k x k` Gram is accumulated in float64 over chunks of the `m`
    columns, read from the stacked blocks: beside them, only one chunk
    (`memory.GRAM_CHUNK_VALUES` values) is held in float64, not a transposed copy
    and a float64 copy of the whole matrix.
    """
    t = stored.stack()
    shape = tf.shape(t)
    num, batch, block, m = shape[0], shape[1], shape[2], shape[3]
    if not use_gram:
        t = tf.transpose(t, [1, 0, 2, 3])
        mat = tf.reshape(t, [batch, num * block, m])[:, :k]
        return tf.linalg.svd(mat, compute_uv=False)
    rows = num * block
    chunk = tf.maximum(1, memory.GRAM_CHUNK_VALUES // tf.maximum(1, batch * rows))
    steps = (m + chunk - 1) // chunk

    def body(j, gram):
        start = j * chunk
        size = tf.minimum(chunk, m - start)
        part = tf.slice(t, tf.stack([0, 0, 0, start]), tf.stack([-1, -1, -1, size]))
        part = tf.reshape(tf.transpose(tf.cast(part, tf.float64), [1, 0, 2, 3]),
                          tf.stack([batch, rows, size]))
        update = tf.linalg.matmul(part, part, transpose_b=True)
        return j + 1, tf.ensure_shape(gram + update, gram.shape)

    _, gram = tf.while_loop(
        lambda j, _: j < steps,
        body,
        (tf.constant(0), zeros(tf.stack([batch, rows, rows]), tf.float64)),
        parallel_iterations=1,
    )
    # The assembled matrix is [B, k, m] with k the smaller side on this path.
    return gram_singular_values(gram[:, :k, :k])


def zeros(shape, dtype) -> tf.Tensor:
    """Zeros that stay out of the graph's constants (loop accumulators).

    Inside a `tf.function` traced with a known batch size, `tf.zeros` has a
    static shape, and Grappler's constant folding turns it into a `Const`
    node that the function keeps for its lifetime: one float64 `n0 x n0`
    Gram per colored layer and one per forward-pack output, on top of the
    loop's own buffers (2.8 GiB on MobileNetV2, outside the memory plan).
    `Empty(init=True)` is excluded from constant folding and zero-filled.

    Args:
        shape: 1-D int32 tensor (or list) of dimensions.
        dtype: element type.
    """
    return tf.raw_ops.Empty(shape=tf.cast(shape, tf.int32), dtype=dtype, init=True)


def forward_spectra(
    fn: OutputsFn,
    x: tf.Tensor,
    basis: tf.Tensor | None,
    units: Sequence[int],
    *,
    block: int,
    use_gram: bool = True,
) -> list[tf.Tensor]:
    """Exact singular values of `F_l = J_l(x) V` for every output, by forward mode.

    Args:
        fn: maps `[N, *input_shape]` inputs to `[N, n_l]` outputs.
        x: `[B, *input_shape]` points.
        basis: `[k, n0]` orthonormal rows spanning a subspace that contains
            every Jacobian's row space, so that `F_l` has the singular values
            of `J_l`; None for the identity (`k = n0`, never materialised).
        units: `n_l` of each output.
        block: directions in flight per pass (`B * block` replicas).
        use_gram: float64 Gram in the smaller dimension (True, the default)
            or SVD of the assembled `F_l` (float64 inputs, XLA).

    Returns:
        One `[B, min(n_l, k)]` tensor of singular values per output (float64
        when `use_gram`).
    """
    n0 = int(x.shape[1:].num_elements())
    k = n0 if basis is None else int(basis.shape[0])
    batch = tf.shape(x)[0]
    source, num = _block_source(basis, k, block, x.dtype)
    accumulate = [use_gram and n <= k for n in units]

    init = []
    for n, acc in zip(units, accumulate):
        if acc:
            init.append(zeros(tf.stack([batch, n, n]), tf.float64))
        else:
            init.append(tf.TensorArray(x.dtype, size=num, element_shape=None))

    def body(i, state):
        v = tf.broadcast_to(source(i), tf.stack([batch, block, n0]))
        columns = jvp(fn, x, v)  # [B, block, n_l] each: block columns of F_l, transposed
        new = []
        for acc, c, s in zip(accumulate, columns, state):
            if acc:
                c64 = tf.cast(c, tf.float64)
                new.append(s + tf.linalg.matmul(c64, c64, transpose_a=True))
            else:
                new.append(s.write(i, c))
        return i + 1, new

    _, state = tf.while_loop(
        lambda i, _: i < num, body, (tf.constant(0), init), parallel_iterations=1
    )
    out = []
    for acc, s in zip(accumulate, state):
        if acc:
            out.append(gram_singular_values(s))
        else:  # assembled F_l^T: [B, k, n_l], k < n_l or SVD wanted
            out.append(_finish(s, k, use_gram=use_gram))
    return out


def reverse_spectra(
    fn: OutputsFn,
    x: tf.Tensor,
    basis: tf.Tensor | None,
    units: int,
    *,
    index: int = 0,
    block: int,
    use_gram: bool = True,
) -> tf.Tensor:
    """Exact singular values of `F = J(x) V` for one output, by reverse mode.

    Rows of `J` come from `J^T e_j` for blocks of output basis vectors `e_j`.

    Args:
        fn: maps `[N, *input_shape]` inputs to `[N, n_l]` outputs.
        x: `[B, *input_shape]` points.
        basis: `[k, n0]` orthonormal rows or None (see `forward_spectra`).
        units: `n_l` of output `index`.
        index: which output of `fn`. Default 0.
        block: rows in flight per pass.
        use_gram: see `forward_spectra`.

    Returns:
        `[B, min(n_l, k)]` singular values.
    """
    k = int(x.shape[1:].num_elements()) if basis is None else int(basis.shape[0])
    batch = tf.shape(x)[0]
    source, num = _block_source(None, units, block, x.dtype)
    accumulate = use_gram and k <= units
    if accumulate:
        init = zeros(tf.stack([batch, k, k]), tf.float64)
    else:
        init = tf.TensorArray(x.dtype, size=num, element_shape=None)

    def body(i, s):
        u = tf.broadcast_to(source(i), tf.stack([batch, block, units]))
        rows = vjp(fn, x, u, index=index)  # [B, block, n0]
        if basis is not None:
            rows = tf.linalg.matmul(rows, tf.cast(basis, x.dtype), transpose_b=True)
        if accumulate:
            r64 = tf.cast(rows, tf.float64)
            return i + 1, s + tf.linalg.matmul(r64, r64, transpose_a=True)
        return i + 1, s.write(i, rows)

    _, state = tf.while_loop(
        lambda i, _: i < num, body, (tf.constant(0), init), parallel_iterations=1
    )
    if accumulate:
        return gram_singular_values(state)
    return _finish(state, units, use_gram=use_gram)
