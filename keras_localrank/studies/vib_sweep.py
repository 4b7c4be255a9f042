"""The VIB beta sweep: one VIB classifier per (beta, seed), information terms and
local rank of each, plots, and the beta values where local rank changes most.

`train_and_evaluate(config, workdir)` is what `experiments/vib_beta_sweep.py`
calls; tests call it with a tiny config. The run directory (a
`keras_localrank.rundir.RunDirectory`) holds

    config.json                  the resolved config
    manifest.json                which outputs are complete
    runs/beta=<b>_seed=<s>/      one sub-run per model: config.json,
                                 record.json (its results), complete.json
    results.csv, results.json    all finished runs, one row per (beta, seed)
    local_rank_vs_beta.png       exact and robust local rank against beta
    information_plane.png        rate against the I(Z;Y) bound, coloured by beta
    accuracy_vs_beta.png         test accuracy against beta
    summary.json                 transitions, per-beta means, wall time

Rank columns follow `keras_localrank.names`: `local_rank/<layer>` and
`robust_local_rank@<robust_atol>/<layer>` (means over the rank samples), and
`local_rank_std/<layer>`, `robust_local_rank@<robust_atol>_std/<layer>`.

Finished (beta, seed) pairs are never retrained: a sub-run is complete once
its record is written, and an interrupted sweep started again with the same
directory picks up where it stopped. A rerun may add betas or seeds; a
different model or data setting is refused before anything is written. Each
sub-run writes only inside its own folder, so sub-runs can be trained by
separate workers (`train_one`) while the driver writes the summaries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import keras
import numpy as np
import pandas as pd

from keras_localrank import datasets, names
from keras_localrank.curves import find_transitions
from keras_localrank.executors import Executor, InProcessExecutor
from keras_localrank.rundir import RunDirectory, SubRun
from keras_localrank.spectra import Tolerance
from keras_localrank.validation import (
    check_betas,
    check_choice,
    check_finite_float,
    check_int,
    check_positive_int,
    check_sequence,
)
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
    "rank_columns",
    "train_and_evaluate",
    "train_one",
]

log = logging.getLogger(__name__)

RECORD = "record.json"


def beta_grid(beta_min: float = 1e-6, beta_max: float = 10.0, num: int = 15) -> tuple[float, ...]:
    """`num` log-spaced beta values from `beta_min` to `beta_max` (both included).

    Raises:
        TypeError: non-numeric bounds or a non-int `num`.
        ValueError: `beta_min <= 0`, `beta_max <= beta_min`, non-finite bounds,
            `num < 2`.
    """
    beta_min = check_finite_float("beta_min", beta_min, low=0.0)
    beta_max = check_finite_float("beta_max", beta_max, low=0.0)
    num = check_int("num", num, minimum=2)
    if beta_min <= 0 or beta_max <= beta_min:
        raise ValueError(
            "Expected 0 < beta_min < beta_max for a log grid. "
            f"Received: beta_min={beta_min}, beta_max={beta_max}"
        )
    grid = np.geomspace(beta_min, beta_max, num)
    return tuple(float(f"{b:.6g}") for b in grid)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A beta sweep.

    Attributes:
        betas: the beta grid: at least 2 distinct finite values >= 0, sorted
            on construction. Default: 15 log-spaced values from 1e-6 to 10.
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

    Raises:
        TypeError: a field of the wrong type.
        ValueError: a field out of range, an unknown dataset or preset.
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
        object.__setattr__(self, "betas", check_betas("betas", self.betas, minimum_count=2))
        seeds = check_sequence("seeds", self.seeds)
        seeds = tuple(check_int(f"seeds[{i}]", s, minimum=0) for i, s in enumerate(seeds))
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"Expected distinct int seeds. Received: seeds={self.seeds!r}")
        object.__setattr__(self, "seeds", seeds)
        check_choice("dataset", self.dataset, datasets.NAMES)
        check_choice("preset", self.preset, sorted(PRESETS))
        for name in ("n_train", "n_test"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_positive_int("rank_samples", self.rank_samples)
        check_finite_float("robust_atol", self.robust_atol, low=0.0, low_open=True)
        check_finite_float("active_threshold", self.active_threshold, low=0.0)
        self.model_config()  # validates the overrides

    def model_config(self):
        """The `keras_localrank.vib.VIBConfig` of every model of the sweep."""
        return get_preset(self.preset, **self.overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["seeds"] = list(self.seeds)
        out["model"] = self.model_config().to_dict()
        return out

    def fingerprint(self) -> dict:
        """The settings a finished run depends on (everything but the grid and
        seeds; `overrides` are in the resolved `model`)."""
        out = self.to_dict()
        for key in MUTABLE_KEYS:
            out.pop(key)
        return out


#: `SweepConfig` fields a rerun on the same directory may change.
MUTABLE_KEYS = ("betas", "seeds", "overrides")


def rank_columns(layers, robust_atol: float) -> list[str]:
    """The mean-rank columns of `results.csv`: exact, then robust, per layer."""
    return [names.rank_key(layer, names.EXACT) for layer in layers] + [
        names.rank_key(layer, names.ROBUST, robust_atol) for layer in layers
    ]


def _std_column(layer: str, kind: str, atol: float) -> str:
    return f"{names.rank_column(kind, atol)}_std/{layer}"


def subrun_name(beta: float, seed: int) -> str:
    """The sub-run folder of one (beta, seed) model."""
    return f"runs/beta={beta:.6g}_seed={seed}"


def train_one(config: SweepConfig, data, beta: float, seed: int) -> dict:
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
    for kind, result in zip(names.RANK_KINDS, (exact, robust)):
        for layer in result.layer_names:
            record[names.rank_key(layer, kind, config.robust_atol)] = result.mean[layer]
            record[_std_column(layer, kind, config.robust_atol)] = result.std[layer]
    keras.backend.clear_session(free_memory=True)
    return record


def _pair_task(beta, seed, path, sub_config, *, config, data) -> tuple[dict, bool]:
    """One (beta, seed) model in its own locked sub-run (an executor's unit of work).

    Returns:
        `(record, trained)`: the run record, and whether this call trained it.
    """
    with SubRun(path, sub_config, lock=True) as sub:
        if sub.is_complete():
            return sub.read_json(RECORD), False
        sub.write_json(RECORD, train_one(config, data, beta, seed))
        sub.mark_complete()
        return sub.read_json(RECORD), True


def _summarize(config: SweepConfig, records: list[dict], trained: int, start: float):
    frame = pd.DataFrame(
        [{k: v for k, v in r.items() if k not in ("layers", "rate_per_dimension")}
         for r in records]
    ).sort_values(["beta", "seed"])
    rank_cols = rank_columns(records[0]["layers"], config.robust_atol)
    transitions = find_transitions(frame, rank_cols)
    frame_log = frame.assign(log10_rate=np.log10(np.maximum(frame["rate"], 1e-12)))
    other = find_transitions(
        frame_log, ["accuracy", "log10_rate", "izy_lower_bound", "active_dimensions"]
    )
    # The overall sharpest change: summed relative change over all local-rank columns.
    betas = np.array(sorted(frame["beta"].unique()), float)
    means = frame.groupby("beta")[rank_cols].mean().reindex(betas)
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
    per_beta = frame.drop(columns=["seed"]).groupby("beta").mean().reset_index()
    summary = {
        "description": (
            "Transitions: for each column, the neighbouring beta pairs with the "
            "largest change of the seed-mean ('delta'); 'relative' = |delta| / "
            "range over the grid; 'noise' = std over seeds. 'overall' ranks beta "
            "pairs by the summed relative change of all local-rank columns."
        ),
        "rank_columns": rank_cols,
        "overall_local_rank_transitions": overall,
        "local_rank_transitions": transitions,
        "other_transitions": other,
        "per_beta_mean": per_beta.to_dict(orient="records"),
        "num_runs": len(records),
        "trained_this_call": trained,
        "wall_seconds_this_call": time.perf_counter() - start,
        "train_seconds_total": float(frame["train_seconds"].sum()),
    }
    return frame, summary


def train_and_evaluate(
    config: SweepConfig,
    workdir,
    *,
    plots: bool = True,
    extra_files: dict[str, str] | None = None,
    executor: Executor | None = None,
) -> dict:
    """Train and measure one VIB classifier per (beta, seed); write results and plots.

    Args:
        config: the `SweepConfig`.
        workdir: the run directory (created; reused to resume).
        plots: write the PNG plots. Default True.
        extra_files: `{relative path: text}` written into `workdir` once its
            config is accepted (e.g. the script's `flags.txt`). Default None.
        executor: runs the (beta, seed) models (`keras_localrank.executors`;
            one task per model). Default None: one after the other here.

    Returns:
        The summary (also written to `summary.json`).

    Raises:
        TypeError: `config` is not a `SweepConfig`; a bad `workdir`.
        ValueError: `workdir` is a file or not writable.
        keras_localrank.rundir.ConfigMismatch: `workdir` holds a sweep with
            different settings (a `ValueError`; nothing is written).
        keras_localrank.rundir.RunDirectoryLocked: another process is running
            in `workdir`.
    """
    if not isinstance(config, SweepConfig):
        raise TypeError(f"Expected `config` to be a SweepConfig. Received: {config!r}")
    start = time.perf_counter()
    with RunDirectory(workdir, config.to_dict(), mutable_keys=MUTABLE_KEYS) as run:
        for relpath, text in (extra_files or {}).items():
            run.write_text(relpath, text)
        outputs = ("results.csv", "results.json", "summary.json")
        run.mark_incomplete(*outputs)
        data = datasets.load(
            config.dataset,
            data_path=config.data_path,
            n_train=config.n_train,
            n_test=config.n_test,
        )
        pairs = [(beta, seed) for beta in config.betas for seed in config.seeds]
        subs = [
            run.subrun(subrun_name(b, s), {**config.fingerprint(), "beta": b, "seed": s})
            for b, s in pairs
        ]  # every config checked before any training

        def finished(i, outcome):
            record, fresh = outcome
            if fresh:
                log.info(
                    "beta=%g seed=%d: acc=%.3f rate=%.3f izy>=%.3f (%.1fs)",
                    record["beta"], record["seed"], record["accuracy"], record["rate"],
                    record["izy_lower_bound"], record["train_seconds"],
                )
            else:
                log.info("beta=%g seed=%d: finished earlier, skipped", *pairs[i])
            run.mark_complete(subs[i].name)

        outcomes = (executor or InProcessExecutor()).map(
            _pair_task,
            [(b, s, sub.path, sub.config) for (b, s), sub in zip(pairs, subs)],
            shared=dict(config=config, data=data),
            on_result=finished,
        )
        records = [record for record, _ in outcomes]
        trained = sum(fresh for _, fresh in outcomes)

        frame, summary = _summarize(config, records, trained, start)
        run.write_text("results.csv", frame.to_csv(index=False))
        run.write_json("results.json", records)
        if plots:
            from keras_localrank.studies.vib_sweep_plots import plot_sweep

            title = (
                f"VIB on {config.dataset}: {config.model_config().encoder_units}, "
                f"K={config.model_config().bottleneck_units}, {len(config.seeds)} seed(s)"
            )
            summary["plots"] = plot_sweep(
                frame, run.path, title, robust_atol=config.robust_atol, layers=records[0]["layers"]
            )
            for name in summary["plots"]:
                run.mark_complete(name)
        run.write_json("summary.json", summary)
        for name in outputs:
            run.mark_complete(name)
    return summary
