"""Plots of the VIB beta sweep: local rank, information plane, accuracy and rate
against beta (PNG files written atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from keras_localrank import names
from keras_localrank.plotting import new_figure, save_figure

__all__ = ["plot_sweep"]


def _plot_x(betas: np.ndarray) -> np.ndarray:
    """Log-axis positions: beta = 0 is drawn a decade below the smallest beta > 0."""
    positive = betas[betas > 0]
    floor = positive.min() / 10 if positive.size else 1e-8
    return np.where(betas > 0, betas, floor)


def plot_sweep(
    frame: pd.DataFrame,
    folder: str,
    title: str,
    *,
    robust_atol: float,
    layers: Sequence[str],
) -> list[str]:
    """Write the sweep's three PNGs into `folder`; returns their file names.

    Args:
        frame: `results.csv` as a frame (one row per (beta, seed)).
        folder: the run directory.
        title: the title of the local-rank figure.
        robust_atol: the robust threshold (names the robust columns).
        layers: the measured layers.
    """
    paths = []
    grouped = frame.groupby("beta")
    betas = np.array(sorted(frame["beta"].unique()), float)
    x = _plot_x(betas)

    fig, axes = new_figure(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, kind in zip(axes, names.RANK_KINDS):
        for layer in layers:
            col = names.rank_key(layer, kind, robust_atol)
            mean = grouped[col].mean().reindex(betas).to_numpy()
            lo = grouped[col].min().reindex(betas).to_numpy()
            hi = grouped[col].max().reindex(betas).to_numpy()
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=layer)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel(names.rank_column(kind, robust_atol))
        ax.set_title(f"{kind} local rank (band: min-max over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    paths.append(os.path.join(folder, "local_rank_vs_beta.png"))
    save_figure(fig, paths[-1], dpi=80, bbox_inches="tight")

    fig, ax = new_figure(figsize=(5, 4))
    colour = np.log10(_plot_x(frame["beta"].to_numpy(float)))
    points = ax.scatter(frame["rate"], frame["izy_lower_bound"], c=colour, cmap="viridis", s=18)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("rate R >= I(X;Z)  [nats]")
    ax.set_ylabel("H(Y) - CE <= I(Z;Y)  [nats]")
    ax.axhline(frame["label_entropy"].iloc[0], color="grey", ls="--", lw=0.8, label="H(Y)")
    ax.legend(fontsize=8, loc="lower right")
    fig.colorbar(points, ax=ax, label="log10 beta")
    ax.set_title("information plane", fontsize=10)
    ax.grid(alpha=0.3)
    paths.append(os.path.join(folder, "information_plane.png"))
    save_figure(fig, paths[-1], dpi=80, bbox_inches="tight")

    fig, ax1 = new_figure(figsize=(5.5, 3.8))
    for col, axis, colour_name in (("accuracy", ax1, "C0"), ("rate", ax1.twinx(), "C3")):
        mean = grouped[col].mean().reindex(betas).to_numpy()
        axis.plot(x, mean, marker="o", ms=3, color=colour_name)
        axis.fill_between(
            x,
            grouped[col].min().reindex(betas).to_numpy(),
            grouped[col].max().reindex(betas).to_numpy(),
            color=colour_name,
            alpha=0.2,
        )
        axis.set_ylabel(col if col == "accuracy" else "rate [nats]", color=colour_name)
        if col == "rate" and (frame["rate"] > 0).all():
            axis.set_yscale("log")
    ax1.set_xscale("log")
    ax1.set_xlabel("beta")
    ax1.grid(alpha=0.3)
    ax1.set_title("test accuracy and rate against beta", fontsize=10)
    paths.append(os.path.join(folder, "accuracy_vs_beta.png"))
    save_figure(fig, paths[-1], dpi=80, bbox_inches="tight")
    return [os.path.basename(p) for p in paths]
