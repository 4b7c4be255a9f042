"""Training dynamics of local rank: train an MLP, measure every hidden layer.

`train_and_evaluate(config, workdir)` is what `experiments/gaussian_mlp.py`
and `experiments/mnist_mlp.py` call; tests call it with a tiny config. It
trains one MLP per seed with AdamW (decoupled weight decay on kernels only),
measures exact and robust local rank of every hidden layer at log-spaced
optimizer steps together with train/test loss and accuracy, and writes

    workdir/config.json                 the resolved config
    workdir/manifest.json               which outputs are complete
    workdir/seed=<s>/                   one sub-run per seed:
        config.json                     what this run depends on
        trace.csv                       every rank measurement (LocalRankCallback)
        metrics.csv                     train/test loss and accuracy at the same steps
        measurements.csv, .json         one row per (step, layer): local_rank,
                                        robust_local_rank@<eps> per eps, loss, accuracy
        history.csv                     Keras per-epoch logs (CSVLogger)
        tensorboard/                    Keras TensorBoard + per-layer rank scalars
        dynamics.png                    rank per layer vs step, loss, accuracy
        dead_units.png                  rank, active-unit bound and their gap per layer
        summary.json                    per layer: peak, final, drop, drop start;
                                        dead units vs low-rank structure (verdicts)
        checkpoints/, state.json        the resume state
        complete.json                   written last: the run is finished
    workdir/measurements.csv            all seeds
    workdir/dynamics.png                mean over seeds with a +-1 std band
    workdir/dead_units.png              rank, bound and gap, mean over seeds
    workdir/summary.json                per seed and mean/std across seeds; the
                                        dead-unit verdicts of the seed means

With `information=True` (the default) every seed also records `I(X;T)` and
`I(T;Y)` of every hidden layer at the same steps (`information.csv`, and the
local Gaussian channel as rows of kind "information" in `trace.csv`), and the
run writes information planes and `information_report.json`/`.txt`; see
`keras_localrank.studies.information_study`.

The folder is a `keras_localrank.rundir.RunDirectory`: a second process on the
same `workdir` is refused while the first runs, and a rerun with a different
config is refused before anything is written. A rerun may add seeds or change
the summary-only settings (`drop_tolerance`, `min_relative_drop`,
`fit_accuracy`).

Resuming: a checkpoint (model and optimizer state, as a `.keras` file written
atomically) is taken every `checkpoint_every` epochs. Started again with the
same `workdir`, a run continues from its last checkpoint with `initial_epoch`;
measurements taken after that checkpoint are dropped from the trace before
training resumes, so they are redone once, never duplicated. The data order of
every epoch is a stateless function of `(seed, epoch)`, so a resumed run
follows the same trajectory as an uninterrupted one. Finished runs are not
retrained.

The drop of a curve and when it starts are defined in `keras_localrank.curves`.
Every measurement also records the unit activity of each layer
(`active_units`, `dead_units`, `rank_bound` and a `rank_deficit` per rank
column, see `keras_localrank.active_units`); the summaries split each drop
into dead units and low-rank structure (`keras_localrank.studies.dead_units`).

References:
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence

import keras
import pandas as pd

from keras_localrank import names
from keras_localrank import schedules as schedules_lib
from keras_localrank.callbacks import LocalRankCallback
from keras_localrank.curves import (
    DROP_START_DEFINITION,
    aggregate_summaries,
    summarize_curve,
)
from keras_localrank.executors import Executor, InProcessExecutor
from keras_localrank.rundir import RunDirectory, SubRun
from keras_localrank.studies import dead_units
from keras_localrank.studies.checkpoints import Checkpoint, read_state, restore, truncate_csv
from keras_localrank.studies.dynamics_config import (
    EXECUTION_FIELDS,
    METRIC_COLUMNS,
    PRESETS,
    SUMMARY_FIELDS,
    DynamicsConfig,
    get_preset,
    grid_steps,
    measurement_steps,
    rank_columns,
)
from keras_localrank.studies import information_study
from keras_localrank.studies.fast_loop import FastLoop
from keras_localrank.studies.mlp import (
    build_mlp,
    compile_mlp,
    epoch_batches,
    load_data,
    loss_function,
    rank_inputs,
)
from keras_localrank.studies.step_metrics import StepMetrics

__all__ = [
    "DynamicsConfig",
    "PRESETS",
    "get_preset",
    "build_mlp",
    "summarize_curve",
    "summarize_run",
    "read_measurements",
    "aggregate_summaries",
    "train_and_evaluate",
    "rank_columns",
]

log = logging.getLogger(__name__)

_LOGS = ("trace.csv", "metrics.csv", "history.csv")
_OUTPUTS = ("measurements.csv", "dynamics.png", "summary.json")


def summarize_run(frame: pd.DataFrame, config: DynamicsConfig) -> dict:
    """`summary.json` of one run from its `measurements.csv` frame.

    Returns:
        `{"layers": {layer: {rank column: summarize_curve(...)}}, "final": {...
        train/test loss and accuracy}, "fit_step": ...}`.
    """
    layers = {}
    for layer, rows in frame.groupby("layer", sort=False):
        rows = rows.sort_values("step")
        layers[layer] = {
            column: summarize_curve(
                rows["step"],
                rows[column],
                drop_tolerance=config.drop_tolerance,
                min_relative_drop=config.min_relative_drop,
            )
            for column in rank_columns(config.atols)
        }
    per_step = frame.drop_duplicates("step").sort_values("step")
    fitted = per_step[per_step["train_accuracy"] >= config.fit_accuracy]
    units = (
        {"dead_units": dead_units.verdicts(frame, rank_columns(config.atols))}
        if "rank_bound" in frame
        else {}
    )
    return dict(
        layers=layers,
        **units,
        final={c: float(per_step[c].iloc[-1]) for c in METRIC_COLUMNS},
        fit_step=int(fitted["step"].iloc[0]) if len(fitted) else None,
        steps=int(per_step["step"].iloc[-1]),
        measurements=int(len(per_step)),
    )


def _measurements(run: SubRun, config: DynamicsConfig) -> pd.DataFrame:
    return read_measurements(run.join(""), config)


def read_measurements(folder: str | os.PathLike, config: DynamicsConfig) -> pd.DataFrame:
    """One row per (step, layer) from a seed folder's `trace.csv` and
    `metrics.csv`, also while it trains (only steps present in both)."""
    trace = pd.read_csv(os.path.join(folder, "trace.csv"))
    trace = trace[trace["kind"].isin(names.RANK_KINDS)].copy()  # not the information rows
    trace["column"] = [
        names.rank_column(kind, None if kind == names.EXACT else atol)
        for kind, atol in zip(trace["kind"], trace["atol"])
    ]
    wide = trace.pivot_table(
        index=["step", "epoch", "layer"], columns="column", values="mean", sort=False
    ).reset_index()
    metrics = pd.read_csv(os.path.join(folder, "metrics.csv")).drop(columns="epoch")
    frame = wide.merge(metrics, on="step", how="inner")
    columns = ["step", "epoch", "layer", *rank_columns(config.atols), *METRIC_COLUMNS]
    units = dead_units.unit_measurements(trace)
    if units is not None:  # traces written before unit activity was recorded have none
        frame = frame.merge(units, on=["step", "layer"], how="left")
        columns += dead_units.unit_columns(rank_columns(config.atols))
    return frame[columns].sort_values(["step", "layer"], kind="stable").reset_index(drop=True)


class _Grid(schedules_lib.LogSchedule):
    """The config's measurement grid (`measurement_steps`: round or floor)."""

    def __init__(self, config: DynamicsConfig):
        self._config = config
        super().__init__(config.num_measurements, config.total_steps)

    def steps_for(self, total_steps):
        return grid_steps(total_steps, self._config.num_measurements, self._config.grid)


