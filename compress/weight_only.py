"""Data-free baselines for convnets: weight SVD, spatial factorization, Tucker-2.

`weight_factorize` gives every Dense layer its truncated SVD and every
Conv1D/Conv2D layer one of the `compress.conv` schemes computed from the
kernel alone, with ranks chosen by a `RankPolicy` on the squared singular
values of the matrix each scheme truncates (the energy of the weights), so
the baselines meet the same budget (parameters or MACs) as the local-rank
method.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
import numpy as np

from compress.conv import (
    CONV_SCHEMES,
    channel_svd_factors,
    conv_positions,
    factorize_convs,
    factorized_shapes,
    kernel_matrix,
    spatial_factors,
    spatial_matrix,
    tucker2_factors,
)
from compress.costs import get_cost
from compress.folding import plan_rewrite
from compress.graph import rebuild
from compress.outcome import Compressed
from compress.policies import Candidate, ParamFraction, RankPolicy, get_policy
from compress.surgery import factorize
from keras_localrank.validation import check_choice

__all__ = ["weight_factorize"]


def _conv_candidate(layer, scheme):
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    shape = tuple(int(d) for d in kernel.shape)
    cout = shape[-1]
    if scheme == "spatial":
        s = np.linalg.svd(spatial_matrix(kernel), compute_uv=False)
        limit = min(shape[0] * shape[2], shape[1] * shape[3])
    elif scheme == "tucker2":
        s = np.linalg.svd(np.moveaxis(kernel, -1, 0).reshape(cout, -1), compute_uv=False)
        limit = cout
    else:
        s = np.linalg.svd(kernel_matrix(kernel), compute_uv=False)
        limit = min(int(np.prod(shape[:-1])), cout)
    candidate = Candidate(
        layer.name,
        int(np.prod(shape[:-1])),
        cout,
        layer.use_bias,
        s**2,
        kernel_shape=shape,
        positions=conv_positions(layer)[1],
        factorized=functools.partial(factorized_shapes, layer, scheme),
        rank_limit=limit,
    )
    return candidate


def _conv_factors(layer, scheme, rank):
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    if scheme == "spatial":
        return spatial_factors(kernel, bias, rank)
    if scheme == "tucker2":
        return tucker2_factors(kernel, bias, rank)
    return channel_svd_factors(kernel, bias, rank)


def weight_factorize(
    model: keras.Model,
    policy: RankPolicy | float,
    *,
    scheme: str = "channel",
    layers: Sequence[str] | None = None,
    cost="params",
    fold_bn: bool = True,
) -> Compressed:
    """Data-free factorization of Dense and convolution layers at one budget.

    Args:
        model: a built functional or Sequential model (not modified).
        policy: a `RankPolicy` (`ParamFraction`, `EnergyFraction`), or a
            float: the target fraction of the original cost.
        scheme: the convolution rewrite, one of `CONV_SCHEMES`:
            `"channel"` (weight SVD, default), `"spatial"` (Jaderberg et
            al.; Conv1D layers, which have one spatial axis, get the channel
            SVD, noted in `notes`) or `"tucker2"` (Kim et al.).
        layers: names of the layers to factorize. Default None: all Dense,
            Conv1D and Conv2D layers.
        cost: what the budget counts: `"params"` (default), `"macs"` or a
            `compress.costs.CostModel`.
        fold_bn: fold BatchNormalization into the preceding layer first.
            Default True.

    Returns:
        A `Compressed` with `method` `"weight_svd"`, `"spatial"` or
        `"tucker2"`.

    Raises:
        ValueError: a bad `scheme` or `cost`; no compressible layer; an
            impossible budget (`InfeasibleBudgetError`).
    """
    check_choice("scheme", scheme, CONV_SCHEMES)
    cost = get_cost(cost)
    if not isinstance(policy, RankPolicy):
        policy = ParamFraction(policy) if isinstance(policy, (int, float)) else get_policy(policy)
    original = cost.model(model)
    plan = plan_rewrite(model, layers, fold_bn=fold_bn)
    work, folded, notes = plan.model, plan.folded, dict(plan.notes)
    dense, convs, skipped = plan.dense, plan.convs, plan.skipped
    candidates, svds, schemes = [], {}, {}
    for layer in dense:
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        u, s, vt = np.linalg.svd(kernel, full_matrices=False)
        svds[layer.name] = (u, s, vt)
        positions = int(np.prod([int(d) for d in layer.output.shape[1:-1]]))
        candidates.append(
            Candidate(
                layer.name, kernel.shape[0], kernel.shape[1], layer.use_bias, s**2,
                positions=positions,
            )
        )
    for layer in convs:
        own = scheme
        if scheme == "spatial" and len(layer.kernel.shape) != 4:
            own = "channel"
            notes[layer.name] = "Conv1D has one spatial axis: channel weight SVD instead"
        schemes[layer.name] = own
        candidates.append(_conv_candidate(layer, own))
    fixed = cost.model(work) - sum(
        sum(cost.layer(s) for s in c.original_shapes()) for c in candidates
    )
    ranks = policy.select(
        candidates, fixed_params=fixed, original_params=original, cost_fn=cost.layer
    )
    dense_factors, conv_factors = {}, {}
    for c in candidates:
        r = ranks[c.name]
        if not c.saves(r, cost.layer):
            continue
        layer = work.get_layer(c.name)
        if c.name in svds:
            u, s, vt = svds[c.name]
            dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
            bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
            dense_factors[c.name] = (
                (u[:, :r] * s[:r]).astype(dtype), vt[:r].astype(dtype), bias
            )
        else:
            conv_factors[c.name] = _conv_factors(layer, schemes[c.name], r)
    out = factorize_convs(work, conv_factors) if conv_factors else work
    out = factorize(out, dense_factors) if dense_factors else out
    if out is model:
        out = rebuild(model)
    kept = {n: int(f[0].shape[1]) for n, f in dense_factors.items()}
    kept.update({n: f.rank for n, f in conv_factors.items()})
    return Compressed(
        model=out,
        method="weight_svd" if scheme == "channel" else scheme,
        budget=getattr(policy, "fraction", None),
        ranks=kept,
        budget_kind=cost.name,
        skipped=skipped,
        folded=folded,
        notes=notes,
    )
