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

__all__ = [
    "COMPRESSION_PHASE_DEFINITION",
    "SHARP_DEFINITION",
    "aggregate_summaries",
    "compare_compression",
    "spearman",
    "detect_transitions",
    "find_transitions",
    "refine_grid",
    "summarize_curve",
]

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


COMPRESSION_PHASE_DEFINITION = (
    "the measured steps from the earlier of the two drop starts (rank, information) "
    "to the last step; None when neither curve drops"
)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two curves (ties get their average rank).

    Pairs with a NaN are left out. NaN when fewer than 3 pairs remain or
    either curve is constant on them.

    Args:
        a, b: the two curves, same length.

    Returns:
        The Pearson correlation of the two rank vectors, in [-1, 1], or NaN.

    Raises:
        ValueError: lengths that differ.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"Expected two curves of the same length. Received shapes {a.shape}, {b.shape}"
        )
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size < 3:
        return math.nan
    ra = pd.Series(a).rank(method="average").to_numpy()
    rb = pd.Series(b).rank(method="average").to_numpy()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denominator) if denominator > 0 else math.nan


def compare_compression(
    steps: Sequence[int],
    rank: Sequence[float],
    information: Sequence[float],
    *,
    drop_tolerance: float = 0.1,
    min_relative_drop: float = 0.05,
) -> dict:
    """Whether and when an information curve compresses relative to a rank curve.

    Both drop starts use `summarize_curve` with the same settings (see "When
    the drop starts" above), so they are directly comparable. The
    compression phase is `COMPRESSION_PHASE_DEFINITION`; the Spearman
    correlation of the two curves is taken over it (positive: they fall
    together).

    Args:
        steps: measurement steps, increasing.
        rank: the local-rank curve at those steps.
        information: the `I(X;T)` curve at those steps.
        drop_tolerance, min_relative_drop: as in `summarize_curve`.

    Returns:
        A dict with `rank_drop_start_step` and `information_drop_start_step`
        (None: no drop), `lead_steps` (rank start minus information start:
        > 0 when information compresses first; None unless both drop),
        `order` (`"information_first"`, `"rank_first"`, `"same_step"`,
        `"only_information"`, `"only_rank"` or `"neither"`),
        `rank_relative_drop`, `information_relative_drop`,
        `information_drop` (peak minus final), `phase_start_step`,
        `phase_points` and `spearman` (None without a phase, with fewer
        than 3 points in it, or with a curve constant on it).

    Raises:
        ValueError: lengths that differ, or a curve with no finite value.
    """
    steps = np.asarray(steps, dtype=np.int64)
    rank = np.asarray(rank, dtype=np.float64)
    information = np.asarray(information, dtype=np.float64)
    if not steps.shape == rank.shape == information.shape:
        raise ValueError(
            "Expected steps and both curves of the same length. Received: "
            f"{steps.shape}, {rank.shape}, {information.shape}"
        )
    settings = dict(drop_tolerance=drop_tolerance, min_relative_drop=min_relative_drop)
    r = summarize_curve(steps, rank, **settings)
    i = summarize_curve(steps, information, **settings)
    rs, is_ = r["drop_start_step"], i["drop_start_step"]
    if rs is not None and is_ is not None:
        order = (
            "information_first" if is_ < rs else "rank_first" if rs < is_ else "same_step"
        )
    else:
        order = {(True, False): "only_information", (False, True): "only_rank"}.get(
            (is_ is not None, rs is not None), "neither"
        )
    starts = [s for s in (rs, is_) if s is not None]
    phase_start = min(starts) if starts else None
    rho = None
    points = 0
    if phase_start is not None:
        phase = steps >= phase_start
        points = int(phase.sum())
        rho = spearman(rank[phase], information[phase])
        rho = None if math.isnan(rho) else rho  # JSON-safe, left out of seed means
    return dict(
        rank_drop_start_step=rs,
        information_drop_start_step=is_,
        lead_steps=None if rs is None or is_ is None else int(rs - is_),
        order=order,
        rank_relative_drop=r["relative_drop"],
        information_relative_drop=i["relative_drop"],
        information_drop=i["drop"],
        phase_start_step=phase_start,
        phase_points=points,
        spearman=rho,
    )


