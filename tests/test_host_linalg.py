"""The host BLAS/LAPACK kernels of the exact path against NumPy, and the
engine's Grams held on the host against float64 references.

`host_linalg` accumulates float64 Grams in place by `dsyrk` and solves them
by LAPACK's two-stage eigenvalue routine; `matfree` uses it for Grams of
order `HOST_LAPACK_MIN_ORDER` and up, so the engine tests on small models
never reach it: these use orders 130-200.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_localrank import host_linalg, memory
from keras_localrank.matfree import forward_spectra, reverse_spectra
from keras_localrank.spectra import HOST_LAPACK_MIN_ORDER


def test_eigvalsh_equals_numpy_and_may_overwrite():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((300, 200)) @ np.diag(np.logspace(0, -6, 200))
    a = b.T @ b
    expected = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(host_linalg.eigvalsh(a), expected, rtol=0, atol=1e-13 * expected[-1])
    work = np.asfortranarray(a.copy())
    np.testing.assert_allclose(
        host_linalg.eigvalsh(work, overwrite=True), expected, rtol=0, atol=1e-13 * expected[-1]
    )
    np.testing.assert_array_equal(host_linalg.eigvalsh(np.ones((1, 1)) * 3.0), [3.0])
    with pytest.raises(ValueError, match="square"):
        host_linalg.eigvalsh(np.ones((2, 3)))


def test_two_stage_solver_is_found_in_numpys_openblas():
    # The wheels this project installs ship OpenBLAS with LAPACK 3.7+; if the
    # lookup broke, every solve would silently fall back to the slower one.
    assert host_linalg.two_stage_available()


def test_held_grams_accumulate_blocks_in_place_and_are_released():
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((2, d, 150)).astype("float32") for d in (7, 64, 1)]
    keys = np.array([host_linalg.gram_open(2, 150), host_linalg.gram_open(2, 150)])
    for c in blocks:
        assert host_linalg.gram_update(keys, c, 2 * c) is keys
    assert set(keys.tolist()) <= set(host_linalg.open_grams())
    first, second = host_linalg.gram_eigvalsh(keys)
    full = np.concatenate(blocks, axis=1).astype(np.float64)
    expected = np.stack([np.linalg.eigvalsh(f.T @ f) for f in full])
    np.testing.assert_allclose(first, expected, rtol=0, atol=1e-12 * expected.max())
    np.testing.assert_allclose(second, 4 * expected, rtol=0, atol=4e-12 * expected.max())
    assert not set(keys.tolist()) & set(host_linalg.open_grams())
    (empty,) = host_linalg.gram_eigvalsh(np.array([host_linalg.gram_open(0, 5)]))
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("order", [3, 150, 1])
def test_one_large_gram_is_updated_in_two_parts_that_add_up(order, monkeypatch):
    # A single matrix (fewer than the cores) is split into a top block with
    # the off-diagonal block and a bottom block; `SPLIT_MIN_ORDER` lowered so
    # that small orders take that path.
    monkeypatch.setattr(host_linalg, "SPLIT_MIN_ORDER", 2)
    rng = np.random.default_rng(4)
    blocks = [rng.standard_normal((1, d, order)) for d in (5, 33)]
    (key,) = keys = np.array([host_linalg.gram_open(1, order)])
    for c in blocks:
        host_linalg.gram_update(keys, c)
    (values,) = host_linalg.gram_eigvalsh(keys)
    full = np.concatenate(blocks, axis=1)[0]
    expected = np.linalg.eigvalsh(full.T @ full)
    np.testing.assert_allclose(values[0], expected, rtol=0, atol=1e-12 * expected.max())


def test_grams_of_a_measurement_that_raises_are_released():
    before = set(host_linalg.open_grams())
    with pytest.raises(RuntimeError):
        with host_linalg.released_on_error():
            host_linalg.gram_open(1, 300)
            raise RuntimeError("interrupted")
    assert set(host_linalg.open_grams()) == before


@pytest.mark.parametrize("m, n", [(130, 200), (200, 130)])
def test_engine_grams_on_the_host_equal_numpy_singular_values(m, n, monkeypatch):
    # A per-sample linear map of known matrix, large enough for the host path
    # in both modes (forward accumulates n_l x n_l when m <= n, reverse k x k
    # when n <= m), blocks of directions that do not divide the sizes.
    assert min(m, n) >= HOST_LAPACK_MIN_ORDER
    rng = np.random.default_rng(2)
    a = rng.standard_normal((2, m, n)) @ np.diag(np.logspace(0, -4, n))
    x = tf.constant(rng.standard_normal((2, n)).astype("float32"))
    calls = []
    update = host_linalg.gram_update
    monkeypatch.setattr(host_linalg, "gram_update", lambda *a: calls.append(1) or update(*a))
    monkeypatch.setattr(memory, "GRAM_CHUNK_VALUES", 20_000)  # assembled: several chunks

    def fn(z):
        mats = tf.repeat(tf.constant(a, tf.float32), tf.shape(z)[0] // 2, axis=0)
        return [tf.einsum("bmn,bn->bm", mats, z)]

    expected = np.sort(np.linalg.svd(a.astype(np.float32).astype(np.float64), compute_uv=False))
    fw = forward_spectra(fn, x, None, [m], block=37)[0]
    rv = reverse_spectra(fn, x, None, m, block=41)
    graph = tf.function(lambda z: forward_spectra(fn, z, None, [m], block=37)[0])(x)
    for got in (fw, rv, graph):
        got = np.sort(got.numpy(), axis=-1)[:, -min(m, n):]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.max())
    # One update per block where the Gram is accumulated (forward, eager and
    # traced, when m <= n; reverse when n <= m); one per column chunk where
    # the matrix is assembled first (the other mode).
    def chunks(rows, cols):  # matfree._finish's column chunks, 2 samples
        return -(-cols // (memory.GRAM_CHUNK_VALUES // (2 * rows)))

    forward = 2 * -(-n // 37) if m <= n else 2 * chunks(-(-n // 37) * 37, m)
    reverse = -(-m // 41) if n <= m else chunks(-(-m // 41) * 41, n)
    assert len(calls) == forward + reverse
    assert not host_linalg.open_grams()


def test_planner_prefers_directions_in_flight_to_samples_per_chunk():
    # Large per-sample results: one sample with many directions per pass, not
    # several samples with few (each pass updates every Gram of the pack).
    assert memory.plan_sizes(
        budget=2000, per_sample=600, per_replica=2, max_directions=3072, batch_size=None
    ) == (1, 700)
    # Small results: as many samples as fit (up to 128) with all directions.
    assert memory.plan_sizes(
        budget=100_000, per_sample=10, per_replica=1, max_directions=300, batch_size=None
    ) == (128, 300)


def test_a_forward_pack_mixing_accumulated_and_assembled_grams_solves_both():
    # One pass, two outputs: 130 x 200 (Gram accumulated, order 130) and
    # 260 x 200 (assembled, Gram of order 200), solved together on the host.
    rng = np.random.default_rng(3)
    mats = [rng.standard_normal((2, m, 200)) @ np.diag(np.logspace(0, -3, 200)) for m in (130, 260)]
    x = tf.constant(rng.standard_normal((2, 200)).astype("float32"))

    def fn(z):
        reps = tf.shape(z)[0] // 2
        return [
            tf.einsum("bmn,bn->bm", tf.repeat(tf.constant(a, tf.float32), reps, axis=0), z)
            for a in mats
        ]

    got = tf.function(lambda z: forward_spectra(fn, z, None, [130, 260], block=64))(x)
    for a, values in zip(mats, got):
        expected = np.sort(np.linalg.svd(a.astype(np.float32).astype(np.float64), compute_uv=False))
        values = np.sort(values.numpy(), axis=-1)[:, -expected.shape[-1]:]
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6 * expected.max())
    assert not host_linalg.open_grams()


@pytest.mark.parametrize("n, batch", [(1, 1), (5, 2), (300, 1), (600, 2)])
def test_taken_gram_is_the_full_symmetric_sum_and_is_released(n, batch):
    # Orders below, at and above one block of columns filled in place.
    rng = np.random.default_rng(n)
    blocks = [rng.standard_normal((batch, d, n)) for d in (7, 3)]
    key = host_linalg.gram_open(batch, n)
    for block in blocks:
        host_linalg.gram_update(np.array([key]), block)
    gram = host_linalg.gram_take(np.array([key]))
    expected = sum(np.einsum("bdi,bdj->bij", b, b) for b in blocks)
    assert gram.shape == (batch, n, n)
    np.testing.assert_allclose(gram, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert key not in host_linalg.open_grams()


# -- ranks without eigenvalues (spectrum=False) ---------------------------------


def _known_spectrum(n, values, seed):
    """A symmetric matrix `Q diag(values) Q^T` with a random orthogonal `Q`."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    a = (q * np.asarray(values, np.float64)) @ q.T
    return np.asfortranarray((a + a.T) / 2)


