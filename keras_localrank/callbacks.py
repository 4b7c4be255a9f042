"""`LocalRankCallback`: local rank per layer while `model.fit` runs.

A thin adapter over `LocalRankEstimator`: the estimator (and its traced
measurement function) is built once in `on_train_begin`; each scheduled
measurement is one call on a fixed, pre-validated probe set.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_localrank import information as info
from keras_localrank import names
from keras_localrank.estimate import LocalRankEstimator, input_shape_hint
from keras_localrank.memory import DEFAULT_MEMORY_BUDGET
from keras_localrank.inputs import as_samples
from keras_localrank.io import read_rows, write_rows
from keras_localrank.scheduled import ScheduledCallback
from keras_localrank.spectra import Tolerance
from keras_localrank.validation import check_finite_float

__all__ = [
    "LocalRankCallback",
    "DEFAULT_MAX_SAMPLES",
    "INFORMATION_COLUMNS",
    "INFORMATION_KIND",
    "is_chief",
]

#: Probe-set cap: enough for a standard error of ~0.1-0.5 rank on typical
#: layers, while one measurement of five 200-unit layers stays near the cost
#: of one epoch on 10,000 MNIST digits (2-core CPU).
DEFAULT_MAX_SAMPLES = 256

TRACE_COLUMNS = [
    "step", "epoch", "layer", "kind", "atol", "mean", "std", "stderr", "min", "max",
    "effective_rank", "stable_rank", "seconds",
]
#: Trace columns added by `active_units=True` (NaN on layers without them).
ACTIVE_TRACE_COLUMNS = ["active_units", "dead_units", "rank_bound", "rank_deficit"]
#: Extra trace columns with `information=`: the rows of kind
#: `INFORMATION_KIND` carry the estimator and its `sigma` (NaN on rank rows).
INFORMATION_COLUMNS = ["estimator", "sigma"]
#: The trace `kind` of the local Gaussian-channel rows.
INFORMATION_KIND = "information"


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes a run's files under `strategy`.

    False only on the non-chief workers of a multi-worker strategy
    (`tf.distribute.MultiWorkerMirroredStrategy`), as TensorFlow's own
    `strategy.extended.should_save_summary` says; every worker still trains
    and measures (the measurement runs on all replicas), but only the chief
    writes. Add `keras.callbacks.CSVLogger`, `TensorBoard` and checkpoints
    only `if is_chief(strategy)`; `LocalRankCallback` checks it itself.

    Args:
        strategy: the model's strategy. Default None: the current one.
    """
    strategy = strategy or tf.distribute.get_strategy()
    return bool(getattr(strategy.extended, "should_save_summary", True))


def _information_sigmas(sigma) -> tuple[float, ...]:
    if sigma is None:
        return ()
    return info._check_sigmas(sigma)


def _atols(atol) -> tuple[float, ...]:
    if atol is None:
        return ()
    values = list(atol) if isinstance(atol, (list, tuple)) else [atol]
    return tuple(check_finite_float("atol", v, low=0.0) for v in values)


