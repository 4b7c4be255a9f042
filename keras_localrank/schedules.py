"""When a training callback measures: measurement schedules.

Schedules are small config-serialisable objects. A schedule is either
epoch-based (fires in `on_epoch_end`, no per-batch hook, so Keras keeps async
dispatch) or step-based (fires after given optimizer steps, counted from 1
across epochs, so resuming with `initial_epoch` continues the schedule).
"""

from __future__ import annotations

import math

import numpy as np

from keras_localrank.inputs import check_positive_int

__all__ = ["Schedule", "EpochSchedule", "StepSchedule", "LogSchedule", "get"]


class Schedule:
    """Base class. Subclasses set `per_step` and implement `fires`."""

    per_step: bool = False

    def resolve(self, *, epochs: int, steps_per_epoch: int | None) -> None:
        """Learn the length of the run (called in `on_train_begin`).

        Raises:
            ValueError: if the schedule never fires in this run.
        """

    def fires(self, index: int) -> bool:
        """Whether to measure at this epoch (0-based) or step (1-based)."""
        raise NotImplementedError

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

    def resolve(self, *, epochs, steps_per_epoch):
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

    def resolve(self, *, epochs, steps_per_epoch):
        if steps_per_epoch is not None and epochs * steps_per_epoch < self.every:
            raise ValueError(
                f"{self!r} never fires in a run of {epochs * steps_per_epoch} steps."
            )

    def fires(self, index):
        return index % self.every == 0

    def get_config(self):
        return {"every": self.every}


class LogSchedule(Schedule):
    """About `num` measurements at log-spaced steps over the run.

    Steps are `round(logspace(0, log10(total_steps), num))`, deduplicated, so
    early training is sampled densely and the late (compression) phase still
    gets measurements. This is how the paper's authors measured.

    Args:
        num: number of log-spaced points (fewer when steps repeat). Default 50.
        total_steps: the last step. Default None: `epochs * steps_per_epoch`
            of the run (set again at each `fit` so a resumed run keeps the
            same grid).
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

    def resolve(self, *, epochs, steps_per_epoch):
        total = self.total_steps
        if total is None:
            if steps_per_epoch is None:
                raise ValueError(
                    "LogSchedule needs the run length: pass total_steps=... when the "
                    "number of steps per epoch is unknown."
                )
            total = epochs * steps_per_epoch
        self._steps = frozenset(self.steps_for(total))

    @property
    def steps(self) -> list[int]:
        return sorted(self._steps)

    def fires(self, index):
        return index in self._steps

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