@pytest.mark.parametrize("n", [5, 70, 200])
def test_positive_inertia_counts_eigenvalues_above_a_shift(n):
    # Eigenvalues known by construction, spread on both sides of every shift
    # (an indefinite `a - shift I` makes Bunch-Kaufman take 2 x 2 pivots).
    values = np.linspace(-3.0, 5.0, n)
    a = _known_spectrum(n, values, seed=n)
    for shift in (-2.5, -0.01, 0.3, 1.77, 4.9, 6.0):
        expected = int((values > shift).sum())
        assert host_linalg.positive_inertia(a, shift) == expected, shift
    lower = np.asfortranarray(np.tril(a))  # only the lower triangle is read
    assert host_linalg.positive_inertia(lower, 0.3, overwrite=True) == int((values > 0.3).sum())
    assert host_linalg.positive_inertia(np.zeros((4, 4), order="F"), 0.0) == 0
    assert host_linalg.positive_inertia(np.zeros((0, 0)), 1.0) == 0


@pytest.mark.parametrize("n", [40, 150])
def test_rank_record_equals_the_eigenvalue_count_of_a_gram(n):
    # A float64 Gram of a rank-deficient matrix with singular values over
    # six decades: the record's counts equal the numpy rule applied to the
    # eigenvalues, for the default float32 rule, an absolute threshold, and
    # both (thresholds falling between singular values by construction).
    rng = np.random.default_rng(n)
    r = n // 2
    b = rng.standard_normal((r, n)) * np.logspace(0, -6, r)[:, None]
    gram = b.T @ b
    s = np.sqrt(np.maximum(np.linalg.eigvalsh(gram), 0.0))
    spec = np.array([[0.0, np.finfo(np.float32).eps * n], [1e-3 * s.max(), 0.0], [1e-2, 1e-5]])
    record = host_linalg.rank_record(np.asfortranarray(np.tril(gram)), spec)
    thr = np.maximum(spec[:, 0], spec[:, 1] * s.max())
    expected = (s[None] > thr[:, None]).sum(axis=1)
    assert 0 < expected.min() and expected.max() < n  # the rules cut inside the spectrum
    np.testing.assert_allclose(record[0], s.max(), rtol=1e-10)
    np.testing.assert_allclose(record[1], np.sum(s * s), rtol=1e-12)
    np.testing.assert_array_equal(record[2:], expected)
    zero = host_linalg.rank_record(np.zeros((n, n), order="F"), spec)
    np.testing.assert_array_equal(zero, np.zeros(5))
    # Absolute thresholds only: no sigma_max needed (NaN above order
    # RECORD_MIN_ORDER, where it would cost a Lanczos run), same counts.
    absolute = host_linalg.rank_record(np.asfortranarray(np.tril(gram)), spec[1:2])
    assert np.isnan(absolute[0]) == (n >= host_linalg.RECORD_MIN_ORDER)
    np.testing.assert_array_equal(absolute[2:], expected[1:2])


def test_held_grams_give_rank_records_and_are_released():
    rng = np.random.default_rng(5)
    c = rng.standard_normal((2, 90, 160)) * np.logspace(0, -5, 160)
    keys = np.array([host_linalg.gram_open(2, 160)])
    host_linalg.gram_update(keys, c)
    spec = np.array([[[0.0, 1e-4], [1e-3, 0.0]]])
    (records,) = host_linalg.gram_records(keys, spec)
    assert not host_linalg.open_grams()
    for b in range(2):
        s = np.linalg.svd(c[b], compute_uv=False)
        thr = np.maximum(spec[0, :, 0], spec[0, :, 1] * s.max())
        np.testing.assert_array_equal(records[b, 2:], (s[None] > thr[:, None]).sum(axis=1))
    batch = host_linalg.records_batch(np.stack([x.T @ x for x in c]), spec[0])
    np.testing.assert_array_equal(batch[:, 2:], records[:, 2:])
