"""Training dynamics of local rank: train an MLP, measure every hidden layer.

`train_and_evaluate(config, workdir)` is what `experiments/gaussian_mlp.py`
and `experiments/mnist_mlp.py` call; tests call it with a tiny config. It
trains one MLP per seed with AdamW (decoupled weight decay on kernels only),
measures exact and robust local rank of every hidden layer at log-spaced
optimizer steps together with train/test loss and accuracy, and writes

    workdir/config.json                 the resolved config
    workdir/seed=<s>/                   one run per seed:
        config.json                     the resolved config of this run
        trace.csv                       every rank measurement (LocalRankCallback)
        metrics.csv                     train/test loss and accuracy at the same steps
        measurements.csv, .json         one row per (step, layer): local rank,
                                        robust local rank per eps, loss, accuracy
        history.csv                     Keras per-epoch logs (CSVLogger)
        tensorboard/                    Keras TensorBoard + per-layer rank scalars
        dynamics.png                    rank per layer vs step, loss, accuracy
        summary.json                    per layer: peak, final, drop, drop start
        checkpoints/, state.json        the resume state
    workdir/measurements.csv            all seeds
    workdir/dynamics.png                mean over seeds with a +-1 std band
    workdir/summary.json                per seed and mean/std across seeds

Resuming: a checkpoint (model and optimizer state, as a `.keras` file written
atomically) is taken every `checkpoint_every` epochs. Started again with the
same `workdir`, a run continues from its last checkpoint with `initial_epoch`;
measurements taken after that checkpoint are dropped from the trace before
training resumes, so they are redone once, never duplicated. The data order of
every epoch is a stateless function of `(seed, epoch)`, so a resumed run
follows the same trajectory as an uninterrupted one. Finished runs are not
retrained.

**When the drop starts** (`drop_start_step`): with `peak` the largest and
`final` the last value of a layer's curve, the last measured step at which the
curve is still within `drop_tolerance` (default 10%) of the eventual drop from
its peak, i.e. `value >= peak - drop_tolerance * (peak - final)`. After that
step the curve never comes back near its peak. It is None when the relative
drop `(peak - final) / peak` is below `min_relative_drop` (default 5%).

References:
    Patel & Shwartz-Ziv, "Learning to Compress: Local Rank and Information
    Compression in Deep Neural Networks", https://arxiv.org/abs/2410.07687
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import time
from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from keras_localrank import datasets
from keras_localrank import schedules as schedules_lib
from keras_localrank.callbacks import LocalRankCallback
from keras_localrank.io import atomic_write_json, atomic_write_text

__all__ = [
    "DynamicsConfig",
    "PRESETS",
    "get_preset",
    "build_mlp",
    "summarize_curve",
    "summarize_run",
    "aggregate_summaries",
    "train_and_evaluate",
    "rank_columns",
]

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["train_loss", "train_accuracy", "test_loss", "test_accuracy"]


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """One training-dynamics study (one MLP per seed).

    Attributes:
        dataset: a `keras_localrank.datasets.NAMES` entry. Default "gaussian".
        data_path: an `.npz` with `x`, `y` read instead of downloading (mnist).
            Default None.
        n_train: training examples (None: all). Default 2000.
        n_test: test examples (None: all). Default 1000.
        dim: input dimension of the Gaussian task. Default 20.
        k: directions the Gaussian labels depend on (`2**k` classes). Default 2.
        data_seed: seed of the Gaussian task / of the npz split; fixed across
            model seeds so every seed sees the same task. Default 0.
        hidden: widths of the hidden ReLU layers. Default (100, 100, 100).
        activation: hidden activation. Default "relu".
        learning_rate: AdamW learning rate. Default 1e-3.
        weight_decay: AdamW decoupled weight decay (Keras multiplies it by the
            learning rate each step). Default 0.5.
        decay_bias: also decay biases. Default False (kernels only).
        batch_size: Default 64.
        epochs: Default 1000 (32,000 steps at the defaults).
        num_measurements: log-spaced measurement steps over the run (plus one
            before training). Default 50.
        atols: thresholds `eps` of the robust local rank. Default (1e-2,).
        rank_samples: training inputs the local rank averages over. Default 256.
        checkpoint_every: epochs between checkpoints. Default 50.
        seeds: one run per seed (model init and data order). Default (0,).
        drop_tolerance: see "When the drop starts" in the module docstring.
            Default 0.1.
        min_relative_drop: smaller relative drops count as no drop. Default 0.05.
        fit_accuracy: `fit_step` is the first step whose train accuracy
            reaches this. Default 0.99.
    """

    dataset: str = "gaussian"
    data_path: str | None = None
    n_train: int | None = 2000
    n_test: int | None = 1000
    dim: int = 20
    k: int = 2
    data_seed: int = 0
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    learning_rate: float = 1e-3
    weight_decay: float = 0.5
    decay_bias: bool = False
    batch_size: int = 64
    epochs: int = 1000
    num_measurements: int = 50
    atols: tuple[float, ...] = (1e-2,)
    rank_samples: int = 256
    checkpoint_every: int = 50
    seeds: tuple[int, ...] = (0,)
    drop_tolerance: float = 0.1
    min_relative_drop: float = 0.05
    fit_accuracy: float = 0.99

    def __post_init__(self):
        if self.dataset not in datasets.NAMES:
            raise ValueError(
                f"Expected `dataset` in {datasets.NAMES}. Received: dataset={self.dataset!r}"
            )
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=1)
        for name in (
            "dim",
            "k",
            "batch_size",
            "epochs",
            "num_measurements",
            "rank_samples",
            "checkpoint_every",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("data_seed", self.data_seed, minimum=0)
        hidden = _as_tuple("hidden", self.hidden)
        if not hidden:
            raise ValueError(
                f"Expected at least one hidden layer. Received: hidden={self.hidden!r}"
            )
        for i, width in enumerate(hidden):
            _check_int(f"hidden[{i}]", width, minimum=1)
        object.__setattr__(self, "hidden", tuple(int(w) for w in hidden))
        seeds = _as_tuple("seeds", self.seeds)
        for i, seed in enumerate(seeds):
            _check_int(f"seeds[{i}]", seed, minimum=0)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"Expected one or more distinct seeds. Received: seeds={self.seeds!r}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        atols = _as_tuple("atols", self.atols)
        for i, atol in enumerate(atols):
            _check_float(f"atols[{i}]", atol, low=0.0, low_open=True)
        object.__setattr__(self, "atols", tuple(float(a) for a in atols))
        _check_float("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("drop_tolerance", self.drop_tolerance, low=0.0, high=1.0)
        _check_float("min_relative_drop", self.min_relative_drop, low=0.0, high=1.0)
        _check_float("fit_accuracy", self.fit_accuracy, low=0.0, high=1.0)
        if self.dataset == "gaussian":
            if not 1 <= self.k <= min(self.dim, 8):
                raise ValueError(
                    f"Expected 1 <= k <= min(dim, 8). Received: k={self.k}, dim={self.dim}"
                )
            if self.data_path is not None:
                raise ValueError(
                    "The Gaussian task is generated, not read: expected no `data_path`. "
                    f"Received: data_path={self.data_path!r}"
                )
            if self.n_train is None or self.n_test is None:
                raise ValueError(
                    "Expected `n_train` and `n_test` for the Gaussian task. "
                    f"Received: n_train={self.n_train}, n_test={self.n_test}"
                )
        if not isinstance(self.activation, str):
            raise TypeError(
                f"Expected `activation` to be a string. Received: activation={self.activation!r}"
            )
        keras.activations.get(self.activation)  # ValueError for unknown names

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.epochs * self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        if self.n_train is None:
            raise ValueError("steps_per_epoch needs `n_train`; see `resolved`.")
        return math.ceil(self.n_train / self.batch_size)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("hidden", "atols", "seeds"):
            out[key] = list(out[key])
        return out

    def run_fingerprint(self) -> dict:
        """The settings one seed's run depends on (everything but the seed list)."""
        out = self.to_dict()
        out.pop("seeds")
        for key in ("drop_tolerance", "min_relative_drop", "fit_accuracy"):
            out.pop(key)  # summary-only settings may change between calls
        return out