def _train_seed(config, data, seed: int, run: SubRun, callbacks, verbose: int) -> None:
    state = read_state(run)
    if state.get("done"):
        return
    keras.utils.set_random_seed(seed)
    model = build_mlp(
        data.x_train.shape[1],
        data.num_classes,
        config.hidden,
        activation=config.activation,
        seed=seed,
        init=config.init,
    )
    compile_mlp(model, config)
    initial_epoch = state.get("epoch", 0)
    if initial_epoch:
        restore(model, run.join("checkpoints", state["checkpoint"]))  # and its global step
        # The scheduled callbacks drop their own rows past the restored step.
        truncate_csv(run, "history.csv", "epoch", initial_epoch - 1)
        log.info("seed %d: resuming at epoch %d (step %d)", seed, initial_epoch, state["step"])
    else:
        run.remove(*_LOGS)  # this run's own leftovers from before its first checkpoint
    fresh = not initial_epoch
    hidden = [f"hidden_{i + 1}" for i in range(len(config.hidden))]
    tensorboard = run.join("tensorboard")
    fast = config.loop == "fast"
    run_callbacks = [
        StepMetrics(
            data,
            _Grid(config),
            run.join("metrics.csv"),
            measure_on_train_begin=fresh,
            loss_fn=loss_function(config),
        ),
        LocalRankCallback(
            rank_inputs(data, config),
            hidden,
            atol=list(config.atols),
            schedule=_Grid(config),
            max_samples=config.rank_samples,
            trace_path=run.join("trace.csv"),
            log_dir=os.path.join(tensorboard, "local_rank"),
            measure_on_train_begin=fresh,
            active_units=True,
            information=list(config.information_sigmas) if config.information else None,
        ),
        *_information_callbacks(config, data, hidden, run, fresh, tensorboard),
        Checkpoint(run, config.checkpoint_every, config.epochs, time.perf_counter()),
        *(
            ()
            if fast  # per-epoch logs: `fit` only
            else (
                keras.callbacks.CSVLogger(run.join("history.csv"), append=True),
                keras.callbacks.TensorBoard(tensorboard, write_graph=False),
            )
        ),
        *callbacks,
    ]
    if fast:
        loop = FastLoop(
            model,
            data.x_train,
            data.y_train,
            loss_fn=loss_function(config),
            batch_size=config.batch_size,
            seed=seed,
            steps_per_execution=config.steps_per_execution,
        )
        loop.fit(
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            callbacks=run_callbacks,
            stop_steps=measurement_steps(config),
            stop_every_epochs=config.checkpoint_every,
        )
        keras.backend.clear_session()
        return
    batches = epoch_batches(
        data.x_train,
        data.y_train,
        batch_size=config.batch_size,
        seed=seed,
        first_epoch=initial_epoch,
        epochs=config.epochs,
    )
    model.fit(
        batches,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=config.steps_per_epoch,
        callbacks=run_callbacks,
        verbose=verbose,
        shuffle=False,
    )  # the order comes from `epoch_batches`
    keras.backend.clear_session()


