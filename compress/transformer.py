"""Transformer rewrites: low-rank projections and constant-head removal.

A *projection* is a linear map `p = u W + b` from `n_in` input features to
`n_out` output features, applied at every position: a `Dense` layer, an
`EinsumDense` layer of the projection form `"<free><in>,<in><out>-><free><out>"`
(a transformer's feed-forward layers), or one of the four `EinsumDense`
projections inside a `keras.layers.MultiHeadAttention` (`query`, `key`,
`value`: `d_model -> heads x head_dim`; `attention_output`:
`heads x value_dim -> d_out`). Projections are named by *target*: the layer
name, or `"<attention layer>/<projection>"`.

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

Rewritten layers are `LowRankDense` (for `Dense`), `LowRankEinsumDense` (for
`EinsumDense`) and `LowRankMultiHeadAttention` (a `MultiHeadAttention`
whose chosen projections are `LowRankEinsumDense`); all are registered
serializable layers, so rewritten models save and load as `.keras` files.
"""

from __future__ import annotations

import dataclasses
import inspect
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
from compress.policies import Candidate
from compress.surgery import replace_layers
from keras_localrank.inputs import as_samples
from keras_localrank.taps import model_graph
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
    "projection_statistics",
    "prune_constant_heads",
    "transformer_targets",
    "weight_svd_projections",
]


class UnsupportedLayerError(ValueError):
    """A layer (or a use of it) that the transformer rewrites cannot handle."""


# --- layouts: every projection as a 2-D kernel ----------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a projection layer's kernel unfolds to `prod(in_dims) x prod(out_dims)`."""

    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    kernel_perm: tuple[int, ...]  # transposes the kernel to (*in, *out)
    bias_shape: tuple[int, ...] | None  # the stored bias shape (None: no bias)

    @property
    def n_in(self) -> int:
        return math.prod(self.in_dims)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_dims)


def _unsupported(layer, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"Cannot rewrite layer {layer.name!r} of type {type(layer).__name__}: {why}."
    )


def _check_plain(layer) -> None:
    if getattr(layer, "quantization_mode", None) is not None:
        raise _unsupported(layer, "quantized layers are not supported")
    if getattr(layer, "lora_enabled", False):
        raise _unsupported(layer, "LoRA-enabled layers are not supported")


def einsum_layout(layer) -> _Layout:
    """The `_Layout` of a Dense, EinsumDense or LowRank* projection layer.

    Raises:
        UnsupportedLayerError: an equation not of the projection form
            `"<free><in>,<in><out>-><free><out>"`, or a bias over free axes.
    """
    if isinstance(layer, LowRankEinsumDense):
        in_dims = tuple(int(d) for d in layer.kernel_a.shape[:-1])
        return _Layout(
            in_dims,
            layer.output_dims,
            tuple(range(len(in_dims) + len(layer.output_dims))),
            layer.output_dims if layer.use_bias else None,
        )
    if isinstance(layer, LowRankDense):
        n_in = int(layer.kernel_a.shape[0])
        return _Layout((n_in,), (layer.units,), (0, 1), (layer.units,) if layer.use_bias else None)
    if isinstance(layer, keras.layers.Dense):
        _check_plain(layer)
        n_in, units = (int(d) for d in layer.kernel.shape)
        return _Layout((n_in,), (units,), (0, 1), (units,) if layer.use_bias else None)
    if not isinstance(layer, keras.layers.EinsumDense):
        raise _unsupported(layer, "expected a Dense or EinsumDense projection")
    _check_plain(layer)
    equation = layer.equation.replace(" ", "")
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    if "." in ker or len(set(ker)) != len(ker):
        raise _unsupported(layer, f"equation {layer.equation!r} has an unsupported kernel")
    bound = [c for c in ker if c in inp and c not in out]
    outs = [c for c in ker if c in out and c not in inp]
    k = len(bound)
    free = inp[:-k] if k else inp
    if (
        k == 0
        or len(bound) + len(outs) != len(ker)
        or sorted(inp[-k:]) != sorted(bound)
        or not out.startswith(free)
        or sorted(out[len(free) :]) != sorted(outs)
    ):
        raise _unsupported(
            layer,
            f"equation {layer.equation!r} is not a projection of trailing axes "
            "('<free><in>,<in><out>-><free><out>')",
        )
    order = list(inp[-k:]) + list(out[len(free) :])
    perm = tuple(ker.index(c) for c in order)
    shape = tuple(int(d) for d in layer.kernel.shape)
    in_dims = tuple(shape[p] for p in perm[:k])
    out_dims = tuple(shape[p] for p in perm[k:])
    bias_shape = None
    if layer.bias is not None:
        bias_shape = tuple(int(d) for d in layer.bias.shape)
        if len(bias_shape) > len(out_dims):
            raise _unsupported(layer, f"bias axes {layer.bias_axes!r} include free axes")
    return _Layout(in_dims, out_dims, perm, bias_shape)


