"""Active units, dead units and the active-unit bound on local rank.

Local rank can fall for two reasons: units of an earlier layer stop
responding (a *dead* or *inactive* unit passes no derivative), or the live
units span a low-dimensional space. This module separates the two.

Definitions (for a Dense forest rooted at the model input, the graphs of the
analytic path, see `keras_localrank.dense_chain`):

- The **activation** of a layer is the composition `g` of element-wise
  functions applied to its pre-activation `p_l(x)` before the next Dense
  layer: the layer's own `activation` and any element-wise activation layers
  after it (`ReLU`, `Activation("tanh")`, ...). A layer that feeds no Dense
  layer of the forest uses its own `activation`.
- A unit `j` is **active** at `x` when `g'(p_lj(x)) != 0`, evaluated by
  autodiff in the measurement dtype (the same derivative the Jacobian uses).
  For ReLU this is `p_lj(x) > 0`; for ReLU6 `0 < p < 6`; for hard sigmoid and
  hard tanh the linear segment; for leaky ReLU, ELU, tanh, sigmoid, softplus
  and other smooth functions every unit, except units saturated so far that
  the derivative rounds to exactly zero in that dtype (e.g. `tanh(p)` in
  float32 for `|p| > ~9`); for a linear layer every unit.
- A unit is **dead** when it is inactive on every probe input.
- The **active-unit bound** of layer `l` at `x`:

      bound_l(x) = min(n_l, n0, min over edges k -> m on the path from the
                       input to l of #{j : g_k'(p_kj(x)) != 0})

  where `g_k` is the element-wise function on the edge into `m`. It holds
  because `J_l = W_l^T D_{l-1} W_{l-1}^T ... D_1 W_1^T` with diagonal
  `D_k = diag(g_k'(p_k))`, and each `D_k` has rank equal to its non-zero
  count. In a forest every layer has one path from the input, so the bound
  is exact bookkeeping, not an estimate. For the first layer it is
  `min(n_1, n0)`.
- The **rank deficit** `bound_l(x) - rank(J_l(x))` (exact or robust rank) is
  the part of the gap below the bound that dead units do not explain: low-rank
  structure of the live units.

Layers outside a Dense forest (convolutions, attention, several inputs,
non-element-wise activations such as softmax between layers) get NaN with
the reason in `skipped`.

Over training (or a sweep), a drop of rank from a reference point `0` to a
final point `1` splits exactly:

    rank_0 - rank_1 = (bound_0 - bound_1) + (deficit_1 - deficit_0)
                      \\_ dead units _/     \\_ low-rank structure _/

`decompose_drop` returns both parts and a verdict.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_localrank.dense_chain import DenseLink, _apply_with_derivative, find_dense_forest
from keras_localrank.inputs import as_samples
from keras_localrank.taps import select_taps
from keras_localrank.tracing import instance_function
from keras_localrank.validation import check_choice, check_fraction

__all__ = [
    "ACTIVE_DEFINITION",
    "VERDICT_RULE",
    "ActiveUnitCounter",
    "ActiveUnits",
    "DropDecomposition",
    "active_counts",
    "active_units",
    "dead_units",
    "decompose_drop",
    "rank_bound",
]

ACTIVE_DEFINITION = (
    "active unit: derivative of the layer's element-wise activation at its "
    "pre-activation is non-zero in the measurement dtype (ReLU: p > 0); dead "
    "unit: inactive on every probe input; rank_bound: per input, min(n_l, n0, "
    "active units of every earlier layer on the path from the input); "
    "rank_deficit: rank_bound - rank (exact or robust)"
)

#: Fraction of a drop one mechanism must explain for a one-sided verdict.
MOSTLY = 2 / 3
#: A drop below this many ranks (or below `MIN_RELATIVE_DROP` of the
#: reference rank) is "no drop".
MIN_DROP = 0.5
MIN_RELATIVE_DROP = 0.05

VERDICT_RULE = (
    "drop = rank(ref) - rank(final) splits exactly into dead = bound(ref) - "
    "bound(final) and low_rank = deficit(final) - deficit(ref); 'no drop' if "
    f"drop < {MIN_DROP} or drop < {MIN_RELATIVE_DROP:g} * rank(ref); else "
    f"'mostly dead units' if dead >= {MOSTLY:.2f} * drop, 'mostly low-rank "
    f"structure' if low_rank >= {MOSTLY:.2f} * drop, otherwise 'both'"
)


# -- plain functions on per-sample derivatives ---------------------------------


def active_counts(derivative) -> tf.Tensor:
    """Active units per sample: `#{j : derivative[b, j] != 0}`.

    Args:
        derivative: `[B, n]` activation derivatives at the pre-activations.

    Returns:
        `[B]` int32 counts.
    """
    return tf.math.count_nonzero(tf.not_equal(derivative, 0), axis=-1, dtype=tf.int32)


def ever_active(derivative) -> tf.Tensor:
    """`[n]` bool: units active on at least one of the `B` samples."""
    return tf.reduce_any(tf.not_equal(derivative, 0), axis=0)


def dead_units(derivative) -> tf.Tensor:
    """Units inactive on every sample (int32 scalar)."""
    return tf.math.count_nonzero(
        tf.logical_not(ever_active(derivative)), dtype=tf.int32
    )


def rank_bound(path_counts: Sequence, *, units: int, input_dim: int) -> tf.Tensor:
    """The active-unit bound `min(n_l, n0, min_k active_k(x))` per sample.

    Args:
        path_counts: `[B]` active counts of every element-wise edge on the
            path from the input to the layer (may be empty: first layer).
        units: `n_l`.
        input_dim: `n0`.

    Returns:
        `[B]` int32 bounds (needs at least one count to know `B`; with none,
        a scalar).
    """
    cap = tf.constant(min(int(units), int(input_dim)), tf.int32)
    if not path_counts:
        return cap
    return tf.minimum(cap, tf.reduce_min(tf.stack(list(path_counts)), axis=0))


# -- the Dense-forest plan ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    link: DenseLink
    own: tuple  # element-wise stages applied to this layer's pre-activation
    path: tuple[DenseLink, ...]  # non-root links from the input down to this one
    units: int
    input_dim: int


def _same_stages(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b))


def _links_of(forest: dict) -> list[DenseLink]:
    seen, out = set(), []
    for link in forest.values():
        chain = []
        while link is not None and id(link) not in seen:
            seen.add(id(link))
            chain.append(link)
            link = link.parent
        out.extend(chain)
    return out


class ActiveUnitCounter:
    """Active units, ever-active units and the rank bound of chosen layers, per chunk.

    Built once per model; `__call__` runs one traced function on a chunk of
    samples, reading the current weights.

    Args:
        model: a built Keras model.
        taps: the `taps.Tap`s to report (as `select_taps` returns them).
        all_taps: every measurable tap of the model (used to find which Dense
            layer feeds which, so a layer's activation includes element-wise
            layers after it). Default None: `taps`.
        dtype: the compute dtype. Default `"float32"`.

    Attributes:
        supported: names of the taps with a bound, in tap order.
        skipped: `{tap name: reason}` for the others.
    """

    def __init__(self, model, taps, *, all_taps=None, dtype: str = "float32"):
        check_choice("dtype", dtype, ("float32", "float64"))
        self.dtype = dtype
        self._plans: dict[str, _Plan] = {}
        self.skipped: dict[str, str] = {}
        names = [t.name for t in taps]
        everything = list(all_taps) if all_taps is not None else list(taps)
        known = {t.name for t in everything}
        everything += [t for t in taps if t.name not in known]
        forest = find_dense_forest(model, everything)
        links = _links_of(forest)
        children: dict[int, list[DenseLink]] = {}
        for link in links:
            if link.parent is not None:
                children.setdefault(id(link.parent), []).append(link)
        for tap in taps:
            link = forest.get(tap.name)
            if link is None:
                self.skipped[tap.name] = (
                    "not on a chain of Dense layers with element-wise activations "
                    "fed by the model input"
                )
                continue
            kids = children.get(id(link), [])
            if kids and not all(_same_stages(k.stages, kids[0].stages) for k in kids):
                self.skipped[tap.name] = (
                    "its branches apply different element-wise functions"
                )
                continue
            own = kids[0].stages if kids else (link.layer.activation,)
            path, node = [], link
            while node.parent is not None:
                path.append(node)
                node = node.parent
            self._plans[tap.name] = _Plan(
                link, tuple(own), tuple(reversed(path)), tap.units, tap.input_dim
            )
        self.supported = [n for n in names if n in self._plans]
        self._fn = instance_function(self._compute, reduce_retracing=True)

    def _compute(self, x):
        batch = tf.shape(x)[0]
        x_flat = tf.reshape(tf.cast(x, self.dtype), [batch, -1])
        pre: dict[int, tf.Tensor] = {}

        def preact(link):
            key = id(link)
            if key not in pre:
                if link.parent is None:
                    inp = x_flat
                else:
                    inp, _ = _apply_with_derivative(link.stages, preact(link.parent))
                out = tf.linalg.matmul(inp, tf.cast(link.layer.kernel, self.dtype))
                if link.layer.use_bias:
                    out = out + tf.cast(link.layer.bias, self.dtype)
                pre[key] = out
            return pre[key]

        counts: dict[int, tf.Tensor] = {}  # id(child link) -> [B] active count on its edge
        out = {}
        for name, plan in self._plans.items():
            _, d = _apply_with_derivative(plan.own, preact(plan.link))
            path_counts = []
            for link in plan.path:
                if id(link) not in counts:
                    _, dk = _apply_with_derivative(link.stages, preact(link.parent))
                    counts[id(link)] = active_counts(dk)
                path_counts.append(counts[id(link)])
            bound = rank_bound(path_counts, units=plan.units, input_dim=plan.input_dim)
            bound = tf.broadcast_to(bound, [batch])
            out[name] = (active_counts(d), ever_active(d), bound)
        return out

    def __call__(self, x) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`{layer: (active [B] int, ever active [n_l] bool, bound [B] int)}`."""
        if not self._plans:
            return {}
        return {
            k: tuple(np.asarray(v) for v in values)
            for k, values in self._fn(tf.constant(x)).items()
        }