def _check_int(name, value, *, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"Expected `{name}` to be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"Expected `{name}` >= {minimum}. Received: {name}={value!r}")


def _check_float(name, value, *, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"Expected `{name}` to be a number. Received: {name}={value!r}")
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and value > high
    if bad:
        bounds = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        if high is not None:
            bounds += f"{' and ' if bounds else ''}<= {high}"
        raise ValueError(f"Expected finite `{name}` {bounds}. Received: {name}={value!r}")


def _as_tuple(name, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"Expected `{name}` to be a sequence. Received: {name}={value!r}")
    return tuple(value)


#: Named configurations. `gaussian`: the issue's d=20, k=2 study. `mnist`: a
#: 4x200 MLP on 1,000 MNIST digits with 10x the paper's learning rate and 100x
#: its weight decay, so the compression phase arrives within minutes.
#: `mnist_paper`: the paper's setting (1,000 images, lr 1e-4, weight decay 0.01
#: on kernels, batch 64, 10^6 steps, ~50 log-spaced measurements).
_MNIST = dict(dataset="mnist", n_train=1000, n_test=2000, hidden=(200, 200, 200, 200))
PRESETS: dict[str, dict] = {
    "gaussian": dict(dataset="gaussian"),
    "mnist": dict(**_MNIST, learning_rate=1e-3, weight_decay=1.0, epochs=600, checkpoint_every=50),
    "mnist_paper": dict(
        **_MNIST, learning_rate=1e-4, weight_decay=0.01, epochs=62_500, checkpoint_every=500
    ),
}


def get_preset(name: str, **overrides) -> DynamicsConfig:
    """A `DynamicsConfig` from a `PRESETS` name, with fields replaced by `overrides`.

    Raises:
        ValueError: an unknown preset or field, or an invalid value.
    """
    if name not in PRESETS:
        raise ValueError(f"Expected `preset` in {sorted(PRESETS)}. Received: preset={name!r}")
    fields = {f.name for f in dataclasses.fields(DynamicsConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Unknown DynamicsConfig fields: {unknown}. Expected some of {sorted(fields)}"
        )
    return DynamicsConfig(**{**PRESETS[name], **overrides})


def rank_columns(atols: Sequence[float]) -> list[str]:
    """Names of the rank columns of `measurements.csv`: exact, then one per eps."""
    return ["local_rank"] + [f"local_rank_eps={a:g}" for a in atols]


# -- data and model ----------------------------------------------------------------


def load_data(config: DynamicsConfig) -> datasets.Dataset:
    """The config's train/test data (float32 vectors, int64 labels)."""
    if config.dataset == "gaussian":
        return datasets.gaussian_task(
            config.n_train, config.n_test, dim=config.dim, k=config.k, seed=config.data_seed
        )
    return datasets.load(
        config.dataset,
        data_path=config.data_path,
        seed=config.data_seed,
        n_train=config.n_train,
        n_test=config.n_test,
    )


def build_mlp(
    input_dim: int,
    num_classes: int,
    hidden: Sequence[int],
    *,
    activation: str = "relu",
    seed: int = 0,
) -> keras.Model:
    """A Dense MLP with layers `hidden_1..hidden_L` and a linear `output` (logits).

    Args:
        input_dim: input features.
        num_classes: output logits.
        hidden: widths of the hidden layers.
        activation: hidden activation. Default "relu".
        seed: seed of the Glorot-uniform kernels. Default 0.

    Returns:
        A functional `keras.Model` (not compiled) returning logits.
    """
    inputs = keras.Input((input_dim,), name="x")
    h = inputs
    for i, width in enumerate(hidden):
        h = keras.layers.Dense(
            width,
            activation=activation,
            name=f"hidden_{i + 1}",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 1000 + i),
        )(h)
    outputs = keras.layers.Dense(
        num_classes,
        name="output",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed * 1000 + len(hidden)),
    )(h)
    return keras.Model(inputs, outputs, name="mlp")


