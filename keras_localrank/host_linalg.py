"""Float64 Grams and their eigenvalues by the host's BLAS and LAPACK.

Two kernels of the exact path run here, on NumPy arrays, called from the
traced measurement through `tf.numpy_function` (`matfree`):

**Gram accumulation.** `J^T J = sum_b F_b^T F_b` over blocks of Jacobian
products is accumulated in place by BLAS `dsyrk` (the lower triangle only, no
product or new sum allocated) into buffers held here (`gram_open`,
`gram_update`, `gram_eigvalsh`). TensorFlow has no symmetric rank-k update:
its float64 `matmul` plus add took 97-115 ms for one rank-212 update of a
3,072 x 3,072 Gram on 2 cores; `dsyrk` in place takes 26 ms on one core,
and updates of different layers run on different cores (`ctypes` releases
the GIL). When the routine is not found, `a.T @ a` is added instead.

**Eigenvalues.** `eigvalsh(a)` returns the eigenvalues of the symmetric matrix `a` in
ascending order, as `numpy.linalg.eigvalsh` does, but through LAPACK's
two-stage solver (`dsyevd_2stage`: a blocked reduction to band form, then
band to tridiagonal) when the BLAS library NumPy loaded exports it. For
eigenvalues only this reduction does most of its work in matrix-matrix
products; NumPy's `dsyevd` reduces straight to tridiagonal form, half of it
in memory-bound matrix-vector products. Measured on this project's 2-core
machine, one thread, a Gram matrix of order 3,072: 2.55 s with NumPy,
1.68 s two-stage (1.5x), eigenvalues equal to 1.4e-15 of the largest.

Both routines are found with `ctypes` in the OpenBLAS that NumPy loaded
(`threadpoolctl` names its file), under the names its builds use
(`LAPACKE_dsyevd_2stage`, `cblas_dsyrk`, with the `scipy_` prefix and `64_`
suffix of the NumPy wheels' ILP64 OpenBLAS). On first use each is checked
against NumPy on a small matrix; when one is missing, fails or disagrees,
NumPy is used instead. Plain functions on NumPy arrays.

Reference:
    Haidar, Ltaief & Dongarra, "Parallel reduction to condensed forms for
    symmetric eigenvalue problems using aggregated fine-grained and
    memory-aware kernels", SC 2011 (the two-stage reduction in LAPACK 3.7+).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import itertools
import math
import os
import threading

import numpy as np

__all__ = [
    "eigvalsh",
    "eigvalsh_batch",
    "gram_eigvalsh",
    "gram_records",
    "largest_eigenvalue",
    "positive_inertia",
    "rank_record",
    "records_batch",
    "gram_open",
    "gram_take",
    "gram_update",
    "open_grams",
    "release",
    "released_on_error",
    "two_stage_available",
    "window_gram",
]

_COL_MAJOR = 102  # column-major layout: no transposed copy
_LOWER, _NO_TRANS = 122, 111  # CBLAS enums
_state: dict = {}
_lock = threading.Lock()


def _find(base: str, signature):
    """`base` (e.g. "cblas_dsyrk") in NumPy's OpenBLAS as a ctypes function,
    `signature(integer type) -> (restype, argtypes)`; or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    for info in threadpool_info():
        if info.get("user_api") != "blas" or "openblas" not in str(info.get("internal_api")):
            continue
        try:
            lib = ctypes.CDLL(info["filepath"])
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix, ilp64 in (("64_", True), ("", False)):
                fn = getattr(lib, prefix + base + suffix, None)
                if fn is None:
                    continue
                fn.restype, fn.argtypes = signature(ctypes.c_int64 if ilp64 else ctypes.c_int32)
                return fn
    return None


def _find_routine():
    """The two-stage eigenvalue routine, or None."""
    return _find(
        "LAPACKE_dsyevd_2stage",
        lambda i: (i, [ctypes.c_int, ctypes.c_char, ctypes.c_char, i,
                       ctypes.c_void_p, i, ctypes.c_void_p]),
    )  # fmt: skip


