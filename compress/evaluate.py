"""Re-evaluation of a (compressed) model: accuracy, size, cost, speed, fine-tune."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time

import keras
import numpy as np

from compress.distill import DistillationLoss, pack_targets
from compress.macs import count_macs, uncounted_layers
from compress.outputs import OutputKind, output_kind
from compress.registry import count_params
from keras_localrank.validation import check_choice, check_fraction, check_positive_int

__all__ = [
    "FINETUNE_SCHEDULES",
    "FineTuned",
    "check_learning_rate",
    "default_finetune_lr",
    "ensure_compiled",
    "file_size",
    "finetune",
    "LATENCY_BATCHES",
    "latency_ms",
    "measure",
    "validation_score",
]

logger = logging.getLogger(__name__)


def ensure_compiled(
    model, *, learning_rate: float = 1e-3, kind: OutputKind | None = None
) -> keras.Model:
    """Compile an uncompiled classifier with Adam, the cross-entropy of its output, accuracy.

    Args:
        model: a Keras classifier (left as it is when already compiled).
        learning_rate: Adam's learning rate. Default 1e-3.
        kind: what the output is. Default None: `output_kind(model)`.

    Returns:
        `model`.
    """
    if not getattr(model, "compiled", False):
        kind = output_kind(model) if kind is None else kind
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=kind.loss(),
            metrics=["accuracy"],
        )
    return model


#: Default fine-tuning learning rate, as a fraction of the compiled one.
FINETUNE_LR_FRACTION = 0.1
#: Learning rate that fraction applies to when the model has no float one.
FALLBACK_LR = 1e-3
#: How the fine-tuning learning rate moves: held, or cosine-decayed to zero.
FINETUNE_SCHEDULES = ("constant", "cosine")


def check_learning_rate(value, name: str = "finetune_lr") -> float | None:
    """`value` as a float >= 0 (None passes through), or a clear error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"Expected `{name}` to be a number. Received: {name}={value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"Expected `{name}` >= 0 and finite. Received: {name}={value!r}")
    return float(value)


def default_finetune_lr(model) -> float:
    """`FINETUNE_LR_FRACTION` times the model's compiled learning rate.

    A compressed model starts next to the original's optimum: a fresh
    optimizer at the training learning rate knocks it away (measured: Adam
    at 1e-3 lowers the accuracy of good compressed models), a tenth of it
    refines. Models without a compiled float learning rate (uncompiled, or a
    schedule) get a tenth of `FALLBACK_LR` (Adam's default), i.e. 1e-4.
    """
    optimizer = getattr(model, "optimizer", None) if getattr(model, "compiled", False) else None
    base = None
    if optimizer is not None:
        value = optimizer.get_config().get("learning_rate")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            base = float(value)
    return FINETUNE_LR_FRACTION * (FALLBACK_LR if base is None else base)


def _with_learning_rate(model, learning_rate) -> None:
    """Recompile `model` (same loss and metrics) with a fresh optimizer at `learning_rate`
    (a float or a `keras.optimizers.schedules.LearningRateSchedule`)."""
    config = model.get_compile_config()
    optimizer = keras.optimizers.deserialize(config["optimizer"])
    optimizer_config = {**optimizer.get_config(), "learning_rate": learning_rate}
    fresh = type(optimizer).from_config(optimizer_config)
    config = {**config, "optimizer": keras.optimizers.serialize(fresh)}
    model.compile_from_config(config)


def validation_score(model, x, y, *, batch_size: int = 128) -> tuple[float, float]:
    """`(accuracy or -inf, -loss)` on `(x, y)`: larger is better, compared as a tuple."""
    result = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return float(result.get("accuracy", -np.inf)), -float(result["loss"])


@dataclasses.dataclass
class FineTuned:
    """What `finetune` did.

    Attributes:
        model: the fine-tuned model (the same object that was passed in).
        learning_rate: the learning rate used.
        best_epoch: epoch whose weights were kept (0: the weights before
            fine-tuning); the last epoch without validation data.
        scores: validation `(accuracy, -loss)` before and after each epoch
            (empty without validation data).
    """

    model: keras.Model
    learning_rate: float
    best_epoch: int
    scores: list = dataclasses.field(default_factory=list)


