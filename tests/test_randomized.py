"""The certified randomized robust rank: planted spectra and small networks.

Statistical tests use a fixed list of seeds; each checks that the certified
interval `[rank, upper]` contains the true robust rank, with an allowed number
of misses consistent with the stated failure probability.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_localrank as klr
from keras_localrank.randomized import (
    certified_sketch,
    planned_test_sizes,
    probes_per_round,
    robust_rank_interval,
)
from tests.reference import finite_difference_jacobians

# Singular values straddling atol = 1 (two inside (sqrt(3)/2, 1], the band a
# residual of atol/2 cannot resolve), plus a tail of small ones.
PLANTED = np.array([4.0, 2.0, 1.3, 1.1, 1.03, 0.97, 0.9, 0.6, 0.2] + [1e-3] * 6)
ATOL = 1.0


def planted_operators(seed, batch=4, m=50, n=40):
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(batch):
        u, _ = np.linalg.qr(rng.standard_normal((m, len(PLANTED))))
        v, _ = np.linalg.qr(rng.standard_normal((n, len(PLANTED))))
        mats.append((u * PLANTED) @ v.T)
    a = tf.constant(np.stack(mats))
    return (
        lambda v: tf.einsum("bmn,bdn->bdm", a, v),
        lambda u: tf.einsum("bmn,bdm->bdn", a, u),
    )


def binomial_tail(n, p, k):
    """P(Binomial(n, p) > k)."""
    return 1.0 - sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_planted_spectrum_interval_holds_over_seeds():
    delta = 1e-3
    true = int((PLANTED > ATOL).sum())
    misses, trials, widths = 0, 0, []
    for seed in range(30):
        mv, rmv = planted_operators(seed)
        sketch = certified_sketch(
            mv, rmv, batch=4, shape=(50, 40), target=ATOL / 2,
            failure_probability=delta, block=4, seed=seed,
        )
        assert sketch.failure_probability <= delta
        low, high = robust_rank_interval(
            sketch.singular_values, sketch.residual_bound, ATOL, 40
        )
        assert np.all(low <= true)  # deterministic: s_i(Q^T A) <= s_i(A)
        misses += int(np.sum(high < true))
        trials += 4
        widths.extend(high - low)
        assert np.all(sketch.residual_bound <= ATOL / 2)
    # Misses allowed: at most 2 of 120 (P(more) < 0.1% at delta = 1e-3).
    assert binomial_tail(trials, delta, 2) < 1e-3
    assert misses <= 2
    # Informative: the interval is at most the two values in the band wide.
    assert max(widths) <= 2


def test_sketch_is_deterministic_given_the_seed_and_reaches_exactness():
    mv, rmv = planted_operators(0, batch=2)
    a = certified_sketch(mv, rmv, batch=2, shape=(50, 40), target=0.5, seed=3)
    b = certified_sketch(mv, rmv, batch=2, shape=(50, 40), target=0.5, seed=3)
    np.testing.assert_array_equal(a.singular_values, b.singular_values)
    np.testing.assert_array_equal(a.residual_bound, b.residual_bound)
    # A target met only once the whole range (rank 15) is captured:
    # singular values exact.
    full = certified_sketch(mv, rmv, batch=2, shape=(50, 40), target=1e-9, seed=3)
    assert 15 <= full.sketch_size <= 40 and np.all(full.residual_bound <= 1e-9)
    got = np.sort(full.singular_values, axis=1)[:, ::-1][:, : len(PLANTED)]
    np.testing.assert_allclose(got, np.tile(PLANTED, (2, 1)), atol=1e-8)


def test_probes_cover_the_union_bound():
    assert probes_per_round(1e-3, 10) == 4  # 10 rounds * 1e-4 = 1e-3
    assert probes_per_round(0.5, 1) == 1


def test_tests_run_when_the_basis_has_grown_by_a_quarter():
    # With 1-2 directions in flight (large models), a test after every block
    # spent more products on test vectors than on the basis: ResNet50 at 224
    # did not finish. The test sizes grow geometrically; their count bounds
    # the union bound's rounds.
    assert planned_test_sizes(2, 2) == [2]
    assert planned_test_sizes(2, 30) == [2, 4, 6, 8, 10, 13, 17, 22, 28, 30]
    assert planned_test_sizes(8, 20) == [8, 16, 20]
    sizes = planned_test_sizes(2, 313)  # ResNet50 at 224, conv5: block 2, memory cap 313
    assert len(sizes) <= 25 and sizes[-1] == 313
    assert all(b >= a + 2 and (b >= 1.25 * a or b == 313) for a, b in zip(sizes, sizes[1:]))

    rng = np.random.default_rng(0)
    decay = 0.93 ** np.arange(120)
    a = tf.constant(rng.standard_normal((1, 150, 120)) * decay)
    calls = {"tests": 0, "products": 0}

    def matvec(v):
        calls["products"] += int(v.shape[1])
        return tf.einsum("bmn,bdn->bdm", a, v)

    def rmatvec(u):
        calls["products"] += int(u.shape[1])
        return tf.einsum("bmn,bdm->bdn", a, u)

    sketch = certified_sketch(
        matvec, rmatvec, batch=1, shape=(150, 120), target=0.05, block=2, seed=0
    )
    # still certified, and the estimate holds
    assert np.all(sketch.residual_bound <= 0.05)
    true = (np.linalg.svd(a.numpy(), compute_uv=False) > 0.1).sum(axis=-1)
    low, high = robust_rank_interval(sketch.singular_values, sketch.residual_bound, 0.1, 120)
    assert np.all(low <= true) and np.all(true <= high)
    # test rounds at most the planned sizes, far fewer than one per block
    assert sketch.rounds <= len(planned_test_sizes(2, 120)) < sketch.sketch_size // 2
    # products: 3 per basis vector (power iteration 1) + 1 to assemble it, +
    # the tests; with a test after every block the tests alone were
    # ~ probes * size / block (about 3 per basis vector here).
    assert calls["products"] <= 5 * sketch.sketch_size


def test_uncertified_sketch_reports_the_trivial_upper_bound():
    mv, rmv = planted_operators(1, batch=2)
    sketch = certified_sketch(
        mv, rmv, batch=2, shape=(50, 40), target=0.5, block=2, max_size=2, seed=0
    )
    assert sketch.sketch_size == 2
    low, high = robust_rank_interval(sketch.singular_values, sketch.residual_bound, ATOL, 40)
    assert np.all(sketch.residual_bound > ATOL)
    assert np.all(low <= 2) and np.all(high == 40)


def small_convnet(seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="c1")(inp)
    h = keras.layers.Conv2D(4, 3, strides=2, activation="tanh", name="c2")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(5, name="head")(h))


def test_randomized_network_estimate_contains_the_exact_robust_rank():
    atol = 0.2
    misses = trials = 0
    widths = []
    for seed in range(3):
        model = small_convnet(seed)
        x = np.random.default_rng(seed).standard_normal((3, 6, 6, 2)).astype("float32")
        est = klr.LocalRankEstimator(
            model, tolerances=(klr.Tolerance(atol=atol),), method="randomized",
            failure_probability=1e-3, seed=seed, sketch_block=4,
        )
        result = est(x)[0]
        ref = finite_difference_jacobians(model, x, list(result.per_sample))
        for name, jac in ref.items():
            true = (np.linalg.svd(jac, compute_uv=False) > atol).sum(axis=1)
            low, high = result.per_sample[name], result.upper_per_sample[name]
            assert np.all(low <= true), name
            misses += int(np.sum(high < true))
            trials += len(true)
            widths.extend(high - low)
        frame = result.to_frame()
        assert set(frame["method"]) == {"randomized"}
        assert (frame["failure_probability"] == 1e-3).all()
        assert (frame["sketch_size"] > 0).all()
        assert frame["effective_rank"].isna().all()  # not estimated: NaN, not wrong
    # At most one miss (P(more) < 0.1% over these trials at delta = 1e-3).
    assert binomial_tail(trials, 1e-3, 1) < 1e-3
    assert misses <= 1
    assert max(widths) <= 1  # and the intervals are informative


def test_auto_picks_randomized_when_exact_exceeds_the_budget():
    model = small_convnet(0)
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 2)).astype("float32")
    with pytest.raises(ValueError, match="atol"):
        klr.LocalRankEstimator(model, memory_budget=35_000, sketch_block=2)
    est = klr.LocalRankEstimator(
        model, tolerances=(klr.Tolerance(atol=0.2),), memory_budget=35_000,
        sketch_block=2, spectral_stats={"energy": lambda s: tf.reduce_sum(s**2, -1)},
    )
    plans = est.plans
    assert plans["c1"].method == "randomized"  # 108 x 72 Jacobian: over budget
    assert plans["head"].method == "exact"
    result = est(x)[0]
    exact = klr.local_rank(model, x, atol=0.2, method="exact")
    for name in result.per_sample:
        assert np.all(result.per_sample[name] <= exact.per_sample[name])
        assert np.all(exact.per_sample[name] <= result.upper_per_sample[name])
    assert np.isnan(result.stats["energy"]["c1"]).all()
    assert np.isfinite(result.stats["energy"]["head"]).all()
