"""`StepMetrics`: train/test loss and accuracy at the steps a step schedule names."""

from __future__ import annotations

import os

import keras
import numpy as np
import pandas as pd

from keras_localrank.io import atomic_write_text

__all__ = ["StepMetrics"]


class StepMetrics(keras.callbacks.Callback):
    """Train/test loss and accuracy at the steps a step schedule fires (same
    step counting as `LocalRankCallback`), appended to a CSV written atomically.

    Args:
        data: a `keras_localrank.datasets.Dataset`.
        schedule: a step schedule (`schedules.LogSchedule`, ...).
        path: the CSV (continued when it exists: resumed runs).
        measure_on_train_begin: also evaluate before the first step.
        batch_size: evaluation batch size. Default 2048.
    """

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
