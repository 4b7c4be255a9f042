"""Summaries of measured curves: peak/final/drop of a curve over training, the
largest changes of a quantity across a sweep, and mean/std across seeds.

Plain functions on arrays and data frames; the studies in
`keras_localrank.studies` use them, and so can any other analysis.

**When the drop starts** (`summarize_curve`'s `drop_start_step`): with `peak`
the largest and `final` the last value of a curve, the last measured step at
which the curve is still within `drop_tolerance` (default 10%) of the eventual
drop from its peak, i.e. `value >= peak - drop_tolerance * (peak - final)`.
After that step the curve never comes back near its peak. It is None when the
relative drop `(peak - final) / peak` is below `min_relative_drop` (default 5%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["aggregate_summaries", "find_transitions", "summarize_curve"]

DROP_START_DEFINITION = (
    "last measured step with value >= peak - drop_tolerance * (peak - final); "
    "None when (peak - final) / peak < min_relative_drop"
)


def summarize_curve(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    drop_tolerance: float = 0.1,
    min_relative_drop: float = 0.05,
) -> dict:
    """Peak, final value, drop and the step the drop starts, of one curve.

    Args:
        steps: measurement steps, increasing.
        values: the curve at those steps (NaNs are ignored).
        drop_tolerance: the drop starts after the last step with
            `value >= peak - drop_tolerance * (peak - final)`. Default 0.1.
        min_relative_drop: a smaller `(peak - final) / peak` is no drop
            (`drop_start_step` None). Default 0.05.

    Returns:
        A dict with `peak`, `peak_step`, `final`, `final_step`, `drop`
        (`peak - final`), `relative_drop` and `drop_start_step`.

    Raises:
        ValueError: no finite value, or lengths that differ.
    """
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape:
        raise ValueError(
            f"Expected as many steps as values. Received: {steps.shape}, {values.shape}"
        )
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if not values.size:
        raise ValueError("Expected at least one finite value in the curve.")
    peak_index = int(np.argmax(values))
    peak, final = float(values[peak_index]), float(values[-1])
    drop = peak - final
    relative = drop / peak if peak > 0 else 0.0
    start = None
    if relative >= min_relative_drop and drop > 0:
        near_peak = np.nonzero(values >= peak - drop_tolerance * drop)[0]
        start = int(steps[near_peak[-1]])
    return dict(
        peak=peak,
        peak_step=int(steps[peak_index]),
        final=final,
        final_step=int(steps[-1]),
        drop=drop,
        relative_drop=relative,
        drop_start_step=start,
    )


def aggregate_summaries(summaries: dict) -> dict:
    """Mean and std across runs of every number in nested per-run summary dicts.

    Missing values (e.g. no drop: `drop_start_step` None) are left out of the
    mean; `count` says how many runs had a value. Non-numeric fields are
    dropped.

    Args:
        summaries: `{run key: summary dict}` with the same nesting per run
            (taken in sorted key order).

    Returns:
        The nesting of the summaries with `{"mean", "std", "count"}` leaves.
    """

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def walk(items: list):
        if isinstance(items[0], dict):
            out = {key: walk([item.get(key) for item in items]) for key in items[0]}
            return {key: value for key, value in out.items() if value is not None}
        if not any(is_number(v) for v in items) and any(v is not None for v in items):
            return None  # strings, flags: not aggregated
        numbers = [float(v) for v in items if is_number(v)]
        return dict(
            mean=float(np.mean(numbers)) if numbers else None,
            std=float(np.std(numbers)) if numbers else None,
            count=len(numbers),
        )

    return walk([summaries[key] for key in sorted(summaries)])


def find_transitions(
    frame: pd.DataFrame, columns: Sequence[str], *, by: str = "beta", top: int = 3
) -> dict[str, list[dict]]:
    """Where each column changes most sharply between neighbouring values of `by`.

    For each column the mean over repeats (seeds) is taken per value of `by`;
    the change between consecutive values is `delta = m(b_{i+1}) - m(b_i)`,
    and the transition is placed at the geometric mid-point of the pair (the
    arithmetic one when `b_i` is 0). The `top` largest `|delta|` are
    returned, largest first, with `relative` = `|delta|` over the column's
    range across the grid, and `noise` = the larger of the two values'
    standard deviations over repeats (0 with one repeat).

    Args:
        frame: one row per (grid value, repeat), with a `by` column.
        columns: the columns to analyse.
        by: the grid column. Default "beta".
        top: transitions per column. Default 3.

    Returns:
        `{column: [{"<by>_low", "<by>_high", "<by>_mid", "delta", "relative",
        "noise"}, ...]}`.
    """
    grouped = frame.groupby(by)
    out = {}
    for col in columns:
        means = grouped[col].mean().sort_index()
        stds = grouped[col].std(ddof=1).reindex(means.index).fillna(0.0)
        grid = means.index.to_numpy(float)
        values = means.to_numpy(float)
        if len(grid) < 2:
            out[col] = []
            continue
        deltas = np.diff(values)
        span = float(values.max() - values.min())
        order = np.argsort(-np.abs(deltas), kind="stable")[:top]
        out[col] = [
            {
                f"{by}_low": float(grid[i]),
                f"{by}_high": float(grid[i + 1]),
                f"{by}_mid": float(math.sqrt(grid[i] * grid[i + 1]))
                if grid[i] > 0
                else float(grid[i + 1]) / 2,
                "delta": float(deltas[i]),
                "relative": float(abs(deltas[i]) / span) if span > 0 else 0.0,
                "noise": float(max(stds.iloc[i], stds.iloc[i + 1])),
            }
            for i in order
            if deltas[i] != 0
        ]
    return out
