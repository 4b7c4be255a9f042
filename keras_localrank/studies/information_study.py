"""Information next to local rank in the training-dynamics studies.

`keras_localrank.studies.dynamics` calls these hooks when
`DynamicsConfig.information` is on. At the same optimizer steps as local rank,
on the same inputs (the first `rank_samples` of the split local rank averages
over) and their labels, every hidden layer's pre-activation `T` gets:

- `I(X;T)`: the pairwise-distance bounds on `I(X; T + N(0, sigma^2 I))`
  (`kl_upper`, `bd_lower`) for each `information_sigmas` value, and
- `I(T;Y)`: the `kl` and `bd` estimates at the same `sigma`,

written by `InformationCallback` to `information.csv` in the seed folder, and
the local Gaussian-channel information from the rank measurement's own
singular values (`LocalRankCallback(information=...)`, rows of kind
"information" in `trace.csv`).

Outputs added to a study (see `dynamics.py` for the rest):

    seed=<s>/information.csv                 the information trace
    seed=<s>/information_plane_sigma=<s>.png information plane, I(X;T), rank
    seed=<s>/summary.json["information"]     `compare_run` of that seed
    information_plane_sigma=<s>.png          the same, seed means
    information_report.json, .txt            per layer and estimate, across seeds

The report compares, per layer, each `I(X;T)` curve with each local-rank
curve using `keras_localrank.curves.compare_compression` (drop starts side by
side, Spearman correlation over the compression phase).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from keras_localrank import information as info
from keras_localrank import names
from keras_localrank.callbacks import INFORMATION_KIND
from keras_localrank.curves import (
    COMPRESSION_PHASE_DEFINITION,
    DROP_START_DEFINITION,
    aggregate_summaries,
    compare_compression,
    summarize_curve,
)
from keras_localrank.information_callback import InformationCallback
from keras_localrank.studies.dynamics_config import DynamicsConfig, rank_columns

__all__ = [
    "TRACE_FILE",
    "rank_labels",
    "information_callback",
    "information_labels",
    "read_information",
    "information_frame",
    "compare_run",
    "measurement_cost",
    "aggregate_report",
    "report_text",
    "plot_planes",
]

TRACE_FILE = "information.csv"


def rank_labels(data, config: DynamicsConfig) -> np.ndarray:
    """The labels of the local-rank inputs (`mlp.rank_inputs`): the first
    `rank_samples` of the training or test split (`rank_on`)."""
    y = data.y_train if config.rank_on == "train" else data.y_test
    return np.asarray(y)[: config.rank_samples]


def information_labels(config: DynamicsConfig) -> dict[str, list[str]]:
    """`{"I(X;T)": [...], "I(T;Y)": [...], "gaussian_channel": [...]}`: the
    estimate labels (`<estimator>@sigma=<sigma>`) the study records."""
    if not config.information:
        return {info.IXT: [], info.ITY: [], "gaussian_channel": []}
    sigmas = config.information_sigmas
    return {
        info.IXT: [f"{e}@sigma={s:g}" for s in sigmas for e in ("kl_upper", "bd_lower")],
        info.ITY: [f"{e}@sigma={s:g}" for s in sigmas for e in ("kl", "bd")],
        "gaussian_channel": [f"gaussian_channel@sigma={s:g}" for s in sigmas],
    }


def information_callback(config: DynamicsConfig, x, y, layers, run, *, fresh: bool, log_dir: str):
    """The study's `InformationCallback` for one seed, or None when off.

    Args:
        config: the study.
        x, y: the local-rank inputs and their labels.
        layers: the hidden layer names.
        run: the seed's `SubRun` (the trace goes to `TRACE_FILE` in it).
        fresh: the run starts at step 0 (also measure before training).
        log_dir: TensorBoard folder.
    """
    if not config.information:
        return None
    if fresh:
        run.remove(TRACE_FILE)  # leftovers from before the first checkpoint
    from keras_localrank.studies.dynamics import _Grid

    return InformationCallback(
        x,
        y,
        layers,
        sigma=list(config.information_sigmas),
        schedule=_Grid(config),
        max_samples=config.rank_samples,
        measure_on_train_begin=fresh,
        trace_path=run.join(TRACE_FILE),
        log_dir=log_dir,
    )


def read_information(folder: str | os.PathLike) -> pd.DataFrame | None:
    """A seed folder's information trace, or None when it has none."""
    path = os.path.join(folder, TRACE_FILE)
    return pd.read_csv(path) if os.path.exists(path) else None


