"""When a training callback measures: measurement schedules.

Schedules are small config-serialisable objects. A schedule is either
epoch-based (fires in `on_epoch_end`, no per-batch hook, so Keras keeps async
dispatch) or step-based: it names optimizer steps (the global step
`model.optimizer.iterations`, counted from 1 across epochs and across `fit`
calls), and `due(previous, current)` lists those crossed between two checks,
so a callback that only sees every `steps_per_execution`-th step still fires.
`keras_localrank.scheduled.ScheduledCallback` drives them.
"""

from __future__ import annotations

import math

import numpy as np

from keras_localrank.validation import check_positive_int

__all__ = ["Schedule", "EpochSchedule", "StepSchedule", "LogSchedule", "get", "last_step"]


def last_step(
    *, epochs: int, steps_per_epoch: int | None, initial_epoch: int = 0,
    initial_step: int | None = None,
) -> int | None:
    """The optimizer step a `fit` call ends at (None if steps per epoch are unknown).

    `initial_step + (epochs - initial_epoch) * steps_per_epoch`: a `fit` that
    starts at `initial_epoch` with the optimizer at `initial_step` (default
    `initial_epoch * steps_per_epoch`) runs the remaining epochs.
    """
    if steps_per_epoch is None:
        return None
    if initial_step is None:
        initial_step = initial_epoch * steps_per_epoch
    return initial_step + max(epochs - initial_epoch, 0) * steps_per_epoch


class Schedule:
    """Base class. Subclasses set `per_step` and implement `fires` (epoch
    schedules) or `due` (step schedules)."""

    per_step: bool = False

    def resolve(
        self, *, epochs: int, steps_per_epoch: int | None, initial_epoch: int = 0,
        initial_step: int | None = None,
    ) -> None:
        """Learn the length of the run (called before the first step of `fit`).

        Args:
            epochs: the `epochs` argument of `fit` (the last epoch, exclusive).
            steps_per_epoch: optimizer steps per epoch, or None if unknown.
            initial_epoch: the first epoch of this `fit` call. Default 0.
            initial_step: the optimizer step this `fit` call starts from.
                Default None: `initial_epoch * steps_per_epoch`.

        Raises:
            ValueError: if the schedule never fires in a run from step 0 to
                the last step of this `fit` call.
        """

    def fires(self, index: int) -> bool:
        """Whether to measure at this epoch (0-based) or step (1-based)."""
        raise NotImplementedError

    def due(self, previous: int, current: int) -> list[int]:
        """The scheduled steps `s` with `previous < s <= current`, sorted.

        A callback that checks at steps `previous` and then `current` (with
        `steps_per_execution > 1`, Keras calls batch hooks only every
        `steps_per_execution` steps) fires when this is non-empty.
        """
        if not self.per_step:
            raise TypeError(f"{self!r} is epoch-based: use `fires(epoch)`.")
        return [s for s in range(previous + 1, current + 1) if self.fires(s)]

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict) -> Schedule:
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class EpochSchedule(Schedule):
    """Measure at the end of every `every`-th epoch (default: every epoch).

    Args:
        every: measure when `(epoch + 1) % every == 0`. Default 1.
    """

    per_step = False

    def __init__(self, every: int = 1):
        self.every = check_positive_int("every", every)

    def resolve(self, *, epochs, steps_per_epoch, initial_epoch=0, initial_step=None):
        if epochs < self.every:
            raise ValueError(
                f"{self!r} never fires in a run of epochs={epochs}; use every <= {epochs}."
            )

    def fires(self, index):
        return (index + 1) % self.every == 0

    def get_config(self):
        return {"every": self.every}


class StepSchedule(Schedule):
    """Measure after every `every`-th optimizer step (steps count from 1).

    Args:
        every: measure when `step % every == 0`.
    """

    per_step = True

    def __init__(self, every: int):
        self.every = check_positive_int("every", every)

    def resolve(self, *, epochs, steps_per_epoch, initial_epoch=0, initial_step=None):
        last = last_step(
            epochs=epochs, steps_per_epoch=steps_per_epoch,
            initial_epoch=initial_epoch, initial_step=initial_step,
        )
        if last is not None and last < self.every:
            raise ValueError(f"{self!r} never fires in a run of {last} steps.")

    def fires(self, index):
        return index % self.every == 0

    def due(self, previous, current):
        first = (previous // self.every + 1) * self.every
        return list(range(first, current + 1, self.every))

    def get_config(self):
        return {"every": self.every}


class LogSchedule(Schedule):
    """About `num` measurements at log-spaced steps over the run.

    Steps are `round(logspace(0, log10(total_steps), num))`, deduplicated, so
    early training is sampled densely and the late (compression) phase still
    gets measurements. This is how the paper's authors measured.

    Args:
        num: number of log-spaced points (fewer when steps repeat). Default 50.
        total_steps: the last step. Default None: the step the `fit` call
            ends at, `initial_step + (epochs - initial_epoch) * steps_per_epoch`
            (set again at each `fit`, so a run resumed with `initial_epoch` or
            `BackupAndRestore` keeps the same grid).
    """

    per_step = True

    def __init__(self, num: int = 50, total_steps: int | None = None):
        self.num = check_positive_int("num", num)
        self.total_steps = None if total_steps is None else check_positive_int(
            "total_steps", total_steps
        )
        self._steps: frozenset[int] = frozenset()
        if self.total_steps is not None:
            self._steps = frozenset(self.steps_for(self.total_steps))

    def steps_for(self, total_steps: int) -> list[int]:
        """The sorted measurement steps for a run of `total_steps` steps."""
        grid = np.logspace(0, math.log10(total_steps), self.num)
        return sorted({int(s) for s in np.round(grid)})

    def resolve(self, *, epochs, steps_per_epoch, initial_epoch=0, initial_step=None):
        total = self.total_steps
        if total is None:
            total = last_step(
                epochs=epochs, steps_per_epoch=steps_per_epoch,
                initial_epoch=initial_epoch, initial_step=initial_step,
            )
            if total is None:
                raise ValueError(
                    "LogSchedule needs the run length: pass total_steps=... when the "
                    "number of steps per epoch is unknown."
                )
        self._steps = frozenset(self.steps_for(max(total, 1)))

    @property
    def steps(self) -> list[int]:
        return sorted(self._steps)

    def fires(self, index):
        return index in self._steps

    def due(self, previous, current):
        return [s for s in self.steps if previous < s <= current]

    def get_config(self):
        return {"num": self.num, "total_steps": self.total_steps}


def get(schedule) -> Schedule:
    """A `Schedule` from a schedule object or a name (`"epoch"`, `"log"`).

    Raises:
        ValueError, TypeError: for anything else.
    """
    if isinstance(schedule, Schedule):
        return schedule
    if schedule == "epoch":
        return EpochSchedule()
    if schedule == "log":
        return LogSchedule()
    if isinstance(schedule, str):
        raise ValueError(
            "Expected `schedule` 'epoch', 'log' or a Schedule object. "
            f"Received: schedule={schedule!r}"
        )
    raise TypeError(
        f"Expected `schedule` to be a string or Schedule. Received: schedule={schedule!r}"
    )
