"""The VIB beta sweep: one VIB classifier per (beta, seed), information terms and
local rank of each, plots, and the beta values where local rank changes most.

`run_sweep(config, workdir)` is what `experiments/vib_beta_sweep.py` calls; tests
call it with a tiny config. The run directory holds

    config.json                the resolved config
    runs/beta=<b>_seed=<s>.json one finished model each (the resume state)
    results.csv, results.json  all finished runs, one row per (beta, seed)
    local_rank_vs_beta.png     exact and robust local rank against beta
    information_plane.png      rate against the I(Z;Y) bound, coloured by beta
    accuracy_vs_beta.png       test accuracy against beta
    summary.json               transitions, per-beta means, wall time

Finished (beta, seed) pairs are never retrained: a run file is written
atomically once a model is trained and measured, and an interrupted sweep
started again with the same directory picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd

from keras_localrank import datasets
from keras_localrank.io import atomic_write_json, atomic_write_text
from keras_localrank.layers.gaussian_bottleneck import check_beta
from keras_localrank.plotting import new_figure, save_figure
from keras_localrank.spectra import Tolerance
from keras_localrank.vib import (
    PRESETS,
    build_vib_classifier,
    compile_vib_classifier,
    get_preset,
    information_quantities,
    vib_local_rank_estimator,
)

__all__ = [
    "SweepConfig",
    "beta_grid",
    "check_betas",
    "find_transitions",
    "run_sweep",
]

log = logging.getLogger(__name__)

TOLERANCE_KINDS = ("exact", "robust")


def beta_grid(beta_min: float = 1e-6, beta_max: float = 10.0, num: int = 15) -> tuple[float, ...]:
    """`num` log-spaced beta values from `beta_min` to `beta_max` (both included).

    Raises:
        TypeError: non-numeric bounds or a non-int `num`.
        ValueError: `beta_min <= 0`, `beta_max <= beta_min`, non-finite bounds,
            `num < 2`.
    """
    beta_min = check_beta(beta_min, "beta_min")
    beta_max = check_beta(beta_max, "beta_max")
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)):
        raise TypeError(f"Expected `num` to be an int. Received: num={num!r}")
    if num < 2:
        raise ValueError(f"Expected `num` >= 2 for a grid. Received: num={num}")
    if beta_min <= 0 or beta_max <= beta_min:
        raise ValueError(
            "Expected 0 < beta_min < beta_max for a log grid. "
            f"Received: beta_min={beta_min}, beta_max={beta_max}"
        )
    grid = np.geomspace(beta_min, beta_max, int(num))
    return tuple(float(f"{b:.6g}") for b in grid)


def check_betas(betas) -> tuple[float, ...]:
    """Validate an explicit beta grid: >= 2 distinct finite values >= 0; sorted.

    Raises:
        TypeError: not a sequence of real numbers.
        ValueError: fewer than 2 values, a negative/NaN/infinite value, duplicates.
    """
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (Sequence, np.ndarray)):
        raise TypeError(
            f"Expected `betas` to be a sequence of numbers. Received: betas={betas!r}"
        )
    values = [check_beta(b, f"betas[{i}]") for i, b in enumerate(betas)]
    if len(values) < 2:
        raise ValueError(f"Expected at least 2 beta values. Received: betas={list(betas)!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"Expected distinct beta values. Received: betas={list(betas)!r}")
    return tuple(sorted(values))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A beta sweep.

    Attributes:
        betas: the beta grid (validated by `check_betas`). Default: 15
            log-spaced values from 1e-6 to 10.
        seeds: one model per seed and beta. Default (0, 1, 2).
        dataset: a `keras_localrank.datasets` name. Default `"mnist"`.
        data_path: an `.npz` read instead of downloading. Default None.
        n_train, n_test: examples kept (None: all). Defaults 8000 / 2000.
        rank_samples: test examples the local rank is averaged over. Default 500.
        preset: a `keras_localrank.vib.PRESETS` name. Default `"small"`.
        overrides: `VIBConfig` fields replacing the preset's (e.g. epochs).
        robust_atol: singular-value threshold of the robust local rank.
            Default 0.1.
        active_threshold: per-dimension KL (nats) above which a bottleneck
            dimension is active. Default 1e-2.
    """

    betas: tuple[float, ...] = beta_grid()
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "mnist"
    data_path: str | None = None
    n_train: int | None = 8000
    n_test: int | None = 2000
    rank_samples: int = 500
    preset: str = "small"
    overrides: dict = dataclasses.field(default_factory=dict)
    robust_atol: float = 0.1
    active_threshold: float = 1e-2

    def __post_init__(self):
        object.__setattr__(self, "betas", check_betas(self.betas))
        seeds = tuple(self.seeds)
        if not seeds or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds
        ) or len(set(seeds)) != len(seeds):
            raise ValueError(f"Expected distinct int seeds. Received: seeds={self.seeds!r}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if self.dataset not in datasets.NAMES:
            raise ValueError(
                f"Expected `dataset` in {datasets.NAMES}. Received: dataset={self.dataset!r}"
            )
        if self.preset not in PRESETS:
            raise ValueError(
                f"Expected `preset` in {sorted(PRESETS)}. Received: preset={self.preset!r}"
            )
        self.model_config()  # validates the overrides
        if self.rank_samples < 1:
            raise ValueError(
                f"Expected `rank_samples` >= 1. Received: rank_samples={self.rank_samples}"
            )
        if check_beta(self.robust_atol, "robust_atol") <= 0:
            raise ValueError(f"Expected `robust_atol` > 0. Received: {self.robust_atol}")
        check_beta(self.active_threshold, "active_threshold")

    def model_config(self):
        return get_preset(self.preset, **self.overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["seeds"] = list(self.seeds)
        out["model"] = self.model_config().to_dict()
        return out

    def fingerprint(self) -> dict:
        """The settings a finished run depends on (everything but the grid and seeds)."""
        out = self.to_dict()
        for key in ("betas", "seeds", "overrides"):
            out.pop(key)
        return out


def _run_name(beta: float, seed: int) -> str:
    return f"beta={beta:.6g}_seed={seed}.json"


def _train_one(config: SweepConfig, data, beta: float, seed: int) -> dict:
    """Train one VIB classifier and measure it; returns the run record."""
    model_cfg = config.model_config()
    keras.utils.set_random_seed(seed)
    model = build_vib_classifier(
        data.input_shape,
        data.num_classes,
        beta=beta,
        encoder_units=model_cfg.encoder_units,
        bottleneck_units=model_cfg.bottleneck_units,
        activation=model_cfg.activation,
        train_samples=model_cfg.train_samples,
        eval_samples=model_cfg.eval_samples,
        learnable_prior=model_cfg.learnable_prior,
        scale_shift=model_cfg.scale_shift,
        seed=seed,
    )
    steps = math.ceil(len(data.x_train) / model_cfg.batch_size)
    compile_vib_classifier(model, model_cfg, steps_per_epoch=steps)
    start = time.perf_counter()
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=model_cfg.batch_size,
        epochs=model_cfg.epochs,
        verbose=0,
    )
    train_seconds = time.perf_counter() - start
    info = information_quantities(
        model, data.x_test, data.y_test, active_threshold=config.active_threshold
    )
    estimator = vib_local_rank_estimator(
        model, tolerances=(Tolerance(), Tolerance(atol=config.robust_atol))
    )
    exact, robust = estimator(data.x_test, max_samples=config.rank_samples)
    record = {
        "beta": beta,
        "seed": seed,
        "accuracy": info.accuracy,
        "rate": info.rate,
        "izy_lower_bound": info.izy_lower_bound,
        "cross_entropy": info.cross_entropy,
        "label_entropy": info.label_entropy,
        "active_dimensions": info.active_dimensions,
        "train_loss": float(history.history["loss"][-1]),
        "train_rate": float(history.history["rate"][-1]),
        "train_seconds": train_seconds,
        "layers": exact.layer_names,
        "rate_per_dimension": [float(v) for v in info.rate_per_dimension],
    }
    for kind, result in zip(TOLERANCE_KINDS, (exact, robust)):
        for name in result.layer_names:
            record[f"lr_{kind}/{name}"] = result.mean[name]
            record[f"lr_{kind}_std/{name}"] = result.std[name]
    keras.backend.clear_session(free_memory=True)
    return record


def find_transitions(
    frame: pd.DataFrame, columns: Sequence[str], *, top: int = 3
) -> dict[str, list[dict]]:
    """Where each column changes most sharply between neighbouring betas.

    For each column the mean over seeds is taken per beta; the change
    between consecutive betas is `delta = m(beta_{i+1}) - m(beta_i)`, and the
    transition is placed at the geometric mid-point of the pair. The `top`
    largest `|delta|` are returned, largest first, with `relative` = `|delta|`
    over the column's range across the grid, and `noise` = the larger of the
    two betas' standard deviations over seeds (0 with one seed).

    Args:
        frame: one row per (beta, seed) with a `beta` column.
        columns: the columns to analyse.
        top: transitions per column. Default 3.

    Returns:
        `{column: [{"beta_low", "beta_high", "beta_mid", "delta", "relative",
        "noise"}, ...]}`.
    """
    grouped = frame.groupby("beta")
    out = {}
    for col in columns:
        means = grouped[col].mean().sort_index()
        stds = grouped[col].std(ddof=1).reindex(means.index).fillna(0.0)
        betas = means.index.to_numpy(float)
        values = means.to_numpy(float)
        if len(betas) < 2:
            out[col] = []
            continue
        deltas = np.diff(values)
        span = float(values.max() - values.min())
        order = np.argsort(-np.abs(deltas), kind="stable")[:top]
        out[col] = [
            {
                "beta_low": float(betas[i]),
                "beta_high": float(betas[i + 1]),
                "beta_mid": float(math.sqrt(betas[i] * betas[i + 1]))
                if betas[i] > 0
                else float(betas[i + 1]) / 2,
                "delta": float(deltas[i]),
                "relative": float(abs(deltas[i]) / span) if span > 0 else 0.0,
                "noise": float(max(stds.iloc[i], stds.iloc[i + 1])),
            }
            for i in order
            if deltas[i] != 0
        ]
    return out


def _lr_columns(frame: pd.DataFrame, kind: str) -> list[str]:
    return [c for c in frame.columns if c.startswith(f"lr_{kind}/")]


def _plot_x(betas: np.ndarray) -> np.ndarray:
    """Log-axis positions: beta = 0 is drawn a decade below the smallest beta > 0."""
    positive = betas[betas > 0]
    floor = positive.min() / 10 if positive.size else 1e-8
    return np.where(betas > 0, betas, floor)


def _plots(frame: pd.DataFrame, workdir: str, title: str) -> list[str]:
    paths = []
    grouped = frame.groupby("beta")
    betas = np.array(sorted(frame["beta"].unique()), float)
    x = _plot_x(betas)

    fig, axes = new_figure(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, kind in zip(axes, TOLERANCE_KINDS):
        for col in _lr_columns(frame, kind):
            mean = grouped[col].mean().reindex(betas).to_numpy()
            lo = grouped[col].min().reindex(betas).to_numpy()
            hi = grouped[col].max().reindex(betas).to_numpy()
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=col.split("/", 1)[1])
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel("local rank")
        ax.set_title(f"{kind} local rank (band: min-max over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    paths.append(os.path.join(workdir, "local_rank_vs_beta.png"))
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
    paths.append(os.path.join(workdir, "information_plane.png"))
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
    paths.append(os.path.join(workdir, "accuracy_vs_beta.png"))
    save_figure(fig, paths[-1], dpi=80, bbox_inches="tight")
    return paths


def _check_workdir_config(config: SweepConfig, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        old = {k: v for k, v in saved.items() if k not in ("betas", "seeds", "overrides")}
        if old != json.loads(json.dumps(config.fingerprint())):
            raise ValueError(
                f"The run directory {workdir!r} holds a sweep with different settings; "
                "use a new directory. Differences: "
                + str({k: (old.get(k), v) for k, v in config.fingerprint().items()
                       if old.get(k) != v})
            )
    atomic_write_json(path, config.to_dict())


def run_sweep(config: SweepConfig, workdir: str | os.PathLike, *, plots: bool = True) -> dict:
    """Train and measure one VIB classifier per (beta, seed); write results and plots.

    Args:
        config: the `SweepConfig`.
        workdir: the run directory (created; reused to resume).
        plots: write the PNG plots. Default True.

    Returns:
        The summary (also written to `summary.json`).

    Raises:
        ValueError: `workdir` holds a sweep with different settings.
    """
    workdir = os.fspath(workdir)
    runs_dir = os.path.join(workdir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    _check_workdir_config(config, workdir)
    start = time.perf_counter()
    data = datasets.load(
        config.dataset,
        data_path=config.data_path,
        n_train=config.n_train,
        n_test=config.n_test,
    )
    records, trained = [], 0
    for beta in config.betas:
        for seed in config.seeds:
            path = os.path.join(runs_dir, _run_name(beta, seed))
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    records.append(json.load(f))
                log.info("beta=%g seed=%d: finished earlier, skipped", beta, seed)
                continue
            record = _train_one(config, data, beta, seed)
            atomic_write_json(path, record)
            records.append(record)
            trained += 1
            log.info(
                "beta=%g seed=%d: acc=%.3f rate=%.3f izy>=%.3f (%.1fs)",
                beta, seed, record["accuracy"], record["rate"],
                record["izy_lower_bound"], record["train_seconds"],
            )

    frame = pd.DataFrame(
        [{k: v for k, v in r.items() if k not in ("layers", "rate_per_dimension")}
         for r in records]
    ).sort_values(["beta", "seed"])
    atomic_write_text(os.path.join(workdir, "results.csv"), frame.to_csv(index=False))
    atomic_write_json(os.path.join(workdir, "results.json"), records)

    lr_cols = _lr_columns(frame, "exact") + _lr_columns(frame, "robust")
    transitions = find_transitions(frame, lr_cols)
    frame["log10_rate"] = np.log10(np.maximum(frame["rate"], 1e-12))
    other = find_transitions(
        frame, ["accuracy", "log10_rate", "izy_lower_bound", "active_dimensions"]
    )
    # The overall sharpest change: summed relative change over all local-rank columns.
    betas = np.array(sorted(frame["beta"].unique()), float)
    means = frame.groupby("beta")[lr_cols].mean().reindex(betas)
    spans = (means.max() - means.min()).replace(0, np.nan)
    score = (means.diff().abs() / spans).sum(axis=1, skipna=True).to_numpy()[1:]
    overall = [
        {
            "beta_low": float(betas[i]),
            "beta_high": float(betas[i + 1]),
            "beta_mid": float(math.sqrt(betas[i] * betas[i + 1])),
            "score": float(score[i]),
        }
        for i in np.argsort(-score, kind="stable")[:3]
        if score[i] > 0
    ]
    per_beta = frame.drop(columns=["seed", "log10_rate"]).groupby("beta").mean().reset_index()
    summary = {
        "description": (
            "Transitions: for each column, the neighbouring beta pairs with the "
            "largest change of the seed-mean ('delta'); 'relative' = |delta| / "
            "range over the grid; 'noise' = std over seeds. 'overall' ranks beta "
            "pairs by the summed relative change of all local-rank columns."
        ),
        "overall_local_rank_transitions": overall,
        "local_rank_transitions": transitions,
        "other_transitions": other,
        "per_beta_mean": per_beta.to_dict(orient="records"),
        "num_runs": len(records),
        "trained_this_call": trained,
        "wall_seconds_this_call": time.perf_counter() - start,
        "train_seconds_total": float(frame["train_seconds"].sum()),
    }
    if plots:
        title = (
            f"VIB on {config.dataset}: {config.model_config().encoder_units}, "
            f"K={config.model_config().bottleneck_units}, {len(config.seeds)} seed(s)"
        )
        summary["plots"] = [os.path.basename(p) for p in _plots(frame, workdir, title)]
    atomic_write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
