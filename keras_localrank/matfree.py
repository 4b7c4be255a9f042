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

import numpy as np
import tensorflow as tf

from keras_localrank import host_linalg, memory
from keras_localrank.spectra import (
    HOST_LAPACK_MIN_ORDER,
    in_xla_context,
    rank_record,
    symmetric_eigenvalues,
    symmetric_records,
)

__all__ = [
    "host_open",
    "on_host",
    "host_singular_values",
    "host_take",
    "host_update",
    "jvp",
    "vjp",
    "forward_spectra",
    "reverse_spectra",
    "gram_singular_values",
    "zeros",
]

#: `fn(x) -> list of [N, n_l]` flattened outputs (pre-activations).
OutputsFn = Callable[[tf.Tensor], Sequence[tf.Tensor]]


def _softsign_second_derivative(op, grad):
    """Gradient of `SoftsignGrad(g, x) = g / (1 + |x|)^2`, which TensorFlow
    does not register: forward mode differentiates an op's gradient, so
    without it every `ForwardAccumulator` through `softsign` failed
    ("gradient registry has no entry for: SoftsignGrad")."""
    g, x = op.inputs
    denominator = 1.0 + tf.abs(x)
    return grad / denominator**2, -2.0 * grad * g * tf.sign(x) / denominator**3


try:
    tf.RegisterGradient("SoftsignGrad")(_softsign_second_derivative)
except KeyError:  # registered already (a later TensorFlow, or a re-import)
    pass


def jvp(fn: OutputsFn, x: tf.Tensor, directions: tf.Tensor) -> list[tf.Tensor]:
    """Jacobian-vector products of every output of `fn`, many directions at once.

    When `fn` is linearized (a `jacobians.Preactivations` whose `linearized`
    is True: a network of `linearize.LINEARIZED_LAYERS`), its `tangents`
    give the products by the layers' own linear maps, the primal computed
    once per sample. Otherwise each sample is repeated once per direction
    (the direction axis folded into the batch axis) under a
    `ForwardAccumulator`, which recomputes the primal for every direction.

    Args:
        fn: maps `[N, *input_shape]` inputs to a list of `[N, n_l]` outputs.
        x: `[B, *input_shape]` points.
        directions: `[B, d, n0]` directions (flattened input space).

    Returns:
        One `[B, d, n_l]` tensor per output: `J_l(x_b) v_{b,i}`.
    """
    if getattr(fn, "linearized", False):
        return fn.tangents(x, directions)
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


def gram_singular_values(gram: tf.Tensor, spec=None) -> tf.Tensor:
    """Singular values from a float64 Gram matrix: `sqrt(max(eig, 0))`; or,
    given a rule `spec` (`spectra.record_spec`), its rank record
    (`spectra.rank_record`), computed without eigenvalues on the host."""
    if spec is not None:
        return symmetric_records(gram, spec)
    return tf.sqrt(tf.maximum(symmetric_eigenvalues(gram), 0.0))


def _recorded(s: tf.Tensor, spec) -> tf.Tensor:
    """`s` (singular values), or its rank record when `spec` is given."""
    return s if spec is None else rank_record(s, spec)


def on_host(sizes) -> bool:
    """Whether Grams of these orders are accumulated on the host
    (`host_linalg`: BLAS `dsyrk` in place, then LAPACK), not by TensorFlow:
    outside XLA, from order `HOST_LAPACK_MIN_ORDER` up."""
    return bool(sizes) and min(sizes) >= HOST_LAPACK_MIN_ORDER and not in_xla_context()


def host_open(batch, sizes) -> tf.Tensor:
    """Keys `[L]` of new zero float64 Grams `[batch, n, n]` held on the host."""
    keys = [
        tf.numpy_function(host_linalg.gram_open, [batch, n], tf.int64, stateful=True)
        for n in sizes
    ]
    return tf.ensure_shape(tf.stack(keys), [len(sizes)])


def host_update(keys: tf.Tensor, blocks) -> tf.Tensor:
    """`G_l += F_l^T F_l` on the host for every `[B, d, n_l]` block; returns
    the keys, to be threaded through the loop (it orders the updates)."""
    out = tf.numpy_function(host_linalg.gram_update, [keys, *blocks], tf.int64, stateful=True)
    return tf.ensure_shape(out, keys.shape)