def _work_array(a: np.ndarray, overwrite: bool) -> np.ndarray:
    """`a` itself when a LAPACK routine may destroy it (`overwrite`, float64,
    Fortran order, writeable), else a float64 Fortran-order copy."""
    if overwrite and a.dtype == np.float64 and a.flags.f_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=np.float64, order="F", copy=True)


def _two_stage(fn, a: np.ndarray, *, overwrite: bool = False) -> np.ndarray | None:
    """Eigenvalues by `fn` (None when LAPACK reports an error)."""
    n = a.shape[-1]
    work = _work_array(a, overwrite)
    w = np.empty(n, np.float64)
    info = fn(_COL_MAJOR, b"N", b"L", n, work.ctypes.data, max(1, n), w.ctypes.data)
    return w if info == 0 else None


def _routine():
    """The checked two-stage routine, or None (looked up once per process)."""
    with _lock:
        if "fn" not in _state:
            fn = _find_routine()
            if fn is not None:
                rng = np.random.default_rng(0)
                b = rng.standard_normal((40, 40))
                check = b @ b.T
                ours = _two_stage(fn, check)
                ref = np.linalg.eigvalsh(check)
                if ours is None or not np.allclose(ours, ref, rtol=0, atol=1e-10 * ref[-1]):
                    fn = None
            _state["fn"] = fn
        return _state["fn"]


def two_stage_available() -> bool:
    """Whether `eigvalsh` uses LAPACK's two-stage solver in this process."""
    return _routine() is not None


