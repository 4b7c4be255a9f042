"""Dead units versus low-rank structure in the studies' measurements.

Small helpers the dynamics studies (Gaussian, MNIST) and the VIB sweep call:
unit-activity columns from a `LocalRankCallback` trace, the per-layer
decomposition of a rank drop (`keras_localrank.active_units.decompose_drop`)
and its one-line verdict, and the plot of rank, active-unit bound and gap.

Reference and final points: over training, the reference is the step where
the layer's rank curve peaks (the `peak` of `keras_localrank.curves`) and the
final point the last measurement, so the drop is the `drop` of the summary;
over beta, the reference is the smallest beta and the final point the
largest (seed means).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from keras_localrank import names
from keras_localrank.active_units import ACTIVE_DEFINITION, VERDICT_RULE, decompose_drop

__all__ = [
    "DEFINITIONS",
    "deficit_columns",
    "unit_columns",
    "unit_measurements",
    "verdicts",
    "plot_rank_bound",
    "record_units",
    "long_from_wide",
]

DEFINITIONS = {
    "units": ACTIVE_DEFINITION,
    "verdict_rule": VERDICT_RULE,
    "reference": (
        "over training: the step of the peak of the layer's rank curve vs the last "
        "measurement; over beta: the smallest vs the largest beta (seed means)"
    ),
}


def deficit_columns(rank_columns: Sequence[str]) -> list[str]:
    """The deficit column of each rank column (`local_rank` -> `rank_deficit`)."""
    return [c.replace("local_rank", "rank_deficit") for c in rank_columns]


def unit_columns(rank_columns: Sequence[str]) -> list[str]:
    """`active_units`, `dead_units`, `rank_bound`, then one deficit per rank column."""
    return [*names.UNIT_COLUMNS, *deficit_columns(rank_columns)]


def unit_measurements(trace: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (step, layer) of unit activity from a callback trace.

    Args:
        trace: a `LocalRankCallback(active_units=True)` trace (columns `step`,
            `layer`, `kind`, `atol`, `active_units`, `dead_units`,
            `rank_bound`, `rank_deficit`).

    Returns:
        Columns `step`, `layer`, `active_units`, `dead_units`, `rank_bound`
        and a deficit column per rank kind (`rank_deficit`,
        `robust_rank_deficit@<atol>`); None for a trace without unit columns.
    """
    if "rank_bound" not in trace:
        return None
    trace = trace.assign(
        column=[
            names.deficit_column(kind, None if kind == names.EXACT else atol)
            for kind, atol in zip(trace["kind"], trace["atol"])
        ]
    )
    deficits = trace.pivot_table(
        index=["step", "layer"], columns="column", values="rank_deficit", sort=False,
        dropna=False,
    )
    units = trace.groupby(["step", "layer"], sort=False)[list(names.UNIT_COLUMNS)].first()
    return units.join(deficits).reset_index()


def record_units(record: dict, results, kinds) -> None:
    """Add the unit-activity keys of measured results to a flat record.

    Args:
        record: a dict of `logs`-style keys (e.g. a sweep's run record).
        results: `LocalRankResult`s, one per rank kind, on the same samples.
        kinds: `(kind, atol)` of each result.

    Adds `active_units/<layer>` (unless present), `dead_units/<layer>`,
    `rank_bound/<layer>` and the deficit key per kind, for layers with a bound.
    """
    first = results[0]
    for layer in first.layer_names:
        if layer in first.active_skipped:
            continue
        record.setdefault(f"{names.ACTIVE_UNITS}/{layer}", first.active_units[layer])
        record[f"{names.DEAD_UNITS}/{layer}"] = first.dead_units[layer]
        record[f"{names.RANK_BOUND}/{layer}"] = first.rank_bound[layer]
        for (kind, atol), result in zip(kinds, results):
            record[names.deficit_key(layer, kind, atol)] = result.rank_deficit[layer]


def long_from_wide(frame: pd.DataFrame, layers: Sequence[str], rank_columns: Sequence[str],
                   *, x: str = "beta") -> pd.DataFrame:
    """Rows per (x, seed, layer) from a wide table with `<column>/<layer>` keys.

    Layers without a `rank_bound/<layer>` column are left out.
    """
    keep = [c for c in (x, "seed") if c in frame]
    parts = []
    for layer in layers:
        if f"{names.RANK_BOUND}/{layer}" not in frame:
            continue
        columns = [*rank_columns, *unit_columns(rank_columns)]
        part = frame[keep].copy()
        part["layer"] = layer
        for column in columns:
            key = f"{column}/{layer}"
            part[column] = frame[key] if key in frame else np.nan
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*keep, "layer", *rank_columns, "rank_bound"])
    return pd.concat(parts, ignore_index=True)