def _labels(trace: pd.DataFrame) -> pd.Series:
    return (
        trace["estimator"].astype(str) + "@" + trace["parameter"].astype(str) + "="
        + trace["value"].map(lambda v: f"{float(v):g}")
    )


def information_frame(folder: str | os.PathLike, config: DynamicsConfig) -> pd.DataFrame | None:
    """One row per (step, layer): the rank columns and every information estimate.

    Columns: `step`, `layer`, the `rank_columns(config.atols)`, then
    `information/<label>` (`I(X;T)`, including the Gaussian channel) and
    `label_information/<label>` (`I(T;Y)`), in nats (`names.information_key`
    without the layer). None when the run recorded no information.
    """
    trace = read_information(folder)
    if trace is None or not config.information:
        return None
    trace = trace.assign(
        column=[
            names.information_key("", q, label).rstrip("/")
            for q, label in zip(trace["quantity"], _labels(trace))
        ]
    )
    wide = trace.pivot_table(index=["step", "layer"], columns="column", values="nats")
    ranks = pd.read_csv(os.path.join(folder, "trace.csv"))
    channel = ranks[ranks["kind"] == INFORMATION_KIND]
    ranks = ranks[ranks["kind"].isin(names.RANK_KINDS)].copy()
    ranks["column"] = [
        names.rank_column(kind, None if kind == names.EXACT else atol)
        for kind, atol in zip(ranks["kind"], ranks["atol"])
    ]
    parts = [wide, ranks.pivot_table(index=["step", "layer"], columns="column", values="mean")]
    if len(channel):
        channel = channel.assign(
            column=[
                names.information_key("", info.IXT, f"gaussian_channel@sigma={float(s):g}")
                .rstrip("/")
                for s in channel["sigma"]
            ]
        )
        parts.append(channel.pivot_table(index=["step", "layer"], columns="column",
                                         values="mean"))
    frame = pd.concat(parts, axis=1, join="inner").reset_index()
    frame.columns.name = None
    return frame.sort_values(["layer", "step"]).reset_index(drop=True)


def measurement_cost(folder: str | os.PathLike) -> dict:
    """Seconds spent measuring in one seed folder: local rank (with the
    Gaussian channel it carries) and the information estimates, summed over
    measurements, and their ratio."""
    ranks = pd.read_csv(os.path.join(folder, "trace.csv")).drop_duplicates("step")
    trace = read_information(folder)
    rank_seconds = float(ranks["seconds"].sum())
    info_seconds = float(trace.drop_duplicates("step")["seconds"].sum())
    return dict(
        local_rank_seconds=rank_seconds,
        information_seconds=info_seconds,
        information_over_local_rank=info_seconds / rank_seconds if rank_seconds else None,
        measurements=int(len(ranks)),
    )


def _ixt_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("information/")]


def compare_run(frame: pd.DataFrame, config: DynamicsConfig) -> dict:
    """Per layer, every `I(X;T)` curve against every rank curve, and `I(T;Y)`.

    Returns:
        `{"layers": {layer: {"<rank column> vs <information column>":
        compare_compression(...), "<label_information column>":
        summarize_curve(...)}}}`.
    """
    out = {}
    for layer, rows in frame.groupby("layer", sort=False):
        rows = rows.sort_values("step")
        entry = {}
        for rank in rank_columns(config.atols):
            for column in _ixt_columns(frame):
                entry[f"{rank} vs {column}"] = compare_compression(
                    rows["step"],
                    rows[rank],
                    rows[column],
                    drop_tolerance=config.drop_tolerance,
                    min_relative_drop=config.min_relative_drop,
                )
        for column in [c for c in frame.columns if c.startswith("label_information/")]:
            if rows[column].notna().any():
                entry[column] = summarize_curve(
                    rows["step"], rows[column],
                    drop_tolerance=config.drop_tolerance,
                    min_relative_drop=config.min_relative_drop,
                )
        out[layer] = entry
    return {"layers": out}


