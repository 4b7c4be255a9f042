"""Data-free baselines: truncated SVD of each Dense kernel, and of each
transformer projection (Dense, EinsumDense, attention projections)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np

from compress.costs import get_cost
from compress.graph import flatten_nested
from compress.outcome import Compressed
from compress.policies import Candidate, ParamFraction, RankPolicy, get_policy
from compress.registry import compressible_layers, count_params
from compress.surgery import factorize, replace_layers

__all__ = ["projection_weight_svd", "select_layers", "weight_svd"]


def select_layers(model, layers: Sequence[str] | None = None) -> list:
    """The factorizable layers of `model`, optionally restricted to `layers`.

    Raises:
        ValueError: a model with no compressible layer, or a named layer that
            is unknown or not compressible.
    """
    found = compressible_layers(model)
    if layers is not None:
        names = {layer.name for layer in found}
        for name in layers:
            if name not in names:
                raise ValueError(
                    f"Expected names of compressible (Dense) layers in `layers`. "
                    f"Received: {name!r}; compressible layers: {sorted(names)}."
                )
        found = [layer for layer in found if layer.name in set(layers)]
    if not found:
        raise ValueError(
            f"Model {model.name!r} has no compressible layer: expected at least one "
            "Dense layer with a 2-D kernel. Received layers: "
            f"{[type(layer).__name__ for layer in model.layers]}."
        )
    return found


def weight_svd(
    model: keras.Model,
    policy: RankPolicy | float,
    *,
    layers: Sequence[str] | None = None,
) -> Compressed:
    """Truncated SVD `W ~ U_r S_r V_r^T` of every Dense kernel (data-free).

    Ranks come from `policy` applied to the squared singular values of each
    kernel (the energy of the weights), with a floor of 1.

    Args:
        model: a built functional or Sequential model (nested models are
            inlined first: `compress.graph.flatten_nested`).
        policy: a `RankPolicy`, or a float: the target parameter fraction.
        layers: names of the layers to factorize. Default None: every Dense.

    Returns:
        A `Compressed`.
    """
    if not isinstance(policy, RankPolicy):
        policy = ParamFraction(policy) if isinstance(policy, (int, float)) else get_policy(policy)
    model = flatten_nested(model)
    chosen = select_layers(model, layers)
    svds, candidates = {}, []
    for layer in chosen:
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
        u, s, vt = np.linalg.svd(kernel, full_matrices=False)
        svds[layer.name] = (u, s, vt)
        candidates.append(
            Candidate(layer.name, kernel.shape[0], kernel.shape[1], layer.use_bias, s**2)
        )
    original = count_params(model)
    fixed = original - sum(c.dense_params for c in candidates)
    ranks = policy.select(candidates, fixed_params=fixed, original_params=original)
    factors = {}
    for c in candidates:
        r = ranks[c.name]
        if not c.saves(r):
            continue
        u, s, vt = svds[c.name]
        layer = model.get_layer(c.name)
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        dtype = keras.backend.standardize_dtype(layer.kernel.dtype)
        factors[c.name] = ((u[:, :r] * s[:r]).astype(dtype), vt[:r].astype(dtype), bias)
    return Compressed(
        model=factorize(model, factors),
        method="weight_svd",
        budget=getattr(policy, "fraction", None),
        ranks={name: int(f[0].shape[1]) for name, f in factors.items()},
    )


def projection_weight_svd(
    model: keras.Model,
    policy: RankPolicy | float,
    *,
    targets: Sequence[str] | None = None,
    cost="params",
) -> Compressed:
    """Truncated SVD of every transformer projection's kernel (data-free).

    The targets are those of `compress.transformer.transformer_targets`
    (Dense and EinsumDense layers, the query/key/value/output projections of
    each `MultiHeadAttention`); ranks come from `policy` applied to the
    squared singular values of each kernel unfolded to `n_in x n_out`, and a
    rank whose factors would not save weights keeps the projection dense.

    Args:
        model: a built functional or Sequential model (not modified).
        policy: a `RankPolicy`, or a float: the target parameter fraction.
        targets: projection targets. Default None: all.
        cost: `"params"` (default), `"macs"` or a `compress.costs.CostModel`.

    Returns:
        A `Compressed` (`method="weight_svd"`).

    Raises:
        ValueError: no target, an impossible budget.
        UnsupportedLayerError: targets that cannot be rewritten.
    """
    from compress.transformer import weight_candidates, weight_svd_projections

    if not isinstance(policy, RankPolicy):
        policy = ParamFraction(policy) if isinstance(policy, (int, float)) else get_policy(policy)
    cost = get_cost(cost)
    candidates = weight_candidates(model, targets)
    original = cost.model(model)
    fixed = original - sum(
        sum(cost.layer(shape) for shape in c.original_shapes()) for c in candidates
    )
    ranks = policy.select(
        candidates, fixed_params=fixed, original_params=original, cost_fn=cost.layer
    )
    chosen = {c.name: ranks[c.name] for c in candidates if c.saves(ranks[c.name], cost.layer)}
    compressed = (
        weight_svd_projections(model, chosen)[0] if chosen else replace_layers(model, {}, {})
    )
    return Compressed(
        model=compressed,
        method="weight_svd",
        budget=getattr(policy, "fraction", None),
        ranks=chosen,
        budget_kind=cost.name,
    )