class ActiveUnitAccumulator:
    """Collects `ActiveUnitCounter` outputs over chunks (`add`, then `results`)."""

    def __init__(self, counter: ActiveUnitCounter, names: Sequence[str]):
        self.counter = counter
        self.names = list(names)
        self._active = {n: [] for n in counter.supported}
        self._bound = {n: [] for n in counter.supported}
        self._ever: dict[str, np.ndarray] = {}

    def add(self, chunk, valid: int) -> None:
        for name, (active, ever, bound) in self.counter(chunk).items():
            self._active[name].append(active[:valid])
            self._bound[name].append(bound[:valid])
            self._ever[name] = ever if name not in self._ever else self._ever[name] | ever

    def results(self, num_samples: int):
        """`(active_per_sample, dead, bound_per_sample)` dicts over `names` (NaN if skipped)."""
        nan = np.full(num_samples, np.nan)
        active, bound, dead = {}, {}, {}
        for name in self.names:
            if name in self._active and self._active[name]:
                active[name] = np.concatenate(self._active[name]).astype(np.float64)
                bound[name] = np.concatenate(self._bound[name]).astype(np.float64)
                dead[name] = float(np.sum(~self._ever[name]))
            else:
                active[name], bound[name], dead[name] = nan, nan, math.nan
        return active, dead, bound


