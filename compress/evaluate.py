"""Re-evaluation of a (compressed) model: accuracy, size, cost, speed, fine-tune."""

from __future__ import annotations

import os
import tempfile
import time

import keras
import numpy as np

from compress.registry import count_macs, count_params

__all__ = ["ensure_compiled", "file_size", "finetune", "latency_ms", "measure", "outputs_logits"]


def outputs_logits(model) -> bool:
    """False when the model's last layer applies a softmax, else True."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    return activation is not keras.activations.softmax


def ensure_compiled(model, *, learning_rate: float = 1e-3) -> keras.Model:
    """Compile an uncompiled classifier with Adam, sparse cross-entropy, accuracy."""
    if not getattr(model, "compiled", False):
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=outputs_logits(model)),
            metrics=["accuracy"],
        )
    return model


def finetune(model, x, y, *, epochs: int, batch_size: int = 128, seed: int = 0) -> keras.Model:
    """Train `model` in place for `epochs` with its compile configuration
    (a fresh optimizer). Returns the model."""
    if epochs < 0:
        raise ValueError(f"Expected `finetune_epochs` >= 0. Received: {epochs}")
    if epochs:
        keras.utils.set_random_seed(seed)
        ensure_compiled(model)
        model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0)
    return model


def file_size(model) -> int:
    """Bytes of the model saved as `.keras` (in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def latency_ms(model, x, *, batch_size: int = 128, runs: int = 15) -> float:
    """Median CPU time of one inference batch, in milliseconds."""
    batch = np.asarray(x[:batch_size])
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
) -> dict:
    """Metrics, parameters, MACs, file size and latency of `model` on `(x, y)`.

    Args:
        model: a Keras model (compiled, or a classifier `ensure_compiled` can
            compile).
        x: test inputs.
        y: test labels.
        nonzero: count parameters as non-zero weights. Default False.
        batch_size: evaluation and latency batch size. Default 128.
        latency_runs: timed inference runs (the median is kept). Default 15.

    Returns:
        `{"metrics": {...}, "params", "macs", "file_bytes", "latency_ms"}`.
    """
    ensure_compiled(model)
    metrics = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "params": count_params(model, nonzero=nonzero),
        "macs": count_macs(model),
        "file_bytes": file_size(model),
        "latency_ms": latency_ms(model, x, batch_size=batch_size, runs=latency_runs),
    }
