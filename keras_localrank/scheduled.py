"""`ScheduledCallback`: the one way a callback here decides when to act during `fit`.

The step is the optimizer's global step, `model.optimizer.iterations` (as
TF-MOT's pruning callbacks read it), never a private counter, so it stays
right when

- `model.compile(..., steps_per_execution=k)` makes Keras call batch hooks
  only every `k` steps: a step schedule fires when the global step *crosses*
  a scheduled step since the last check (`Schedule.due`), not only on
  equality;
- `fit` is called again on the same model and callback: steps continue;
- `keras.callbacks.BackupAndRestore` (or a reloaded checkpoint) resumes an
  interrupted run: records past the step it resumes from are discarded, and
  the optional measurement before training is taken at the true current
  step, and only if that step is not already recorded.

A subclass implements three hooks:

- `on_scheduled_step(step, epoch, *, initial)`: act (measure, evaluate, ...)
  on the current weights; `step` is the global step, `epoch` the current
  0-based epoch (`initial=True`: the measurement before training, where
  `epoch` is the last finished epoch, -1 on a fresh run);
- `recorded_steps()`: the steps already in the subclass's record (a trace
  loaded from disk), so a resumed run does not record a step twice;
- `discard_after(step)`: forget records with a step greater than `step`.

Subclasses that override `on_train_begin`, `on_epoch_begin`,
`on_train_batch_end` or `on_epoch_end` call `super()`. Epoch schedules add no
per-batch hook (Keras keeps asynchronous dispatch).

Example:
    >>> class Norm(ScheduledCallback):
    ...     def __init__(self):
    ...         super().__init__(schedules.StepSchedule(100))
    ...         self.rows = []
    ...     def on_scheduled_step(self, step, epoch, *, initial=False):
    ...         self.rows.append((step, float(keras.ops.norm(self.model.weights[0]))))
    ...     def recorded_steps(self):
    ...         return [s for s, _ in self.rows]
    ...     def discard_after(self, step):
    ...         self.rows = [r for r in self.rows if r[0] <= step]
"""

from __future__ import annotations

from collections.abc import Iterable

import keras

from keras_localrank import schedules as schedules_lib

__all__ = ["ScheduledCallback", "global_step"]


def global_step(model: keras.Model) -> int:
    """The optimizer's step count, `model.optimizer.iterations`, as an int.

    Raises:
        ValueError: the model has no optimizer (not compiled).
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            "Expected a compiled model: the step is read from `model.optimizer.iterations`. "
            f"Received: model {getattr(model, 'name', model)!r} with no optimizer."
        )
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class ScheduledCallback(keras.callbacks.Callback):
    """Base class: calls `on_scheduled_step` at the steps or epochs a schedule names.

    Args:
        schedule: `"epoch"` (default: end of every epoch), `"log"` (~50
            log-spaced steps over the run), or a `schedules.EpochSchedule(n)`,
            `schedules.StepSchedule(n)`, `schedules.LogSchedule(num, total)`.
        measure_on_train_begin: also act once before the first step of each
            `fit` call, at the current global step, unless that step is
            already recorded. Default False.

    Attributes:
        schedule: the `schedules.Schedule` (assignable).
        step: the global step at the last check (None before `fit`).
        epoch: the current epoch (0-based).

    Raises:
        ValueError: a schedule that never fires in the run, raised before the
            first training step; a model without an optimizer.
        TypeError, ValueError: a bad `schedule` (at construction).
    """

    def __init__(self, schedule="epoch", *, measure_on_train_begin: bool = False):
        super().__init__()
        self.schedule = schedule
        self.measure_on_train_begin = bool(measure_on_train_begin)
        self.step: int | None = None
        self.epoch = 0
        self._synced = False

    # -- the schedule ---------------------------------------------------------------

    @property
    def schedule(self) -> schedules_lib.Schedule:
        return self._schedule

    @schedule.setter
    def schedule(self, value) -> None:
        self._schedule = schedules_lib.get(value)
        if self._schedule.per_step:
            self.__dict__.pop("on_train_batch_end", None)
        else:
            # Keras' default no-op hook: Keras keeps asynchronous dispatch.
            self.on_train_batch_end = keras.callbacks.Callback.on_train_batch_end.__get__(self)

    # -- hooks for subclasses -------------------------------------------------------------

    def on_scheduled_step(self, step: int, epoch: int, *, initial: bool = False) -> None:
        """Act on the current weights at global step `step` (override)."""
        raise NotImplementedError

    def recorded_steps(self) -> Iterable[int]:
        """Steps already recorded (override when the record outlives a `fit`)."""
        return ()

    def discard_after(self, step: int) -> None:
        """Forget records with a step greater than `step` (override likewise)."""

    # -- the global step ------------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """`model.optimizer.iterations` now."""
        return global_step(self.model)

    def _sync(self, epoch: int) -> None:
        """Once per `fit`, before the first step: every `on_train_begin` has run
        (so `BackupAndRestore` has restored the weights and the optimizer)."""
        self._synced = True
        self.epoch = epoch
        step = self.global_step
        params = self.params or {}
        self.schedule.resolve(
            epochs=params.get("epochs", 1) or 1,
            steps_per_epoch=params.get("steps"),
            initial_epoch=epoch,
            initial_step=step,
        )
        self.step = step
        self.discard_after(step)
        if self.measure_on_train_begin and step not in set(self.recorded_steps()):
            self.on_scheduled_step(step, epoch - 1, initial=True)

    # -- Keras hooks ------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._synced = False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if not self._synced:
            self._sync(epoch)

    def on_train_batch_end(self, batch, logs=None):
        if not self._synced:
            self._sync(self.epoch)
        step = self.global_step
        previous, self.step = self.step, step
        if self.schedule.due(previous, step):
            self.on_scheduled_step(step, self.epoch)

    def on_epoch_end(self, epoch, logs=None):
        if not self._synced:
            self._sync(epoch)
        self.epoch = epoch
        if not self.schedule.per_step:
            self.step = self.global_step
            if self.schedule.fires(epoch):
                self.on_scheduled_step(self.step, epoch)
