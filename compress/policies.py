"""Rank-selection policies: how many directions each layer keeps.

A policy sees one `Candidate` per factorizable layer (its shape, the
eigenvalues of the subspace statistic it will be projected on, in
descending order, and the measured local-rank floor) and returns a rank per
layer. Most policies share one mechanism: a common *energy threshold* `e`
gives each layer the smallest rank whose leading eigenvalues hold a fraction
`e` of its total, never below its floor; they differ in how `e` is set
(fixed, by a budget, or by an accuracy tolerance).
`GreedyParamFraction` instead spends a budget where a measured loss on
held-out data says it matters most. A budget counts weights by default;
`select(..., cost_fn=compress.costs.mac_cost)` makes it count
multiply-accumulates (any `LayerShape -> cost` function works, see
`compress.costs`). A budget below what the floors need raises
`InfeasibleBudgetError` (a `ValueError`). Policies are
plain objects with `get_config`/`from_config`, like TF-MOT's pruning
schedules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from compress.costs import LayerShape, mac_cost, param_cost

__all__ = [
    "AccuracyTolerance",
    "Candidate",
    "EnergyFraction",
    "GreedyParamFraction",
    "InfeasibleBudgetError",
    "ParamFraction",
    "RankPolicy",
    "get_policy",
    "ranks_at_energy",
    "total_cost",
    "total_params",
]

_BISECTION_STEPS = 60


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A layer that can be factorized.

    Attributes:
        name: layer name.
        n_in: input width of the kernel seen as a matrix (`prod(kernel_size)
            * c_in` for a convolution).
        n_out: output width (units or filters).
        use_bias: whether the layer has a bias.
        spectrum: non-negative eigenvalues of the layer's subspace statistic,
            descending (the energy each kept direction carries).
        floor: smallest rank allowed (the measured local rank, or 1).
        kernel_shape: the kernel's shape. Default None: `(n_in, n_out)`.
        positions: output positions per sample that share the kernel (for
            MACs). Default 1.
        factorized: `rank -> tuple[LayerShape, ...]`, the layers of the
            rewritten form at that rank. Default None: two factors, the
            kernel with `rank` outputs then a `rank -> n_out` pointwise layer
            carrying the bias (`LowRankDense`, or a conv and a 1x1 conv).
        rank_limit: largest rank. Default None: `min(n_in, n_out)`.
    """

    name: str
    n_in: int
    n_out: int
    use_bias: bool
    spectrum: np.ndarray
    floor: int = 1
    kernel_shape: tuple[int, ...] | None = None
    positions: int = 1
    factorized: Callable[[int], tuple[LayerShape, ...]] | None = None
    rank_limit: int | None = None

    @property
    def max_rank(self) -> int:
        return self.rank_limit or min(self.n_in, self.n_out)

    def original_shapes(self) -> tuple[LayerShape, ...]:
        """The layer as it is."""
        kernel = self.kernel_shape or (self.n_in, self.n_out)
        bias = self.n_out if self.use_bias else 0
        return (LayerShape(tuple(kernel), self.positions, bias),)

    def factor_shapes(self, rank: int) -> tuple[LayerShape, ...]:
        """The layers of the factorized form at `rank`."""
        if self.factorized is not None:
            return tuple(self.factorized(rank))
        kernel = tuple(self.kernel_shape or (self.n_in, self.n_out))
        bias = self.n_out if self.use_bias else 0
        first = LayerShape(kernel[:-1] + (rank,), self.positions, 0)
        second = LayerShape((1,) * (len(kernel) - 2) + (rank, self.n_out), self.positions, bias)
        return (first, second)

    def saves(self, rank: int, cost_fn: Callable[[LayerShape], float] = param_cost) -> bool:
        """True when the factorized form at `rank` costs less than the layer."""
        factored = sum(cost_fn(s) for s in self.factor_shapes(rank))
        return factored < sum(cost_fn(s) for s in self.original_shapes())

    def cost(self, rank: int, cost_fn: Callable[[LayerShape], float] = param_cost) -> float:
        """Cost of the layer at `rank` (kept as it is when that is cheaper)."""
        shapes = self.factor_shapes(rank) if self.saves(rank, cost_fn) else self.original_shapes()
        return float(sum(cost_fn(s) for s in shapes))

    def cost_per_rank(self, cost_fn: Callable[[LayerShape], float] = param_cost) -> float:
        """Cost of one more rank of the factorized form (at rank 1 -> 2)."""
        if self.max_rank < 2:
            return math.inf
        one, two = (sum(cost_fn(s) for s in self.factor_shapes(r)) for r in (1, 2))
        return max(two - one, 1e-12)

    def largest_saving_rank(self, cost_fn: Callable[[LayerShape], float] = param_cost) -> int:
        """The largest rank whose factorized form is cheaper than the layer (0: none)."""
        best = 0
        for rank in range(1, self.max_rank + 1):
            if not self.saves(rank, cost_fn):
                break
            best = rank
        return best

    @property
    def dense_params(self) -> int:
        return int(sum(param_cost(s) for s in self.original_shapes()))

    @property
    def break_even(self) -> int:
        """The largest rank whose factorization has fewer weights than the kernel (0: none)."""
        return self.largest_saving_rank(param_cost)

    def params(self, rank: int) -> int:
        """Weights of the layer at `rank` (kept dense when that is smaller)."""
        return int(self.cost(rank, param_cost))

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank holding `energy` of the spectrum, at least `floor`."""
        s = np.clip(np.asarray(self.spectrum, dtype=np.float64), 0.0, None)
        total = s.sum()
        if total <= 0.0 or energy <= 0.0:
            rank = 1
        else:
            cumulative = np.cumsum(s) / total
            rank = int(np.searchsorted(cumulative, min(energy, 1.0) - 1e-12)) + 1
        return int(min(max(rank, self.floor, 1), self.max_rank))


class InfeasibleBudgetError(ValueError):
    """A budget below what the kept layers and the rank floors need."""


def ranks_at_energy(candidates: Sequence[Candidate], energy: float) -> dict[str, int]:
    """`{name: rank}` at one energy threshold shared by all layers."""
    return {c.name: c.rank_for_energy(energy) for c in candidates}


def total_cost(
    candidates: Sequence[Candidate],
    ranks: dict[str, int],
    fixed: float,
    cost_fn: Callable[[LayerShape], float] = param_cost,
) -> float:
    """Cost of the model: `fixed` plus each candidate at its rank."""
    return float(fixed + sum(c.cost(ranks[c.name], cost_fn) for c in candidates))


def total_params(candidates: Sequence[Candidate], ranks: dict[str, int], fixed: int) -> int:
    """Weights of the model: `fixed` plus each candidate at its rank."""
    return int(round(total_cost(candidates, ranks, fixed, param_cost)))


def _unit(cost_fn) -> str:
    return {param_cost: "parameters", mac_cost: "MACs"}.get(cost_fn, "cost units")


def _check_fraction(name: str, value, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"Expected `{name}` to be a number. Received: {name}={value!r}")
    value = float(value)
    if not math.isfinite(value) or value > 1.0 or value < 0.0 or (low_open and value == 0.0):
        raise ValueError(
            f"Expected `{name}` in {'(0, 1]' if low_open else '[0, 1]'}. Received: {name}={value!r}"
        )
    return value


def _check_reachable(fraction, candidates, fixed_params, original_params, cost_fn) -> float:
    """The budget in cost units, or an `InfeasibleBudgetError` when the floors exceed it."""
    target = fraction * original_params
    smallest = total_cost(candidates, ranks_at_energy(candidates, 0.0), fixed_params, cost_fn)
    if smallest > target:
        raise InfeasibleBudgetError(
            f"Impossible budget: budget={fraction!r} allows "
            f"{int(target):,} of {int(original_params):,} {_unit(cost_fn)}, but the layers "
            f"that are kept and the rank floors need at least {int(smallest):,} "
            f"(budget >= {smallest / original_params:.4f}). Raise the budget or "
            "lower the floors."
        )
    return target


class RankPolicy:
    """Base class: `select(candidates, fixed_params=..., original_params=...)`."""

    def select(
        self,
        candidates: Sequence[Candidate],
        *,
        fixed_params: float,
        original_params: float,
        evaluate: Callable[[dict[str, int]], float] | None = None,
        cost_fn: Callable[[LayerShape], float] = param_cost,
    ) -> dict[str, int]:
        """Choose a rank per candidate.

        Args:
            candidates: the factorizable layers.
            fixed_params: cost of every other layer (they are kept), in the
                unit of `cost_fn` (weights by default).
            original_params: cost of the uncompressed model, same unit.
            evaluate: `ranks -> score`, lower is better (the accuracy drop
                for `AccuracyTolerance`, a validation loss for
                `GreedyParamFraction`).
            cost_fn: `LayerShape -> cost`, the budget's unit (see
                `compress.costs`). Default `param_cost` (weights).

        Returns:
            `{layer name: rank}`.
        """
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))


class EnergyFraction(RankPolicy):
    """Keep, in every layer, the leading directions holding `energy` of the total.

    Args:
        energy: fraction in (0, 1] of each layer's spectrum to keep.

    Raises:
        ValueError, TypeError: `energy` outside (0, 1] or not a number.
    """

    def __init__(self, energy: float):
        self.energy = _check_fraction("energy", energy)

    def select(
        self, candidates, *, fixed_params, original_params, evaluate=None, cost_fn=param_cost
    ):
        return ranks_at_energy(candidates, self.energy)

    def get_config(self) -> dict:
        return {"energy": self.energy}


class ParamFraction(RankPolicy):
    """The largest shared energy threshold whose model fits a parameter budget.

    Args:
        fraction: target fraction in (0, 1] of the original parameter count.

    Raises:
        ValueError: `fraction` outside (0, 1]; from `select`
            (`InfeasibleBudgetError`), a budget below
            what the floors and the uncompressible layers need.
        TypeError: `fraction` not a number.
    """

    def __init__(self, fraction: float):
        self.fraction = _check_fraction("fraction", fraction)

    def select(
        self, candidates, *, fixed_params, original_params, evaluate=None, cost_fn=param_cost
    ):
        target = _check_reachable(self.fraction, candidates, fixed_params, original_params, cost_fn)

        def fits(energy):
            ranks = ranks_at_energy(candidates, energy)
            return total_cost(candidates, ranks, fixed_params, cost_fn) <= target

        low, high = 0.0, 1.0
        if fits(high):
            return ranks_at_energy(candidates, high)
        for _ in range(_BISECTION_STEPS):
            mid = (low + high) / 2
            if fits(mid):
                low = mid
            else:
                high = mid
        return ranks_at_energy(candidates, low)

    def get_config(self) -> dict:
        return {"fraction": self.fraction}


class AccuracyTolerance(RankPolicy):
    """The smallest model whose accuracy drop stays within `max_drop`.

    Bisects the shared energy threshold, calling `evaluate(ranks)` (which
    must return the accuracy drop, in the same unit as `max_drop`) at each
    step; assumes the drop shrinks as the energy kept grows.

    Args:
        max_drop: largest accepted accuracy drop, >= 0 (e.g. 0.005 for half
            a point).
        steps: number of bisection steps (evaluations). Default 8.

    Raises:
        ValueError: negative `max_drop`, `steps` < 1.
        TypeError: from `select`, when no `evaluate` callback is given.
    """

    def __init__(self, max_drop: float, steps: int = 8):
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)):
            raise TypeError(f"Expected `max_drop` to be a number. Received: {max_drop!r}")
        if not math.isfinite(max_drop) or max_drop < 0:
            raise ValueError(f"Expected `max_drop` >= 0. Received: max_drop={max_drop!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Expected `steps` to be a positive int. Received: steps={steps!r}")
        self.max_drop = float(max_drop)
        self.steps = steps

    def select(
        self, candidates, *, fixed_params, original_params, evaluate=None, cost_fn=param_cost
    ):
        if evaluate is None:
            raise TypeError(
                "AccuracyTolerance needs `evaluate` (ranks -> accuracy drop). "
                "Received: evaluate=None"
            )
        low, high = 0.0, 1.0
        best = ranks_at_energy(candidates, high)
        if evaluate(ranks_at_energy(candidates, low)) <= self.max_drop:
            return ranks_at_energy(candidates, low)
        for _ in range(self.steps):
            mid = (low + high) / 2
            ranks = ranks_at_energy(candidates, mid)
            if evaluate(ranks) <= self.max_drop:
                high, best = mid, ranks
            else:
                low = mid
        return best

    def get_config(self) -> dict:
        return {"max_drop": self.max_drop, "steps": self.steps}


class GreedyParamFraction(RankPolicy):
    """Meet a parameter budget, lowering ranks where a measured loss rises least.

    Starts from every layer at full rank and repeatedly lowers the rank of
    the one layer whose step down costs the least increase of
    `evaluate(ranks)` (a loss on held-out data, lower is better) per weight
    saved, until the model fits the budget; ranks never go below the
    floors. Each step removes about `step` of the weights still above the
    budget, and at least `step / 2` of the budget itself (so the last steps
    are fine), so the number of evaluations grows with the logarithm of the
    compression ratio times the number of layers. Unlike `ParamFraction`,
    layers are not tied to one energy threshold: a layer the loss is
    insensitive to gives up more. The `ParamFraction` ranks at the same
    budget are evaluated too, and returned when their loss is lower.

    Args:
        fraction: target fraction in (0, 1] of the original parameter count.
        step: fraction in (0, 1] of the excess weights removed per step.
            Default 0.1.

    Raises:
        ValueError: `fraction` or `step` outside (0, 1]; from `select`, a
            budget below what the floors and the uncompressible layers need
            (`InfeasibleBudgetError`).
        TypeError: `fraction` or `step` not a number; from `select`, no
            `evaluate` callback.
    """

    def __init__(self, fraction: float, step: float = 0.1):
        self.fraction = _check_fraction("fraction", fraction)
        self.step = _check_fraction("step", step)

    def select(
        self, candidates, *, fixed_params, original_params, evaluate=None, cost_fn=param_cost
    ):
        if evaluate is None:
            raise TypeError(
                "GreedyParamFraction needs `evaluate` (ranks -> loss). Received: evaluate=None"
            )
        target = _check_reachable(self.fraction, candidates, fixed_params, original_params, cost_fn)
        ranks = {c.name: c.max_rank for c in candidates}
        total = total_cost(candidates, ranks, fixed_params, cost_fn)
        savers = {c.name: c.largest_saving_rank(cost_fn) for c in candidates}
        per_rank = {c.name: c.cost_per_rank(cost_fn) for c in candidates}
        loss = evaluate(ranks)
        while total > target:
            chunk = max(self.step * (total - target), self.step / 2 * target)
            best = None
            for c in candidates:
                rank = ranks[c.name]
                start = min(rank, savers[c.name])
                step = chunk / per_rank[c.name]
                new = max(c.floor, 1, start - max(1, round(min(step, c.max_rank))))
                saved = c.cost(rank, cost_fn) - c.cost(new, cost_fn)
                if saved <= 0:
                    continue
                trial = {**ranks, c.name: new}
                trial_loss = evaluate(trial)
                score = (trial_loss - loss) / saved
                if best is None or score < best[0]:
                    best = (score, trial, trial_loss)
            if best is None:  # unreachable after _check_reachable; kept for safety
                break
            _, ranks, loss = best
            total = total_cost(candidates, ranks, fixed_params, cost_fn)
        # Greedy steps are myopic: far below the original size they can end
        # worse than one shared energy threshold. Keep whichever is better.
        shared = ParamFraction(self.fraction).select(
            candidates,
            fixed_params=fixed_params,
            original_params=original_params,
            cost_fn=cost_fn,
        )
        return shared if evaluate(shared) < loss else ranks

    def get_config(self) -> dict:
        return {"fraction": self.fraction, "step": self.step}


_POLICIES = {
    cls.__name__: cls
    for cls in (EnergyFraction, ParamFraction, AccuracyTolerance, GreedyParamFraction)
}


def get_policy(identifier) -> RankPolicy:
    """A policy from itself or `{"class_name": ..., "config": {...}}`.

    Raises:
        ValueError: an unknown class name.
        TypeError: anything else.
    """
    if isinstance(identifier, RankPolicy):
        return identifier
    if isinstance(identifier, dict) and set(identifier) == {"class_name", "config"}:
        cls = _POLICIES.get(identifier["class_name"])
        if cls is None:
            raise ValueError(
                f"Unknown policy class_name. Received: {identifier['class_name']!r}; "
                f"expected one of {sorted(_POLICIES)}."
            )
        return cls.from_config(identifier["config"])
    raise TypeError(
        f"Expected a RankPolicy or {{'class_name': ..., 'config': ...}}. Received: {identifier!r}"
    )
