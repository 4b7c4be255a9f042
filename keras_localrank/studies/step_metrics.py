"""`StepMetrics`: train/test loss and accuracy at the steps a schedule names."""

from __future__ import annotations

import os

import keras
import numpy as np
import pandas as pd

from keras_localrank.io import atomic_write_text
from keras_localrank.scheduled import ScheduledCallback

__all__ = ["StepMetrics"]


class StepMetrics(ScheduledCallback):
    """Train/test loss and accuracy (of a logits model) at scheduled optimizer steps.

    The step is the optimizer's global step (`keras_localrank.scheduled`), the
    same one `LocalRankCallback` uses, so both record the same steps, also with
    `steps_per_execution > 1` and after a resume. Rows go to a CSV rewritten
    atomically after every evaluation; an existing CSV is continued, and rows
    past the step training resumes from are dropped.

    Args:
        data: a `keras_localrank.datasets.Dataset`.
        schedule: a schedule (`schedules.LogSchedule`, `StepSchedule`, ...).
        path: the CSV.
        measure_on_train_begin: also evaluate before the first step.
            Default False.
        batch_size: evaluation batch size. Default 2048.
        loss_fn: per-example loss `f(labels, logits)`. Default: cross-entropy
            from logits (`studies.mlp.loss_function` gives the config's).
    """

    def __init__(
        self,
        data,
        schedule,
        path,
        *,
        measure_on_train_begin=False,
        batch_size=2048,
        loss_fn=None,
    ):
        super().__init__(schedule, measure_on_train_begin=measure_on_train_begin)
        self._loss_fn = loss_fn or (
            lambda labels, logits: keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            )
        )
        self._arrays = (data.x_train, data.y_train, data.x_test, data.y_test)
        self.path = os.fspath(path)
        self._batch_size = batch_size
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        self.rows = pd.read_csv(self.path).to_dict("records") if os.path.exists(self.path) else []
        super().on_train_begin(logs)

    # -- ScheduledCallback hooks ----------------------------------------------------

    def on_scheduled_step(self, step, epoch, *, initial=False):
        x_tr, y_tr, x_te, y_te = self._arrays
        train_loss, train_acc = self._evaluate(x_tr, y_tr)
        test_loss, test_acc = self._evaluate(x_te, y_te)
        self.rows.append(
            dict(
                step=step,
                epoch=epoch,
                train_loss=train_loss,
                train_accuracy=train_acc,
                test_loss=test_loss,
                test_accuracy=test_acc,
            )
        )
        self._save()

    def recorded_steps(self):
        return [row["step"] for row in self.rows]

    def discard_after(self, step):
        kept = [row for row in self.rows if row["step"] <= step]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._save()

    # -- helpers --------------------------------------------------------------------

    def _save(self):
        atomic_write_text(self.path, pd.DataFrame(self.rows).to_csv(index=False))

    def _evaluate(self, x, y) -> tuple[float, float]:
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), self._batch_size):
            logits = self.model(x[start : start + self._batch_size], training=False)
            labels = y[start : start + self._batch_size]
            loss_sum += float(keras.ops.sum(self._loss_fn(labels, logits)))
            correct += int(np.sum(np.argmax(keras.ops.convert_to_numpy(logits), -1) == labels))
        return loss_sum / len(x), correct / len(x)