def _kernel_2d(layer, layout: _Layout) -> np.ndarray:
    """The layer's effective kernel as a float64 `n_in x n_out` matrix."""
    if isinstance(layer, (LowRankEinsumDense, LowRankDense)):
        a = keras.ops.convert_to_numpy(layer.kernel_a).astype(np.float64)
        b = keras.ops.convert_to_numpy(layer.kernel_b).astype(np.float64)
        return a.reshape(layout.n_in, -1) @ b.reshape(b.shape[0], layout.n_out)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    return np.transpose(kernel, layout.kernel_perm).reshape(layout.n_in, layout.n_out)


def _bias_flat(layer, layout: _Layout) -> np.ndarray | None:
    """The bias broadcast to `out_dims` and flattened (None without bias)."""
    if layout.bias_shape is None:
        return None
    bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    return np.broadcast_to(bias, layout.out_dims).reshape(-1).copy()


# --- targets and calibration statistics ---------------------------------------------


def _node(model, layer):
    graph = model_graph(model)
    nodes = {n for group in graph._nodes_by_depth.values() for n in group}
    own = [n for n in layer._inbound_nodes if n in nodes]
    if len(own) != 1:
        raise _unsupported(layer, f"it is called {len(own)} times in the model (expected once)")
    return own[0]


def _split_target(target: str) -> tuple[str, str | None]:
    name, _, role = target.partition("/")
    return name, role or None


def _is_projection_layer(layer) -> bool:
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, LowRankEinsumDense))


def transformer_targets(model) -> list[str]:
    """The rewritable projections of `model`, in model order.

    Dense and projection-form EinsumDense layers are named by layer name;
    each `MultiHeadAttention` contributes `"<name>/query"`, `"<name>/key"`,
    `"<name>/value"` and `"<name>/attention_output"`. Layers that cannot be
    rewritten (other equations, quantized, gated attention) are left out.
    """
    targets = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.MultiHeadAttention):
            try:
                _check_mha(layer)
            except UnsupportedLayerError:
                continue
            if layer.built:
                targets.extend(f"{layer.name}/{p}" for p in PROJECTIONS)
        elif _is_projection_layer(layer) and not isinstance(layer, LowRankDense):
            try:
                einsum_layout(layer)
            except UnsupportedLayerError:
                continue
            targets.append(layer.name)
    return targets


def _resolve(model, target: str):
    """`(model layer, projection sublayer)` of a target, validated."""
    if not isinstance(target, str):
        raise TypeError(f"Expected a target name (str). Received: {target!r}")
    name, role = _split_target(target)
    try:
        layer = model.get_layer(name)
    except ValueError:
        raise ValueError(
            f"Unknown layer {name!r} in target {target!r}. Rewritable targets: "
            f"{transformer_targets(model)}."
        ) from None
    if isinstance(layer, keras.layers.MultiHeadAttention):
        if role not in PROJECTIONS:
            raise ValueError(
                f"Expected a target '{name}/<projection>' with projection in "
                f"{PROJECTIONS} for attention layer {name!r}. Received: {target!r}"
            )
        _check_mha(layer)
        sub = getattr(layer, SUBLAYERS[role])
        einsum_layout(sub)
        return layer, sub
    if role is not None:
        raise ValueError(
            f"Layer {name!r} is not an attention layer; expected target {name!r}. "
            f"Received: {target!r}"
        )
    if not _is_projection_layer(layer) or isinstance(layer, LowRankDense):
        raise _unsupported(layer, "expected a Dense, EinsumDense or MultiHeadAttention layer")
    einsum_layout(layer)
    return layer, layer


_MHA_CALL = inspect.signature(keras.layers.MultiHeadAttention.call)


def _mha_parts(layer, args, kwargs) -> dict:
    """The inputs of each projection of `layer` and its per-head attention output."""
    bound = _MHA_CALL.bind(layer, *args, **kwargs).arguments
    if bound.get("return_attention_scores"):
        raise _unsupported(layer, "calls with return_attention_scores=True are not supported")
    query, value = bound["query"], bound["value"]
    key = bound.get("key")
    key = value if key is None else key
    mask = layer._compute_attention_mask(
        query,
        value,
        attention_mask=bound.get("attention_mask"),
        use_causal_mask=bool(bound.get("use_causal_mask", False)),
    )
    attention, _ = layer._compute_attention(
        layer._query_dense(query),
        layer._key_dense(key),
        layer._value_dense(value),
        mask,
        training=False,
    )
    return {"query": query, "key": key, "value": value, "attention_output": attention}