def _compile(model: keras.Model, config: DynamicsConfig) -> None:
    optimizer = keras.optimizers.AdamW(
        learning_rate=config.learning_rate, weight_decay=config.weight_decay
    )
    if not config.decay_bias:
        optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    optimizer.build(model.trainable_variables)


def _epoch_batches(x, y, *, batch_size: int, seed: int, first_epoch: int, epochs: int):
    """Batches of epochs `first_epoch..epochs-1`; each epoch's order depends only
    on `(seed, epoch)`, so a resumed run sees the same batches."""
    x, y = tf.constant(x), tf.constant(y)
    n = int(x.shape[0])

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    epochs_ds = tf.data.Dataset.range(first_epoch, epochs)
    return (
        epochs_ds.flat_map(one_epoch)
        .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
        .prefetch(2)
    )


# -- callbacks -------------------------------------------------------------------


class _StepMetrics(keras.callbacks.Callback):
    """Train/test loss and accuracy at the steps a step schedule fires (same
    step counting as `LocalRankCallback`), appended to a CSV written atomically."""

    def __init__(self, data, schedule, path, *, measure_on_train_begin, batch_size=2048):
        super().__init__()
        self._arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
        self.schedule = schedule
        self.path = path
        self.measure_on_train_begin = measure_on_train_begin
        self._batch_size = batch_size
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        self._spe = self.params["steps"]
        self.schedule.resolve(epochs=self.params["epochs"], steps_per_epoch=self._spe)
        self.rows = pd.read_csv(self.path).to_dict("records") if os.path.exists(self.path) else []
        self._epoch, self._step = 0, 0
        if self.measure_on_train_begin:
            self._measure(-1)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._step = epoch, epoch * self._spe

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self.schedule.fires(self._step):
            self._measure(self._epoch)

    def _evaluate(self, x, y) -> tuple[float, float]:
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), self._batch_size):
            logits = self.model(x[start : start + self._batch_size], training=False)
            labels = y[start : start + self._batch_size]
            loss_sum += float(
                keras.ops.sum(
                    keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                )
            )
            correct += int(np.sum(np.argmax(keras.ops.convert_to_numpy(logits), -1) == labels))
        return loss_sum / len(x), correct / len(x)

    def _measure(self, epoch):
        x_tr, y_tr, x_te, y_te = self._arrays
        train_loss, train_acc = self._evaluate(x_tr, y_tr)
        test_loss, test_acc = self._evaluate(x_te, y_te)
        self.rows.append(
            dict(
                step=self._step,
                epoch=epoch,
                train_loss=train_loss,
                train_accuracy=train_acc,
                test_loss=test_loss,
                test_accuracy=test_acc,
            )
        )
        atomic_write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))


