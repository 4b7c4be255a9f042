"""Plots of local-rank training dynamics (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["plot_dynamics"]

_METRIC_PANELS = (
    ("loss", ("train_loss", "test_loss")),
    ("accuracy", ("train_accuracy", "test_accuracy")),
)


def _mean_std(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and std over seeds (rows sharing a step) of one column."""
    stats = frame.groupby("step")[column].agg(["mean", "std"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    return stats


def _band(ax, stats: pd.DataFrame, label: str, color=None):
    x = stats["step"].to_numpy()
    mean, std = stats["mean"].to_numpy(), stats["std"].to_numpy()
    (line,) = ax.plot(x, mean, marker=".", markersize=3, label=label, color=color)
    if np.any(std > 0):
        ax.fill_between(x, mean - std, mean + std, alpha=0.25, color=line.get_color())


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize, dpi=None, **subplot_kw):
    """A matplotlib `Figure` and its axes, without pyplot.

    The global matplotlib backend is left alone (no `matplotlib.use`), so a
    user's notebook or GUI session is unaffected; PNGs are rendered by Agg.

    Returns:
        `(figure, axes)` as `Figure.subplots` returns them.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig, path: str | os.PathLike, **savefig_kw) -> None:
    """Write `fig` as a PNG atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", **savefig_kw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_dynamics(
    frame: pd.DataFrame,
    path: str | os.PathLike,
    *,
    rank_columns: Sequence[str],
    title: str = "",
    reference: float | None = None,
    reference_label: str = "",
    dpi: int = 70,
) -> None:
    """One PNG: a panel per rank column (one line per layer), then loss and accuracy.

    Steps go on a symmetric-log x axis (linear below 1, so the measurement
    before training, step 0, is drawn too). With several seeds (a `seed`
    column), lines are means over seeds and bands +-1 standard deviation.

    Args:
        frame: rows of `measurements.csv`: `step`, `layer`, the rank columns,
            `train_loss`, `test_loss`, `train_accuracy`, `test_accuracy`.
        path: the PNG to write (atomically: temp file, then rename).
        rank_columns: the rank columns to draw, one panel each.
        title: figure title. Default "".
        reference: draw a dashed horizontal line at this rank (e.g. the task
            dimension k). Default None.
        reference_label: legend label of the reference line.
        dpi: resolution. Default 70 (small files for the repository).

    Raises:
        ValueError: a missing column or an empty frame.
    """
    needed = {"step", "layer", *rank_columns, *(c for _, cs in _METRIC_PANELS for c in cs)}
    missing = sorted(needed - set(frame.columns))
    if missing or frame.empty:
        raise ValueError(
            f"Expected a non-empty frame with columns {sorted(needed)}. Missing: {missing}"
        )
    panels = len(rank_columns) + len(_METRIC_PANELS)
    fig, axes = new_figure(1, panels, figsize=(3.6 * panels, 3.2))
    for ax, column in zip(axes, rank_columns):
        for layer, rows in frame.groupby("layer", sort=True):
            _band(ax, _mean_std(rows, column), layer)
        if reference is not None:
            ax.axhline(reference, color="k", linestyle="--", linewidth=1, label=reference_label)
        ax.set_ylabel(column)
        ax.set_title(column.replace("local_rank", "local rank"), fontsize=10)
        ax.legend(fontsize=7)
    per_step = frame.drop_duplicates(["step", "seed"] if "seed" in frame else ["step"])
    for ax, (name, columns) in zip(axes[len(rank_columns) :], _METRIC_PANELS):
        for column in columns:
            _band(ax, _mean_std(per_step, column), column.split("_")[0])
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
