"""Rank-selection policies: how many directions each layer keeps.

A policy sees one `Candidate` per factorizable layer (its shape, the
eigenvalues of the subspace statistic it will be projected on, in
descending order, and the measured local-rank floor) and returns a rank per
layer. Most policies share one mechanism: a common *energy threshold* `e`
gives each layer the smallest rank whose leading eigenvalues hold a fraction
`e` of its total, never below its floor; they differ in how `e` is set
(fixed, by a parameter budget, or by an accuracy tolerance).
`GreedyParamFraction` instead spends a parameter budget where a measured
loss on held-out data says it matters most. Policies are
plain objects with `get_config`/`from_config`, like TF-MOT's pruning
schedules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

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
    "total_params",
]

_BISECTION_STEPS = 60


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A layer that can be factorized.

    Attributes:
        name: layer name.
        n_in: input width.
        n_out: output width (units).
        use_bias: whether the layer has a bias.
        spectrum: non-negative eigenvalues of the layer's subspace statistic,
            descending (the energy each kept direction carries).
        floor: smallest rank allowed (the measured local rank, or 1).
    """

    name: str
    n_in: int
    n_out: int
    use_bias: bool
    spectrum: np.ndarray
    floor: int = 1

    @property
    def max_rank(self) -> int:
        return min(self.n_in, self.n_out)

    @property
    def dense_params(self) -> int:
        return self.n_in * self.n_out + (self.n_out if self.use_bias else 0)

    @property
    def break_even(self) -> int:
        """The largest rank whose factorization has fewer weights than the kernel (0: none)."""
        return (self.n_in * self.n_out - 1) // (self.n_in + self.n_out)

    def saves(self, rank: int) -> bool:
        """True when a rank-`rank` factorization has fewer weights than the kernel."""
        return rank * (self.n_in + self.n_out) < self.n_in * self.n_out

    def params(self, rank: int) -> int:
        """Weights of the layer at `rank` (kept dense when that is smaller)."""
        kernel = min(rank * (self.n_in + self.n_out), self.n_in * self.n_out)
        return kernel + (self.n_out if self.use_bias else 0)

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


def total_params(candidates: Sequence[Candidate], ranks: dict[str, int], fixed: int) -> int:
    """Weights of the model: `fixed` plus each candidate at its rank."""
    return int(fixed + sum(c.params(ranks[c.name]) for c in candidates))


def _check_fraction(name: str, value, *, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"Expected `{name}` to be a number. Received: {name}={value!r}")
    value = float(value)
    if not math.isfinite(value) or value > 1.0 or value < 0.0 or (low_open and value == 0.0):
        raise ValueError(
            f"Expected `{name}` in {'(0, 1]' if low_open else '[0, 1]'}. Received: {name}={value!r}"
        )
    return value


def _check_reachable(fraction, candidates, fixed_params, original_params) -> float:
    """The budget in parameters, or a ValueError when the floors exceed it."""
    target = fraction * original_params
    smallest = total_params(candidates, ranks_at_energy(candidates, 0.0), fixed_params)
    if smallest > target:
        raise InfeasibleBudgetError(
            f"Impossible budget: budget={fraction!r} allows "
            f"{int(target):,} of {original_params:,} parameters, but the layers "
            f"that are kept and the rank floors need at least {smallest:,} "
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
        fixed_params: int,
        original_params: int,
        evaluate: Callable[[dict[str, int]], float] | None = None,
    ) -> dict[str, int]:
        """Choose a rank per candidate.

        Args:
            candidates: the factorizable layers.
            fixed_params: weights of every other layer (they are kept).
            original_params: weights of the uncompressed model.
            evaluate: `ranks -> score`, lower is better (the accuracy drop
                for `AccuracyTolerance`, a validation loss for
                `GreedyParamFraction`).

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

    def select(self, candidates, *, fixed_params, original_params, evaluate=None):
        return ranks_at_energy(candidates, self.energy)

    def get_config(self) -> dict:
        return {"energy": self.energy}


class ParamFraction(RankPolicy):
    """The largest shared energy threshold whose model fits a parameter budget.

    Args:
        fraction: target fraction in (0, 1] of the original parameter count.

    Raises:
        ValueError: `fraction` outside (0, 1]; from `select`, a budget below
            what the floors and the uncompressible layers need.
        TypeError: `fraction` not a number.
    """

    def __init__(self, fraction: float):
        self.fraction = _check_fraction("fraction", fraction)

    def select(self, candidates, *, fixed_params, original_params, evaluate=None):
        target = _check_reachable(self.fraction, candidates, fixed_params, original_params)
        low, high = 0.0, 1.0
        if total_params(candidates, ranks_at_energy(candidates, high), fixed_params) <= target:
            return ranks_at_energy(candidates, high)
        for _ in range(_BISECTION_STEPS):
            mid = (low + high) / 2
            if total_params(candidates, ranks_at_energy(candidates, mid), fixed_params) <= target:
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

    def select(self, candidates, *, fixed_params, original_params, evaluate=None):
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
            budget below what the floors and the uncompressible layers need.
        TypeError: `fraction` or `step` not a number; from `select`, no
            `evaluate` callback.
    """

    def __init__(self, fraction: float, step: float = 0.1):
        self.fraction = _check_fraction("fraction", fraction)
        self.step = _check_fraction("step", step)

    def select(self, candidates, *, fixed_params, original_params, evaluate=None):
        if evaluate is None:
            raise TypeError(
                "GreedyParamFraction needs `evaluate` (ranks -> loss). Received: evaluate=None"
            )
        target = _check_reachable(self.fraction, candidates, fixed_params, original_params)
        ranks = {c.name: c.max_rank for c in candidates}
        total = total_params(candidates, ranks, fixed_params)
        loss = evaluate(ranks)
        while total > target:
            chunk = max(self.step * (total - target), self.step / 2 * target)
            best = None
            for c in candidates:
                rank = ranks[c.name]
                start = min(rank, c.break_even)
                new = max(c.floor, 1, start - max(1, round(chunk / (c.n_in + c.n_out))))
                saved = c.params(rank) - c.params(new)
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
            total = total_params(candidates, ranks, fixed_params)
        # Greedy steps are myopic: far below the original size they can end
        # worse than one shared energy threshold. Keep whichever is better.
        shared = ParamFraction(self.fraction).select(
            candidates, fixed_params=fixed_params, original_params=original_params
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
