"""Resume state of one training run: `.keras` checkpoints (model and optimizer),
`state.json`, and the restore that puts them back into a freshly compiled model."""

from __future__ import annotations

import os
import time

import keras
import pandas as pd

from keras_localrank.rundir import SubRun

__all__ = ["Checkpoint", "read_state", "restore", "truncate_csv"]

STATE = "state.json"
FOLDER = "checkpoints"


def read_state(run: SubRun) -> dict:
    """The run's `state.json` (`epoch`, `step`, `checkpoint`, `done`,
    `train_seconds`), or `{}` before the first checkpoint."""
    return run.read_json(STATE, {})


class Checkpoint(keras.callbacks.Callback):
    """Model + optimizer to `checkpoints/epoch=<e>.keras` every `every` epochs and
    at the end; `state.json` (written after the model) names the latest one.

    Both files are written atomically inside the sub-run folder; the previous
    checkpoint is removed only once the new one and `state.json` are in place.

    Args:
        run: the sub-run folder.
        every: epochs between checkpoints.
        epochs: the run's last epoch (always checkpointed).
        started: `time.perf_counter()` when this call's training started.
    """

    def __init__(self, run: SubRun, every: int, epochs: int, started: float):
        super().__init__()
        self.run, self.every, self.epochs = run, every, epochs
        self._started = started
        self._seconds = read_state(run).get("train_seconds", 0.0)

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.epochs:
            return
        name = f"epoch={done:07d}.keras"
        with self.run.atomic_path(f"{FOLDER}/{name}") as tmp:
            self.model.save(tmp)
        state = dict(
            epoch=done,
            step=done * self.params["steps"],
            checkpoint=name,
            done=done == self.epochs,
            train_seconds=self._seconds + time.perf_counter() - self._started,
        )
        self.run.write_json(STATE, state)
        older = [
            f"{FOLDER}/{f}"
            for f in os.listdir(self.run.join(FOLDER))
            if f.startswith("epoch=") and f.endswith(".keras") and f != name
        ]
        self.run.remove(*older)


def truncate_csv(run: SubRun, relpath: str, column: str, last: int) -> None:
    """Keep only rows with `column <= last` (measurements redone after a resume)."""
    if run.exists(relpath):
        frame = pd.read_csv(run.join(relpath))
        run.write_text(relpath, frame[frame[column] <= last].to_csv(index=False))


def restore(model: keras.Model, path: str | os.PathLike) -> None:
    """Copy model weights and optimizer state from a `.keras` checkpoint.

    The model must be compiled the same way first (Keras does not serialise
    the kernels-only weight-decay exclusion); then its variables are assigned.

    Raises:
        ValueError: the checkpoint's optimizer state does not match the model's.
    """
    saved = keras.models.load_model(path)
    model.set_weights(saved.get_weights())
    src, dst = saved.optimizer.variables, model.optimizer.variables
    if len(src) != len(dst):
        raise ValueError(f"Checkpoint {os.fspath(path)!r} does not match the model's optimizer.")
    for target, value in zip(dst, src):
        target.assign(value)
