"""`LocalRankResult`: per-sample ranks and their statistics, per layer."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pandas as pd

from keras_localrank.io import atomic_write_json, atomic_write_text
from keras_localrank.spectra import Tolerance

__all__ = ["LayerInfo", "LocalRankResult"]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What was measured for one layer.

    Attributes:
        name: layer name.
        class_name: layer class.
        units: `n_l`, pre-activation values per sample.
        input_dim: `n0`, model input values per sample.
        method: `"analytic"` (Dense-chain factors), `"exact"` (Gram of
            matrix-free products) or `"randomized"` (certified sketch).
        mode: `"forward"` / `"reverse"` products (`"forward+reverse"` for the
            sketch), None for analytic.
        directions: `k`, input directions pushed through the network (`n0`,
            or fewer after the reduction through a constant first layer).
        failure_probability: for `"randomized"`, the probability `delta` that
            a sample's certified interval `[rank, upper]` misses its true
            robust rank; 0 for the exact methods.
        rows: rows of the Jacobian the exact path formed: `n_l`, or fewer
            for a pointwise layer wider than its input (measured through it
            with the same singular values, see `keras_localrank.thin`); 0
            when no rows were formed (analytic, randomized).
    """

    name: str
    class_name: str
    units: int
    input_dim: int
    method: str
    mode: str | None = None
    directions: int = 0
    failure_probability: float = 0.0
    rows: int = 0

    @property
    def bound(self) -> int:
        return min(self.units, self.input_dim)


def _by_layer(fn):
    """Turn a function of one array into a `{layer: float}` property."""

    def prop(self) -> dict[str, float]:
        return {name: float(fn(values)) for name, values in self.per_sample.items()}

    prop.__doc__ = fn.__doc__
    return property(prop)


def _std(v: np.ndarray) -> float:
    """Sample standard deviation of the per-sample ranks (ddof=1; 0 for one sample)."""
    return float(np.std(v, ddof=1)) if v.size > 1 else 0.0


def _nanmin(v: np.ndarray) -> float:
    kept = np.asarray(v, np.float64)
    kept = kept[~np.isnan(kept)]
    return float(kept.min()) if kept.size else float("nan")