class _Checkpoint(keras.callbacks.Callback):
    """Model + optimizer to `checkpoints/epoch=<e>.keras` every `every` epochs and
    at the end; `state.json` (written after the model) names the latest one."""

    def __init__(self, run_dir, every, epochs, started):
        super().__init__()
        self.run_dir, self.every, self.epochs = run_dir, every, epochs
        self._started = started
        self._seconds = _read_state(run_dir).get("train_seconds", 0.0)

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.epochs:
            return
        folder = os.path.join(self.run_dir, "checkpoints")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"epoch={done:07d}.keras")
        tmp = os.path.join(folder, f".tmp-epoch={done:07d}.keras")
        self.model.save(tmp)
        os.replace(tmp, path)
        state = dict(
            epoch=done,
            step=done * self.params["steps"],
            checkpoint=os.path.basename(path),
            done=done == self.epochs,
            train_seconds=self._seconds + time.perf_counter() - self._started,
        )
        atomic_write_json(os.path.join(self.run_dir, "state.json"), state)
        for old in glob.glob(os.path.join(folder, "epoch=*.keras")):
            if old != path:
                os.unlink(old)


def _read_state(run_dir) -> dict:
    path = os.path.join(run_dir, "state.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _truncate_csv(path: str, column: str, last: int) -> None:
    """Keep only rows with `column <= last` (measurements redone after a resume)."""
    if os.path.exists(path):
        frame = pd.read_csv(path)
        atomic_write_text(path, frame[frame[column] <= last].to_csv(index=False))


def _restore(model: keras.Model, path: str) -> None:
    """Copy model weights and optimizer state from a `.keras` checkpoint.

    The optimizer is rebuilt by `_compile` (Keras does not serialise the
    kernels-only weight-decay exclusion), then its variables are assigned.
    """
    saved = keras.models.load_model(path)
    model.set_weights(saved.get_weights())
    src, dst = saved.optimizer.variables, model.optimizer.variables
    if len(src) != len(dst):
        raise ValueError(f"Checkpoint {path!r} does not match the model's optimizer state.")
    for target, value in zip(dst, src):
        target.assign(value)


# -- summaries -------------------------------------------------------------------


def summarize_curve(
    steps: Sequence[int],
    values: Sequence[float],
    *,
    drop_tolerance: float = 0.1,
    min_relative_drop: float = 0.05,
) -> dict:
    """Peak, final value, drop and the step the drop starts, of one rank curve.

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
    return dict(
        layers=layers,
        final={c: float(per_step[c].iloc[-1]) for c in METRIC_COLUMNS},
        fit_step=int(fitted["step"].iloc[0]) if len(fitted) else None,
        steps=int(per_step["step"].iloc[-1]),
        measurements=int(len(per_step)),
    )


def aggregate_summaries(summaries: dict[int, dict]) -> dict:
    """Mean and std across seeds of every number in per-seed `summarize_run` dicts.

    Missing values (e.g. no drop: `drop_start_step` None) are left out of the
    mean; `count` says how many seeds had a value. Non-numeric fields are
    dropped.
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
            std=float(np.std(numbers)) if numbers else None,
            count=len(numbers),
        )

    return walk([summaries[seed] for seed in sorted(summaries)])