class _Moments:
    """Running mean, scatter and range of rows (float64; Chan et al. merge)."""

    def __init__(self):
        self.count = 0
        self.mean = self.scatter = self.low = self.high = None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(axis=0)
        centred = rows - mean_b
        scatter_b = centred.T @ centred
        low_b, high_b = rows.min(axis=0), rows.max(axis=0)
        if self.count == 0:
            self.count, self.mean, self.scatter = n_b, mean_b, scatter_b
            self.low, self.high = low_b, high_b
            return
        n_a = self.count
        delta = mean_b - self.mean
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / (n_a + n_b))
        self.mean = self.mean + delta * (n_b / (n_a + n_b))
        self.low, self.high = np.minimum(self.low, low_b), np.maximum(self.high, high_b)
        self.count = n_a + n_b


@dataclasses.dataclass(frozen=True)
class ProjectionStatistics:
    """One projection's output moments on the calibration data.

    Attributes:
        target: the target name.
        n_in: input features (contracted axes, flattened).
        n_out: output features (flattened).
        use_bias: whether the projection has a bias.
        mean: `E[p]`, shape `[n_out]` (float64).
        covariance: `Cov[p]`, shape `[n_out, n_out]` (float64).
        count: rows (samples x positions) averaged over.
    """

    target: str
    n_in: int
    n_out: int
    use_bias: bool
    mean: np.ndarray
    covariance: np.ndarray
    count: int

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """`(eigenvalues, eigenvectors)` of the subspace statistic, descending.

        The statistic is the covariance with a bias (the bias carries the
        mean), the second moment without. Eigenvalues at the level of float32
        rounding are set to zero.
        """
        stat = self.covariance
        if not self.use_bias:
            stat = stat + np.outer(self.mean, self.mean)
        eigvals, eigvecs = np.linalg.eigh(stat)
        noise = max(float(eigvals.max()), 0.0) * len(eigvals) * np.finfo(np.float32).eps
        eigvals = np.where(eigvals > noise, eigvals, 0.0)
        order = np.argsort(eigvals)[::-1]
        return eigvals[order], eigvecs[:, order]


def _collect(model, x, layers, *, batch_size: int):
    """Run `model` on `x` in chunks; yield `{layer name: call (args, kwargs)}`."""
    graph = model_graph(model)
    x = as_samples(x, input_shape=tuple(graph.inputs[0].shape[1:]), name="x")
    nodes = {layer.name: _node(model, layer) for layer in layers}
    tensors, seen = [], set()
    for node in nodes.values():
        for t in node.arguments.keras_tensors:
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    capture = keras.Model(graph.inputs[0], tensors)
    for start in range(0, len(x), batch_size):
        values = capture(keras.ops.convert_to_tensor(x[start : start + batch_size]), training=False)
        if not isinstance(values, (list, tuple)):
            values = [values]
        table = {id(t): v for t, v in zip(tensors, values)}
        yield {name: node.arguments.fill_in(table) for name, node in nodes.items()}


def _rows(array, contract_dims: int) -> np.ndarray:
    a = keras.ops.convert_to_numpy(array)
    return a.reshape(-1, math.prod(a.shape[a.ndim - contract_dims :]))


def _gather(model, x, targets: Sequence[str], *, heads: bool, batch_size: int):
    """Moments of each target's pre-activation and, with `heads`, of each
    attention layer's per-head output."""
    resolved = {t: _resolve(model, t) for t in targets}
    layers = {layer.name: layer for layer, _ in resolved.values()}
    moments = {t: _Moments() for t in targets}
    head_moments = {n: _Moments() for n, lyr in layers.items() if heads and _is_mha(lyr)}
    linear = {}
    for t, (_, sub) in resolved.items():
        layout = einsum_layout(sub)
        linear[t] = (len(layout.in_dims), _kernel_2d(sub, layout), _bias_flat(sub, layout))
    for calls in _collect(model, x, list(layers.values()), batch_size=batch_size):
        parts = {}
        for name, (args, kwargs) in calls.items():
            if _is_mha(layers[name]):
                parts[name] = _mha_parts(layers[name], args, kwargs)
                if name in head_moments:
                    head_moments[name].add(_rows(parts[name]["attention_output"], 2))
        for t in resolved:
            name, role = _split_target(t)
            u = parts[name][role] if role else calls[name][0][0]
            contract, kernel, bias = linear[t]
            rows = _rows(u, contract) @ kernel
            moments[t].add(rows if bias is None else rows + bias)
    return resolved, moments, head_moments