def _information_callbacks(config, data, hidden, run, fresh, tensorboard):
    callback = information_study.information_callback(
        config,
        rank_inputs(data, config),
        information_study.rank_labels(data, config),
        hidden,
        run,
        fresh=fresh,
        log_dir=os.path.join(tensorboard, "information"),
    )
    return () if callback is None else (callback,)


def _finish_information(config, seed, run: SubRun, plots: bool, title: str):
    """The seed's information comparison (None when off); its planes."""
    frame = information_study.information_frame(run.join(""), config)
    if frame is None:
        return None
    if plots and not run.is_complete():
        information_study.plot_planes(
            information_study.read_information(run.join("")),
            pd.read_csv(run.join("trace.csv")),
            run.join(""),
            config,
            f"{title}, seed {seed}",
        )
    report = information_study.compare_run(frame, config)
    report["cost"] = information_study.measurement_cost(run.join(""))
    return report


def _finish_seed(config, seed, run: SubRun, plots: bool, title: str):
    """Measurements, summary and plot of one trained seed; then its completion marker."""
    if run.is_complete():
        frame = pd.read_csv(run.join("measurements.csv"))
    else:
        frame = _measurements(run, config)
        run.write_text("measurements.csv", frame.to_csv(index=False))
        run.write_json("measurements.json", frame.to_dict("records"))
        if plots:
            _plot(frame, config, run.join("dynamics.png"), f"{title}, seed {seed}")
            _plot_units(frame, config, run.join("dead_units.png"), f"{title}, seed {seed}")
    summary = {**summarize_run(frame, config), "run": read_state(run)}
    if config.information:
        summary["information"] = _finish_information(config, seed, run, plots, title)
    if run.read_json("summary.json") != json.loads(json.dumps(summary)):
        run.write_json("summary.json", summary)  # summary-only settings may have changed
    if not run.is_complete():
        run.mark_complete(steps=summary["steps"], measurements=summary["measurements"])
    return frame, summary