# -- runs ------------------------------------------------------------------------


def _measurements(run_dir: str, config: DynamicsConfig) -> pd.DataFrame:
    """Join the rank trace and the loss/accuracy rows into one row per (step, layer)."""
    trace = pd.read_csv(os.path.join(run_dir, "trace.csv"))
    trace["column"] = [
        "local_rank" if kind == "exact" else f"local_rank_eps={atol:g}"
        for kind, atol in zip(trace["kind"], trace["atol"])
    ]
    wide = trace.pivot_table(
        index=["step", "epoch", "layer"], columns="column", values="mean", sort=False
    ).reset_index()
    metrics = pd.read_csv(os.path.join(run_dir, "metrics.csv")).drop(columns="epoch")
    frame = wide.merge(metrics, on="step", how="left")
    columns = ["step", "epoch", "layer", *rank_columns(config.atols), *METRIC_COLUMNS]
    return frame[columns].sort_values(["step", "layer"], kind="stable").reset_index(drop=True)


def _check_run_config(run_dir: str, fingerprint: dict) -> None:
    path = os.path.join(run_dir, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        diff = sorted(
            k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)
        )
        if diff:
            raise ValueError(
                f"The run directory {run_dir!r} holds a run with a different config "
                f"(fields {diff}); use a new workdir to change them."
            )
    else:
        atomic_write_json(path, fingerprint)


def _train_seed(config, data, seed: int, run_dir: str, callbacks, verbose: int) -> None:
    _check_run_config(run_dir, {**config.run_fingerprint(), "seed": seed})
    state = _read_state(run_dir)
    if state.get("done"):
        return
    keras.utils.set_random_seed(seed)
    model = build_mlp(
        data.x_train.shape[1],
        data.num_classes,
        config.hidden,
        activation=config.activation,
        seed=seed,
    )
    _compile(model, config)
    initial_epoch = state.get("epoch", 0)
    paths = {
        name: os.path.join(run_dir, name) for name in ("trace.csv", "metrics.csv", "history.csv")
    }
    if initial_epoch:
        _restore(model, os.path.join(run_dir, "checkpoints", state["checkpoint"]))
        _truncate_csv(paths["trace.csv"], "step", state["step"])
        _truncate_csv(paths["metrics.csv"], "step", state["step"])
        _truncate_csv(paths["history.csv"], "epoch", initial_epoch - 1)
        log.info("seed %d: resuming at epoch %d (step %d)", seed, initial_epoch, state["step"])
    else:
        for path in paths.values():  # leftovers of a run interrupted before its first checkpoint
            if os.path.exists(path):
                os.unlink(path)
    fresh = not initial_epoch
    schedule = schedules_lib.LogSchedule(config.num_measurements, config.total_steps)
    hidden = [f"hidden_{i + 1}" for i in range(len(config.hidden))]
    probe = data.x_train[: config.rank_samples]
    tensorboard = os.path.join(run_dir, "tensorboard")
    run_callbacks = [
        _StepMetrics(
            data,
            schedules_lib.LogSchedule(config.num_measurements, config.total_steps),
            paths["metrics.csv"],
            measure_on_train_begin=fresh,
        ),
        LocalRankCallback(
            probe,
            hidden,
            atol=list(config.atols),
            schedule=schedule,
            max_samples=config.rank_samples,
            trace_path=paths["trace.csv"],
            log_dir=os.path.join(tensorboard, "local_rank"),
            measure_on_train_begin=fresh,
        ),
        _Checkpoint(run_dir, config.checkpoint_every, config.epochs, time.perf_counter()),
        keras.callbacks.CSVLogger(paths["history.csv"], append=True),
        keras.callbacks.TensorBoard(tensorboard, write_graph=False),
        *callbacks,
    ]
    batches = _epoch_batches(
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
    )  # the order comes from `_epoch_batches`
    keras.backend.clear_session()