def aggregate_summaries(summaries: dict) -> dict:
    """Mean and std across runs of every number in nested per-run summary dicts.

    The std is the sample standard deviation (ddof=1; 0 with one run), as
    everywhere else in this module and in the docs' tables (it was the
    population std, which read 3.8 where the docs said 4.7 for three seeds).

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
            std=float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0 if numbers else None,
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


#: When `detect_transitions` calls a transition sharp.
SHARP_DEFINITION = (
    "sharp: the steepest drop of the seed-mean curve happens within one grid step "
    "no wider than `max_step_decades` (default 1/8 decade), the drop exceeds "
    "`k` (default 3) pooled seed standard deviations, and it is at least "
    "`min_concentration` (default 1/2) of the change over the decade centred on "
    "that step (a curve falling evenly in log beta puts about 1/8 of a decade's "
    "change into one 1/8-decade step)"
)


def _seed_matrix(frame: pd.DataFrame, column: str, by: str, seed: str):
    """Grid values, and a (seeds, grid) matrix of `column` (NaN where missing)."""
    table = frame.pivot_table(index=seed, columns=by, values=column, aggfunc="mean")
    table = table.reindex(sorted(table.columns), axis=1)
    return table.columns.to_numpy(float), table.to_numpy(float)


def _log_grid(grid: np.ndarray) -> np.ndarray:
    if (grid <= 0).any():
        raise ValueError(
            "Expected a grid of values > 0 for transitions in log scale. "
            f"Received: {grid[grid <= 0].tolist()}"
        )
    return np.log10(grid)


def _window_change(log_grid: np.ndarray, means: np.ndarray, i: int, half: float) -> float:
    """The change of `means` across the window `mid(i) +- half` decades (nearest points)."""
    mid = 0.5 * (log_grid[i] + log_grid[i + 1])
    lo = int(np.argmin(np.abs(log_grid - (mid - half))))
    hi = int(np.argmin(np.abs(log_grid - (mid + half))))
    lo, hi = min(lo, i), max(hi, i + 1)
    return float(means[hi] - means[lo])


def detect_transitions(
    frame: pd.DataFrame,
    column: str,
    *,
    by: str = "beta",
    seed: str = "seed",
    top: int = 2,
    direction: str = "down",
    k: float = 3.0,
    max_step_decades: float = 0.125,
    min_concentration: float = 0.5,
    window_decades: float = 1.0,
    num_bootstrap: int = 2000,
    confidence: float = 0.9,
    random_seed: int = 0,
) -> dict:
    """Transitions of a per-seed curve against log10 of the grid, with a
    bootstrap over seeds and a stated sharpness criterion.

    The seed-mean curve `m_i` is taken at each grid value `b_i`; a transition
    is a grid step `(b_i, b_{i+1})` with one of the `top` steepest drops
    `(m_i - m_{i+1}) / (log10 b_{i+1} - log10 b_i)` (rises with
    `direction="up"`; on a grid refined in places, a wide coarse step is not
    preferred for being wide), whose `jump` is `m_i - m_{i+1}`; steps closer than
    `window_decades / 2` to a larger one being skipped. Its location is the
    step's midpoint in log10 (`log10_mid`). For each transition, seeds are
    resampled with replacement `num_bootstrap` times (whole curves, so the
    pairing across the grid is kept); in each resample the steepest drop
    within `window_decades / 2` of the point estimate gives a location and a
    jump, whose `confidence` percentile intervals are reported
    (`log10_interval`: from the lower edge of the low-percentile step to the
    upper edge of the high-percentile step, so it covers whole grid steps;
    `jump_interval`), with `location_support`, the
    fraction of resamples picking the same step. With 2-3 seeds the bootstrap
    has few distinct resamples: the interval is then a spread, not a
    calibrated confidence interval. See `SHARP_DEFINITION` for `sharp`.

    Args:
        frame: one row per (grid value, seed).
        column: the curve.
        by: the grid column (values > 0). Default "beta".
        seed: the repeat column. Default "seed".
        top: transitions returned, largest first. Default 2.
        direction: `"down"` (drops) or `"up"` (rises). Default "down".
        k: a sharp jump exceeds `k` pooled seed standard deviations. Default 3.
        max_step_decades: widest grid step of a sharp transition. Default 1/8.
        min_concentration: smallest share of the change over the decade
            (`window_decades`) around the step that a sharp jump must carry.
            Default 0.5.
        window_decades: the window of `concentration` and of the bootstrap
            search. Default 1.
        num_bootstrap: resamples. Default 2000.
        confidence: the interval level. Default 0.9.
        random_seed: the bootstrap's seed. Default 0.

    Returns:
        `{"column", "direction", "grid": [...], "mean": [...], "std": [...]
        (over seeds, ddof=1; 0 with one seed), "num_seeds", "criterion",
        "transitions": [{"<by>_low", "<by>_high", "log10_mid",
        "step_decades", "jump", "noise", "jump_over_noise",
        "window_change", "concentration", "log10_interval",
        "jump_interval", "location_support", "sharp"}, ...]}`.

    Raises:
        ValueError: fewer than 2 grid values, a grid value <= 0, a bad
            `direction`, or bad numeric settings.
    """
    from keras_localrank.validation import (
        check_choice,
        check_finite_float,
        check_fraction,
        check_positive_int,
    )

    check_choice("direction", direction, ("down", "up"))
    check_positive_int("top", top)
    check_positive_int("num_bootstrap", num_bootstrap)
    k = check_finite_float("k", k, low=0.0)
    max_step_decades = check_finite_float(
        "max_step_decades", max_step_decades, low=0.0, low_open=True
    )
    window_decades = check_finite_float("window_decades", window_decades, low=0.0, low_open=True)
    min_concentration = check_fraction("min_concentration", min_concentration)
    confidence = check_fraction("confidence", confidence)
    grid, values = _seed_matrix(frame, column, by, seed)
    if grid.size < 2:
        raise ValueError(f"Expected at least 2 values of `{by}`. Received: {grid.tolist()}")
    log_grid = _log_grid(grid)
    sign = 1.0 if direction == "down" else -1.0
    means = np.nanmean(values, axis=0)
    n_seeds = values.shape[0]
    stds = np.nanstd(values, axis=0, ddof=1) if n_seeds > 1 else np.zeros_like(means)
    drops = sign * (means[:-1] - means[1:])
    mids = 0.5 * (log_grid[:-1] + log_grid[1:])
    widths = np.diff(log_grid)
    steepness = drops / widths  # per decade: a wide coarse step is not favoured
    half = window_decades / 2
    chosen = []
    for i in np.argsort(-steepness, kind="stable"):
        if drops[i] <= 0 or len(chosen) == top:
            break
        if all(abs(mids[i] - mids[j]) >= half for j in chosen):
            chosen.append(int(i))
    rng = np.random.default_rng(random_seed)
    picks = rng.integers(0, n_seeds, size=(num_bootstrap, n_seeds))
    boot_means = np.stack([np.nanmean(values[p], axis=0) for p in picks])
    boot_drops = sign * (boot_means[:, :-1] - boot_means[:, 1:])
    boot_steep = boot_drops / widths
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    transitions = []
    for i in chosen:
        near = np.abs(mids - mids[i]) < half
        masked = np.where(near[None, :], boot_steep, -np.inf)
        where = np.argmax(masked, axis=1)
        jumps = boot_drops[np.arange(num_bootstrap), where]
        noise = float(np.sqrt(0.5 * (stds[i] ** 2 + stds[i + 1] ** 2)))
        jump = float(drops[i])
        window = -sign * _window_change(log_grid, means, i, half)  # a drop is > 0
        concentration = min(jump / window, 1.0) if window > 0 else 1.0
        step = float(log_grid[i + 1] - log_grid[i])
        ratio = jump / noise if noise > 0 else math.inf
        sharp = bool(
            step <= max_step_decades * (1 + 1e-6)
            and ratio > k
            and concentration >= min_concentration
        )
        transitions.append(
            {
                f"{by}_low": float(grid[i]),
                f"{by}_high": float(grid[i + 1]),
                "log10_mid": float(mids[i]),
                "step_decades": step,
                "jump": jump,
                "noise": noise,
                "jump_over_noise": float(ratio),
                "window_change": float(window),
                "concentration": float(concentration),
                "log10_interval": [
                    float(np.percentile(log_grid[where], q[0])),
                    float(np.percentile(log_grid[where + 1], q[1])),
                ],
                "jump_interval": [float(v) for v in np.percentile(jumps, q)],
                "location_support": float(np.mean(where == i)),
                "sharp": sharp,
            }
        )
    return {
        "column": column,
        "direction": direction,
        "grid": grid.tolist(),
        "mean": means.tolist(),
        "std": stds.tolist(),
        "num_seeds": int(n_seeds),
        "criterion": SHARP_DEFINITION,
        "transitions": transitions,
    }


def refine_grid(
    grid: Sequence[float],
    centres: Sequence[tuple[float, float]],
    *,
    per_decade: int = 8,
    pad_steps: int = 1,
) -> tuple[float, ...]:
    """A log grid with at least `per_decade` points per decade around transitions.

    Each centre `(low, high)` is a step of the coarse `grid`; the interval is
    widened by `pad_steps` coarse steps on each side and filled with
    log-spaced points no more than `1 / per_decade` decades apart (ends
    included). The result is the union with `grid`, sorted, rounded to 6
    significant digits.

    Args:
        grid: the coarse grid (values > 0).
        centres: `(low, high)` grid steps to refine.
        per_decade: points per decade in the refined intervals. Default 8.
        pad_steps: coarse steps added on each side. Default 1.

    Raises:
        ValueError: a value <= 0, `per_decade < 1`, `pad_steps < 0`.
    """
    from keras_localrank.validation import check_int, check_positive_int

    check_positive_int("per_decade", per_decade)
    check_int("pad_steps", pad_steps, minimum=0)
    coarse = np.array(sorted(set(float(b) for b in grid)), float)
    log_coarse = _log_grid(coarse)
    points = set(coarse.tolist())
    for low, high in centres:
        i = int(np.argmin(np.abs(log_coarse - math.log10(low))))
        j = int(np.argmin(np.abs(log_coarse - math.log10(high))))
        a = log_coarse[max(min(i, j) - pad_steps, 0)]
        b = log_coarse[min(max(i, j) + pad_steps, len(coarse) - 1)]
        # (grid values carry 6 digits: allow that rounding before adding a step)
        count = max(int(math.ceil((b - a) * per_decade - 1e-4)), 1) + 1
        points.update((10.0 ** np.linspace(a, b, count)).tolist())
    return tuple(sorted({float(f"{p:.6g}") for p in points}))