def _seed_task(seed, path, sub_config, *, config, data, plots, title, verbose, callbacks):
    """One seed, start to finish, in its own locked sub-run (an executor's unit of work)."""
    with SubRun(path, sub_config, lock=True) as sub:
        if not sub.is_complete():
            _train_seed(config, data, seed, sub, callbacks, verbose)
        return _finish_seed(config, seed, sub, plots, title)


def train_and_evaluate(
    config: DynamicsConfig,
    workdir: str | os.PathLike,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    plots: bool = True,
    verbose: int = 0,
    title: str | None = None,
    extra_files: Mapping[str, str] | None = None,
    executor: Executor | None = None,
) -> dict:
    """Train one MLP per seed, measure local rank over training, write the outputs.

    Args:
        config: the study.
        workdir: the run directory (see the module docstring); reuse it to resume.
        callbacks: extra Keras callbacks for every `fit` (after the built-in ones).
        plots: write PNG plots. Default True.
        verbose: Keras `fit` verbosity. Default 0.
        title: plot title. Default: dataset and model.
        extra_files: `{relative path: text}` written into `workdir` once its
            config is accepted (e.g. the script's `flags.txt`). Default None.
        executor: runs the seeds (`keras_localrank.executors`; one task per
            seed). Default None: one after the other in this process.

    Returns:
        The top-level summary (also written to `workdir/summary.json`):
        `{"per_seed": {seed: summarize_run(...)}, "mean_std": ...,
        "task_dimension": k (Gaussian task) or None, ...}`.

    Raises:
        TypeError: `config` is not a `DynamicsConfig`; a bad `workdir`.
        ValueError: `workdir` is a file or not writable; bad data; extra
            `callbacks` with an executor that runs seeds in other processes.
        keras_localrank.rundir.ConfigMismatch: `workdir` holds a run with a
            different config (a `ValueError`; nothing is written).
        keras_localrank.rundir.RunDirectoryLocked: another process is running
            in `workdir`.
    """
    if not isinstance(config, DynamicsConfig):
        raise TypeError(f"Expected `config` to be a DynamicsConfig. Received: {config!r}")
    start = time.perf_counter()
    with RunDirectory(
        workdir, config.to_dict(), mutable_keys=("seeds", *SUMMARY_FIELDS, *EXECUTION_FIELDS)
    ) as run:
        for relpath, text in (extra_files or {}).items():
            run.write_text(relpath, text)
        data = load_data(config)
        if data.x_train.ndim != 2:
            raise ValueError(f"Expected vector inputs. Received shape {data.x_train.shape}")
        if config.n_train is None:
            config = dataclasses.replace(config, n_train=len(data.x_train))
        if len(data.x_train) != config.n_train:
            raise ValueError(
                f"Expected {config.n_train} training examples. Received: {len(data.x_train)} "
                f"from dataset={config.dataset!r}"
            )
        run.mark_incomplete(*_OUTPUTS)
        title = title or (
            f"{config.dataset} (n={config.n_train}), MLP {'x'.join(map(str, config.hidden))}, "
            f"AdamW lr={config.learning_rate:g} wd={config.weight_decay:g}"
        )
        executor = executor or InProcessExecutor()
        if callbacks and not executor.in_process:
            raise ValueError(
                "Expected no extra `callbacks` with an executor that runs seeds in other "
                f"processes. Received: callbacks={list(callbacks)!r}, executor={executor!r}"
            )
        subs = [run.subrun(f"seed={s}", {**config.run_fingerprint(), "seed": s})
                for s in config.seeds]  # every config checked before any training
        done = executor.map(
            _seed_task,
            [(seed, sub.path, sub.config) for seed, sub in zip(config.seeds, subs)],
            shared=dict(config=config, data=data, plots=plots, title=title,
                        verbose=verbose, callbacks=tuple(callbacks)),
            on_result=lambda i, _: run.mark_complete(subs[i].name),
        )
        frames, summaries = [], {}
        for seed, (frame, summaries[seed]) in zip(config.seeds, done):
            frames.append(frame.assign(seed=seed))
        everything = pd.concat(frames, ignore_index=True)
        run.write_text("measurements.csv", everything.to_csv(index=False))
        run.mark_complete("measurements.csv", rows=len(everything))
        if plots:
            _plot(
                everything,
                config,
                run.join("dynamics.png"),
                f"{title}, {len(config.seeds)} seed(s)",
            )
            run.mark_complete("dynamics.png")
            if _plot_units(everything, config, run.join("dead_units.png"),
                           f"{title}, mean of {len(config.seeds)} seed(s)"):
                run.mark_complete("dead_units.png")
        if config.information:
            _write_information_report(run, config, summaries, plots, title)
        result = dict(
            per_seed={str(s): summaries[s] for s in config.seeds},
            mean_std=aggregate_summaries(summaries),
            seeds=list(config.seeds),
            task_dimension=config.k if config.dataset == "gaussian" else None,
            rank_columns=rank_columns(config.atols),
            drop_start_definition=DROP_START_DEFINITION,
            **(
                {
                    "dead_units": dead_units.verdicts(everything, rank_columns(config.atols)),
                    "dead_units_definitions": dead_units.DEFINITIONS,
                }
                if "rank_bound" in everything
                else {}
            ),
            wall_seconds_this_call=time.perf_counter() - start,
        )
        run.write_json("summary.json", result)
        run.mark_complete("summary.json")
    return result


