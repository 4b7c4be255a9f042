"""Projections: what the transformer rewrites see of a layer, and its data.

A *projection* is a linear map `p = u W + b` from `n_in` input features to
`n_out` output features applied at every position: a `Dense` layer, an
`EinsumDense` layer of the projection form `"<free><in>,<in><out>-><free><out>"`,
or one of the four `EinsumDense` projections inside a
`keras.layers.MultiHeadAttention`. Projections are named by *target*: the
layer name, or `"<attention layer>/<projection>"`. This module unfolds each
projection to an `n_in x n_out` kernel (`ProjectionLayout`) and gathers the
mean and covariance of its output over calibration data (and the range of
each attention head's output), in float64 chunks.
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
from keras_localrank.inputs import as_samples
from keras_localrank.taps import model_graph
from keras_localrank.validation import check_positive_int

__all__ = [
    "MHA_CALL",
    "ProjectionLayout",
    "ProjectionStatistics",
    "UnsupportedLayerError",
    "call_node",
    "check_attention",
    "check_batch_size",
    "einsum_layout",
    "gather_moments",
    "is_attention",
    "make_candidate",
    "projection_bias",
    "projection_candidates",
    "projection_kernel",
    "projection_statistics",
    "resolve_target",
    "skipped_layers",
    "split_target",
    "transformer_targets",
    "unsupported",
]


class UnsupportedLayerError(ValueError):
    """A layer (or a use of it) that the transformer rewrites cannot handle."""


# --- layouts: every projection as a 2-D kernel ----------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectionLayout:
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


def unsupported(layer, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"Cannot rewrite layer {layer.name!r} of type {type(layer).__name__}: {why}."
    )


def _check_plain(layer) -> None:
    if getattr(layer, "quantization_mode", None) is not None:
        raise unsupported(layer, "quantized layers are not supported")
    if getattr(layer, "lora_enabled", False):
        raise unsupported(layer, "LoRA-enabled layers are not supported")


def einsum_layout(layer) -> ProjectionLayout:
    """The `ProjectionLayout` of a Dense, EinsumDense or LowRank* projection layer.

    Raises:
        UnsupportedLayerError: an equation not of the projection form
            `"<free><in>,<in><out>-><free><out>"`, or a bias over free axes.
    """
    if isinstance(layer, LowRankEinsumDense):
        in_dims = tuple(int(d) for d in layer.kernel_a.shape[:-1])
        return ProjectionLayout(
            in_dims,
            layer.output_dims,
            tuple(range(len(in_dims) + len(layer.output_dims))),
            layer.output_dims if layer.use_bias else None,
        )
    if isinstance(layer, LowRankDense):
        n_in = int(layer.kernel_a.shape[0])
        return ProjectionLayout(
            (n_in,), (layer.units,), (0, 1), (layer.units,) if layer.use_bias else None
        )
    if isinstance(layer, keras.layers.Dense):
        _check_plain(layer)
        n_in, units = (int(d) for d in layer.kernel.shape)
        return ProjectionLayout((n_in,), (units,), (0, 1), (units,) if layer.use_bias else None)
    if not isinstance(layer, keras.layers.EinsumDense):
        raise unsupported(layer, "expected a Dense or EinsumDense projection")
    _check_plain(layer)
    equation = layer.equation.replace(" ", "")
    lhs, out = equation.split("->")
    inp, ker = lhs.split(",")
    if "." in ker or len(set(ker)) != len(ker):
        raise unsupported(layer, f"equation {layer.equation!r} has an unsupported kernel")
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
        raise unsupported(
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
            raise unsupported(layer, f"bias axes {layer.bias_axes!r} include free axes")
    return ProjectionLayout(in_dims, out_dims, perm, bias_shape)


def projection_kernel(layer, layout: ProjectionLayout) -> np.ndarray:
    """The layer's effective kernel as a float64 `n_in x n_out` matrix."""
    if isinstance(layer, (LowRankEinsumDense, LowRankDense)):
        a = keras.ops.convert_to_numpy(layer.kernel_a).astype(np.float64)
        b = keras.ops.convert_to_numpy(layer.kernel_b).astype(np.float64)
        return a.reshape(layout.n_in, -1) @ b.reshape(b.shape[0], layout.n_out)
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    return np.transpose(kernel, layout.kernel_perm).reshape(layout.n_in, layout.n_out)


def projection_bias(layer, layout: ProjectionLayout) -> np.ndarray | None:
    """The bias broadcast to `out_dims` and flattened (None without bias)."""
    if layout.bias_shape is None:
        return None
    bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64)
    return np.broadcast_to(bias, layout.out_dims).reshape(-1).copy()


# --- targets and calibration statistics ---------------------------------------------


def call_node(model, layer):
    graph = model_graph(model)
    nodes = {n for group in graph._nodes_by_depth.values() for n in group}
    own = [n for n in layer._inbound_nodes if n in nodes]
    if len(own) != 1:
        raise unsupported(layer, f"it is called {len(own)} times in the model (expected once)")
    return own[0]


def split_target(target: str) -> tuple[str, str | None]:
    name, _, role = target.partition("/")
    return name, role or None


def _is_projection_layer(layer) -> bool:
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, LowRankEinsumDense))


