"""The local-rank method: data-aware pruning and factorization.

0. BatchNormalization after a linear layer is folded into it
   (`compress.folding`).
1. Units whose output is constant on the calibration data (a ReLU unit that
   is never active outputs 0) are removed and folded into the next layer's
   bias: exact on that data. Convolution channels too, through
   normalization, activation and pooling (`compress.channels`).
2. Each remaining Dense layer is projected on the subspace its
   pre-activation uses across samples: the leading eigenvectors `U_r` of the
   pre-activation covariance (default) or of `E_x[J_l(x) J_l(x)^T]`. With
   `m = E[p]`, `p ~ m + (p - m) U_r U_r^T`, i.e. a `LowRankDense` with
   `A = W U_r`, `B = U_r^T`, bias `m - (m - b) U_r U_r^T`: exact at full rank.
   A Conv1D/Conv2D layer is projected the same way on the covariance of its
   output channels over positions and samples: a convolution with `r`
   filters, then a `1 x 1` convolution (`compress.conv`).
3. The rank of each layer comes from a `RankPolicy` on a budget of
   parameters or MACs (`compress.costs`); it is never below the layer's
   measured robust local rank `ceil(E_x[rank_eps(J_l(x) S)])` (a rank-r
   layer caps the rank of its Jacobian at r; for a convolution, the
   Jacobian of the channels at one position). `S = Sigma_x^{1/2}`
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

from compress.channels import prune_constant_channels
from compress.conv import ConvFactors, channel_projection_factors, conv_positions, factorize_convs
from compress.costs import get_cost
from compress.folding import plan_rewrite
from compress.graph import rebuild
from compress.outcome import Compressed
from compress.policies import Candidate, ParamFraction, RankPolicy, get_policy
from compress.registry import CONV_FACTORIZABLE_LAYERS
from compress.statistics import calibration_statistics, jacobian_gram
from compress.surgery import consumer_of, factorize, prune_units
from keras_localrank.estimate import local_rank
from keras_localrank.graph import functional_graph
from keras_localrank.taps import model_graph

__all__ = [
    "SUBSPACES",
    "constant_units",
    "conv_channel_floors",
    "local_rank_compress",
    "local_rank_floors",
]

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


def _check_calibration(model, x):
    inputs = functional_graph(model).inputs
    described = ", ".join(f"{t.name!r} {t.dtype}" for t in inputs)
    if len(inputs) != 1:
        raise ValueError(
            "Expected a model with one input: the rewrites are calibrated on one "
            f"array of samples. Received: model {model.name!r} with {len(inputs)} "
            f"inputs ({described})."
        )
    if not keras.backend.is_float_dtype(inputs[0].dtype):
        raise TypeError(
            "Expected a model with a float input: the rewrites are calibrated on "
            "float statistics of the input, so integer-input models (token ids into "
            f"an Embedding) are not compressed. Received: model {model.name!r} with "
            f"input {described}."
        )
    if not hasattr(x, "shape") or len(x) == 0:
        raise ValueError(
            "Expected non-empty calibration data `x`, an array of samples. Received: "
            f"x of type {type(x).__name__} with shape {getattr(x, 'shape', None)}."
        )


def conv_channel_floors(
    model,
    x,
    layer_names: Sequence[str],
    *,
    atol: float | None = None,
    rtol: float | None = 0.1,
    positions_per_axis: int = 2,
    data_shaped: bool = True,
    max_entries: float = 2e8,
) -> tuple[dict[str, int], dict[str, str]]:
    """Channel-rank floors of convolutions from the measured local rank.

    A channel rewrite of rank `r` maps the pre-activation channels at every
    output position through the same `r` directions, so the Jacobian of the
    `c_out` channels at one position, `J_{l,q}(x)` (`c_out x n0`), has rank
    at most `r`. The floor is the largest, over a grid of positions `q`, of
    `ceil(E_x[rank_eps(J_{l,q}(x) S)])`, measured with
    `keras_localrank.local_rank` on `RankProbe`s that each read one position
    of the pre-activation (`S = Sigma_x^{1/2}` when `data_shaped`).

    Args:
        model: a built functional or Sequential model.
        x: calibration samples (a small subset: the cost grows with it).
        layer_names: Conv1D/Conv2D layers, or Dense layers applied at every
            position of a sequence (a transformer's feed-forward layers), to
            measure.
        atol, rtol: singular-value tolerances of the robust rank. Defaults
            None and 0.1.
        positions_per_axis: grid points per spatial axis. Default 2.
        data_shaped: measure `J S` instead of `J`. Default True.
        max_entries: a layer whose Jacobians would hold more entries than
            this (samples x probes x c_out x n0) is not measured. Default 2e8.

    Returns:
        `({layer: floor}, {layer: reason no floor was measured})`.
    """
    from keras_localrank.layers import RankProbe
    from keras_localrank.taps import select_taps

    if data_shaped:
        model, x = data_shaped_model(model, x)
    n0 = int(np.prod(np.shape(x)[1:]))
    selection = select_taps(model, list(layer_names))
    graph = model_graph(model)
    probes, owners = [], {}
    skipped = {name: f"floor not measured: {why}" for name, why in selection.skipped.items()}
    for tap in selection.taps:
        layer = tap.layer
        spatial = [int(d) for d in tap.layer.output.shape[1:-1]]
        grid = [np.unique(np.linspace(0, d - 1, min(positions_per_axis, d)).round().astype(int))
                for d in spatial]
        points = np.array(np.meshgrid(*grid, indexing="ij")).reshape(len(spatial), -1).T
        width = int(layer.filters if hasattr(layer, "filters") else layer.units)
        cost = len(x) * len(points) * width * n0
        if cost > max_entries:
            skipped[layer.name] = (
                f"floor not measured: {cost:.2g} Jacobian entries exceed max_entries="
                f"{max_entries:.2g}; rank floor 1"
            )
            continue
        config = {**layer.get_config(), "activation": "linear", "name": f"{layer.name}__pre"}
        linear = layer.__class__.from_config(config)
        pre = linear(tap.input)
        linear.set_weights(layer.get_weights())
        # Dense layers on sequences count as 1-D: one position is one token.
        crop = keras.layers.Cropping2D if len(spatial) == 2 else keras.layers.Cropping1D
        for point in points:
            cropping = tuple((int(p), d - 1 - int(p)) for p, d in zip(point, spatial))
            h = crop(cropping[0] if len(spatial) == 1 else cropping)(pre)
            name = f"{layer.name}__at_" + "_".join(str(int(p)) for p in point)
            probes.append(RankProbe(name=name)(keras.layers.Flatten()(h)))
            owners[name] = layer.name
    floors: dict[str, int] = {}
    if probes:
        probe_model = keras.Model(graph.inputs[0], probes)
        result = local_rank(probe_model, x, layers=list(owners), atol=atol, rtol=rtol)
        for probe, value in result.mean.items():
            owner = owners[probe]
            floors[owner] = max(floors.get(owner, 1), math.ceil(value - 1e-9))
    return floors, skipped


def _candidate(layer, statistic, floor):
    """`(Candidate, eigenvector basis)` of a Dense or convolution layer."""
    eigvals, eigvecs = np.linalg.eigh(statistic)
    # Eigenvalues at the level of float32 rounding are zero (numpy's
    # matrix_rank rule, applied to the computed-in-float32 statistic).
    noise = max(float(eigvals.max()), 0.0) * len(eigvals) * np.finfo(np.float32).eps
    eigvals = np.where(eigvals > noise, eigvals, 0.0)
    order = np.argsort(eigvals)[::-1]
    kernel = tuple(int(d) for d in layer.kernel.shape)
    if isinstance(layer, CONV_FACTORIZABLE_LAYERS):
        positions = conv_positions(layer)[1]
    else:
        positions = math.prod(int(d) for d in layer.output.shape[1:-1])
    candidate = Candidate(
        layer.name,
        math.prod(kernel[:-1]),
        kernel[-1],
        layer.use_bias,
        eigvals[order],
        floor=floor,
        kernel_shape=kernel,
        positions=positions,
    )
    return candidate, eigvecs[:, order]


def _factors(layer, basis, mean):
    """Factors of `layer` projected on `basis` (LowRankDense or conv chain)."""
    if isinstance(layer, CONV_FACTORIZABLE_LAYERS):
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        return channel_projection_factors(kernel, bias, basis, mean)
    return _projected_factors(layer, basis, mean)


def _dense_equivalent(layer, factors) -> list[np.ndarray]:
    """The original layer's weights computing the same function as `factors`."""
    if isinstance(factors, ConvFactors):
        reduce, expand = factors.kernels
        kernel = np.tensordot(reduce, expand.reshape(expand.shape[-2:]), axes=([-1], [0]))
        return [kernel.astype(reduce.dtype)] + ([factors.bias] if layer.use_bias else [])
    a, b, bias = factors
    return [a @ b] + ([bias] if layer.use_bias else [])


def local_rank_compress(
    model: keras.Model,
    x,
    policy: RankPolicy | float,
    *,
    layers: Sequence[str] | None = None,
    subspace: str = "covariance",
    prune: bool = True,
    prune_atol: float = 0.0,
    fold_bn: bool = True,
    floor: bool = True,
    floor_atol: float | None = None,
    floor_rtol: float | None = 0.1,
    floor_samples: int = 128,
    conv_floor_samples: int = 16,
    conv_floor_positions: int = 2,
    batch_size: int = 256,
    evaluate: Callable[[keras.Model], float] | None = None,
    cost="params",
) -> Compressed:
    """Compress `model` with the local-rank method (see the module docstring).

    Dense layers become `LowRankDense`; Conv1D/Conv2D layers become a
    convolution with `r` filters and a `1 x 1` convolution (see
    `compress.conv`), `r` from the covariance of the output channels over
    positions and samples. BatchNormalization after a linear layer is folded
    first, and constant units and channels are removed (`compress.channels`).
    Every weight layer that is left as it is, and why, is in the outcome's
    `skipped`.

    Args:
        model: a built functional or Sequential Keras model (not modified).
        x: calibration samples `[N, *input_shape]`, float.
        policy: a `RankPolicy`, or a float: the target fraction of the
            original model's cost (`ParamFraction`).
        layers: names of Dense/Conv1D/Conv2D layers to factorize. Default
            None: all.
        subspace: `"covariance"` (default) or `"jacobian"` (Dense layers
            only; convolutions always use the covariance, noted in `notes`).
        prune: first remove units and channels constant on `x`. Default True.
        prune_atol: a unit is constant when its output range is <= this.
            Default 0 (exact: only units constant to the last bit).
        fold_bn: fold BatchNormalization into the preceding layer first.
            Default True.
        floor: keep each rank >= the layer's measured local rank (see
            `local_rank_floors`, data-shaped, and `conv_channel_floors`).
            Default True.
        floor_atol: absolute singular-value tolerance of the floor's robust
            local rank. Default None.
        floor_rtol: tolerance relative to each sample's largest singular
            value. Default 0.1.
        floor_samples: calibration samples used for Dense floors. Default 128.
        conv_floor_samples: calibration samples used for convolution floors
            (each costs a `c_out x n0` Jacobian per grid position). Default 16.
        conv_floor_positions: grid points per spatial axis for convolution
            floors. Default 2.
        batch_size: samples per chunk. Default 256.
        evaluate: `model -> score` (lower is better), needed by
            `AccuracyTolerance` (the accuracy drop) and `GreedyParamFraction`
            (a held-out loss). It receives a stand-in of the same
            architecture whose kernels equal the factorized layers' products
            (the same function, no model rebuilt per trial). Default None.
        cost: what the budget counts: `"params"` (default), `"macs"`, or a
            `compress.costs.CostModel`.

    Returns:
        A `Compressed` with ranks, floors, removed units and channels, folded
        normalizations, skipped layers and notes.

    Raises:
        ValueError: bad `subspace` or `cost`; no compressible layer; data
            that does not fit the model; an impossible budget
            (`InfeasibleBudgetError`).
    """
    if subspace not in SUBSPACES:
        raise ValueError(f"Expected `subspace` in {SUBSPACES}. Received: subspace={subspace!r}")
    cost = get_cost(cost)
    if not isinstance(policy, RankPolicy):
        policy = ParamFraction(policy) if isinstance(policy, (int, float)) else get_policy(policy)
    _check_calibration(model, x)
    model_graph(model)
    original = cost.model(model)
    plan = plan_rewrite(model, layers, fold_bn=fold_bn)
    work, folded, notes = plan.model, plan.folded, dict(plan.notes)
    dense, convs, skipped = plan.dense, plan.convs, plan.skipped
    dense_names = [layer.name for layer in dense]
    conv_names = [layer.name for layer in convs]
    names = dense_names + conv_names

    removed: dict[str, int] = {}
    if prune:
        if conv_names:
            work, pruning = prune_constant_channels(
                work, x, layers=conv_names, atol=prune_atol, batch_size=batch_size
            )
            removed.update(pruning.removed)
            notes.update({k: f"channels not pruned: {v}" for k, v in pruning.skipped.items()})
        prunable = [n for n in dense_names if consumer_of(work, work.get_layer(n)) is not None]
        if prunable:
            stats = calibration_statistics(work, x, prunable, batch_size=batch_size)
            plan = {}
            for n in prunable:
                consts = constant_units(stats[n], atol=prune_atol)
                if len(consts) >= work.get_layer(n).units:  # keep one unit
                    consts.pop(max(consts))
                if consts:
                    plan[n] = consts
            if plan:
                logger.info("removing constant units: %s", {k: len(v) for k, v in plan.items()})
                work = prune_units(work, plan)
                removed.update({k: len(v) for k, v in plan.items()})

    stats = calibration_statistics(work, x, names, batch_size=batch_size)
    grams = None
    if subspace == "jacobian":
        for n in conv_names:
            notes[n] = "projected on the channel covariance (no Jacobian subspace for convolutions)"
        if dense_names:
            grams = jacobian_gram(work, x, dense_names, batch_size=max(1, min(batch_size, 16)))
    floors: dict[str, int] = {}
    if floor and dense_names:
        floors.update(
            local_rank_floors(
                work, x[:floor_samples], dense_names, atol=floor_atol, rtol=floor_rtol
            )
        )
    if floor and conv_names:
        conv_floors, unmeasured = conv_channel_floors(
            work,
            x[:conv_floor_samples],
            conv_names,
            atol=floor_atol,
            rtol=floor_rtol,
            positions_per_axis=conv_floor_positions,
        )
        floors.update(conv_floors)
        notes.update(unmeasured)
    candidates, bases = [], {}
    for n in names:
        layer = work.get_layer(n)
        st = stats[n]
        if grams is not None and n in grams:
            statistic = grams[n]
        elif layer.use_bias:
            statistic = st.covariance
        else:  # no bias to carry the mean: project the second moment
            statistic = st.covariance + np.outer(st.mean, st.mean)
        candidate, bases[n] = _candidate(layer, statistic, floors.get(n, 1))
        candidates.append(candidate)
    fixed = cost.model(work) - sum(
        sum(cost.layer(s) for s in c.original_shapes()) for c in candidates
    )

    def build(ranks):
        dense_factors, conv_factors = {}, {}
        for c in candidates:
            r = ranks[c.name]
            if not c.saves(r, cost.layer):
                continue
            layer = work.get_layer(c.name)
            f = _factors(layer, bases[c.name][:, :r], stats[c.name].mean)
            (conv_factors if isinstance(f, ConvFactors) else dense_factors)[c.name] = f
        out = factorize_convs(work, conv_factors) if conv_factors else work
        out = factorize(out, dense_factors) if dense_factors else out
        if out is model:  # never hand back the input model itself
            out = rebuild(model)
        ranks_out = {n: int(f[0].shape[1]) for n, f in dense_factors.items()}
        ranks_out.update({n: f.rank for n, f in conv_factors.items()})
        return out, ranks_out

    trial = (
        None
        if evaluate is None
        else _trial_evaluator(work, candidates, bases, stats, evaluate, cost.layer)
    )
    ranks = policy.select(
        candidates,
        fixed_params=fixed,
        original_params=original,
        evaluate=trial,
        cost_fn=cost.layer,
    )
    compressed, kept_ranks = build(ranks)
    layer_loss = {} if trial is None else _layer_losses(trial, candidates, ranks, kept_ranks)
    return Compressed(
        model=compressed,
        method="local_rank",
        budget=getattr(policy, "fraction", None),
        ranks=kept_ranks,
        floors=floors,
        removed_units=removed,
        budget_kind=cost.name,
        skipped=skipped,
        folded=folded,
        notes=notes,
        layer_loss=layer_loss,
    )


def _layer_losses(trial, candidates, ranks, kept) -> dict[str, float]:
    """`{layer: trial loss with only it at its rank - loss with none rewritten}`."""
    full = {c.name: c.max_rank for c in candidates}
    base = trial(full)
    return {name: trial({**full, name: ranks[name]}) - base for name in kept}


def _trial_evaluator(work, candidates, bases, stats, evaluate, cost_fn):
    """`ranks -> evaluate(stand-in)`: one clone of `work` whose kernels and
    biases are set to those of the factorized layers at `ranks`."""
    stand_in = keras.models.clone_model(work)
    stand_in.set_weights(work.get_weights())
    cache: dict[tuple[str, int], list[np.ndarray]] = {}  # bounded: kernels can be large
    current: dict[str, int] = {}

    def weights(c, rank):
        if (c.name, rank) not in cache:
            layer = work.get_layer(c.name)
            if c.saves(rank, cost_fn):
                f = _factors(layer, bases[c.name][:, :rank], stats[c.name].mean)
                value = _dense_equivalent(layer, f)
            else:
                value = layer.get_weights()
            if len(cache) >= 2 * len(candidates):
                cache.pop(next(iter(cache)))
            cache[(c.name, rank)] = value
        return cache[(c.name, rank)]

    def run(ranks):
        for c in candidates:
            rank = c.max_rank if not c.saves(ranks[c.name], cost_fn) else ranks[c.name]
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