class LocalRankResult:
    """Local rank of each measured layer: `E_x[rank(J_l(x))]` and friends.

    Attributes:
        layers: `LayerInfo` per measured layer, in model order.
        per_sample: `{layer: int array}`, the rank of `J_l(x)` for each sample.
        effective_rank_per_sample: `{layer: float array}`.
        stable_rank_per_sample: `{layer: float array}`.
        tolerance: the `Tolerance` the ranks use.
        dtype: the dtype the Jacobians were computed in.
        skipped: `{layer: reason}` for layers that could not be measured.
        upper_per_sample: `{layer: int array}`, a certified upper bound on the
            rank (equal to `per_sample` for the exact methods; for the
            randomized method the true robust rank lies in
            `[per_sample, upper_per_sample]` with probability at least
            `1 - failure_probability`).
        margin_per_sample: `{layer: float array}`, `min_i |s_i - tol| / tol`:
            how far the singular value closest to the threshold is from it
            (NaN when the threshold is 0).
        near_threshold_per_sample: `{layer: int array}`, singular values
            within 10% of the threshold (ranks that rounding could flip).
        stats: `{stat: {layer: float array}}` from `spectral_stats` (NaN on
            randomized layers).
        sketch_size_per_sample: `{layer: array}`, basis size of the randomized
            sketch (0 for the exact methods).
        active_per_sample: `{layer: float array}`, active units of the layer
            per input (see `keras_localrank.active_units`; NaN where not
            defined).
        dead_units: `{layer: float}`, units inactive on every input (NaN
            where not defined).
        bound_per_sample: `{layer: float array}`, the active-unit bound on
            the layer's rank per input (NaN where not defined).
        active_skipped: `{layer: reason}` for layers without active units.
    """

    def __init__(
        self,
        *,
        layers: list[LayerInfo],
        per_sample: dict[str, np.ndarray],
        effective_rank_per_sample: dict[str, np.ndarray],
        stable_rank_per_sample: dict[str, np.ndarray],
        tolerance: Tolerance,
        dtype: str,
        skipped: dict[str, str] | None = None,
        upper_per_sample: dict[str, np.ndarray] | None = None,
        margin_per_sample: dict[str, np.ndarray] | None = None,
        near_threshold_per_sample: dict[str, np.ndarray] | None = None,
        stats: dict[str, dict[str, np.ndarray]] | None = None,
        sketch_size_per_sample: dict[str, np.ndarray] | None = None,
        active_per_sample: dict[str, np.ndarray] | None = None,
        dead_units: dict[str, float] | None = None,
        bound_per_sample: dict[str, np.ndarray] | None = None,
        active_skipped: dict[str, str] | None = None,
    ):
        self.layers = list(layers)
        self.per_sample = per_sample
        self.effective_rank_per_sample = effective_rank_per_sample
        self.stable_rank_per_sample = stable_rank_per_sample
        self.tolerance = tolerance
        self.dtype = dtype
        self.skipped = dict(skipped or {})
        self.upper_per_sample = upper_per_sample or dict(per_sample)
        nan = {k: np.full(len(v), np.nan) for k, v in per_sample.items()}
        zero = {k: np.zeros(len(v), np.int64) for k, v in per_sample.items()}
        self.margin_per_sample = margin_per_sample or nan
        self.near_threshold_per_sample = near_threshold_per_sample or zero
        self.stats = dict(stats or {})
        self.sketch_size_per_sample = sketch_size_per_sample or zero
        self.active_per_sample = active_per_sample or nan
        self.dead_units = dead_units or {k: math.nan for k in per_sample}
        self.bound_per_sample = bound_per_sample or nan
        self.active_skipped = dict(
            active_skipped
            if active_skipped is not None
            else ({} if active_per_sample else dict.fromkeys(per_sample, "not measured"))
        )

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.per_sample.values())))

    mean = _by_layer(np.mean)
    std = _by_layer(_std)
    min = _by_layer(np.min)
    max = _by_layer(np.max)

    @property
    def stderr(self) -> dict[str, float]:
        """Standard error of the mean: `std / sqrt(num_samples)`."""
        n = self.num_samples
        return {k: v / math.sqrt(n) for k, v in self.std.items()}

    @property
    def effective_rank(self) -> dict[str, float]:
        """Mean effective rank per layer."""
        return {k: float(np.mean(v)) for k, v in self.effective_rank_per_sample.items()}

    @property
    def stable_rank(self) -> dict[str, float]:
        """Mean stable rank per layer."""
        return {k: float(np.mean(v)) for k, v in self.stable_rank_per_sample.items()}

    @property
    def upper(self) -> dict[str, float]:
        """Mean certified upper bound per layer (equals `mean` when exact)."""
        return {k: float(np.mean(v)) for k, v in self.upper_per_sample.items()}

    @property
    def margin(self) -> dict[str, float]:
        """Smallest relative distance of a singular value to the threshold."""
        return {k: _nanmin(v) for k, v in self.margin_per_sample.items()}

    @property
    def near_threshold(self) -> dict[str, float]:
        """Mean count of singular values within 10% of the threshold."""
        return {k: float(np.mean(v)) for k, v in self.near_threshold_per_sample.items()}

    @property
    def active_units(self) -> dict[str, float]:
        """Mean active units per input (NaN where not defined)."""
        return {k: float(np.mean(v)) for k, v in self.active_per_sample.items()}

    @property
    def rank_bound(self) -> dict[str, float]:
        """Mean active-unit bound on the rank (NaN where not defined)."""
        return {k: float(np.mean(v)) for k, v in self.bound_per_sample.items()}

    @property
    def deficit_per_sample(self) -> dict[str, np.ndarray]:
        """`{layer: bound - rank}` per input: the gap dead units do not explain."""
        return {
            k: self.bound_per_sample[k] - np.asarray(v, np.float64)
            for k, v in self.per_sample.items()
        }

    @property
    def rank_deficit(self) -> dict[str, float]:
        """Mean `bound - rank` per layer (NaN where not defined)."""
        return {k: float(np.mean(v)) for k, v in self.deficit_per_sample.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: name, class, units, bound, statistics, tolerance,
        method and its error statement, margin to the threshold, the mean of
        every spectral statistic, and the unit activity (`active_units`,
        `dead_units`, `rank_bound`, `rank_deficit`; NaN where not defined)."""
        stats = {
            "mean": self.mean,
            "std": self.std,
            "stderr": self.stderr,
            "min": self.min,
            "max": self.max,
            "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank,
            "upper": self.upper,
            "margin": self.margin,
            "near_threshold": self.near_threshold,
            "active_units": self.active_units,
            "dead_units": self.dead_units,
            "rank_bound": self.rank_bound,
            "rank_deficit": self.rank_deficit,
        }
        for name, per_layer in self.stats.items():
            stats[name] = {k: float(np.mean(v)) for k, v in per_layer.items()}
        sketch = {k: float(np.mean(v)) for k, v in self.sketch_size_per_sample.items()}
        rows = []
        for info in self.layers:
            row = {
                "layer": info.name,
                "class": info.class_name,
                "units": info.units,
                "input_dim": info.input_dim,
                "bound": info.bound,
                "samples": self.num_samples,
            }
            row.update({key: values[info.name] for key, values in stats.items()})
            row.update(
                {
                    "atol": self.tolerance.atol,
                    "rtol": self.tolerance.rtol,
                    "method": info.method,
                    "mode": info.mode,
                    "directions": info.directions,
                    "failure_probability": info.failure_probability,
                    "rows": info.rows,
                    "sketch_size": sketch[info.name],
                    "dtype": self.dtype,
                }
            )
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """A JSON-able summary (per-layer table, tolerance, skipped layers)."""
        return {
            "tolerance": {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol},
            "dtype": self.dtype,
            "num_samples": self.num_samples,
            "layers": self.to_frame().to_dict(orient="records"),
            "skipped": self.skipped,
            "active_skipped": self.active_skipped,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the table atomically as `.csv` or `.json` (chosen by suffix).

        Raises:
            ValueError: for any other suffix.
        """
        path = os.fspath(path)
        if path.endswith(".csv"):
            atomic_write_text(path, self.to_frame().to_csv(index=False))
        elif path.endswith(".json"):
            atomic_write_json(path, self.to_dict())
        else:
            raise ValueError(
                f"Expected a path ending in .csv or .json. Received: path={path!r}"
            )

    def __repr__(self) -> str:
        means = ", ".join(f"{k}={v:.2f}" for k, v in self.mean.items())
        return (
            f"LocalRankResult({self.tolerance.label()}, n={self.num_samples}: {means})"
        )
