"""Transformer rewrites: low-rank projections and constant-head removal.

The rewrites act on *projections* (see `compress.projections`): `Dense`
layers, projection-form `EinsumDense` layers (a transformer's feed-forward
layers) and the four projections of a `keras.layers.MultiHeadAttention`
(`query`, `key`, `value`: `d_model -> heads x head_dim`;
`attention_output`: `heads x value_dim -> d_out`), named by *target*: the
layer name, or `"<attention layer>/<projection>"`.

1. **Data-aware low rank.** From the mean `m` and covariance `C` of a
   projection's output over all positions of the calibration samples, keep
   the leading `r` eigenvectors `U_r` of `C`: `p ~ m + (p - m) U_r U_r^T`,
   i.e. the factors `A = W U_r` (`n_in x r`), `B = U_r^T` (`r x n_out`) and
   the bias `m - (m - b) U_r U_r^T`; exact at full rank and, on the data,
   whenever `C` has rank <= `r`. A projection without bias uses the second
   moment `E[p p^T]` and no bias.
2. **Weight SVD** (the data-free baseline): `W ~ U_r S_r V_r^T`, bias kept.
3. **Constant heads.** A head whose attention output (before the output
   projection) is constant on the calibration data (for example a head whose
   value projection is zero outputs its value bias) is removed: the attention
   layer is rebuilt with fewer heads, the head's slices of the four
   projections are dropped, and its constant contribution through the output
   projection is added to the output bias. Other heads are unaffected (each
   head's softmax is its own), so the rewrite is exact on that data.
4. **At a budget.** `transformer_compress` removes constant heads, then lets
   a `RankPolicy` choose the ranks from the eigenvalues of each projection's
   output statistic (`projection_candidates`).

Rewritten layers are `LowRankDense` (for `Dense`), `LowRankEinsumDense` (for
`EinsumDense`) and `LowRankMultiHeadAttention` (a `MultiHeadAttention`
whose chosen projections are `LowRankEinsumDense`); all are registered
serializable layers, so rewritten models save and load as `.keras` files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from compress.attention_layers import (
    PROJECTIONS,
    SUBLAYERS,
    LowRankEinsumDense,
    LowRankMultiHeadAttention,
)
from compress.layers import LowRankDense
from compress.projections import (
    MHA_CALL,
    ProjectionLayout,
    ProjectionStatistics,
    UnsupportedLayerError,
    call_node,
    check_attention,
    check_batch_size,
    einsum_layout,
    gather_moments,
    is_attention,
    make_candidate,
    projection_bias,
    projection_candidates,
    projection_kernel,
    projection_statistics,
    resolve_target,
    skipped_layers,
    split_target,
    transformer_targets,
    unsupported,
)
from compress.surgery import replace_layers
from keras_localrank.validation import check_finite_float, check_positive_int

__all__ = [
    "PROJECTIONS",
    "HeadRecord",
    "LowRankEinsumDense",
    "LowRankMultiHeadAttention",
    "ProjectionRecord",
    "ProjectionStatistics",
    "UnsupportedLayerError",
    "compress_attention",
    "constant_heads",
    "projection_candidates",
    "projection_floors",
    "projection_statistics",
    "prune_constant_heads",
    "skipped_layers",
    "transformer_compress",
    "transformer_targets",
    "weight_candidates",
    "weight_spectra",
    "weight_svd_projections",
]


# --- rewriting -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectionRecord:
    """What happened to one projection.

    Attributes:
        target: the target name.
        rank: the kept rank.
        max_rank: `min(n_in, n_out)`.
        params_before: kernel and bias weights before.
        params_after: kernel and bias weights after.
        energy: fraction of the projection statistic's trace (data-aware) or
            of the kernel's squared singular values (weight SVD) kept.
    """

    target: str
    rank: int
    max_rank: int
    params_before: int
    params_after: int
    energy: float


@dataclasses.dataclass(frozen=True)
class HeadRecord:
    """Heads removed from one attention layer.

    Attributes:
        layer: the attention layer's name.
        removed: indices of the removed heads (original numbering).
        num_heads: heads before.
        kept: heads after.
    """

    layer: str
    removed: tuple[int, ...]
    num_heads: int
    kept: int


def _projection_params(layout: ProjectionLayout, rank: int | None) -> int:
    bias = layout.n_out if layout.bias_shape is not None else 0
    if rank is None:
        return layout.n_in * layout.n_out + bias
    return rank * (layout.n_in + layout.n_out) + bias


def _check_ranks(model, ranks) -> dict[str, int]:
    if not isinstance(ranks, Mapping):
        raise TypeError(f"Expected `ranks` to be a dict {{target: rank}}. Received: {ranks!r}")
    if not ranks:
        raise ValueError("Expected at least one target in `ranks`. Received: ranks={}")
    checked = {}
    for target, rank in ranks.items():
        rank = check_positive_int(f"ranks[{target!r}]", rank)
        _, sub = resolve_target(model, target)
        layout = einsum_layout(sub)
        limit = min(layout.n_in, layout.n_out)
        if rank > limit:
            raise ValueError(
                f"Expected ranks[{target!r}] <= {limit} (min of {layout.n_in} inputs and "
                f"{layout.n_out} outputs). Received: {rank}"
            )
        checked[target] = rank
    return checked


def _factors(sub, rank: int, basis: np.ndarray, mean: np.ndarray | None):
    """`(kernel_a, kernel_b, bias)` in layer shapes: output projected on `basis[:, :rank]`.

    With `mean` (data-aware): bias `m - (m - b) U U^T`; without: bias kept.
    """
    layout = einsum_layout(sub)
    u = basis[:, :rank]
    a = (projection_kernel(sub, layout) @ u).reshape(layout.in_dims + (rank,))
    b = u.T.reshape((rank,) + layout.out_dims)
    bias = projection_bias(sub, layout)
    if bias is not None and mean is not None:
        bias = mean - ((mean - bias) @ u) @ u.T
    if bias is not None:
        bias = bias.reshape(layout.out_dims)
    return a, b, bias


def _weights_of(sub, dtype) -> list:
    return [keras.ops.convert_to_numpy(w).astype(dtype) for w in sub.weights]


def _dtype(layer) -> str:
    return keras.backend.standardize_dtype(layer.variable_dtype)


def _mha_shapes(model, layer):
    node = call_node(model, layer)
    bound = MHA_CALL.bind(layer, *node.arguments.args, **node.arguments.kwargs).arguments
    key = bound.get("key")
    return (
        tuple(bound["query"].shape),
        tuple(bound["value"].shape),
        None if key is None else tuple(key.shape),
    )


def _new_mha(model, layer, config: dict, sub_weights: Mapping[str, list]):
    """`(builder, weights)` of an attention layer rebuilt from `config`."""
    low_rank = "projection_ranks" in config
    cls = LowRankMultiHeadAttention if low_rank else keras.layers.MultiHeadAttention
    probe = cls.from_config(dict(config))
    probe.build(*_mha_shapes(model, layer))
    for role in PROJECTIONS:
        getattr(probe, SUBLAYERS[role]).set_weights(list(sub_weights[role]))
    return (lambda _: cls.from_config(dict(config))), probe.get_weights()


def _rewrite(model, plans: Mapping[str, tuple[int, np.ndarray, np.ndarray | None]]):
    """Rebuild `model` with each target `{target: (rank, basis, mean)}` factorized."""
    builders, weights = {}, {}
    by_layer: dict[str, dict[str, tuple]] = {}
    for target, plan in plans.items():
        name, role = split_target(target)
        by_layer.setdefault(name, {})[role] = plan
    for name, roles in by_layer.items():
        layer = model.get_layer(name)
        dtype = _dtype(layer)
        if is_attention(layer):
            config = layer.get_config()
            ranks = dict(getattr(layer, "projection_ranks", {}))
            sub_weights = {}
            for role in PROJECTIONS:
                sub = getattr(layer, SUBLAYERS[role])
                if role in roles:
                    rank, basis, mean = roles[role]
                    a, b, bias = _factors(sub, rank, basis, mean)
                    sub_weights[role] = [w.astype(dtype) for w in (a, b, bias) if w is not None]
                    ranks[role] = rank
                else:
                    sub_weights[role] = _weights_of(sub, dtype)
            config["projection_ranks"] = ranks
            builders[name], weights[name] = _new_mha(model, layer, config, sub_weights)
            continue
        rank, basis, mean = roles[None]
        a, b, bias = _factors(layer, rank, basis, mean)
        activation = keras.activations.serialize(layer.activation)
        if isinstance(layer, keras.layers.Dense):
            builders[name] = _builder(
                LowRankDense,
                units=int(b.shape[-1]),
                rank=rank,
                activation=activation,
                use_bias=bias is not None,
                name=name,
                dtype=layer.dtype_policy,
                trainable=layer.trainable,
            )
        else:
            builders[name] = _builder(
                LowRankEinsumDense,
                output_dims=tuple(b.shape[1:]),
                rank=rank,
                contract_dims=a.ndim - 1,
                activation=activation,
                use_bias=bias is not None,
                name=name,
                dtype=layer.dtype_policy,
                trainable=layer.trainable,
            )
        weights[name] = [w.astype(dtype) for w in (a, b, bias) if w is not None]
    return replace_layers(model, builders, weights)


def _builder(cls, **kwargs):
    return lambda _: cls(**kwargs)


def _records(model, plans, energies) -> list[ProjectionRecord]:
    records = []
    for target, (rank, _, _) in plans.items():
        layout = einsum_layout(resolve_target(model, target)[1])
        records.append(
            ProjectionRecord(
                target=target,
                rank=rank,
                max_rank=min(layout.n_in, layout.n_out),
                params_before=_projection_params(layout, None),
                params_after=_projection_params(layout, rank),
                energy=energies[target],
            )
        )
    return records


def _energy(values: np.ndarray, rank: int) -> float:
    total = float(values.sum())
    return 1.0 if total <= 0 else float(values[:rank].sum() / total)


def compress_attention(
    model: keras.Model,
    calib_x,
    ranks: Mapping[str, int],
    *,
    statistics: Mapping[str, ProjectionStatistics] | None = None,
    batch_size: int = 64,
) -> tuple[keras.Model, list[ProjectionRecord]]:
    """Data-aware low rank of attention projections and feed-forward layers.

    Each target's output is projected on the leading `rank` eigenvectors of
    its output covariance on `calib_x` (see the module docstring). Every
    listed target is rewritten, even where the factors hold more weights
    than the kernel (use `policies.Candidate.saves` to skip those).

    Args:
        model: a built functional or Sequential model (not modified).
        calib_x: calibration samples `[N, *input_shape]`.
        ranks: `{target: rank}`, targets as in `transformer_targets`
            (`"ffn1"`, `"mha/query"`, ...), `1 <= rank <= min(n_in, n_out)`.
        statistics: precomputed `projection_statistics` covering the
            targets. Default None (computed here).
        batch_size: samples per chunk. Default 64.

    Returns:
        `(new model, [ProjectionRecord])`.

    Raises:
        TypeError, ValueError: bad `ranks`, unknown targets, bad data.
        UnsupportedLayerError: a target that cannot be rewritten.
    """
    ranks = _check_ranks(model, ranks)
    if statistics is None:
        statistics = projection_statistics(model, calib_x, list(ranks), batch_size=batch_size)
    missing = sorted(set(ranks) - set(statistics))
    if missing:
        raise ValueError(f"`statistics` lacks targets {missing}.")
    plans, energies = {}, {}
    for target, rank in ranks.items():
        stat = statistics[target]
        values, basis = stat.eigen()
        plans[target] = (rank, basis, stat.mean if stat.use_bias else None)
        energies[target] = _energy(values, rank)
    return _rewrite(model, plans), _records(model, plans, energies)


def weight_svd_projections(
    model: keras.Model, ranks: Mapping[str, int]
) -> tuple[keras.Model, list[ProjectionRecord]]:
    """Data-free baseline: truncated SVD `W ~ U_r S_r V_r^T` of each target's kernel.

    Args:
        model: a built functional or Sequential model (not modified).
        ranks: `{target: rank}` as for `compress_attention`.

    Returns:
        `(new model, [ProjectionRecord])`, energy = kept share of the squared
        singular values.

    Raises:
        TypeError, ValueError, UnsupportedLayerError: as `compress_attention`.
    """
    ranks = _check_ranks(model, ranks)
    plans, energies = {}, {}
    for target, rank in ranks.items():
        sub = resolve_target(model, target)[1]
        _, s, vt = np.linalg.svd(projection_kernel(sub, einsum_layout(sub)), full_matrices=False)
        basis = vt.T  # kernel @ V_r V_r^T == U_r S_r V_r^T
        plans[target] = (rank, basis, None)
        energies[target] = _energy(s**2, rank)
    return _rewrite(model, plans), _records(model, plans, energies)


def weight_candidates(model, targets: Sequence[str] | None = None) -> list:
    """`policies.Candidate`s from the kernels alone (data-free), one per target.

    Each spectrum is the squared singular values of the target's kernel
    unfolded to `n_in x n_out`.

    Raises:
        ValueError: no target in `model` (or `targets` empty).
        UnsupportedLayerError: targets that cannot be rewritten.
    """
    names = transformer_targets(model) if targets is None else list(targets)
    if not names:
        raise ValueError(
            f"Model {model.name!r} has no projection to factorize: expected Dense, "
            "EinsumDense or MultiHeadAttention layers. Received layers: "
            f"{[type(layer).__name__ for layer in model.layers]}."
        )
    spectra = weight_spectra(model, names)
    candidates = []
    for name in names:
        layout = einsum_layout(resolve_target(model, name)[1])
        candidates.append(
            make_candidate(
                name,
                layout.n_in,
                layout.n_out,
                layout.bias_shape is not None,
                spectra[name],
                1,
                _target_positions(model, name),
            )
        )
    return candidates


def _target_positions(model, target: str) -> int:
    """Positions per sample at which a target's kernel is applied."""
    layer, sub = resolve_target(model, target)
    _, role = split_target(target)
    if role is not None:
        node = call_node(model, layer)
        bound = MHA_CALL.bind(layer, *node.arguments.args, **node.arguments.kwargs).arguments
        source = bound["value"] if role in ("key", "value") else bound["query"]
        return int(math.prod(source.shape[1:-1]))
    return _free_positions(layer)


