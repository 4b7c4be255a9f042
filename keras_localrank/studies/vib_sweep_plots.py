"""Plots of the VIB beta sweep: local rank (several thresholds) and active units,
information plane, accuracy and rate against beta, training-loss convergence,
and detected transitions with their bootstrap intervals (PNG files written
atomically)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from keras_localrank import names
from keras_localrank.plotting import new_figure, save_figure

__all__ = ["plot_convergence", "plot_information_vs_beta", "plot_sweep", "plot_transitions"]


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
    atols: Sequence[float] = (),
) -> list[str]:
    """Write the sweep's three PNGs into `folder`; returns their file names.

    Args:
        frame: `results.csv` as a frame (one row per (beta, seed)).
        folder: the run directory.
        title: the title of the local-rank figure.
        robust_atol: the robust threshold (names the robust columns).
        layers: the measured layers.
        atols: further robust thresholds, one more panel each. Default ().
    """
    paths = []
    grouped = frame.groupby("beta")
    betas = np.array(sorted(frame["beta"].unique()), float)
    x = _plot_x(betas)

    panels = [(names.EXACT, None)] + [
        (names.ROBUST, a) for a in sorted({robust_atol, *atols})
    ]
    fig, axes = new_figure(1, len(panels), figsize=(4.6 * len(panels), 3.8), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (kind, atol) in zip(axes, panels):
        for layer in layers:
            col = names.rank_key(layer, kind, atol)
            mean = grouped[col].mean().reindex(betas).to_numpy()
            lo = grouped[col].min().reindex(betas).to_numpy()
            hi = grouped[col].max().reindex(betas).to_numpy()
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=layer)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        active = f"active_units/{layers[0]}"
        if active in frame and len(layers) > 1:  # drawn last, on top of equal curves
            ax.plot(x, grouped[active].mean().reindex(betas).to_numpy(), color="k", ls="--",
                    lw=1.2, zorder=5, label=f"active units of {layers[0]}")
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel(names.rank_column(kind, atol))
        label = "exact" if atol is None else f"robust, eps={atol:g}"
        ax.set_title(f"{label} local rank (band: min-max over seeds)", fontsize=9)
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


def plot_convergence(
    histories: dict[tuple[float, int], pd.DataFrame], path: str, *, last: int = 10
) -> str:
    """Training loss against epoch for every run: whole curves, and the last
    `last` epochs relative to each run's final loss.

    Args:
        histories: `{(beta, seed): per-epoch frame with "epoch" and "loss"}`.
        path: the PNG to write.
        last: epochs in the right panel. Default 10.

    Returns:
        The file name written.
    """
    from matplotlib import cm, colors

    betas = np.array(sorted({b for b, _ in histories}), float)
    xs = np.log10(_plot_x(betas))
    norm = colors.Normalize(xs.min(), xs.max() if xs.max() > xs.min() else xs.min() + 1)
    lookup = dict(zip(betas, xs))
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(10, 3.8))
    for (beta, _), frame in sorted(histories.items()):
        colour = cm.viridis(norm(lookup[beta]))
        epoch, loss = frame["epoch"].to_numpy(), frame["loss"].to_numpy(float)
        ax1.plot(epoch, loss, color=colour, lw=0.8)
        tail = slice(max(len(loss) - last, 0), None)
        ax2.plot(epoch[tail] - epoch[-1], loss[tail] / loss[-1] - 1, color=colour, lw=0.8)
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (CE + beta * rate)")
    ax1.set_title("training loss, every (beta, seed)", fontsize=9)
    ax2.set_xlabel("epochs before the last")
    ax2.set_ylabel("loss / final loss - 1")
    ax2.set_title(f"last {last} epochs: excess over the final loss", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    mappable = cm.ScalarMappable(norm=norm, cmap="viridis")
    fig.colorbar(mappable, ax=ax2, label="log10 beta")
    save_figure(fig, path, dpi=80, bbox_inches="tight")
    return os.path.basename(path)


def plot_transitions(frame: pd.DataFrame, detected: dict, path: str) -> str:
    """Per-seed curves against beta with the detected transitions.

    One panel per column of `detected` (`keras_localrank.curves.detect_transitions`
    output): thin lines per seed, the seed mean with markers, and for each
    transition the bootstrap interval of its location (shaded) and its
    midpoint (dashed), labelled sharp or not.

    Returns:
        The file name written.
    """
    columns = list(detected)
    ncols = min(len(columns), 3)
    nrows = int(np.ceil(len(columns) / ncols))
    fig, axes = new_figure(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.25)
    positive = frame[frame["beta"] > 0]
    for ax, col in zip(axes.ravel(), columns):
        for _, seed_rows in positive.groupby("seed"):
            seed_rows = seed_rows.sort_values("beta")
            ax.plot(seed_rows["beta"], seed_rows[col], color="grey", lw=0.7, alpha=0.8)
        found = detected[col]
        ax.plot(found["grid"], found["mean"], marker="o", ms=2.5, color="C0", lw=1.2)
        for n, t in enumerate(found["transitions"]):
            lo, hi = t["log10_interval"]
            colour = "C3" if n == 0 else "C1"
            ax.axvspan(10 ** (lo - 0.01), 10 ** (hi + 0.01), color=colour, alpha=0.15)
            ax.axvline(10 ** t["log10_mid"], color=colour, ls="--", lw=0.8)
        if found["transitions"]:
            t = found["transitions"][0]
            verdict = "sharp" if t["sharp"] else "not sharp"
            ax.set_title(
                f"{col}\nsteepest step: drop {t['jump']:.3g} ({t['jump_over_noise']:.1f} sd, "
                f"{t['concentration']:.0%} of its decade): {verdict}",
                fontsize=8,
            )
        else:
            ax.set_title(f"{col}\nno drop", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(columns):]:
        ax.set_visible(False)
    save_figure(fig, path, dpi=80, bbox_inches="tight")
    return os.path.basename(path)


def plot_information_vs_beta(
    frame: pd.DataFrame, path: str, *, layers: Sequence[str], sigmas: Sequence[float]
) -> str:
    """The rate and the noise-injection estimates of `I(X;T)` against beta.

    One panel per `sigma`: the rate (an upper bound on `I(X;Z)` for the
    VIB's own noise) in black, and per layer the band between the
    `bd_lower` and `kl_upper` bounds on `I(X; T + N(0, sigma^2 I))` (seed
    means), `log N` of the probe set dashed. Returns the file name.
    """
    betas = np.array(sorted(frame["beta"].unique()), float)
    x = _plot_x(betas)
    grouped = frame.groupby("beta")
    fig, axes = new_figure(1, len(sigmas), figsize=(4.6 * len(sigmas), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, s in zip(axes, sigmas):
        ax.plot(x, grouped["rate"].mean().reindex(betas).to_numpy(), color="k", marker="o",
                ms=3, label="rate R >= I(X;Z)")
        for layer in layers:
            upper = grouped[f"information/kl_upper@sigma={s:g}/{layer}"].mean().reindex(betas)
            lower = grouped[f"information/bd_lower@sigma={s:g}/{layer}"].mean().reindex(betas)
            (line,) = ax.plot(x, upper.to_numpy(), marker=".", ms=3, label=layer)
            ax.fill_between(x, lower.to_numpy(), upper.to_numpy(), color=line.get_color(),
                            alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("beta")
        ax.set_title(f"I(X;T + N(0, {s:g}^2 I)): bd_lower..kl_upper", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=7)
    save_figure(fig, path, dpi=80, bbox_inches="tight")
    return os.path.basename(path)