def train_and_evaluate(
    config: DynamicsConfig,
    workdir: str | os.PathLike,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    plots: bool = True,
    verbose: int = 0,
    title: str | None = None,
) -> dict:
    """Train one MLP per seed, measure local rank over training, write the outputs.

    Args:
        config: the study.
        workdir: the run directory (see the module docstring); reuse it to resume.
        callbacks: extra Keras callbacks for every `fit` (after the built-in ones).
        plots: write PNG plots. Default True.
        verbose: Keras `fit` verbosity. Default 0.
        title: plot title. Default: dataset and model.

    Returns:
        The top-level summary (also written to `workdir/summary.json`):
        `{"per_seed": {seed: summarize_run(...)}, "mean_std": ...,
        "task_dimension": k (Gaussian task) or None, ...}`.

    Raises:
        TypeError: `config` is not a `DynamicsConfig`.
        ValueError: `workdir` holds a run with a different config, or bad data.
    """
    if not isinstance(config, DynamicsConfig):
        raise TypeError(f"Expected `config` to be a DynamicsConfig. Received: {config!r}")
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
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
    atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    start = time.perf_counter()
    frames, summaries = [], {}
    title = title or (
        f"{config.dataset} (n={config.n_train}), MLP {'x'.join(map(str, config.hidden))}, "
        f"AdamW lr={config.learning_rate:g} wd={config.weight_decay:g}"
    )
    for seed in config.seeds:
        run_dir = os.path.join(workdir, f"seed={seed}")
        os.makedirs(run_dir, exist_ok=True)
        _train_seed(config, data, seed, run_dir, callbacks, verbose)
        frame = _measurements(run_dir, config)
        atomic_write_text(os.path.join(run_dir, "measurements.csv"), frame.to_csv(index=False))
        atomic_write_json(os.path.join(run_dir, "measurements.json"), frame.to_dict("records"))
        summary = {**summarize_run(frame, config), "run": _read_state(run_dir)}
        atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
        frames.append(frame.assign(seed=seed))
        summaries[seed] = summary
        if plots:
            _plot(frame, config, os.path.join(run_dir, "dynamics.png"), f"{title}, seed {seed}")
    everything = pd.concat(frames, ignore_index=True)
    atomic_write_text(os.path.join(workdir, "measurements.csv"), everything.to_csv(index=False))
    if plots:
        _plot(
            everything,
            config,
            os.path.join(workdir, "dynamics.png"),
            f"{title}, {len(config.seeds)} seed(s)",
        )
    result = dict(
        per_seed={str(s): summaries[s] for s in config.seeds},
        mean_std=aggregate_summaries(summaries),
        seeds=list(config.seeds),
        task_dimension=config.k if config.dataset == "gaussian" else None,
        rank_columns=rank_columns(config.atols),
        drop_start_definition=(
            "last measured step with value >= peak - drop_tolerance * (peak - final); "
            "None when (peak - final) / peak < min_relative_drop"
        ),
        wall_seconds_this_call=time.perf_counter() - start,
    )
    atomic_write_json(os.path.join(workdir, "summary.json"), result)
    return result


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