class LocalRankCallback(ScheduledCallback):
    """Measures local rank of chosen layers on a fixed probe set during `fit`.

    Results go into the Keras `logs` as Python floats under
    `local_rank/<layer>` (exact rank) and `robust_local_rank/<layer>` (robust
    rank at `atol`; with several `atol` values,
    `robust_local_rank@<atol>/<layer>`; see `keras_localrank.names`), so
    `History`, the progress bar, `CSVLogger` and `TensorBoard` show them with
    no extra code. **Order:** put this callback *before* `CSVLogger` and
    `TensorBoard` in `callbacks=[...]` (Keras calls callbacks in list order;
    `History` and the progress bar are appended after yours automatically).

    Every epoch's logs carry the most recent measurement (NaN before the
    first), since `CSVLogger` needs the same keys in every row; the exact
    history of measurements, with their steps, is in `trace` / `trace_path`
    and the callback's own TensorBoard output.

    Steps are the optimizer's global step (`model.optimizer.iterations`; see
    `keras_localrank.scheduled`): they continue across `fit` calls, a step
    schedule fires when a scheduled step is crossed (with
    `steps_per_execution=k` Keras checks only every `k` steps, and the
    measurement is taken, and recorded, at the first check at or after the
    scheduled step), and a run resumed by `keras.callbacks.BackupAndRestore`
    drops trace rows past the step it resumes from.

    Args:
        x: probe inputs: NumPy array, tensor or `tf.data.Dataset` of `x` or
            `(x, y)`; the first `max_samples` are used. For a model with
            several inputs, or with `wrt` naming an intermediate tensor (e.g.
            token ids into an `Embedding`), a list or dict of every model
            input, as for `local_rank` (checked against the model at the
            start of training).
        layers: layer names/objects to measure. Default None: all measurable.
        atol: None, a float or a list of floats: also log robust local rank
            at these thresholds (the paper's `rank_eps`). Default None.
        exact: log the exact (numpy-rule) local rank. Default True.
        schedule: `"epoch"` (default: end of every epoch), `"log"` (~50
            log-spaced steps over the run), or a `schedules.EpochSchedule(n)`,
            `schedules.StepSchedule(n)`, `schedules.LogSchedule(num, total)`.
        max_samples: probe-set cap. Default `DEFAULT_MAX_SAMPLES` (256).
        max_overhead: None (default) or a fraction such as 0.1: skip a
            scheduled measurement when measuring so far plus the expected cost
            of this one would exceed that fraction of the training time. The
            count of skipped measurements is logged as `local_rank/skipped`.
        log_dir: write this callback's own TensorBoard scalars (per layer) and
            histograms of per-sample ranks here, at the global step. Default None.
        histograms: with `log_dir`, also write histograms. Default True.
        trace_path: `.csv` or `.json` file rewritten atomically after every
            measurement with every measurement so far (step, epoch, layer,
            rank `kind` "exact"/"robust", atol, mean, std, stderr, min, max,
            effective and stable rank). An existing trace is continued
            (resumed runs); its rows past the current optimizer step are
            dropped. Default None.
        measure_on_train_begin: also measure once before the first step of
            each `fit` (trace and TensorBoard only; it is not an epoch), at
            the current optimizer step, unless that step is already in the
            trace. Default False.
        active_units: also log the unit activity of every layer on a Dense
            chain fed by the input (see `keras_localrank.active_units`):
            `active_units/<layer>` (mean active units per probe input),
            `dead_units/<layer>` (units inactive on every probe input),
            `rank_bound/<layer>` (mean active-unit bound on the rank) and the
            rank deficit `bound - rank` per rank kind,
            `rank_deficit/<layer>` and `robust_rank_deficit[@<atol>]/<layer>`;
            the trace gains the columns `active_units`, `dead_units`,
            `rank_bound`, `rank_deficit`, and TensorBoard the same scalars.
            Default False.
        information: None (default), a float or a list of floats `sigma` > 0:
            also log the local Gaussian-channel information
            `E_x[1/2 sum_i log(1 + s_i(x)^2 / sigma^2)]` (nats) of every
            layer at each `sigma`, computed from the singular values the rank
            measurement already has (the estimator's `spectral_stats`), so at
            no extra Jacobian cost. Keys
            `information/gaussian_channel@sigma=<sigma>/<layer>`
            (`names.information_key`); trace rows of kind `"information"`
            with `estimator` and `sigma` columns, the per-sample statistics
            in `mean`..`max`. NaN on layers measured by the randomized method
            (no full spectrum). See `keras_localrank.information`.
        batch_size, method, dtype, jit_compile, wrt, memory_budget: passed to
            `LocalRankEstimator`, as in `local_rank` (`wrt`: the model input,
            or a layer whose output is, differentiated; `memory_budget`: bytes
            one measurement may hold, default 2 GiB).
        spectrum: False counts the ranks of exactly measured layers without
            their singular values (identical ranks, faster on large
            convnets; their effective rank is then NaN in the trace, and
            `information` is not allowed). Default True. See
            `LocalRankEstimator`.
        verbose: 0 (silent, default) or 1 (one line per measurement or skip).

    Under a multi-worker strategy every worker measures (the measurement runs
    on all replicas) and keeps `trace` in memory, but only the chief
    (`is_chief`) writes `trace_path` and `log_dir`.

    Raises:
        ValueError: empty probe set, NaN/Inf in it, bad `atol`, bad
            `max_overhead`, nothing to log; at `on_train_begin`: unknown layer
            names, probe shape that does not fit the model, a schedule that
            never fires in this run.
        TypeError: non-float probes, a bad `schedule`.

    Example:
        >>> cb = LocalRankCallback(x_probe, atol=1e-2)
        >>> history = model.fit(x, y, epochs=5, callbacks=[cb])
        >>> history.history["local_rank/dense"]
    """

    def __init__(
        self,
        x,
        layers: Iterable[str | keras.layers.Layer] | None = None,
        *,
        atol: float | Sequence[float] | None = None,
        exact: bool = True,
        schedule="epoch",
        max_samples: int = DEFAULT_MAX_SAMPLES,
        max_overhead: float | None = None,
        log_dir: str | os.PathLike | None = None,
        histograms: bool = True,
        trace_path: str | os.PathLike | None = None,
        measure_on_train_begin: bool = False,
        batch_size: int | None = None,
        method: str = "auto",
        dtype: str | None = None,
        jit_compile: bool = False,
        verbose: int = 0,
        active_units: bool = False,
        information: float | Sequence[float] | None = None,
        wrt: int | str | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        spectrum: bool = True,
    ):
        super().__init__(schedule, measure_on_train_begin=measure_on_train_begin)
        if wrt is None and not isinstance(x, (list, tuple, dict)):
            self._x = as_samples(x, input_shape=None, max_samples=max_samples)
        else:  # several inputs or an intermediate `wrt`: checked with the model
            self._x = x
        self._max_samples = max_samples
        self.layers = None if layers is None else list(
            [layers] if isinstance(layers, (str, keras.layers.Layer)) else layers
        )
        self.atols = _atols(atol)
        self.exact = bool(exact)
        self.information_sigmas = _information_sigmas(information)
        self._channel_stats = [info.gaussian_channel_stat(s) for s in self.information_sigmas]
        if not self.exact and not self.atols:
            raise ValueError("Nothing to log: exact=False and no `atol` given.")
        if not isinstance(spectrum, bool):
            raise TypeError(f"Expected `spectrum` to be a bool. Received: spectrum={spectrum!r}")
        if not spectrum and self.information_sigmas:
            raise ValueError(
                "`information` needs the singular values: pass spectrum=True. Received: "
                f"spectrum=False, information={list(self.information_sigmas)}"
            )
        self.max_overhead = None if max_overhead is None else check_finite_float(
            "max_overhead", max_overhead, low=0.0, low_open=True
        )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.histograms = histograms
        self.trace_path = None if trace_path is None else os.fspath(trace_path)
        if self.trace_path and not self.trace_path.endswith((".csv", ".json")):
            raise ValueError(
                f"Expected `trace_path` ending in .csv or .json. Received: {self.trace_path!r}"
            )
        self._estimator_kwargs = dict(
            batch_size=batch_size, method=method, dtype=dtype, jit_compile=jit_compile,
            wrt=wrt, memory_budget=memory_budget, spectrum=spectrum,
        )
        self.verbose = verbose
        if not isinstance(active_units, bool):
            raise TypeError(
                f"Expected `active_units` to be a bool. Received: active_units={active_units!r}"
            )
        self.active_units = active_units
        self._estimator: LocalRankEstimator | None = None
        self._estimator_model = None
        self._writer = None
        self._chief = True
        self.trace: list[dict] = []

    # -- keys -------------------------------------------------------------------

    def _tolerances(self) -> list[tuple[str, str, Tolerance]]:
        """(kind, key prefix, tolerance) for every rank kind logged."""
        kinds = [(names.EXACT, names.rank_column(names.EXACT), Tolerance())] if self.exact else []
        qualify = len(self.atols) > 1
        for a in self.atols:
            prefix = names.rank_column(names.ROBUST, a, qualify=qualify)
            kinds.append((names.ROBUST, prefix, Tolerance(atol=a)))
        return kinds

    @property
    def keys(self) -> list[str]:
        """The `logs` keys this callback writes."""
        layer_names = (
            [info.name for info in self._estimator.layer_infos] if self._estimator else []
        )
        keys = [f"{p}/{n}" for _, p, _ in self._tolerances() for n in layer_names]
        keys += self._unit_keys()
        keys += [
            names.information_key(n, info.IXT, stat.__name__)
            for stat in self._channel_stats
            for n in layer_names
        ]
        return keys + (["local_rank/skipped"] if self.max_overhead is not None else [])

    def _deficit_prefix(self, kind, tol) -> str:
        return names.deficit_column(kind, tol.atol, qualify=len(self.atols) > 1)

    def _unit_keys(self) -> list[str]:
        """The unit-activity keys (`active_units=True`), in layer order."""
        if not self.active_units or self._estimator is None:
            return []
        layers = self._estimator.active_layers
        keys = [f"{column}/{n}" for column in names.UNIT_COLUMNS for n in layers]
        return keys + [
            f"{self._deficit_prefix(kind, tol)}/{n}"
            for kind, _, tol in self._tolerances()
            for n in layers
        ]

    # -- Keras hooks ------------------------------------------------------------

    def on_train_begin(self, logs=None):
        if self._estimator is None or self._estimator_model is not self.model:
            self._estimator = LocalRankEstimator(
                self.model,
                self.layers,
                tolerances=[t for _, _, t in self._tolerances()],
                count_active=self.active_units,
                spectral_stats={stat.__name__: stat for stat in self._channel_stats} or None,
                input_shape=input_shape_hint(self.model, self._x),
                **self._estimator_kwargs,
            )
            self._estimator_model = self.model
            self._probe = self._estimator.check_samples(self._x, max_samples=self._max_samples)
        self._latest = {key: math.nan for key in self.keys}
        self._measured_seconds = 0.0
        self._last_cost = 0.0
        self._train_start = time.perf_counter()
        self.skipped = 0
        self.trace = self._load_trace()
        self._chief = is_chief(getattr(self.model, "distribute_strategy", None))
        if self.log_dir and self._writer is None and self._chief:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        self.measurements = 0
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if logs is not None:
            logs.update(self._latest)
            if self.max_overhead is not None:
                logs["local_rank/skipped"] = float(self.skipped)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    # -- ScheduledCallback hooks ----------------------------------------------------

    def on_scheduled_step(self, step, epoch, *, initial=False):
        if not initial and self.max_overhead is not None:
            elapsed = time.perf_counter() - self._train_start
            training = elapsed - self._measured_seconds
            if self._measured_seconds + self._last_cost > self.max_overhead * training:
                self.skipped += 1
                if self.verbose:
                    print(
                        f"\nLocalRankCallback: skipped the measurement at step {step} "
                        f"(measuring has cost {self._measured_seconds:.1f} s of "
                        f"{training:.1f} s training; max_overhead={self.max_overhead})"
                    )
                return
        self._measure(step=step, epoch=epoch)

    def recorded_steps(self):
        return [row["step"] for row in self.trace]

    def discard_after(self, step):
        kept = [row for row in self.trace if row["step"] <= step]
        if len(kept) != len(self.trace):
            self.trace = kept
            if self.trace_path and self._chief:
                self._save_trace()

    # -- measuring ------------------------------------------------------------------

    def _measure(self, *, step: int, epoch: int):
        start = time.perf_counter()
        results = self._estimator.measure(self._probe)
        seconds = time.perf_counter() - start
        self._measured_seconds += seconds
        self._last_cost = seconds
        self.measurements += 1
        active = self._estimator.active_layers if self.active_units else []
        for i, ((kind, prefix, tol), result) in enumerate(zip(self._tolerances(), results)):
            stats = result.to_frame().set_index("layer")
            deficit = self._deficit_prefix(kind, tol)
            for name in result.layer_names:
                row = stats.loc[name]
                self._latest[f"{prefix}/{name}"] = float(row["mean"])
                units = (
                    {c: float(row[c]) for c in ACTIVE_TRACE_COLUMNS} if self.active_units else {}
                )
                if name in active:
                    for column in names.UNIT_COLUMNS:
                        self._latest[f"{column}/{name}"] = units[column]
                    self._latest[f"{deficit}/{name}"] = units["rank_deficit"]
                self.trace.append(
                    {
                        "step": step, "epoch": epoch, "layer": name,
                        "kind": kind, "atol": tol.atol,
                        **{c: float(row[c]) for c in TRACE_COLUMNS[5:-1]},
                        "seconds": seconds,
                        **units,
                    }
                )
            self._write_tensorboard(prefix, result, step)
            if active and self._writer is not None:
                self._write_unit_scalars(deficit, result, active, step, first=i == 0)
        if self._channel_stats:
            self._record_information(results[0], step=step, epoch=epoch, seconds=seconds)
        if self.trace_path and self._chief:  # under a multi-worker strategy
            self._save_trace()
        if self.verbose:
            means = ", ".join(f"{k}={v:.2f}" for k, v in self._latest.items()
                              if k != "local_rank/skipped")
            print(f"\nLocalRankCallback step {step}: {means} ({seconds:.2f} s)")

    def _record_information(self, result, *, step, epoch, seconds):
        """Logs, trace rows and TensorBoard scalars of the Gaussian-channel stats."""
        for stat in self._channel_stats:
            per_layer = result.stats[stat.__name__]
            for name in result.layer_names:
                values = np.asarray(per_layer[name], np.float64)
                key = names.information_key(name, info.IXT, stat.__name__)
                mean = float(values.mean())
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                self._latest[key] = mean
                self.trace.append(
                    {
                        "step": step, "epoch": epoch, "layer": name,
                        "kind": INFORMATION_KIND, "atol": None, "mean": mean, "std": std,
                        "stderr": std / math.sqrt(values.size), "min": float(values.min()),
                        "max": float(values.max()), "effective_rank": math.nan,
                        "stable_rank": math.nan, "seconds": seconds,
                        "estimator": "gaussian_channel", "sigma": stat.sigma,
                    }
                )
                if self._writer is not None:
                    with self._writer.as_default(step=step):
                        tf.summary.scalar(key, mean)

    @property
    def trace_columns(self) -> list[str]:
        """The trace's columns: `TRACE_COLUMNS`, plus `ACTIVE_TRACE_COLUMNS`
        with `active_units=True` and `INFORMATION_COLUMNS` with `information=`."""
        return (
            TRACE_COLUMNS
            + (ACTIVE_TRACE_COLUMNS if self.active_units else [])
            + (INFORMATION_COLUMNS if self._channel_stats else [])
        )

    def _write_tensorboard(self, prefix, result, step):
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name in result.layer_names:
                tf.summary.scalar(f"{prefix}/{name}", result.mean[name])
                if self.histograms:
                    tf.summary.histogram(
                        f"{prefix}_per_sample/{name}", result.per_sample[name].astype(np.float32)
                    )

    def _write_unit_scalars(self, deficit, result, layers, step, *, first):
        with self._writer.as_default(step=step):
            for name in layers:
                if first:  # the same for every rank kind: written once
                    tf.summary.scalar(f"{names.ACTIVE_UNITS}/{name}", result.active_units[name])
                    tf.summary.scalar(f"{names.DEAD_UNITS}/{name}", result.dead_units[name])
                    tf.summary.scalar(f"{names.RANK_BOUND}/{name}", result.rank_bound[name])
                tf.summary.scalar(f"{deficit}/{name}", result.rank_deficit[name])

    # -- the trace ------------------------------------------------------------------

    def trace_frame(self) -> pd.DataFrame:
        """Every measurement so far, one row per (step, layer, rank kind), and
        with `information=` one per (step, layer, sigma) of kind "information"."""
        return pd.DataFrame(self.trace, columns=self.trace_columns)

    def _save_trace(self):
        write_rows(self.trace_path, self.trace, self.trace_columns)

    def _load_trace(self) -> list[dict]:
        rows = read_rows(self.trace_path) if self.trace_path else None
        return list(self.trace) if rows is None else rows