def verdicts(
    frame: pd.DataFrame, rank_columns: Sequence[str], *, x: str = "step"
) -> dict:
    """Per layer and rank column: how the drop splits into dead units and low-rank structure.

    Args:
        frame: one row per (`x`, layer) (or several seeds: they are averaged
            per `x`), with the rank columns and `rank_bound`.
        rank_columns: e.g. `["local_rank", "robust_local_rank@0.01"]`.
        x: `"step"` (reference: the peak of the rank curve) or `"beta"`
            (reference: the smallest beta). Default `"step"`.

    Returns:
        `{layer: {rank column: DropDecomposition.to_dict(...) plus
        "reference" and "final" x values, ...,
        "verdict": the line of the last rank column}}`; layers without a bound
        (NaN) are left out.
    """
    out = {}
    for layer, rows in frame.groupby("layer", sort=False):
        means = rows.groupby(x)[[*rank_columns, "rank_bound"]].mean().sort_index()
        means = means[means["rank_bound"].notna()]
        if means.empty:
            continue
        entry = {}
        for column in rank_columns:
            curve = means[column].dropna()
            if curve.empty:
                continue
            ref = curve.idxmax() if x == "step" else curve.index[0]
            final = curve.index[-1]
            d = decompose_drop(
                float(curve[ref]),
                float(curve[final]),
                float(means.loc[ref, "rank_bound"]),
                float(means.loc[final, "rank_bound"]),
            )
            entry[column] = {
                **d.to_dict(f"{layer} {column}"),
                f"reference_{x}": float(ref),
                f"final_{x}": float(final),
            }
        if entry:
            entry["verdict"] = entry[list(entry)[-1]]["line"]
            out[str(layer)] = entry
    return out


def shaded_column(rank_columns: Sequence[str]) -> str:
    """The rank whose gap to the bound is shaded: the first robust rank, else the first."""
    return rank_columns[1] if len(rank_columns) > 1 else rank_columns[0]


def plot_rank_bound(
    frame: pd.DataFrame,
    path: str | os.PathLike,
    *,
    rank_columns: Sequence[str],
    x: str = "step",
    title: str = "",
    dpi: int = 70,
) -> None:
    """One PNG: a panel per layer with each rank column, the active-unit bound
    and the gap between the bound and `shaded_column(rank_columns)` shaded
    (seed means).

    Args:
        frame: rows with `x`, `layer`, the rank columns and `rank_bound`.
        path: the PNG to write (atomically).
        rank_columns: the ranks to draw.
        x: `"step"` (symlog axis) or `"beta"` (log axis; 0 drawn at the left).
        title: figure title.
        dpi: resolution. Default 70.

    Raises:
        ValueError: a missing column or no layer with a bound.
    """
    from keras_localrank.plotting import new_figure, save_figure

    needed = {x, "layer", "rank_bound", *rank_columns}
    missing = sorted(needed - set(frame.columns))
    if missing:
        raise ValueError(f"Expected columns {sorted(needed)}. Missing: {missing}")
    layers = [
        layer for layer, rows in frame.groupby("layer", sort=False)
        if rows["rank_bound"].notna().any()
    ]
    if not layers:
        raise ValueError("Expected at least one layer with a finite `rank_bound`.")
    fig, axes = new_figure(1, len(layers), figsize=(3.6 * len(layers), 3.2))
    for ax, layer in zip(np.atleast_1d(axes), layers):
        means = (
            frame[frame["layer"] == layer]
            .groupby(x)[[*rank_columns, "rank_bound"]]
            .mean()
            .sort_index()
        )
        xs = means.index.to_numpy(float)
        if x == "beta":
            positive = xs[xs > 0]
            floor = positive.min() / 10 if positive.size else 1e-6
            xs = np.where(xs > 0, xs, floor)
        for column in rank_columns:
            ax.plot(xs, means[column], marker=".", markersize=3, label=column)
        ax.plot(xs, means["rank_bound"], "k--", linewidth=1.5, zorder=5,
                label="active-unit bound")
        shaded = shaded_column(rank_columns)
        ax.fill_between(xs, means[shaded], means["rank_bound"], alpha=0.2, color="grey",
                        label=f"bound - {shaded}")
        ax.set_title(str(layer), fontsize=10)
        ax.set_xlabel("optimizer step" if x == "step" else "beta")
        if x == "step":
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(left=0)
        else:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