def eigvalsh(a: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Ascending eigenvalues of one symmetric float64 matrix `[n, n]` (its
    lower triangle is read), as `numpy.linalg.eigvalsh`.

    Args:
        a: the matrix.
        overwrite: the solver may use `a` (float64, Fortran order) as its
            work array and destroy it, instead of a copy. Default False.

    Raises:
        ValueError: `a` is not a square 2-D array.
        numpy.linalg.LinAlgError: the solver did not converge.
    """
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"Expected `a` to be a square matrix. Received: shape={a.shape}")
    fn = _routine() if a.shape[0] > 1 else None
    if fn is not None:
        w = _two_stage(fn, a, overwrite=overwrite)
        if w is not None:
            return w
    return np.linalg.eigvalsh(a)


# -- Gram accumulation ---------------------------------------------------------


def _find_syrk():
    """`(cblas_dsyrk, cblas_dgemm)`, checked against NumPy on a small matrix
    (the split update included), or None."""
    syrk = _find(
        "cblas_dsyrk",
        lambda i: (None, [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, ctypes.c_double,
                          ctypes.c_void_p, i, ctypes.c_double, ctypes.c_void_p, i]),
    )  # fmt: skip
    gemm = _find(
        "cblas_dgemm",
        lambda i: (None, [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, ctypes.c_double,
                          ctypes.c_void_p, i, ctypes.c_void_p, i, ctypes.c_double,
                          ctypes.c_void_p, i]),
    )  # fmt: skip
    if syrk is None or gemm is None:
        return None
    c = np.random.default_rng(0).standard_normal((7, 40))
    g = np.zeros((40, 40), order="F")
    for job in _split_jobs((syrk, gemm), g, c):
        job()
    if not np.allclose(np.tril(g), np.tril(c.T @ c), rtol=0, atol=1e-12 * np.abs(g).max()):
        return None
    return syrk, gemm


#: Columns whose upper triangle `gram_take` fills at once.
_SYMMETRIZE_BLOCK = 256

#: Gram orders from which one update is split over two cores.
SPLIT_MIN_ORDER = 512
_TRANS = 112


def _split_jobs(kernels, gram: np.ndarray, c: np.ndarray, parts: int = 2) -> list:
    """`gram += c^T c` (lower triangle) in place as `parts` (1 or 2) jobs;
    `gram` `[n, n]` float64 in Fortran order, `c` `[d, n]` float64
    C-contiguous, read as the column-major `[n, d]` matrix `M = c^T`.

    Two parts split the rows at `h ~ 0.29 n`, which balances the flops:
    `C[:h, :h] += M_1 M_1^T` and `C[h:, :h] += M_2 M_1^T` in one job,
    `C[h:, h:] += M_2 M_2^T` in the other.
    """
    syrk, gemm = kernels
    d, n = c.shape
    a, g, ld, size = c.ctypes.data, gram.ctypes.data, max(1, n), 8

    def rank_k(rows: int, start: int):
        return lambda: syrk(_COL_MAJOR, _LOWER, _NO_TRANS, rows, d, 1.0, a + size * start, ld,
                            1.0, g + size * (start + start * n), ld)  # fmt: skip

    if parts == 1 or n < 2:
        return [rank_k(n, 0)]
    h = max(1, round(0.29 * n))

    def top_and_off_diagonal():
        rank_k(h, 0)()
        gemm(_COL_MAJOR, _NO_TRANS, _TRANS, n - h, h, d, 1.0, a + size * h, ld, a, ld, 1.0,
             g + size * h, ld)  # fmt: skip

    return [top_and_off_diagonal, rank_k(n - h, h)]


def _syrk_routine():
    with _lock:
        if "syrk" not in _state:
            _state["syrk"] = _find_syrk()
        return _state["syrk"]


_grams: dict[int, tuple[int, list[np.ndarray]]] = {}  # key: (n, one buffer per sample)
_keys = itertools.count(1)


def _workers() -> int:
    return max(1, os.cpu_count() or 1)


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    with _lock:
        if "pool" not in _state:
            _state["pool"] = concurrent.futures.ThreadPoolExecutor(
                max_workers=_workers(), thread_name_prefix="host-gram"
            )
        return _state["pool"]


def _one_thread():
    """A context in which BLAS runs single-threaded (threaded OpenBLAS spins
    and stalls when the cores are busy; the pool runs one matrix per core)."""
    if "controller" not in _state:
        from threadpoolctl import ThreadpoolController

        _state["controller"] = ThreadpoolController()
    return _state["controller"].limit(limits=1, user_api="blas")


def gram_open(batch, n) -> np.int64:
    """A new zero `[batch, n, n]` float64 Gram held here; returns its key."""
    batch, n = int(batch), int(n)
    key = next(_keys)
    _grams[key] = (n, [np.zeros((n, n), np.float64, order="F") for _ in range(batch)])
    return np.int64(key)


def gram_update(keys, *blocks) -> np.ndarray:
    """`G_l += F_l^T F_l` for every held Gram `keys[l]` and its block
    `blocks[l]` (`[batch, d, n_l]`), in place, one matrix per core (a single
    large matrix is split over two). Returns `keys` (the token that orders
    the updates in a traced loop)."""
    keys = np.asarray(keys)
    pairs = []
    for key, block in zip(keys.tolist(), blocks):
        grams = _grams[int(key)][1]
        pairs.extend(zip(grams, np.ascontiguousarray(block, dtype=np.float64)))
    kernels = _syrk_routine()
    if kernels is None:
        jobs = [lambda g=g, c=c: g.__iadd__(c.T @ c) for g, c in pairs]
    else:
        parts = 2 if len(pairs) < _workers() else 1
        jobs = [
            job
            for g, c in pairs
            for job in _split_jobs(kernels, g, c, parts if g.shape[0] >= SPLIT_MIN_ORDER else 1)
        ]
    with _one_thread():
        if len(jobs) == 1:
            jobs[0]()
        else:
            list(_pool().map(lambda job: job(), jobs))
    return keys


def gram_take(keys) -> np.ndarray:
    """The held Gram `keys[0]` as one symmetric `[batch, n, n]` array (the
    updates fill the lower triangle; the upper one is filled in place, a
    block of columns at a time); it is released."""
    _, grams = _grams.pop(int(np.asarray(keys).reshape(-1)[0]))
    for g in grams:
        n = g.shape[0]
        for j in range(0, n, _SYMMETRIZE_BLOCK):
            k = min(n, j + _SYMMETRIZE_BLOCK)
            g[j:k, k:] = g[k:, j:k].T  # the block column's part below its diagonal block
            g[j:k, j:k] = np.tril(g[j:k, j:k]) + np.tril(g[j:k, j:k], -1).T
    return grams[0][None] if len(grams) == 1 else np.stack(grams)


def _solve_held(keys, solve_one, width) -> list[np.ndarray]:
    """`solve_one(l, matrix) -> [w]` on every held Gram `keys[l]` (which are
    then released: their buffers are the solver's work arrays), one matrix
    per core, the largest first (TensorFlow runs its host functions one at a
    time: all solves are handed over in one call). Returns `[batch, w]` per
    key; `width(l, n)` is `w` for an empty batch."""
    keys = [int(k) for k in np.asarray(keys).reshape(-1)]
    sizes, grams = zip(*[_grams.pop(k) for k in keys]) if keys else ((), ())
    grams = [list(g) for g in grams]
    jobs = sorted(
        ((i, b) for i, g in enumerate(grams) for b in range(len(g))),
        key=lambda job: -grams[job[0]][job[1]].shape[0],
    )
    values = [[None] * len(g) for g in grams]

    def solve(job):
        i, b = job
        values[i][b] = solve_one(i, grams[i][b])
        grams[i][b] = None  # free the buffer as soon as it is solved

    with _one_thread():
        list(_pool().map(solve, jobs))
    return [
        np.stack(v) if v else np.zeros((0, width(i, n)), np.float64)
        for i, (v, n) in enumerate(zip(values, sizes))
    ]


def gram_eigvalsh(keys) -> list[np.ndarray]:
    """Ascending eigenvalues `[batch, n_l]` of every held Gram `keys[l]`,
    which are then released."""
    return _solve_held(
        keys, lambda _, g: eigvalsh(g, overwrite=True), lambda _, n: n
    )


def gram_records(keys, specs) -> list[np.ndarray]:
    """`rank_record` `[batch, 2 + T]` of every held Gram `keys[l]` with its
    thresholds `specs[l]` (`[L, T, 2]`), which are then released."""
    specs = np.asarray(specs, np.float64)
    return _solve_held(
        keys,
        lambda i, g: rank_record(g, specs[i], overwrite=True),
        lambda i, _: 2 + specs.shape[1],
    )


def _map_batch(fn, matrices: np.ndarray, width: int) -> np.ndarray:
    """`fn` over a batch `[..., n, n]` -> `[..., width]`, one matrix per
    core, each with a single-threaded BLAS (threaded BLAS spins and stalls
    on a busy machine: 4.7 s instead of 0.05 s for one 784 x 784 matrix at
    load 7)."""
    matrices = np.asarray(matrices)
    n = matrices.shape[-1]
    if matrices.size == 0:  # no matrices, or matrices of order 0
        return np.zeros((*matrices.shape[:-2], width), np.float64)
    flat = matrices.reshape(-1, n, n)
    with _one_thread():
        if len(flat) == 1:
            values = [fn(flat[0])]
        else:
            values = list(_pool().map(fn, flat))
    return np.stack(values).reshape(*matrices.shape[:-2], width)


def eigvalsh_batch(matrices: np.ndarray) -> np.ndarray:
    """`eigvalsh` over a batch `[..., n, n]` -> `[..., n]`."""
    return _map_batch(eigvalsh, matrices, np.shape(matrices)[-1])


def records_batch(matrices: np.ndarray, spec: np.ndarray) -> np.ndarray:
    """`rank_record` over a batch `[..., n, n]` -> `[..., 2 + T]`, one
    threshold rule `spec` (`[T, 2]`) for all."""
    spec = np.asarray(spec, np.float64)
    return _map_batch(lambda a: rank_record(a, spec), matrices, 2 + len(spec))


# -- Grams of local Jacobians ----------------------------------------------------


#: Bytes of float64 local Grams `window_gram` forms at once per core.
WINDOW_BLOCK_BYTES = 2**25


def window_gram(products: np.ndarray, windows, input_shape) -> np.ndarray:
    """`J^T J` (`[B, n0, n0]`, float64, symmetric) of local Jacobians from
    their colour products, summed window by window.

    At output position `p` the Jacobian's rows read only the inputs of a box
    of the input grid (all channels): `windows[p] = (colours, box)`, the
    colours reading that box in row-major input order and the box as one
    slice per spatial axis (`colored.Coloring.windows`). The position's
    local Gram `W_p W_p^T` (`W_p`: `[m_p, C_out]`, its rows' products on the
    box) is added to the box's block of `J^T J`, a strided view of the
    Gram: no scatter. Positions with boxes of one size are multiplied
    together (at most `WINDOW_BLOCK_BYTES` of local Grams at once). One
    sample per core; a single sample's positions are split over the cores
    (one partial Gram each).

    Args:
        products: `[B, num_colours, P * C_out]` colour products.
        windows: `[(colours [m_p] int array, box: tuple of slices)] * P`.
        input_shape: `(N_1, ..., N_d, C)`.
    """
    products = np.asarray(products)
    batch, _, width = products.shape
    positions = len(windows)
    v = products.reshape(batch, products.shape[1], positions, width // positions)
    n0 = int(np.prod(input_shape))
    spatial, channels = tuple(input_shape[:-1]), int(input_shape[-1])
    groups: dict = {}
    for p, (_, box) in enumerate(windows):
        groups.setdefault(tuple(s.stop - s.start for s in box), []).append(p)
    tasks = []  # (sizes, positions, colours [G, m])
    for sizes, members in groups.items():
        m = math.prod(sizes) * channels
        step = max(1, WINDOW_BLOCK_BYTES // (8 * m * m))
        for i in range(0, len(members), step):
            chunk = members[i : i + step]
            tasks.append((sizes, chunk, np.stack([windows[p][0] for p in chunk])))
    out = np.zeros((batch, n0, n0), np.float64)
    parts = 1 if batch >= _workers() else max(1, min(_workers(), len(tasks)))

    # The last spatial axis and the channels are one contiguous axis of the
    # Gram's view (a box row is a contiguous run of inputs).
    rows = (*spatial[:-1], spatial[-1] * channels)

    def job(b: int, part: int) -> np.ndarray:
        g = out[b] if part == 0 else np.zeros((n0, n0), np.float64)
        grid = g.reshape(*rows, *rows)
        for sizes, chunk, colours in tasks[part::parts]:
            w = v[b][colours, np.asarray(chunk)[:, None], :].astype(np.float64)  # [G, m, C_out]
            box_rows = (*sizes[:-1], sizes[-1] * channels)
            local = np.matmul(w, w.transpose(0, 2, 1)).reshape(len(chunk), *box_rows, *box_rows)
            for k, p in enumerate(chunk):
                box = windows[p][1]
                last = box[-1]
                block = (*box[:-1], slice(last.start * channels, last.stop * channels))
                grid[block + block] += local[k]
        return g

    jobs = [(b, part) for b in range(batch) for part in range(parts)]
    with _one_thread():
        partial = list(_pool().map(lambda j: job(*j), jobs)) if len(jobs) > 1 else [job(0, 0)]
    for (b, part), g in zip(jobs, partial):
        if part:
            out[b] += g
    return out


# -- Ranks without eigenvalues -------------------------------------------------

#: Below this order a record is read off the eigenvalues (cheap there).
RECORD_MIN_ORDER = 64

#: Relative accuracy of the largest eigenvalue found by Lanczos: the
#: threshold `rtol * sigma_max` moves by at most this fraction of itself,
#: below the eigen-solver's own rounding relative to the default threshold
#: (`n * eps64 / rtol^2 ~ 5e-6` at order 3,072 in float32).
LARGEST_TOL = 1e-8


def positive_inertia(a: np.ndarray, shift: float, *, overwrite: bool = False) -> int:
    """The number of eigenvalues of the symmetric matrix `a` above `shift`.

    By Sylvester's law of inertia, `a - shift I = L D L^T` (LAPACK's
    Bunch-Kaufman `dsytrf`, lower triangle read) has as many eigenvalues
    above 0 as the block diagonal `D` (1 x 1 and 2 x 2 blocks): about
    `n^3 / 3` flops, against `~4 n^3 / 3` for the eigenvalues (0.30 s against
    1.8 s at order 3,072 on one core of this project's machine).

    Args:
        a: `[n, n]` symmetric float64 matrix.
        shift: the threshold.
        overwrite: `a` (float64, Fortran order) may be destroyed.
    """
    from scipy.linalg import lapack

    n = a.shape[0]
    if n == 0:
        return 0
    work = _work_array(a, overwrite)
    work.flat[:: n + 1] -= shift
    lwork = max(int(lapack.dsytrf_lwork(n, lower=1)[0]), 64 * n)
    ldu, ipiv, info = lapack.dsytrf(work, lower=1, lwork=lwork, overwrite_a=1)
    if info < 0:
        raise ValueError(f"dsytrf: illegal argument {-info}")
    diag, sub = np.diagonal(ldu), np.diagonal(ldu, -1)
    count, k = 0, 0
    two = ipiv < 0  # rows k, k+1 of a 2 x 2 block carry the same negative pivot
    while k < n:
        if two[k] and k + 1 < n:
            p, q, r = diag[k], sub[k], diag[k + 1]
            det = p * r - q * q
            count += 1 if det < 0 else (2 if det > 0 and p + r > 0 else int(det == 0 and p + r > 0))
            k += 2
        else:
            count += int(diag[k] > 0)
            k += 1
    return count


def largest_eigenvalue(a: np.ndarray) -> float:
    """The largest eigenvalue of the symmetric matrix `a` (lower triangle
    read) by Lanczos (ARPACK, fixed start: deterministic), relative accuracy
    `LARGEST_TOL`."""
    n = a.shape[0]
    if n < RECORD_MIN_ORDER:
        return float(np.linalg.eigvalsh(a)[-1]) if n else 0.0
    from scipy.linalg import blas
    from scipy.sparse.linalg import LinearOperator, eigsh

    a = np.asfortranarray(a, dtype=np.float64)
    op = LinearOperator((n, n), matvec=lambda v: blas.dsymv(1.0, a, v, lower=1), dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    w = eigsh(op, k=1, which="LA", tol=LARGEST_TOL, v0=v0, return_eigenvectors=False)
    return float(w[0])


def rank_record(a: np.ndarray, spec: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """`[sigma_max, sum sigma_i^2, count_1, ..., count_T]` of a float64 Gram
    `a` (`sigma_i^2` its eigenvalues) without its eigenvalues.

    `count_t = #{sigma_i > max(atol_t, rtol_t * sigma_max)}`, `spec[t] =
    (atol_t, rtol_t)`: the `numpy.linalg.matrix_rank` rule, counted by
    `positive_inertia` at the squared threshold; `sigma_max` by
    `largest_eigenvalue`, only when a rule has `rtol > 0` (NaN otherwise:
    absolute thresholds need none). Small matrices use their eigenvalues.
    """
    spec = np.asarray(spec, np.float64).reshape(-1, 2)
    n = a.shape[0]
    if n < RECORD_MIN_ORDER:
        s = np.sqrt(np.maximum(np.linalg.eigvalsh(a), 0.0)) if n else np.zeros(0)
        top = float(s.max(initial=0.0))
        thr = np.maximum(spec[:, 0], spec[:, 1] * top)
        counts = (s[None, :] > thr[:, None]).sum(axis=1)
        return np.concatenate([[top, float(np.sum(s * s))], counts]).astype(np.float64)
    trace = float(np.trace(a))
    if trace <= 0:
        top = 0.0
    elif (spec[:, 1] > 0).any():
        top = float(np.sqrt(max(largest_eigenvalue(a), 0.0)))
    else:  # absolute thresholds only: no count needs sigma_max
        top = float("nan")
    thr = np.maximum(spec[:, 0], spec[:, 1] * np.nan_to_num(top))
    counts = []
    for t, threshold in enumerate(thr):
        last = overwrite and t == len(thr) - 1
        counts.append(positive_inertia(a, float(threshold) ** 2, overwrite=last))
    return np.array([top, trace, *counts], np.float64)


def open_grams() -> list[int]:
    """Keys of the Grams held now (released by `gram_eigvalsh` or `release`)."""
    return sorted(_grams)


def release(keys) -> None:
    """Drop held Grams (e.g. those of a measurement that raised)."""
    for key in keys:
        _grams.pop(int(key), None)


@contextlib.contextmanager
def released_on_error():
    """Drop the Grams opened inside the block when it raises (a measurement
    interrupted inside its loop never reaches `gram_eigvalsh`). A measurement
    running concurrently in another thread that opens Grams meanwhile would
    lose them too, and fail."""
    before = set(_grams)
    try:
        yield
    except BaseException:
        release(set(_grams) - before)
        raise