# -- a one-call convenience -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActiveUnits:
    """Active units of each layer on a probe set.

    Attributes:
        active_per_sample: `{layer: [N] float}` active units per input (NaN
            on skipped layers).
        dead: `{layer: float}` units inactive on every input.
        bound_per_sample: `{layer: [N] float}` the active-unit rank bound.
        units: `{layer: n_l}`.
        skipped: `{layer: reason}` for layers without a bound.
    """

    active_per_sample: dict
    dead: dict
    bound_per_sample: dict
    units: dict
    skipped: dict

    @property
    def active(self) -> dict[str, float]:
        """Mean active units per input."""
        return {k: float(np.mean(v)) for k, v in self.active_per_sample.items()}

    @property
    def bound(self) -> dict[str, float]:
        """Mean active-unit bound per input."""
        return {k: float(np.mean(v)) for k, v in self.bound_per_sample.items()}


def active_units(
    model, x, *, layers=None, dtype: str | None = None, batch_size: int = 256
) -> ActiveUnits:
    """Active units, dead units and the active-unit rank bound of each layer.

    Args:
        model: a built functional or Sequential `keras.Model` with one input.
        x: `[N, *input_shape]` float probe inputs (array, tensor or dataset).
        layers: layer names/objects. Default None: all measurable layers.
        dtype: `"float32"` or `"float64"`. Default None: float64 if the model
            input is float64, else float32.
        batch_size: samples per chunk. Default 256.

    Returns:
        An `ActiveUnits`.

    Raises:
        TypeError, ValueError: a bad model, `layers`, `x` (see
            `local_rank`), `dtype` or `batch_size`.
    """
    from keras_localrank.validation import check_positive_int

    batch_size = check_positive_int("batch_size", batch_size)
    selection = select_taps(model, layers)
    if not selection.single_input:
        raise ValueError(
            "Expected a model with one input for `active_units`. Received: model "
            f"{getattr(model, 'name', model)!r} with several inputs."
        )
    if dtype is None:
        dtype = "float64" if selection.wrt.dtype == "float64" else "float32"
    check_choice("dtype", dtype, ("float32", "float64"))
    samples = as_samples(x, input_shape=selection.input_shape).astype(dtype, copy=False)
    all_taps = selection.taps
    if layers is not None:  # every Dense layer: which one feeds which
        with warnings.catch_warnings():  # skipped layers were reported already
            warnings.simplefilter("ignore")
            all_taps = select_taps(model).taps
    counter = ActiveUnitCounter(model, selection.taps, all_taps=all_taps, dtype=dtype)
    names = [t.name for t in selection.taps]
    acc = ActiveUnitAccumulator(counter, names)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        acc.add(chunk, len(chunk))
    active, dead, bound = acc.results(len(samples))
    return ActiveUnits(
        active_per_sample=active,
        dead=dead,
        bound_per_sample=bound,
        units={t.name: t.units for t in selection.taps},
        skipped=dict(counter.skipped),
    )