def host_take(key: tf.Tensor, n: int) -> tf.Tensor:
    """The held Gram `[B, n, n]` of `key` (`[1]`) as a tensor (it is released)."""
    gram = tf.numpy_function(host_linalg.gram_take, [key], tf.float64, stateful=True)
    return tf.ensure_shape(gram, [None, n, n])


def host_singular_values(keys: tf.Tensor, sizes, specs=None) -> list[tf.Tensor]:
    """Singular values `[B, n_l]` from the held Grams (which are released);
    given one rule per Gram (`specs`, all with the same number of
    tolerances), their rank records `[B, 2 + T]` instead."""
    if specs is not None:
        specs = tf.constant(np.stack([np.asarray(spec, np.float64) for spec in specs]))
        width = 2 + int(specs.shape[1])
        values = tf.numpy_function(
            host_linalg.gram_records, [keys, specs], [tf.float64] * len(sizes), stateful=True
        )
        if not isinstance(values, (list, tuple)):
            values = [values]
        return [tf.ensure_shape(v, [None, width]) for v in values]
    values = tf.numpy_function(
        host_linalg.gram_eigvalsh, [keys], [tf.float64] * len(sizes), stateful=True
    )
    if not isinstance(values, (list, tuple)):  # eager mode unpacks a single output
        values = [values]
    return [tf.sqrt(tf.maximum(tf.ensure_shape(v, [None, n]), 0.0)) for v, n in zip(values, sizes)]


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