def _is_mha(layer) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention)


def _check_mha(layer) -> None:
    """Only stock (or our low-rank) attention: a subclass may compute differently."""
    if type(layer) not in (keras.layers.MultiHeadAttention, LowRankMultiHeadAttention):
        raise _unsupported(layer, "subclasses of MultiHeadAttention are not supported")
    if layer._use_gate:
        raise _unsupported(layer, "gated attention (use_gate=True) is not supported")


def _check_batch(batch_size) -> int:
    return check_positive_int("batch_size", batch_size)


def projection_statistics(
    model, x, targets: Sequence[str] | None = None, *, batch_size: int = 64
) -> dict[str, ProjectionStatistics]:
    """Output moments of each projection target on calibration data `x`.

    Args:
        model: a built functional or Sequential model with one input.
        x: calibration samples `[N, *input_shape]`.
        targets: target names (see `transformer_targets`). Default None: all.
        batch_size: samples per chunk. Default 64.

    Returns:
        `{target: ProjectionStatistics}`.

    Raises:
        ValueError: unknown targets, data that does not fit the model.
        UnsupportedLayerError: a target layer that cannot be rewritten.
    """
    targets = transformer_targets(model) if targets is None else list(targets)
    resolved, moments, _ = _gather(
        model, x, targets, heads=False, batch_size=_check_batch(batch_size)
    )
    return {t: _statistics(t, resolved[t][1], moments[t]) for t in targets}


def _statistics(target, sub, m: _Moments) -> ProjectionStatistics:
    layout = einsum_layout(sub)
    cov = m.scatter / m.count
    return ProjectionStatistics(
        target=target,
        n_in=layout.n_in,
        n_out=layout.n_out,
        use_bias=layout.bias_shape is not None,
        mean=m.mean,
        covariance=(cov + cov.T) / 2,
        count=m.count,
    )


def projection_candidates(
    statistics: Mapping[str, ProjectionStatistics], floors: Mapping[str, int] | None = None
) -> list:
    """`policies.Candidate`s for the rank policies, one per projection target.

    Args:
        statistics: from `projection_statistics`.
        floors: optional `{target: smallest rank allowed}`. Default None (1).

    Returns:
        A list of `Candidate` whose spectrum is the eigenvalues of the
        projection's output statistic.
    """
    floors = dict(floors or {})
    return [
        Candidate(t, s.n_in, s.n_out, s.use_bias, s.eigen()[0], floor=floors.get(t, 1))
        for t, s in statistics.items()
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


def _projection_params(layout: _Layout, rank: int | None) -> int:
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
        _, sub = _resolve(model, target)
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
    a = (_kernel_2d(sub, layout) @ u).reshape(layout.in_dims + (rank,))
    b = u.T.reshape((rank,) + layout.out_dims)
    bias = _bias_flat(sub, layout)
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
    node = _node(model, layer)
    bound = _MHA_CALL.bind(layer, *node.arguments.args, **node.arguments.kwargs).arguments
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
        name, role = _split_target(target)
        by_layer.setdefault(name, {})[role] = plan
    for name, roles in by_layer.items():
        layer = model.get_layer(name)
        dtype = _dtype(layer)
        if _is_mha(layer):
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
        layout = einsum_layout(_resolve(model, target)[1])
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
        sub = _resolve(model, target)[1]
        _, s, vt = np.linalg.svd(_kernel_2d(sub, einsum_layout(sub)), full_matrices=False)
        basis = vt.T  # kernel @ V_r V_r^T == U_r S_r V_r^T
        plans[target] = (rank, basis, None)
        energies[target] = _energy(s**2, rank)
    return _rewrite(model, plans), _records(model, plans, energies)


def weight_spectra(model, targets: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Squared singular values of each target's kernel, descending (data-free)."""
    targets = transformer_targets(model) if targets is None else list(targets)
    out = {}
    for target in targets:
        sub = _resolve(model, target)[1]
        s = np.linalg.svd(_kernel_2d(sub, einsum_layout(sub)), compute_uv=False)
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
    names = [lyr.name for lyr in model.layers if _is_mha(lyr)] if layers is None else list(layers)
    for name in names:
        layer = model.get_layer(name)
        if not _is_mha(layer):
            raise _unsupported(layer, "expected a MultiHeadAttention layer")
        _check_mha(layer)
    if not names:
        return {}
    _, _, moments = _gather(
        model,
        calib_x,
        [f"{n}/attention_output" for n in names],
        heads=True,
        batch_size=_check_batch(batch_size),
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
            Default 0.
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
        w_o = _kernel_2d(out, layout).reshape(n, -1, layout.n_out)
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