# -- dead units versus low-rank structure -----------------------------------------


@dataclasses.dataclass(frozen=True)
class DropDecomposition:
    """How a drop of local rank splits into dead units and low-rank structure.

    Attributes:
        rank_ref, rank_final: rank at the reference and the final point.
        bound_ref, bound_final: active-unit bound at both points.
        drop: `rank_ref - rank_final`.
        dead: `bound_ref - bound_final`, the part dead units explain.
        low_rank: `deficit_final - deficit_ref`, the rest.
        dead_fraction, low_rank_fraction: the two parts over `drop` (NaN when
            there is no drop; they sum to 1 and either may lie outside [0, 1]).
        verdict: `"no drop"`, `"mostly dead units"`, `"mostly low-rank
            structure"` or `"both"` (see `VERDICT_RULE`).
    """

    rank_ref: float
    rank_final: float
    bound_ref: float
    bound_final: float
    drop: float
    dead: float
    low_rank: float
    dead_fraction: float
    low_rank_fraction: float
    verdict: str

    def line(self, label: str = "") -> str:
        """A one-line verdict with the numbers."""
        head = f"{label}: " if label else ""
        if self.verdict == "no drop" or math.isnan(self.dead_fraction):
            return (
                f"{head}no drop (rank {self.rank_ref:.1f} -> {self.rank_final:.1f}, "
                f"bound {self.bound_ref:.1f} -> {self.bound_final:.1f})"
            )
        return (
            f"{head}{self.verdict}: rank {self.rank_ref:.1f} -> {self.rank_final:.1f} "
            f"(drop {self.drop:.1f}); bound {self.bound_ref:.1f} -> {self.bound_final:.1f} "
            f"(dead units {self.dead:.1f}, {100 * self.dead_fraction:.0f}%); deficit "
            f"{self.bound_ref - self.rank_ref:.1f} -> {self.bound_final - self.rank_final:.1f} "
            f"(low-rank {self.low_rank:.1f}, {100 * self.low_rank_fraction:.0f}%)"
        )

    def to_dict(self, label: str = "") -> dict:
        """The fields (NaN as None, for JSON) and `line`."""
        fields = {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in dataclasses.asdict(self).items()
        }
        return {**fields, "line": self.line(label)}


def decompose_drop(
    rank_ref: float,
    rank_final: float,
    bound_ref: float,
    bound_final: float,
    *,
    mostly: float = MOSTLY,
) -> DropDecomposition:
    """Split `rank_ref - rank_final` into dead units and low-rank structure.

    Args:
        rank_ref, rank_final: mean local rank at the reference and final point.
        bound_ref, bound_final: mean active-unit bound at the same points.
        mostly: fraction of the drop one part must reach for a one-sided
            verdict. Default 2/3.

    Returns:
        A `DropDecomposition` (see `VERDICT_RULE`).

    Raises:
        ValueError: a non-finite input, or `mostly` outside (0.5, 1].
    """
    from keras_localrank.validation import check_finite_float

    values = [
        check_finite_float(n, v)
        for n, v in (
            ("rank_ref", rank_ref),
            ("rank_final", rank_final),
            ("bound_ref", bound_ref),
            ("bound_final", bound_final),
        )
    ]
    mostly = check_fraction("mostly", mostly)
    if mostly <= 0.5:
        raise ValueError(f"Expected `mostly` > 0.5. Received: mostly={mostly}")
    r0, r1, b0, b1 = values
    drop = r0 - r1
    dead = b0 - b1
    low_rank = (b1 - r1) - (b0 - r0)
    if drop < MIN_DROP or drop < MIN_RELATIVE_DROP * abs(r0):
        return DropDecomposition(r0, r1, b0, b1, drop, dead, low_rank, math.nan, math.nan,
                                 "no drop")
    fd, fl = dead / drop, low_rank / drop
    if fd >= mostly:
        verdict = "mostly dead units"
    elif fl >= mostly:
        verdict = "mostly low-rank structure"
    else:
        verdict = "both"
    return DropDecomposition(r0, r1, b0, b1, drop, dead, low_rank, fd, fl, verdict)