def _finish(stored, k: int, *, use_gram: bool, solve: bool = True, spec=None) -> tf.Tensor:
    """Singular values (rank record with `spec`) of the matrix assembled
    from stored blocks (or, with `solve=False` and a Gram held on the host,
    its key `[1]`, for `host_singular_values` to solve it with others in one
    call).

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
        return _recorded(tf.linalg.svd(mat, compute_uv=False), spec)
    rows = num * block
    chunk = tf.maximum(1, memory.GRAM_CHUNK_VALUES // tf.maximum(1, batch * rows))
    steps = (m + chunk - 1) // chunk
    host = on_host([k])

    def body(j, gram):
        start = j * chunk
        size = tf.minimum(chunk, m - start)
        part = tf.slice(t, tf.stack([0, 0, 0, start]), tf.stack([-1, -1, -1, size]))
        part = tf.reshape(tf.transpose(part, [1, 0, 2, 3]), tf.stack([batch, rows, size]))
        if host:  # the first k rows (the rest is padding), as [B, size, k] blocks
            return j + 1, host_update(gram, [tf.transpose(part[:, :k], [0, 2, 1])])
        part = tf.cast(part, tf.float64)
        update = tf.linalg.matmul(part, part, transpose_b=True)
        return j + 1, tf.ensure_shape(gram + update, gram.shape)

    init = host_open(batch, [k]) if host else zeros(tf.stack([batch, rows, rows]), tf.float64)
    _, gram = tf.while_loop(
        lambda j, _: j < steps, body, (tf.constant(0), init), parallel_iterations=1
    )
    if host:
        if not solve:
            return gram
        return host_singular_values(gram, [k], None if spec is None else [spec])[0]
    # The assembled matrix is [B, k, m] with k the smaller side on this path.
    return gram_singular_values(gram[:, :k, :k], spec)


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
    records=None,
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
        records: None, or one rule per output (`spectra.record_spec`, the
            same number of tolerances each): return rank records
            (`spectra.rank_record`) instead of singular values.

    Returns:
        One `[B, min(n_l, k)]` tensor of singular values per output (float64
        when `use_gram`), or one `[B, 2 + T]` rank record per output.
    """
    specs = list(records) if records is not None else [None] * len(units)
    n0 = int(x.shape[1:].num_elements())
    k = n0 if basis is None else int(basis.shape[0])
    batch = tf.shape(x)[0]
    source, num = _block_source(basis, k, block, x.dtype)
    accumulate = [use_gram and n <= k for n in units]
    sizes = [n for n, acc in zip(units, accumulate) if acc]
    host = on_host(sizes)

    init = []
    for n, acc in zip(units, accumulate):
        if acc and not host:
            init.append(zeros(tf.stack([batch, n, n]), tf.float64))
        elif not acc:
            init.append(tf.TensorArray(x.dtype, size=num, element_shape=None))
    keys = host_open(batch, sizes) if host else tf.zeros([0], tf.int64)

    def body(i, keys, state):
        v = tf.broadcast_to(source(i), tf.stack([batch, block, n0]))
        # [B, block, n_l] each: block columns of F_l, transposed
        columns = jvp(fn, x, v)
        if host:
            keys = host_update(keys, [c for acc, c in zip(accumulate, columns) if acc])
            columns = [c for acc, c in zip(accumulate, columns) if not acc]
        new = []
        for c, s in zip(columns, state):
            if isinstance(s, tf.TensorArray):
                new.append(s.write(i, c))
            else:
                c64 = tf.cast(c, tf.float64)
                new.append(s + tf.linalg.matmul(c64, c64, transpose_a=True))
        return i + 1, keys, new

    _, keys, state = tf.while_loop(
        lambda i, *_: i < num, body, (tf.constant(0), keys, init), parallel_iterations=1
    )
    # Grams held on the host (the accumulated ones, in `keys`, and the
    # assembled ones) are solved in one call, one matrix per core.
    state = iter(state)
    out = [None] * len(units)
    held, held_sizes, held_index = [], [], []
    if host:
        held.append(keys)
        held_sizes += sizes
        held_index += [j for j, acc in enumerate(accumulate) if acc]
    for j, acc in enumerate(accumulate):
        if acc and host:
            continue
        if acc:
            out[j] = gram_singular_values(next(state), specs[j])
        elif use_gram and on_host([k]):  # assembled F_l^T: [B, k, n_l], k < n_l
            held.append(_finish(next(state), k, use_gram=True, solve=False))
            held_sizes.append(k)
            held_index.append(j)
        else:  # assembled, solved in TensorFlow (SVD wanted, XLA or small k)
            out[j] = _finish(next(state), k, use_gram=use_gram, spec=specs[j])
    if held:
        solved = host_singular_values(
            tf.concat(held, 0),
            held_sizes,
            None if records is None else [specs[j] for j in held_index],
        )
        for j, values in zip(held_index, solved):
            out[j] = values
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
    record=None,
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
        record: None, or a rule (`spectra.record_spec`): return the rank
            record `[B, 2 + T]` instead of the singular values.

    Returns:
        `[B, min(n_l, k)]` singular values, or the rank record.
    """
    k = int(x.shape[1:].num_elements()) if basis is None else int(basis.shape[0])
    batch = tf.shape(x)[0]
    source, num = _block_source(None, units, block, x.dtype)
    accumulate = use_gram and k <= units
    host = accumulate and on_host([k])
    if host:
        init = host_open(batch, [k])
    elif accumulate:
        init = zeros(tf.stack([batch, k, k]), tf.float64)
    else:
        init = tf.TensorArray(x.dtype, size=num, element_shape=None)

    def body(i, s):
        u = tf.broadcast_to(source(i), tf.stack([batch, block, units]))
        rows = vjp(fn, x, u, index=index)  # [B, block, n0]
        if basis is not None:
            rows = tf.linalg.matmul(rows, tf.cast(basis, x.dtype), transpose_b=True)
        if host:
            return i + 1, host_update(s, [rows])
        if accumulate:
            r64 = tf.cast(rows, tf.float64)
            return i + 1, s + tf.linalg.matmul(r64, r64, transpose_a=True)
        return i + 1, s.write(i, rows)

    _, state = tf.while_loop(
        lambda i, _: i < num, body, (tf.constant(0), init), parallel_iterations=1
    )
    if host:
        return host_singular_values(state, [k], None if record is None else [record])[0]
    if accumulate:
        return gram_singular_values(state, record)
    return _finish(state, units, use_gram=use_gram, spec=record)
