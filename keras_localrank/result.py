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
        method: `"analytic"` or `"autodiff-reverse"` / `"autodiff-forward"`.
    """

    name: str
    class_name: str
    units: int
    input_dim: int
    method: str

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
    ):
        self.layers = list(layers)
        self.per_sample = per_sample
        self.effective_rank_per_sample = effective_rank_per_sample
        self.stable_rank_per_sample = stable_rank_per_sample
        self.tolerance = tolerance
        self.dtype = dtype
        self.skipped = dict(skipped or {})

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

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: name, class, units, bound, statistics, tolerance."""
        stats = {
            "mean": self.mean,
            "std": self.std,
            "stderr": self.stderr,
            "min": self.min,
            "max": self.max,
            "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank,
        }
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