def aggregate_report(per_seed: dict[int, dict], config: DynamicsConfig) -> dict:
    """Across seeds: mean/std/count of every number (`aggregate_summaries`),
    and per comparison how many seeds had each `order`."""
    per_seed = {s: r for s, r in per_seed.items() if r is not None}
    if not per_seed:
        return {}
    mean_std = aggregate_summaries(per_seed)
    orders: dict = {}
    for report in per_seed.values():
        for layer, entry in report["layers"].items():
            for name, value in entry.items():
                if "order" in value:
                    counts = orders.setdefault(layer, {}).setdefault(name, {})
                    counts[value["order"]] = counts.get(value["order"], 0) + 1
    return dict(
        seeds=sorted(per_seed),
        sigmas=list(config.information_sigmas),
        drop_start_definition=DROP_START_DEFINITION,
        compression_phase_definition=COMPRESSION_PHASE_DEFINITION,
        mean_std=mean_std,
        orders=orders,
        per_seed={str(s): r for s, r in sorted(per_seed.items())},
    )


def _fmt(stat, digits=0) -> str:
    if stat is None or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("count", 0) > 1:
        text += f" +- {stat['std']:.{digits}f}"
    return text


def report_text(report: dict, *, rank_column: str, title: str = "") -> str:
    """A plain-text table of `aggregate_report`: one line per layer and
    `I(X;T)` estimate, against `rank_column`."""
    if not report:
        return "No information was recorded.\n"
    seeds = report["seeds"]
    lines = [title] if title else []
    cost = report["mean_std"].get("cost", {}).get("information_over_local_rank")
    if cost:
        lines.append(
            f"measuring cost: information estimates / local rank = {_fmt(cost, 3)} "
            "(seconds per run, mean +- std over seeds)"
        )
    lines += [
        f"seeds: {seeds}; drop start: {report['drop_start_definition']}",
        f"compression phase: {report['compression_phase_definition']}",
        "starts: mean +- std over the seeds that have a drop (n = that count); "
        "order: seeds per outcome",
        "",
        f"{'layer':<10} {'I(X;T) estimate':<40} {'rank start (n)':>18} "
        f"{'I(X;T) start (n)':>18} {'I rel. drop':>12} {'spearman (n)':>16}  order",
    ]
    for layer, entry in report["mean_std"]["layers"].items():
        for name, stats in entry.items():
            if not name.startswith(f"{rank_column} vs "):
                continue
            estimate = name.split(" vs ", 1)[1].removeprefix("information/")
            rank_start = stats.get("rank_drop_start_step")
            info_start = stats.get("information_drop_start_step")
            rho = stats.get("spearman")
            orders = report["orders"].get(layer, {}).get(name, {})
            lines.append(
                f"{layer:<10} {estimate:<40} "
                f"{_fmt(rank_start) + ' (' + str((rank_start or {}).get('count', 0)) + ')':>18} "
                f"{_fmt(info_start) + ' (' + str((info_start or {}).get('count', 0)) + ')':>18} "
                f"{_fmt(stats.get('information_relative_drop'), 2):>12} "
                f"{_fmt(rho, 2) + ' (' + str((rho or {}).get('count', 0)) + ')':>16}  "
                + ", ".join(f"{k} {v}" for k, v in sorted(orders.items()))
            )
    return "\n".join(lines) + "\n"


def plot_planes(trace: pd.DataFrame, ranks: pd.DataFrame, folder, config: DynamicsConfig,
                title: str) -> list[str]:
    """`information_plane_sigma=<sigma>.png` per sigma in `folder` (seed means
    when `trace` has a `seed` column); returns the file names."""
    from keras_localrank.plotting import plot_information_plane

    files = []
    for s in config.information_sigmas:
        name = f"information_plane_sigma={s:g}.png"
        plot_information_plane(
            trace,
            os.path.join(folder, name),
            ixt=f"kl_upper@sigma={s:g}",
            ity=f"kl@sigma={s:g}",
            ranks=ranks[ranks["kind"] == names.ROBUST] if config.atols else ranks,
            rank_kind=names.ROBUST if config.atols else names.EXACT,
            title=f"{title}; sigma = {s:g}",
        )
        files.append(name)
    return files
