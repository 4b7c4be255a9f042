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
    runs/.../history.csv         per-epoch training loss, rate and accuracy
    local_rank_vs_beta.png       exact and robust local rank (each threshold)
                                 against beta, with the active units of the
                                 first encoder layer
    convergence.png              training loss against epoch, every run
    transitions.png              per-seed curves, detected transitions and
                                 their bootstrap intervals
    information_plane.png        rate against the I(Z;Y) bound, coloured by beta
    accuracy_vs_beta.png         test accuracy against beta
    dead_units.png               local rank, active-unit bound and their gap
                                 against beta, per layer
    summary.json                 transitions, per-beta means, dead units vs
                                 low-rank structure per layer, wall time

Rank columns follow `keras_localrank.names`: `local_rank/<layer>` and
`robust_local_rank@<atol>/<layer>` for `robust_atol` and every value of
`atols` (means over the rank samples), and `local_rank_std/<layer>`,
`robust_local_rank@<atol>_std/<layer>`. For ReLU encoders,
`active_fraction/<layer>` (mean over the probe inputs of the fraction of
units with positive pre-activation), `active_units/<layer>` (the mean count)
and `rank_equals_active_below/<layer>` (share of probe inputs whose exact
rank equals min(active units of the encoder layer below, the layer's bound)):
the Jacobian of a layer's pre-activation passes through the layer below only
via its active units, so that count bounds the rank.
Every layer on the encoder's Dense chain also gets `dead_units/<layer>`,
`rank_bound/<layer>` (the active-unit bound, see
`keras_localrank.active_units`) and the rank deficit `bound - rank` per rank
kind (`rank_deficit/<layer>`, `robust_rank_deficit@<atol>/<layer>`); the
summary's `dead_units` says, per layer, whether the fall of local rank from
the smallest to the largest beta is mostly dead units or low-rank structure.
`epochs_trained` and
`loss_change_last5` (relative fall of the training loss over the last 5
epochs) document convergence.

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
from keras_localrank.studies import dead_units
from keras_localrank.curves import (
    SHARP_DEFINITION,
    detect_transitions,
    find_transitions,
    refine_grid,
)
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
    "PlateauStop",
    "SweepConfig",
    "active_fraction",
    "active_unit_counts",
    "beta_grid",
    "default_refine_columns",
    "detect_columns",
    "information_columns",
    "rank_columns",
    "representation_information",
    "refine_betas",
    "train_and_evaluate",
    "train_one",
]

log = logging.getLogger(__name__)

RECORD = "record.json"
#: Per-epoch training metrics of one sub-run (epoch, loss, rate, accuracy).
HISTORY = "history.csv"
#: Record keys that are not columns of `results.csv`.
NON_COLUMNS = ("layers", "rate_per_dimension", "history")


def history_csv(history: dict) -> str:
    """The per-epoch training metrics (Keras `History.history`) as CSV text."""
    frame = pd.DataFrame(history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame.to_csv(index=False)


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
        robust_atol: singular-value threshold of the robust local rank
            shown in the plots. Default 0.1.
        atols: further robust thresholds measured on the same singular
            values (`robust_atol` is always measured). Default (0.01, 1.0).
        early_stop_patience: stop training once the training loss has not
            fallen below `(1 - early_stop_min_delta) * best` for this many
            epochs in a row (`best`: the lowest loss so far; `epochs` stays
            the cap). Default None: train all epochs.
        early_stop_min_delta: the relative improvement that counts (see
            `early_stop_patience`). Default 1e-3.
        active_threshold: per-dimension KL (nats) above which a bottleneck
            dimension is active. Default 1e-2.
        information_sigmas: noise levels `sigma` of the noise-injection
            estimates of `I(X;T)` (and `I(T;Y)` with the test labels) on the
            pre-activations of every encoder layer and of the bottleneck mean,
            next to the rate (`representation_information`). Default
            (0.3, 1.0, 3.0); () turns them off.

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
    atols: tuple[float, ...] = (0.01, 1.0)
    early_stop_patience: int | None = None
    early_stop_min_delta: float = 1e-3
    information_sigmas: tuple[float, ...] = (0.3, 1.0, 3.0)

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
        atols = check_sequence("atols", self.atols)
        atols = tuple(
            check_finite_float(f"atols[{i}]", a, low=0.0, low_open=True)
            for i, a in enumerate(atols)
        )
        if len(set(atols)) != len(atols):
            raise ValueError(f"Expected distinct `atols`. Received: atols={self.atols!r}")
        object.__setattr__(self, "atols", atols)
        sigmas = check_sequence("information_sigmas", self.information_sigmas)
        sigmas = tuple(
            check_finite_float(f"information_sigmas[{i}]", v, low=0.0, low_open=True)
            for i, v in enumerate(sigmas)
        )
        object.__setattr__(self, "information_sigmas", sigmas)
        if self.early_stop_patience is not None:
            check_positive_int("early_stop_patience", self.early_stop_patience)
        check_finite_float(
            "early_stop_min_delta", self.early_stop_min_delta, low=0.0, high=1.0, high_open=True
        )
        self.model_config()  # validates the overrides

    @property
    def all_atols(self) -> tuple[float, ...]:
        """Every robust threshold measured: `robust_atol` and `atols`, sorted."""
        return tuple(sorted({self.robust_atol, *self.atols}))

    def model_config(self):
        """The `keras_localrank.vib.VIBConfig` of every model of the sweep."""
        return get_preset(self.preset, **self.overrides)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["seeds"] = list(self.seeds)
        out["atols"] = list(self.atols)
        out["information_sigmas"] = list(self.information_sigmas)
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


def rank_columns(layers, robust_atol) -> list[str]:
    """The mean-rank columns of `results.csv`: exact, then robust (per threshold), per layer.

    `robust_atol` is one threshold or a sequence of them.
    """
    atols = [robust_atol] if np.ndim(robust_atol) == 0 else list(robust_atol)
    return [names.rank_key(layer, names.EXACT) for layer in layers] + [
        names.rank_key(layer, names.ROBUST, atol) for atol in atols for layer in layers
    ]


#: Column prefixes of the unit activity of the encoder layers (ReLU).
ACTIVE_FRACTION = "active_fraction"
ACTIVE_UNITS = "active_units"
#: Share of probe inputs whose exact rank of a layer equals its bound from the
#: layer below: min(active units of the previous encoder layer, this layer's
#: width, the input size).
RANK_EQUALS_ACTIVE = "rank_equals_active_below"


def active_fraction(pre_activations) -> tuple[float, np.ndarray]:
    """Mean fraction of units with positive pre-activation, and the count per input.

    Args:
        pre_activations: `(inputs, units)` array (for ReLU layers, the
            outputs work too: output > 0 exactly when the pre-activation is).

    Returns:
        `(mean over inputs of the fraction of units > 0, int count per input)`.
    """
    values = np.asarray(pre_activations)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(
            f"Expected a (inputs, units) array. Received: shape={values.shape}"
        )
    counts = np.sum(values > 0, axis=1)
    return float(np.mean(counts / values.shape[1])), counts


def active_unit_counts(model: keras.Model, x, layers) -> dict[str, np.ndarray]:
    """Active (output > 0) units per input of each ReLU layer in `layers`.

    A small functional model returns the named layers' outputs on `x`;
    for a ReLU `Dense` the output is positive exactly where the
    pre-activation is.

    Args:
        model: a built functional model.
        x: probe inputs.
        layers: layer names (ReLU layers).

    Returns:
        `{layer: int array (inputs,)}`.
    """
    outputs = [model.get_layer(name).output for name in layers]
    probe = keras.Model(model.inputs, outputs)
    values = probe.predict(np.asarray(x), verbose=0, batch_size=256)
    if len(layers) == 1:
        values = [values]
    return {name: active_fraction(v)[1] for name, v in zip(layers, values)}


class PlateauStop(keras.callbacks.Callback):
    """Stop once the training loss has not fallen below `(1 - min_delta) * best`
    for `patience` epochs in a row (`best`: lowest loss so far)."""

    def __init__(self, patience: int, min_delta: float):
        super().__init__()
        self.patience, self.min_delta = patience, min_delta
        self.best, self.wait = math.inf, 0

    def on_epoch_end(self, epoch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        if loss < self.best * (1 - self.min_delta) or not math.isfinite(self.best):
            self.best, self.wait = min(loss, self.best), 0
        else:
            self.best = min(loss, self.best)
            self.wait += 1
            if self.wait >= self.patience:
                self.model.stop_training = True


def default_refine_columns(layers) -> list[str]:
    """The curves `refine_betas` follows by default: the exact rank of the last
    encoder layer and accuracy."""
    encoders = [name for name in layers if name.startswith("encoder_")]
    return [names.rank_key(encoders[-1], names.EXACT), "accuracy"]


def refine_betas(
    coarse_frame: pd.DataFrame,
    columns,
    *,
    per_decade: int = 8,
    top: int = 1,
    pad_steps: int = 1,
) -> tuple[float, ...]:
    """A beta grid with >= `per_decade` points per decade around the coarse transitions.

    For each column, `keras_localrank.curves.detect_transitions` finds the
    `top` largest drops of its seed-mean curve on the coarse grid (betas > 0);
    each such coarse step, widened by `pad_steps` coarse steps on each side,
    is filled with log-spaced betas at most `1 / per_decade` decades apart.

    Args:
        coarse_frame: `results.csv` of a coarse sweep (columns `beta`, `seed`).
        columns: the curves to follow (columns of the frame).
        per_decade: points per decade. Default 8.
        top: transitions per column. Default 1.
        pad_steps: coarse steps added on each side. Default 1.

    Returns:
        The coarse grid plus the refined points, sorted.

    Raises:
        ValueError: a column not in the frame, fewer than 2 betas > 0, bad
            `per_decade`, `top` or `pad_steps`.
    """
    columns = check_sequence("columns", columns)
    check_positive_int("per_decade", per_decade)
    missing = [c for c in columns if c not in coarse_frame.columns]
    if missing or not columns:
        raise ValueError(
            f"Expected columns of the coarse results. Received: columns={list(columns)!r}"
        )
    positive = coarse_frame[coarse_frame["beta"] > 0]
    centres = []
    for col in columns:
        found = detect_transitions(positive, col, top=top, num_bootstrap=1)
        centres += [(t["beta_low"], t["beta_high"]) for t in found["transitions"]]
    grid = refine_grid(
        sorted(positive["beta"].unique()), centres, per_decade=per_decade, pad_steps=pad_steps
    )
    if (coarse_frame["beta"] == 0).any():
        grid = (0.0, *grid)
    return grid


def _std_column(layer: str, kind: str, atol: float) -> str:
    return f"{names.rank_column(kind, atol)}_std/{layer}"


def subrun_name(beta: float, seed: int) -> str:
    """The sub-run folder of one (beta, seed) model."""
    return f"runs/beta={beta:.6g}_seed={seed}"


def train_one(config: SweepConfig, data, beta: float, seed: int) -> dict:
    """Train one VIB classifier and measure it; returns the run record.

    The record holds the information terms, the local ranks (exact and one
    robust rank per threshold in `config.all_atols`), for ReLU encoders the
    active units, and `history` (per-epoch training metrics; the caller
    writes them to `history.csv` next to the record).
    """
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
    callbacks = []
    if config.early_stop_patience:
        callbacks.append(PlateauStop(config.early_stop_patience, config.early_stop_min_delta))
    history = model.fit(
        data.x_train,
        data.y_train,
        batch_size=model_cfg.batch_size,
        epochs=model_cfg.epochs,
        verbose=0,
        callbacks=callbacks,
    )
    train_seconds = time.perf_counter() - start
    info = information_quantities(
        model, data.x_test, data.y_test, active_threshold=config.active_threshold
    )
    atols = config.all_atols
    estimator = vib_local_rank_estimator(
        model, tolerances=(Tolerance(), *(Tolerance(atol=a) for a in atols))
    )
    probes = np.asarray(data.x_test[: config.rank_samples])
    exact, *robust = estimator(probes)
    losses = [float(v) for v in history.history["loss"]]
    tail = losses[-6:]
    record = {
        "beta": beta,
        "seed": seed,
        "accuracy": info.accuracy,
        "rate": info.rate,
        "izy_lower_bound": info.izy_lower_bound,
        "cross_entropy": info.cross_entropy,
        "label_entropy": info.label_entropy,
        "active_dimensions": info.active_dimensions,
        "train_loss": losses[-1],
        "train_rate": float(history.history["rate"][-1]),
        "epochs_trained": len(losses),
        # relative fall of the training loss over the last (up to) 5 epochs
        "loss_change_last5": float((tail[0] - tail[-1]) / abs(tail[-1])) if tail[-1] else 0.0,
        "train_seconds": train_seconds,
        "layers": exact.layer_names,
        "rate_per_dimension": [float(v) for v in info.rate_per_dimension],
    }
    for (kind, atol), result in zip(
        [(names.EXACT, None)] + [(names.ROBUST, a) for a in atols], (exact, *robust)
    ):
        for layer in result.layer_names:
            record[names.rank_key(layer, kind, atol)] = result.mean[layer]
            record[_std_column(layer, kind, atol)] = result.std[layer]
    if model_cfg.activation == "relu":
        encoders = [n for n in exact.layer_names if n.startswith("encoder_")]
        counts = active_unit_counts(model, probes, encoders)
        for name in encoders:
            width = model.get_layer(name).units
            record[f"{ACTIVE_FRACTION}/{name}"] = float(np.mean(counts[name] / width))
            record[f"{ACTIVE_UNITS}/{name}"] = float(np.mean(counts[name]))
        bounds = {info.name: info.bound for info in exact.layers}
        for below, layer in zip(encoders, exact.layer_names[1:]):
            bound = np.minimum(counts[below], bounds[layer])
            record[f"{RANK_EQUALS_ACTIVE}/{layer}"] = float(
                np.mean(exact.per_sample[layer] == bound)
            )
    dead_units.record_units(
        record, (exact, *robust), [(names.EXACT, None)] + [(names.ROBUST, a) for a in atols]
    )
    record.update(
        representation_information(
            model, probes, np.asarray(data.y_test[: config.rank_samples]),
            config.information_sigmas,
        )
    )
    record["history"] = {
        key: [float(v) for v in values] for key, values in history.history.items()
    }
    keras.backend.clear_session(free_memory=True)
    return record


def information_columns(layers, sigmas) -> list[str]:
    """The `I(X;T)` columns of the results: `information/kl_upper@sigma=<s>/<layer>`
    and `information/bd_lower@sigma=<s>/<layer>` (`names.information_key`)."""
    from keras_localrank.information import IXT

    return [
        names.information_key(layer, IXT, f"{e}@sigma={s:g}")
        for layer in layers
        for s in sigmas
        for e in ("kl_upper", "bd_lower")
    ]


def representation_information(model: keras.Model, x, y, sigmas) -> dict[str, float]:
    """Noise-injection estimates of `I(X;T)` and `I(T;Y)` for the VIB's measured layers.

    `T` is the pre-activation of each layer `vib_local_rank_estimator`
    measures (every encoder layer and the bottleneck mean), `X` uniform over
    `x`, `T_sigma = T + N(0, sigma^2 I)`: the pairwise bounds `kl_upper`,
    `bd_lower` on `I(X;T_sigma)` and the `kl`, `bd` estimates of
    `I(T_sigma;Y)` (`keras_localrank.information.pairwise_information`).
    Unlike the rate, which bounds `I(X;Z)` for the VIB's own learned
    noise, these use a fixed isotropic `sigma`.

    Args:
        model: a model from `build_vib_classifier`.
        x, y: probe inputs and their labels.
        sigmas: noise levels.

    Returns:
        `{names.information_key(layer, quantity, label): nats}`.
    """
    from keras_localrank import information as info
    from keras_localrank.information_callback import LayerRepresentations
    from keras_localrank.vib import _measured_model

    if not sigmas:
        return {}
    measured, layers = _measured_model(model)
    reps = LayerRepresentations(measured, layers)
    samples = reps.check_samples(np.asarray(x))
    labels = info.check_labels(np.asarray(y)[: len(samples)], len(samples))
    out = {}
    for layer, h in reps(samples).items():
        for e in info.pairwise_information(h, list(sigmas), labels=labels):
            out[names.information_key(layer, e.quantity, e.label)] = e.nats
    return out


def detect_columns(frame: pd.DataFrame, rank_cols, **kwargs) -> dict:
    """`detect_transitions` (drops) of every varying local-rank, active-unit and
    accuracy column, on the betas > 0; {} with fewer than 2 such betas."""
    positive = frame[frame["beta"] > 0]
    if positive["beta"].nunique() < 2:
        return {}
    columns = [*rank_cols, *(c for c in frame if c.startswith(f"{ACTIVE_UNITS}/")), "accuracy"]
    out = {}
    for col in columns:
        means = positive.groupby("beta")[col].mean()
        if means.max() > means.min():
            out[col] = detect_transitions(positive, col, **kwargs)
    return out


def plotted_transitions(layers, robust_atol: float) -> list[str]:
    """The columns of `transitions.png`: the exact rank of the layers after the
    first, the active units of the first encoder layer, the robust rank of the
    last layer and accuracy."""
    return [
        *(names.rank_key(layer, names.EXACT) for layer in layers[1:]),
        f"{ACTIVE_UNITS}/{layers[0]}",
        names.rank_key(layers[-1], names.ROBUST, robust_atol),
        "accuracy",
    ]


def _pair_task(beta, seed, path, sub_config, *, config, data) -> tuple[dict, bool]:
    """One (beta, seed) model in its own locked sub-run (an executor's unit of work).

    Returns:
        `(record, trained)`: the run record, and whether this call trained it.
    """
    with SubRun(path, sub_config, lock=True) as sub:
        if sub.is_complete():
            return sub.read_json(RECORD), False
        record = train_one(config, data, beta, seed)
        sub.write_text(HISTORY, history_csv(record["history"]))
        sub.write_json(RECORD, record)
        sub.mark_complete()
        return sub.read_json(RECORD), True


def _summarize(config: SweepConfig, records: list[dict], trained: int, start: float):
    frame = pd.DataFrame(
        [{k: v for k, v in r.items() if k not in NON_COLUMNS} for r in records]
    ).sort_values(["beta", "seed"])
    rank_cols = rank_columns(records[0]["layers"], config.all_atols)
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
    detected = detect_columns(frame, rank_cols)
    units = _unit_verdicts(config, frame, records[0]["layers"])
    summary = {
        "description": (
            "Transitions: for each column, the neighbouring beta pairs with the "
            "largest change of the seed-mean ('delta'); 'relative' = |delta| / "
            "range over the grid; 'noise' = std over seeds. 'overall' ranks beta "
            "pairs by the summed relative change of all local-rank columns."
        ),
        "rank_columns": rank_cols,
        "information_columns": information_columns(
            records[0]["layers"], config.information_sigmas
        ),
        "overall_local_rank_transitions": overall,
        "local_rank_transitions": transitions,
        "other_transitions": other,
        "detected_transitions": detected,
        "sharp_criterion": SHARP_DEFINITION,
        "per_beta_mean": per_beta.to_dict(orient="records"),
        **units,
        "num_runs": len(records),
        "trained_this_call": trained,
        "wall_seconds_this_call": time.perf_counter() - start,
        "train_seconds_total": float(frame["train_seconds"].sum()),
    }
    return frame, summary


def _sweep_rank_columns(config: SweepConfig) -> list[str]:
    return [names.rank_column(names.EXACT)] + [
        names.rank_column(names.ROBUST, a) for a in config.all_atols
    ]


def _unit_verdicts(config: SweepConfig, frame: pd.DataFrame, layers) -> dict:
    """The summary's `dead_units` (per layer, smallest vs largest beta), or {}."""
    long = dead_units.long_from_wide(frame, layers, _sweep_rank_columns(config))
    if long.empty or long["rank_bound"].isna().all():
        return {}
    return {
        "dead_units": dead_units.verdicts(long, _sweep_rank_columns(config), x="beta"),
        "dead_units_definitions": dead_units.DEFINITIONS,
    }


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
        histories = {
            pair: pd.read_csv(sub.join(HISTORY))
            for pair, sub in zip(pairs, subs)
            if sub.exists(HISTORY)
        }

        frame, summary = _summarize(config, records, trained, start)
        run.write_text("results.csv", frame.to_csv(index=False))
        run.write_json("results.json", records)
        if plots:
            from keras_localrank.studies.vib_sweep_plots import plot_sweep

            title = (
                f"VIB on {config.dataset}: {config.model_config().encoder_units}, "
                f"K={config.model_config().bottleneck_units}, {len(config.seeds)} seed(s)"
            )
            from keras_localrank.studies.vib_sweep_plots import (
                plot_convergence,
                plot_transitions,
            )

            layers = records[0]["layers"]
            summary["plots"] = plot_sweep(
                frame, run.path, title, robust_atol=config.robust_atol, layers=layers,
                atols=config.atols,
            )
            if config.information_sigmas:
                from keras_localrank.studies.vib_sweep_plots import plot_information_vs_beta

                summary["plots"].append(
                    plot_information_vs_beta(
                        frame, run.join("information_vs_beta.png"), layers=layers,
                        sigmas=config.information_sigmas,
                    )
                )
            if histories:
                summary["plots"].append(
                    plot_convergence(histories, run.join("convergence.png"))
                )
            shown = {
                col: summary["detected_transitions"][col]
                for col in plotted_transitions(layers, config.robust_atol)
                if col in summary["detected_transitions"]
            }
            if shown:
                summary["plots"].append(plot_transitions(frame, shown, run.join("transitions.png")))
            long = dead_units.long_from_wide(frame, layers, _sweep_rank_columns(config))
            if not long.empty and long["rank_bound"].notna().any():
                dead_units.plot_rank_bound(
                    long, run.join("dead_units.png"),
                    rank_columns=_sweep_rank_columns(config), x="beta", title=title,
                )
                summary["plots"].append("dead_units.png")
            for name in summary["plots"]:
                run.mark_complete(name)
        run.write_json("summary.json", summary)
        for name in outputs:
            run.mark_complete(name)
    return summary