def _inventory(model) -> tuple[list[str], dict[str, str]]:
    """`(targets, {skipped layer: reason})` over the projection-like layers."""
    targets, skipped = [], {}
    for layer in model.layers:
        is_mha = isinstance(layer, keras.layers.MultiHeadAttention)
        if not is_mha and (not _is_projection_layer(layer) or isinstance(layer, LowRankDense)):
            continue
        try:
            if is_mha:
                check_attention(layer)
                for p in PROJECTIONS:
                    einsum_layout(getattr(layer, SUBLAYERS[p]))
            else:
                einsum_layout(layer)
            call_node(model, layer)
        except UnsupportedLayerError as e:
            skipped[layer.name] = str(e)
            continue
        if is_mha:
            targets.extend(f"{layer.name}/{p}" for p in PROJECTIONS)
        else:
            targets.append(layer.name)
    return targets, skipped


def transformer_targets(model) -> list[str]:
    """The rewritable projections of `model`, in model order.

    Dense and projection-form EinsumDense layers are named by layer name;
    each `MultiHeadAttention` contributes `"<name>/query"`, `"<name>/key"`,
    `"<name>/value"` and `"<name>/attention_output"`. Layers that cannot be
    rewritten are left out: `skipped_layers` names them and says why.
    """
    return _inventory(model)[0]


def skipped_layers(model) -> dict[str, str]:
    """`{layer name: reason}` for Dense, EinsumDense and attention layers of
    `model` that the transformer rewrites cannot handle (other equations,
    gated or subclassed attention, shared, quantized or LoRA layers)."""
    return _inventory(model)[1]


def resolve_target(model, target: str):
    """`(model layer, projection sublayer)` of a target, validated."""
    if not isinstance(target, str):
        raise TypeError(f"Expected a target name (str). Received: {target!r}")
    name, role = split_target(target)
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
        check_attention(layer)
        sub = getattr(layer, SUBLAYERS[role])
        einsum_layout(sub)
        return layer, sub
    if role is not None:
        raise ValueError(
            f"Layer {name!r} is not an attention layer; expected target {name!r}. "
            f"Received: {target!r}"
        )
    if not _is_projection_layer(layer) or isinstance(layer, LowRankDense):
        raise unsupported(layer, "expected a Dense, EinsumDense or MultiHeadAttention layer")
    einsum_layout(layer)
    return layer, layer


MHA_CALL = inspect.signature(keras.layers.MultiHeadAttention.call)


def _mha_parts(layer, args, kwargs) -> dict:
    """The inputs of each projection of `layer` and its per-head attention output."""
    bound = MHA_CALL.bind(layer, *args, **kwargs).arguments
    if bound.get("return_attention_scores"):
        raise unsupported(layer, "calls with return_attention_scores=True are not supported")
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
        positions: positions per sample that share the kernel (tokens).
    """

    target: str
    n_in: int
    n_out: int
    use_bias: bool
    mean: np.ndarray
    covariance: np.ndarray
    count: int
    positions: int = 1

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
    nodes = {layer.name: call_node(model, layer) for layer in layers}
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


def gather_moments(model, x, targets: Sequence[str], *, heads: bool, batch_size: int):
    """Moments of each target's pre-activation and, with `heads`, of each
    attention layer's per-head output."""
    resolved = {t: resolve_target(model, t) for t in targets}
    layers = {layer.name: layer for layer, _ in resolved.values()}
    moments = {t: _Moments() for t in targets}
    head_moments = {n: _Moments() for n, lyr in layers.items() if heads and is_attention(lyr)}
    linear = {}
    for t, (_, sub) in resolved.items():
        layout = einsum_layout(sub)
        linear[t] = (
            len(layout.in_dims),
            projection_kernel(sub, layout),
            projection_bias(sub, layout),
        )
    for calls in _collect(model, x, list(layers.values()), batch_size=batch_size):
        parts = {}
        for name, (args, kwargs) in calls.items():
            if is_attention(layers[name]):
                parts[name] = _mha_parts(layers[name], args, kwargs)
                if name in head_moments:
                    head_moments[name].add(_rows(parts[name]["attention_output"], 2))
        for t in resolved:
            name, role = split_target(t)
            u = parts[name][role] if role else calls[name][0][0]
            contract, kernel, bias = linear[t]
            rows = _rows(u, contract) @ kernel
            moments[t].add(rows if bias is None else rows + bias)
    return resolved, moments, head_moments


def is_attention(layer) -> bool:
    return isinstance(layer, keras.layers.MultiHeadAttention)


def check_attention(layer) -> None:
    """Only stock (or our low-rank) attention: a subclass may compute differently."""
    if type(layer) not in (keras.layers.MultiHeadAttention, LowRankMultiHeadAttention):
        raise unsupported(layer, "subclasses of MultiHeadAttention are not supported")
    if layer._use_gate:
        raise unsupported(layer, "gated attention (use_gate=True) is not supported")


def check_batch_size(batch_size) -> int:
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
    resolved, moments, _ = gather_moments(
        model, x, targets, heads=False, batch_size=check_batch_size(batch_size)
    )
    n = len(x)
    return {t: _statistics(t, resolved[t][1], moments[t], n) for t in targets}


def _statistics(target, sub, m: _Moments, samples: int) -> ProjectionStatistics:
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
        positions=max(1, m.count // max(1, samples)),
    )


def make_candidate(name, n_in, n_out, use_bias, spectrum, floor, positions):
    # Candidates that cost MACs know how many positions share the kernel.
    costed = "positions" in {f.name for f in dataclasses.fields(Candidate)}
    extra = {"positions": positions} if costed else {}
    return Candidate(name, n_in, n_out, use_bias, spectrum, floor=floor, **extra)


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
        make_candidate(t, s.n_in, s.n_out, s.use_bias, s.eigen()[0], floors.get(t, 1), s.positions)
        for t, s in statistics.items()
    ]
