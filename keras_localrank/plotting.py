"""Plots of local-rank training dynamics (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["plot_dynamics", "plot_information_plane", "information_curves"]

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


def information_curves(trace: pd.DataFrame, *, ixt: str, ity: str | None = None) -> pd.DataFrame:
    """One row per (step, layer): the chosen `I(X;T)` and `I(T;Y)` estimates.

    Args:
        trace: an information trace (`InformationCallback.trace_frame()`, or
            its CSV): columns `step`, `layer`, `quantity`, `estimator`,
            `parameter`, `value`, `nats`, and optionally `seed` (averaged).
        ixt: the `I(X;T)` estimate, as `<estimator>@<parameter>=<value>`
            (e.g. `"kl_upper@sigma=0.1"`).
        ity: the `I(T;Y)` estimate (e.g. `"kl@sigma=0.1"`). Default None.

    Returns:
        Columns `step`, `layer`, `ixt` (and `ity`), in nats, sorted by layer
        and step.

    Raises:
        ValueError: missing columns, or no rows for a requested estimate
            (the message lists the estimates present).
    """
    from keras_localrank.information import ITY, IXT

    needed = {"step", "layer", "quantity", "estimator", "parameter", "value", "nats"}
    missing = sorted(needed - set(trace.columns))
    if missing:
        raise ValueError(f"Expected an information trace with columns {sorted(needed)}. "
                         f"Missing: {missing}")
    labels = (
        trace["estimator"].astype(str) + "@" + trace["parameter"].astype(str) + "="
        + trace["value"].map(lambda v: f"{float(v):g}")
    )
    frames = []
    for column, quantity, label in (("ixt", IXT, ixt), ("ity", ITY, ity)):
        if label is None:
            continue
        rows = trace[(trace["quantity"] == quantity) & (labels == label)]
        if rows.empty:
            present = sorted(set(labels[trace["quantity"] == quantity]))
            raise ValueError(
                f"Expected {quantity} estimate {label!r} in the trace. Present: {present}"
            )
        frames.append(rows.groupby(["step", "layer"])["nats"].mean().rename(column))
    out = pd.concat(frames, axis=1, join="inner").reset_index()
    return out.sort_values(["layer", "step"]).reset_index(drop=True)


def plot_information_plane(
    trace: pd.DataFrame,
    path: str | os.PathLike,
    *,
    ixt: str = "kl_upper@sigma=0.1",
    ity: str = "kl@sigma=0.1",
    ranks: pd.DataFrame | None = None,
    rank_kind: str = "exact",
    title: str = "",
    dpi: int = 70,
) -> None:
    """The information plane next to the curves over training, as one PNG.

    Panels: the information plane (`I(X;T)` against `I(T;Y)`, one curve per
    layer, points coloured by optimizer step on a log scale), `I(X;T)` per
    layer against the step, and, with `ranks`, local rank per layer against
    the step, so compression of information and of rank can be compared.

    Args:
        trace: an information trace (see `information_curves`).
        path: the PNG to write (atomically).
        ixt: the `I(X;T)` estimate to draw. Default `"kl_upper@sigma=0.1"`.
        ity: the `I(T;Y)` estimate. Default `"kl@sigma=0.1"`.
        ranks: optional local-rank trace (`LocalRankCallback.trace_frame()`:
            `step`, `layer`, `kind`, `mean`). Default None.
        rank_kind: the rank kind to draw from `ranks`. Default `"exact"`.
        title: figure title. Default "".
        dpi: resolution. Default 70.

    Raises:
        ValueError: see `information_curves`; a rank trace without `rank_kind`.
    """
    from matplotlib.colors import SymLogNorm

    curves = information_curves(trace, ixt=ixt, ity=ity)
    panels = 3 if ranks is not None else 2
    fig, axes = new_figure(1, panels, figsize=(4.0 * panels, 3.4))
    steps = curves["step"].to_numpy(dtype=float)
    norm = SymLogNorm(linthresh=1.0, vmin=steps.min(), vmax=max(steps.max(), 1.0))
    plane, over_steps = axes[0], axes[1]
    points = None
    for layer, rows in curves.groupby("layer", sort=False):
        (line,) = plane.plot(rows["ixt"], rows["ity"], linewidth=1, alpha=0.6, label=layer)
        points = plane.scatter(rows["ixt"], rows["ity"], c=rows["step"], cmap="viridis",
                               norm=norm, s=14, edgecolors=line.get_color(), linewidths=0.6)
        over_steps.plot(rows["step"], rows["ixt"], marker=".", markersize=3, label=layer,
                        color=line.get_color())
    fig.colorbar(points, ax=plane, label="optimizer step")
    plane.set_xlabel(f"I(X;T) [nats], {ixt}")
    plane.set_ylabel(f"I(T;Y) [nats], {ity}")
    plane.set_title("information plane", fontsize=10)
    plane.legend(fontsize=7)
    over_steps.set_ylabel("I(X;T) [nats]")
    over_steps.set_title(f"I(X;T): {ixt}", fontsize=10)
    step_axes = [over_steps]
    if ranks is not None:
        needed = {"step", "layer", "kind", "mean"}
        if needed - set(ranks.columns) or not (ranks["kind"] == rank_kind).any():
            raise ValueError(
                f"Expected a rank trace with columns {sorted(needed)} and rows of kind "
                f"{rank_kind!r}. Received columns {sorted(ranks.columns)}."
            )
        ax = axes[2]
        chosen = ranks[ranks["kind"] == rank_kind]
        for layer, rows in chosen.groupby("layer", sort=False):
            stats = rows.groupby("step")["mean"].mean()
            ax.plot(stats.index, stats.to_numpy(), marker=".", markersize=3, label=layer)
        ax.set_ylabel("local rank")
        ax.set_title(f"local rank ({rank_kind})", fontsize=10)
        step_axes.append(ax)
    for ax in step_axes:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi)
