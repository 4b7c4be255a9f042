"""The local-rank method: data-aware pruning and factorization.

1. Units whose output is constant on the calibration data (a ReLU unit that
   is never active outputs 0) are removed and folded into the next layer's
   bias: exact on that data.
2. Each remaining Dense layer is projected on the subspace its
   pre-activation uses across samples: the leading eigenvectors `U_r` of the
   pre-activation covariance (default) or of `E_x[J_l(x) J_l(x)^T]`. With
   `m = E[p]`, `p ~ m + (p - m) U_r U_r^T`, i.e. a `LowRankDense` with
   `A = W U_r`, `B = U_r^T`, bias `m - (m - b) U_r U_r^T`: exact at full rank.
3. The rank of each layer comes from a `RankPolicy`; it is never below the
   layer's measured robust local rank `ceil(E_x[rank_eps(J_l(x) S)])`
   (a rank-r layer caps the rank of its Jacobian at r). `S = Sigma_x^{1/2}`
   weighs input directions by how much the data moves along them; with
   `S = I` the first layer's local rank is the rank of its kernel whatever
   the data, a floor no compression can meet.

References:
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import keras
import numpy as np

from compress.baselines import select_layers
from compress.outcome import Compressed
from compress.policies import Candidate, ParamFraction, RankPolicy, get_policy
from compress.registry import count_params
from compress.statistics import calibration_statistics, jacobian_gram
from compress.surgery import consumer_of, factorize, prune_units
from keras_localrank.estimate import local_rank
from keras_localrank.taps import model_graph

__all__ = ["SUBSPACES", "constant_units", "local_rank_compress", "local_rank_floors"]

logger = logging.getLogger(__name__)

SUBSPACES = ("covariance", "jacobian")


def constant_units(stats, *, atol: float = 0.0) -> dict[int, float]:
    """`{unit: constant}` for units whose output range on the data is <= `atol`."""
    spread = stats.out_max - stats.out_min
    idx = np.flatnonzero(spread <= atol)
    return {int(j): float((stats.out_max[j] + stats.out_min[j]) / 2) for j in idx}


def local_rank_floors(
    model,
    x,
    layer_names: Sequence[str],
    *,
    atol: float | None = None,
    rtol: float | None = 0.1,
    data_shaped: bool = True,
) -> dict[str, int]:
    """`ceil` of each layer's measured (robust) local rank on `x`.

    With `data_shaped=True` (default) the rank is that of `J_l(x)
    Sigma_x^{1/2}` (`Sigma_x` the covariance of `x`, see
    `data_shaped_model`): directions of input space the data never moves in
    do not count. Without it, the first layer's Jacobian is its kernel, whose
    rank does not depend on the data at all.

    Args:
        model: a built functional or Sequential model.
        x: calibration samples.
        layer_names: layers to measure.
        atol: absolute singular-value tolerance. Default None.
        rtol: tolerance relative to each sample's largest singular value.
            Default 0.1.
        data_shaped: measure `J_l Sigma_x^{1/2}` instead of `J_l`. Default True.

    Returns:
        `{layer: floor}`, each >= 1.
    """
    if data_shaped:
        model, x = data_shaped_model(model, x)
    result = local_rank(model, x, layers=list(layer_names), atol=atol, rtol=rtol)
    return {name: max(1, math.ceil(v - 1e-9)) for name, v in result.mean.items()}


def _projected_factors(layer, u: np.ndarray, mean: np.ndarray):
    """`(A, B, bias)` of `layer` projected on the orthonormal columns `u`."""
    dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    bias = None
    if layer.use_bias:
        b = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
        bias = (mean - ((mean - b) @ u) @ u.T).astype(dtype)
    return (kernel @ u).astype(dtype), u.T.astype(dtype), bias


def _check_calibration(x):
    if not hasattr(x, "shape") or len(x) == 0:
        raise ValueError(
            "Expected non-empty calibration data `x`. Received: "
            f"x with shape {getattr(x, 'shape', None)}."
        )


def local_rank_compress(
    model: keras.Model,
    x,
    policy: RankPolicy | float,
    *,
    layers: Sequence[str] | None = None,
    subspace: str = "covariance",
    prune: bool = True,
    prune_atol: float = 0.0,
    floor: bool = True,
    floor_atol: float | None = None,
    floor_rtol: float | None = 0.1,
    floor_samples: int = 128,
    batch_size: int = 256,
    evaluate: Callable[[keras.Model], float] | None = None,
) -> Compressed:
    """Compress `model` with the local-rank method (see the module docstring).

    Args:
        model: a built functional or Sequential Keras model (not modified).
        x: calibration samples `[N, *input_shape]`, float.
        policy: a `RankPolicy`, or a float: the target parameter fraction of
            the original model (`ParamFraction`).
        layers: names of Dense layers to factorize. Default None: all.
        subspace: `"covariance"` (default) or `"jacobian"`.
        prune: first remove units constant on `x`. Default True.
        prune_atol: a unit is constant when its output range is <= this.
            Default 0 (exact: only units constant to the last bit).
        floor: keep each rank >= the layer's measured local rank (see
            `local_rank_floors`, data-shaped). Default True.
        floor_atol: absolute singular-value tolerance of the floor's robust
            local rank. Default None.
        floor_rtol: tolerance relative to each sample's largest singular
            value. Default 0.1.
        floor_samples: calibration samples used for the floor. Default 128.
        batch_size: samples per chunk. Default 256.
        evaluate: `model -> score` (lower is better), needed by
            `AccuracyTolerance` (the accuracy drop) and `GreedyParamFraction`
            (a held-out loss). It receives a dense stand-in whose kernels
            equal the factorized layers' products (the same function, no
            model rebuilt per trial). Default None.

    Returns:
        A `Compressed` with ranks, floors and removed units.

    Raises:
        ValueError: bad `subspace`; no compressible layer; data that does not
            fit the model; an impossible budget.
    """
    if subspace not in SUBSPACES:
        raise ValueError(f"Expected `subspace` in {SUBSPACES}. Received: subspace={subspace!r}")
    if not isinstance(policy, RankPolicy):
        policy = ParamFraction(policy) if isinstance(policy, (int, float)) else get_policy(policy)
    _check_calibration(x)
    original = count_params(model)
    names = [layer.name for layer in select_layers(model, layers)]

    removed: dict[str, int] = {}
    work = model
    if prune:
        prunable = [n for n in names if consumer_of(model, model.get_layer(n)) is not None]
        if prunable:
            stats = calibration_statistics(model, x, prunable, batch_size=batch_size)
            plan = {}
            for n in prunable:
                consts = constant_units(stats[n], atol=prune_atol)
                if len(consts) >= model.get_layer(n).units:  # keep one unit
                    consts.pop(max(consts))
                if consts:
                    plan[n] = consts
            if plan:
                logger.info("removing constant units: %s", {k: len(v) for k, v in plan.items()})
                work = prune_units(model, plan)
                removed = {k: len(v) for k, v in plan.items()}

    stats = calibration_statistics(work, x, names, batch_size=batch_size)
    grams = (
        jacobian_gram(work, x, names, batch_size=max(1, min(batch_size, 16)))
        if subspace == "jacobian"
        else None
    )
    floors = (
        local_rank_floors(work, x[:floor_samples], names, atol=floor_atol, rtol=floor_rtol)
        if floor
        else {}
    )
    candidates, bases = [], {}
    for n in names:
        layer = work.get_layer(n)
        st = stats[n]
        if grams is not None:
            statistic = grams[n]
        elif layer.use_bias:
            statistic = st.covariance
        else:  # no bias to carry the mean: project the second moment
            statistic = st.covariance + np.outer(st.mean, st.mean)
        eigvals, eigvecs = np.linalg.eigh(statistic)
        # Eigenvalues at the level of float32 rounding are zero (numpy's
        # matrix_rank rule, applied to the computed-in-float32 statistic).
        noise = max(float(eigvals.max()), 0.0) * len(eigvals) * np.finfo(np.float32).eps
        eigvals = np.where(eigvals > noise, eigvals, 0.0)
        order = np.argsort(eigvals)[::-1]
        bases[n] = eigvecs[:, order]
        n_in, n_out = layer.kernel.shape
        candidates.append(
            Candidate(n, n_in, n_out, layer.use_bias, eigvals[order], floor=floors.get(n, 1))
        )
    fixed = count_params(work) - sum(c.dense_params for c in candidates)

    def build(ranks):
        factors = {}
        for c in candidates:
            r = ranks[c.name]
            if not c.saves(r):
                continue
            factors[c.name] = _projected_factors(
                work.get_layer(c.name), bases[c.name][:, :r], stats[c.name].mean
            )
        return factorize(work, factors), factors

    ranks = policy.select(
        candidates,
        fixed_params=fixed,
        original_params=original,
        evaluate=None
        if evaluate is None
        else _trial_evaluator(work, candidates, bases, stats, evaluate),
    )
    compressed, factors = build(ranks)
    return Compressed(
        model=compressed,
        method="local_rank",
        budget=getattr(policy, "fraction", None),
        ranks={n: int(f[0].shape[1]) for n, f in factors.items()},
        floors=floors,
        removed_units=removed,
    )


def _trial_evaluator(work, candidates, bases, stats, evaluate):
    """`ranks -> evaluate(stand-in)`: one dense clone of `work` whose kernels
    and biases are set to those of the factorized layers at `ranks`."""
    stand_in = keras.models.clone_model(work)
    stand_in.set_weights(work.get_weights())
    cache: dict[tuple[str, int], list[np.ndarray]] = {}  # bounded: kernels can be large
    current: dict[str, int] = {}

    def weights(c, rank):
        if (c.name, rank) not in cache:
            layer = work.get_layer(c.name)
            if c.saves(rank):
                a, b, bias = _projected_factors(layer, bases[c.name][:, :rank], stats[c.name].mean)
                value = [a @ b] + ([bias] if layer.use_bias else [])
            else:
                value = layer.get_weights()
            if len(cache) >= 2 * len(candidates):
                cache.pop(next(iter(cache)))
            cache[(c.name, rank)] = value
        return cache[(c.name, rank)]

    def run(ranks):
        for c in candidates:
            rank = c.max_rank if not c.saves(ranks[c.name]) else ranks[c.name]
            if current.get(c.name) != rank:
                stand_in.get_layer(c.name).set_weights(weights(c, rank))
                current[c.name] = rank
        return float(evaluate(stand_in))

    return run


def data_shaped_model(model, x, *, energy: float = 0.9999):
    """`model` preceded by the linear map `z -> m + z Lambda_k^{1/2} U_k^T`.

    `m`, `U_k`, `Lambda_k` are the mean and the leading principal directions
    (holding `energy` of the variance) of the flattened calibration data `x`.
    Returns the new model and the `z` of each sample (`x` projected on the
    `k` directions and whitened), so that the Jacobian with respect to `z`
    is `J(x) Sigma_x^{1/2}`: the layer's sensitivity to perturbations shaped
    like the data.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    mean = flat.mean(axis=0)
    cov = np.cov(flat - mean, rowvar=False, bias=True)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals, eigvecs = np.clip(eigvals[order], 0, None), eigvecs[:, order]
    k = int(np.searchsorted(np.cumsum(eigvals) / eigvals.sum(), energy)) + 1
    scale = np.sqrt(eigvals[:k])
    z = ((flat - mean) @ eigvecs[:, :k]) / scale
    input_shape = tuple(np.shape(x)[1:])
    inp = keras.Input((k,))
    lift = keras.layers.Dense(flat.shape[1], name="data_shape")
    h = lift(inp)
    if len(input_shape) != 1:
        h = keras.layers.Reshape(input_shape)(h)
    graph = model_graph(model)
    # The original layers are called again on `h` (not a nested model), so
    # the local-rank engine sees them as ordinary layers of the new graph.
    out = graph._run_through_graph(h, operation_fn=lambda layer: layer)
    lift.set_weights([(eigvecs[:, :k] * scale).T.astype("float32"), mean.astype("float32")])
    return keras.Model(inp, out), z.astype("float32")