def finetune(
    model,
    x,
    y,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    learning_rate: float | None = None,
    validation_data: tuple | None = None,
    schedule: str = "constant",
    teacher=None,
    distill: float = 0.0,
    temperature: float = 2.0,
) -> FineTuned:
    """Train `model` in place for `epochs`, keeping the best epoch on validation data.

    The model is trained with its compile configuration (loss, metrics, the
    optimizer class) and a fresh optimizer at `learning_rate`, held constant
    or decayed to zero along a cosine over all the steps. With a `teacher`
    and `distill > 0` the loss is `compress.distill.DistillationLoss` (the
    labels mixed with the teacher's outputs, computed once); the model is
    compiled back to its own configuration afterwards. With
    `validation_data`, the weights are scored before fine-tuning and after
    every epoch (accuracy, ties broken by loss) and the best are kept, so
    fine-tuning never makes the model worse on that data.

    Args:
        model: a compiled Keras model, or a classifier `ensure_compiled` can
            compile.
        x: training inputs.
        y: training labels.
        epochs: epochs, >= 0.
        batch_size: batch size. Default 128.
        seed: seed of the shuffling. Default 0.
        learning_rate: >= 0. Default None: `default_finetune_lr(model)`
            (a tenth of the compiled learning rate, 1e-4 for Adam's default).
        validation_data: `(x_val, y_val)` held out of `x`. Default None.
        schedule: `"constant"` (default) or `"cosine"` (from `learning_rate`
            to 0 over `epochs`; see `FINETUNE_SCHEDULES`).
        teacher: the model to distill from (the original), or None. Default
            None.
        distill: share in [0, 1] of the distillation term. Default 0 (plain
            cross-entropy; `teacher` unused).
        temperature: distillation temperature > 0. Default 2.0.

    Returns:
        A `FineTuned`.

    Raises:
        ValueError: negative `epochs` or `learning_rate`, empty validation data,
            an unknown `schedule`, `distill` outside [0, 1] or > 0 without a
            `teacher` or with a one-vs-rest (sigmoid) output.
        TypeError: a `learning_rate` that is not a number.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"Expected `finetune_epochs` >= 0. Received: finetune_epochs={epochs!r}")
    learning_rate = check_learning_rate(learning_rate, "learning_rate")
    ensure_compiled(model)
    if learning_rate is None:
        learning_rate = default_finetune_lr(model)
    if validation_data is not None and len(validation_data[0]) == 0:
        raise ValueError("Expected non-empty `validation_data`. Received: 0 samples.")
    check_choice("schedule", schedule, FINETUNE_SCHEDULES)
    distill = check_fraction("distill", distill, allow_zero=True)
    if distill > 0 and teacher is None:
        raise ValueError(f"Expected a `teacher` to distill from. Received: distill={distill!r}")
    if not epochs:
        return FineTuned(model, learning_rate, 0)
    keras.utils.set_random_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    rate = (
        keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
        if schedule == "cosine"
        else learning_rate
    )
    own_config = model.get_compile_config()
    _with_learning_rate(model, rate)
    if distill > 0:
        kind = output_kind(model)
        if kind.binary:
            raise ValueError(
                "Expected a multi-class (softmax or logits) output to distill. Received: "
                f"{kind.kind} output with distill={distill!r}."
            )
        teacher_out = teacher.predict(x, batch_size=4 * batch_size, verbose=0)
        y = pack_targets(y, teacher_out)
        model.compile(
            optimizer=model.optimizer,
            loss=DistillationLoss(distill, temperature, from_logits=kind.from_logits),
        )

    def score(m):
        if distill > 0:  # the compiled loss wants packed targets: score by prediction
            return _prediction_score(m, *validation_data, kind=kind, batch_size=batch_size)
        return validation_score(m, *validation_data, batch_size=batch_size)

    def restore():
        if distill > 0:
            model.compile_from_config(own_config)

    if validation_data is None:
        model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
        restore()
        return FineTuned(model, learning_rate, epochs)
    scores = [score(model)]
    best_epoch, best_weights = 0, model.get_weights()
    for epoch in range(1, epochs + 1):
        # One epoch at a time; the optimizer (and its schedule's step) carries on.
        model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)
        scores.append(score(model))
        if scores[-1] > scores[best_epoch]:
            best_epoch, best_weights = epoch, model.get_weights()
    model.set_weights(best_weights)
    restore()
    logger.info("fine-tuning: kept epoch %d of %d (validation %s)", best_epoch, epochs, scores)
    return FineTuned(model, learning_rate, best_epoch, scores)


def _prediction_score(model, x, y, *, kind: OutputKind, batch_size: int) -> tuple[float, float]:
    """`validation_score` computed from predictions (whatever the compiled loss)."""
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    y = np.asarray(y).reshape(-1)
    accuracy = float(np.mean(np.argmax(out.reshape(len(y), -1), axis=1) == y))
    return accuracy, -kind.numpy_loss(y, out)


def file_size(model) -> int:
    """Bytes of the model saved as `.keras` (in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        return os.path.getsize(path)


#: Batch sizes the latency is measured at (one sample; a throughput batch).
LATENCY_BATCHES = (1, 64)


def latency_ms(model, x, *, batch_size: int = 128, runs: int = 15) -> float:
    """Median wall-clock time of one inference batch of `batch_size`, in milliseconds.

    The batch is the first `batch_size` samples of `x` (repeated when `x`
    has fewer). One untimed call first traces the predict function; the
    median of `runs` timed calls is robust to the other processes of a
    shared machine.

    Args:
        model: a Keras model.
        x: input samples.
        batch_size: samples per timed batch, >= 1. Default 128.
        runs: timed calls, >= 1. Default 15.

    Returns:
        The median, in milliseconds.

    Raises:
        ValueError, TypeError: `batch_size` or `runs` not a positive int,
            or empty `x`.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    runs = check_positive_int("latency_runs", runs)
    if len(x) == 0:
        raise ValueError("Expected at least one sample to time. Received: x with 0 samples.")
    batch = np.asarray(x)[np.arange(batch_size) % len(x)]
    model.predict_on_batch(batch)  # warm up (traces the predict function)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def measure(
    model,
    x,
    y,
    *,
    nonzero: bool = False,
    batch_size: int = 128,
    latency_runs: int = 15,
    latency_batches: tuple[int, ...] = LATENCY_BATCHES,
    kind: OutputKind | None = None,
) -> dict:
    """Metrics, parameters, MACs, file size and latency of `model` on `(x, y)`.

    Args:
        model: a Keras model (compiled, or a classifier `ensure_compiled` can
            compile).
        x: test inputs.
        y: test labels.
        nonzero: count parameters as non-zero weights. Default False.
        batch_size: evaluation batch size. Default 128.
        latency_runs: timed inference runs per batch size (the median is
            kept). Default 15.
        latency_batches: batch sizes to time. Default `LATENCY_BATCHES`.
        kind: what the output is (for compiling an uncompiled model).
            Default None: detected.

    Returns:
        `{"metrics": {...}, "params", "macs", "macs_uncounted" (layers with
        weights that no MAC rule covers), "file_bytes",
        "latency_ms_b<batch>" for each latency batch, "load_average"}`
        (latencies in milliseconds per batch, measured on this machine's
        CPU; the 1-minute load average of the machine when they were
        measured, None where the platform has none: above the number of
        cores, other processes share the CPU and the latencies say little).
    """
    ensure_compiled(model, kind=kind)
    metrics = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    out = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "params": count_params(model, nonzero=nonzero),
        "macs": count_macs(model),
        "macs_uncounted": uncounted_layers(model),
        "file_bytes": file_size(model),
    }
    for batch in latency_batches:
        out[f"latency_ms_b{batch}"] = latency_ms(
            model, x, batch_size=batch, runs=latency_runs
        )
    out["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return out