def _write_information_report(run, config, summaries, plots, title):
    """`information_report.json`/`.txt` across seeds, and the seed-mean planes."""
    report = information_study.aggregate_report(
        {s: summaries[s].get("information") for s in config.seeds}, config
    )
    run.write_json("information_report.json", report)
    column = rank_columns(config.atols)[-1]  # the robust rank when there is one
    run.write_text(
        "information_report.txt",
        information_study.report_text(report, rank_column=column, title=title),
    )
    if plots:
        traces, ranks = [], []
        for s in config.seeds:
            folder = run.join(f"seed={s}")
            trace = information_study.read_information(folder)
            if trace is not None:
                traces.append(trace.assign(seed=s))
                ranks.append(pd.read_csv(os.path.join(folder, "trace.csv")).assign(seed=s))
        if traces:
            information_study.plot_planes(
                pd.concat(traces, ignore_index=True),
                pd.concat(ranks, ignore_index=True),
                run.join(""),
                config,
                f"{title}, mean of {len(traces)} seed(s)",
            )


def _plot(frame, config, path, title):
    from keras_localrank.plotting import plot_dynamics

    reference = config.k if config.dataset == "gaussian" else None
    plot_dynamics(
        frame,
        path,
        rank_columns=rank_columns(config.atols),
        title=title,
        reference=reference,
        reference_label=f"k = {reference}",
    )


def _plot_units(frame, config, path, title) -> bool:
    """`dead_units.png` (rank, active-unit bound, gap); False without unit columns."""
    if "rank_bound" not in frame or frame["rank_bound"].isna().all():
        return False
    dead_units.plot_rank_bound(frame, path, rank_columns=rank_columns(config.atols), title=title)
    return True