def _free_positions(layer) -> int:
    """Positions per sample of a projection layer: its input's free axes."""
    shape = layer._inbound_nodes[0].input_tensors[0].shape
    contract = len(einsum_layout(layer).in_dims)
    return int(math.prod(shape[1 : len(shape) - contract]))


def weight_spectra(model, targets: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Squared singular values of each target's kernel, descending (data-free)."""
    targets = transformer_targets(model) if targets is None else list(targets)
    out = {}
    for target in targets:
        sub = resolve_target(model, target)[1]
        s = np.linalg.svd(projection_kernel(sub, einsum_layout(sub)), compute_uv=False)
        out[target] = s**2
    return out


# --- heads ------------------------------------------------------------------------------


def constant_heads(
    model, calib_x, *, atol: float = 0.0, layers: Sequence[str] | None = None, batch_size: int = 64
) -> dict[str, dict[int, np.ndarray]]:
    """`{attention layer: {head: constant output}}` on `calib_x`.

    A head is constant when every entry of its attention output (before the
    output projection) varies by at most `atol` over all samples and
    positions; its constant is the midpoint of the range.

    Args:
        model: a built functional or Sequential model.
        calib_x: calibration samples.
        atol: tolerance on each entry's range. Default 0 (exactly constant).
        layers: attention layers to examine. Default None: all.
        batch_size: samples per chunk. Default 64.

    Returns:
        A dict with an entry (possibly empty) per attention layer.
    """
    atol = check_finite_float("atol", atol, low=0.0)
    names = (
        [lyr.name for lyr in model.layers if is_attention(lyr)] if layers is None else list(layers)
    )
    for name in names:
        layer = model.get_layer(name)
        if not is_attention(layer):
            raise unsupported(layer, "expected a MultiHeadAttention layer")
        check_attention(layer)
    if not names:
        return {}
    _, _, moments = gather_moments(
        model,
        calib_x,
        [f"{n}/attention_output" for n in names],
        heads=True,
        batch_size=check_batch_size(batch_size),
    )
    found = {}
    for name in names:
        layer = model.get_layer(name)
        m = moments[name]
        low = m.low.reshape(layer.num_heads, -1)
        high = m.high.reshape(layer.num_heads, -1)
        found[name] = {
            int(h): (low[h] + high[h]) / 2
            for h in range(layer.num_heads)
            if np.all(high[h] - low[h] <= atol)
        }
    return found


def _slice_heads(role: str, sub, keep: np.ndarray, dtype) -> list:
    """The weights of projection `role` restricted to heads `keep`."""
    ws = _weights_of(sub, dtype)
    if role == "attention_output":
        return [ws[0][keep]] + ws[1:]  # kernel or kernel_a: heads first
    if isinstance(sub, LowRankEinsumDense):
        head_weights = [ws[1][:, keep]] + [w[keep] for w in ws[2:]]
        return [ws[0]] + head_weights
    return [ws[0][:, keep]] + [w[keep] for w in ws[1:]]


def prune_constant_heads(
    model: keras.Model,
    calib_x,
    tol: float = 0.0,
    *,
    layers: Sequence[str] | None = None,
    batch_size: int = 64,
) -> tuple[keras.Model, list[HeadRecord]]:
    """Remove attention heads whose output is constant on `calib_x`.

    The constant contribution of each removed head through the output
    projection is added to its bias (see the module docstring). At least one
    head of each layer is kept.

    Args:
        model: a built functional or Sequential model (not modified).
        calib_x: calibration samples.
        tol: tolerance on the range of each entry of a head's output.
            Default 0. In float32 the softmax weights of a head do not sum
            to exactly 1, so a head that outputs its value bias varies by
            about 1e-7 times that bias: pass a small `tol` (1e-6) to find it.
        layers: attention layers to prune. Default None: all.
        batch_size: samples per chunk. Default 64.

    Returns:
        `(new model, [HeadRecord])`: the model is the input itself when no
        head is constant (a record per layer is returned either way).

    Raises:
        ValueError: a non-zero constant to fold into an output projection
            without bias; bad arguments.
        UnsupportedLayerError: layers that are not (supported) attention.
    """
    found = constant_heads(model, calib_x, atol=tol, layers=layers, batch_size=batch_size)
    builders, weights, records = {}, {}, []
    for name, heads in found.items():
        layer = model.get_layer(name)
        n = layer.num_heads
        drop = sorted(heads)
        if len(drop) >= n:  # keep one head
            drop = drop[:-1]
        records.append(HeadRecord(name, tuple(drop), n, n - len(drop)))
        if not drop:
            continue
        keep = np.setdiff1d(np.arange(n), drop)
        dtype = _dtype(layer)
        out = getattr(layer, SUBLAYERS["attention_output"])
        layout = einsum_layout(out)
        w_o = projection_kernel(out, layout).reshape(n, -1, layout.n_out)
        shift = sum(heads[h] @ w_o[h] for h in drop)
        sub_weights = {
            role: _slice_heads(role, getattr(layer, SUBLAYERS[role]), keep, dtype)
            for role in PROJECTIONS
        }
        if layout.bias_shape is None:
            if np.any(shift != 0):
                raise ValueError(
                    f"Heads {drop} of layer {name!r} output non-zero constants, but its "
                    "output projection has no bias to absorb them (use_bias=False)."
                )
        else:
            bias = sub_weights["attention_output"][-1]
            sub_weights["attention_output"][-1] = (
                bias.astype(np.float64) + shift.reshape(bias.shape)
            ).astype(dtype)
        config = {**layer.get_config(), "num_heads": int(keep.size)}
        builders[name], weights[name] = _new_mha(model, layer, config, sub_weights)
    if not builders:
        return model, records
    return replace_layers(model, builders, weights), records


# --- at a budget -------------------------------------------------------------


def transformer_compress(
    model: keras.Model,
    calib_x,
    policy,
    *,
    targets: Sequence[str] | None = None,
    prune_heads: bool = True,
    head_tol: float = 1e-6,
    evaluate=None,
    batch_size: int = 64,
    cost="params",
    floors: Mapping[str, int] | None = None,
):
    """Constant-head removal, then data-aware low rank at ranks chosen by `policy`.

    Args:
        model: a built functional or Sequential model (not modified).
        calib_x: calibration samples.
        policy: a `policies.RankPolicy`, or a float: the target parameter
            fraction (`ParamFraction`). Candidates are the projection
            targets, their spectra the eigenvalues of their output
            statistics; a rank whose factors would not save weights keeps
            the layer dense.
        targets: projection targets. Default None: `transformer_targets`.
        prune_heads: first remove heads constant on `calib_x`. Default True.
        head_tol: tolerance of `prune_constant_heads`. Default 1e-6.
        evaluate: `model -> score` (lower is better), for policies that
            measure (`AccuracyTolerance`, `GreedyParamFraction`). Each trial
            is scored on a stand-in of the same architecture whose
            projection kernels and biases are those of the factors (the
            same function, no model rebuilt per trial). Default None.
        batch_size: samples per chunk. Default 64.
        cost: what the budget counts: `"params"` (default), `"macs"` (a
            projection applied at `t` tokens costs `t * n_in * n_out`; the
            attention scores are counted but never shrink), or a
            `compress.costs.CostModel`.
        floors: `{target: smallest rank allowed}` (see `projection_floors`).
            Default None: 1.

    Returns:
        A `Compressed` (`method="local_rank"`) with the ranks, and the heads
        removed per attention layer in `removed_units`; with `evaluate`,
        `layer_loss` holds the rise of the score when only one projection
        is rewritten at its rank.

    Raises:
        ValueError: an impossible budget (from the policy), bad targets.
        UnsupportedLayerError: targets that cannot be rewritten.
    """
    from compress.costs import get_cost
    from compress.outcome import Compressed
    from compress.policies import ParamFraction, RankPolicy, get_policy

    cost = get_cost(cost)
    if not isinstance(policy, RankPolicy):
        policy = ParamFraction(policy) if isinstance(policy, (int, float)) else get_policy(policy)
    original = cost.model(model)
    work, removed = model, {}
    if prune_heads and any(is_attention(layer) for layer in model.layers):
        work, heads = prune_constant_heads(model, calib_x, head_tol, batch_size=batch_size)
        removed = {r.layer: len(r.removed) for r in heads if r.removed}
    names = transformer_targets(work) if targets is None else list(targets)
    stats = projection_statistics(work, calib_x, names, batch_size=batch_size)
    floors = {t: f for t, f in dict(floors or {}).items() if t in stats}
    candidates = projection_candidates(stats, floors)
    by_name = {c.name: c for c in candidates}
    fixed = cost.model(work) - sum(
        sum(cost.layer(shape) for shape in c.original_shapes()) for c in candidates
    )

    def saving(ranks):
        return {t: r for t, r in ranks.items() if by_name[t].saves(r, cost.layer)}

    def build(ranks):
        chosen = saving(ranks)
        if not chosen:
            return (replace_layers(work, {}, {}) if work is model else work), []
        return compress_attention(work, calib_x, chosen, statistics=stats)

    trial = None if evaluate is None else _stand_in_trial(work, stats, saving, evaluate)
    ranks = policy.select(
        candidates,
        fixed_params=fixed,
        original_params=original,
        evaluate=trial,
        cost_fn=cost.layer,
    )
    compressed, records = build(ranks)
    kept = {r.target: r.rank for r in records}
    layer_loss = {}
    if trial is not None:
        full = {c.name: c.max_rank for c in candidates}
        base = trial(full)
        layer_loss = {t: trial({**full, t: r}) - base for t, r in kept.items()}
    return Compressed(
        model=compressed,
        method="local_rank",
        budget=getattr(policy, "fraction", None),
        ranks=kept,
        removed_units=removed,
        budget_kind=cost.name,
        layer_loss=layer_loss,
        floors=floors,
    )


def projection_floors(
    model: keras.Model,
    x,
    targets: Sequence[str] | None = None,
    *,
    rtol: float | None = 0.1,
    samples: int = 16,
    positions: int = 2,
) -> tuple[dict[str, int], dict[str, str]]:
    """Local-rank floors of the projections that are plain `Dense` layers.

    A `Dense` layer on vectors gets `compress.data_aware.local_rank_floors`;
    one applied at every token of a sequence (a feed-forward layer) gets the
    per-position floor of `compress.data_aware.conv_channel_floors` (the
    Jacobian of its units at one token, at `positions` tokens). Attention
    projections and `EinsumDense` layers are not measured (the local-rank
    engine taps whole layers, not sublayers), and are listed with the reason.

    Args:
        model: a built functional model.
        x: calibration samples (the first `samples` are used).
        targets: projection targets. Default None: `transformer_targets`.
        rtol: relative tolerance of the robust local rank. Default 0.1.
        samples: calibration samples measured. Default 16.
        positions: tokens measured per sequence layer. Default 2.

    Returns:
        `({target: floor}, {target: why no floor was measured})`.
    """
    from compress.data_aware import conv_channel_floors, local_rank_floors

    targets = transformer_targets(model) if targets is None else list(targets)
    vectors, sequences, unmeasured = [], [], {}
    for target in targets:
        layer, _ = resolve_target(model, target)
        if type(layer) is not keras.layers.Dense:
            unmeasured[target] = (
                "floor not measured: attention and EinsumDense projections are "
                "sublayers or multi-axis maps the local-rank engine does not tap"
            )
        elif len(layer.output.shape) == 2:
            vectors.append(target)
        else:
            sequences.append(target)
    floors: dict[str, int] = {}
    x = x[:samples]
    if vectors:
        floors.update(local_rank_floors(model, x, vectors, rtol=rtol))
    if sequences:
        measured, skipped = conv_channel_floors(
            model, x, sequences, rtol=rtol, positions_per_axis=positions
        )
        floors.update(measured)
        unmeasured.update(skipped)
    return floors, unmeasured


def _stand_in_trial(work, stats, saving, evaluate):
    """`ranks -> evaluate(stand-in)`: a clone of `work` whose projections hold
    the product of their factors at `ranks` (the rewritten function)."""
    stand_in = keras.models.clone_model(work)
    stand_in.set_weights(work.get_weights())
    current: dict[str, int | None] = {}

    def weights(target, rank):
        sub = resolve_target(work, target)[1]
        if rank is None:
            return [keras.ops.convert_to_numpy(w) for w in sub.weights]
        layout = einsum_layout(sub)
        st = stats[target]
        basis = st.eigen()[1]
        a, b, bias = _factors(sub, rank, basis, st.mean if st.use_bias else None)
        matrix = a.reshape(layout.n_in, rank) @ b.reshape(rank, layout.n_out)
        inverse = np.argsort(layout.kernel_perm)
        kernel = np.transpose(matrix.reshape(layout.in_dims + layout.out_dims), inverse)
        out = [kernel.astype(_dtype(sub))]
        if bias is not None:
            out.append(bias.reshape(layout.bias_shape).astype(_dtype(sub)))
        return out

    def run(ranks):
        chosen = saving(ranks)
        for target in stats:
            rank = chosen.get(target)
            if current.get(target, "unset") != rank:
                resolve_target(stand_in, target)[1].set_weights(weights(target, rank))
                current[target] = rank
        return float(evaluate(stand_in))

    return run
