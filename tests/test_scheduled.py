"""Step counting of scheduled callbacks: the optimizer's global step, not a counter.

Expected steps are computed independently of the callback: Keras runs
`steps_per_execution=k` steps between two batch hooks, so a scheduled step
`s` is first seen at `ceil(s / k) * k`.
"""

import math

import keras
import numpy as np
import pandas as pd
import pytest

import keras_localrank as klr
from keras_localrank import schedules
from keras_localrank.scheduled import ScheduledCallback


def mlp(seed=0, steps_per_execution=1):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((20,)), keras.layers.Dense(16, activation="relu", name="h0"),
         keras.layers.Dense(4, name="out")]
    )
    model.compile(
        keras.optimizers.SGD(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


@pytest.fixture(scope="module")
def data():
    return klr.datasets.gaussian_task(n_train=640, n_test=32, dim=20, k=2)


def measured_steps(cb):
    frame = cb.trace_frame()
    per_step = frame.groupby("step").size()
    assert (per_step == per_step.iloc[0]).all(), "every measurement covers every layer"
    return frame["step"].drop_duplicates().tolist()


def first_seen(steps, k):
    return sorted({math.ceil(s / k) * k for s in steps})


def test_step_schedule_with_steps_per_execution(data):
    # 3 epochs x 20 steps, executions of 4 steps: 10 -> 12, 20 -> 20, 30 -> 32, ...
    model = mlp(steps_per_execution=4)
    cb = klr.LocalRankCallback(data.x_test, schedule=schedules.StepSchedule(10))
    model.fit(data.x_train, data.y_train, epochs=3, batch_size=32, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations) == 60
    assert measured_steps(cb) == first_seen(range(10, 61, 10), 4) == [12, 20, 32, 40, 52, 60]
    assert cb.trace_frame().groupby("step")["epoch"].first().tolist() == [0, 0, 1, 1, 2, 2]
    # The last measurement is of the final weights.
    final = klr.local_rank(model, data.x_test)
    last = cb.trace_frame().query("step == 60").set_index("layer")["mean"]
    for name, value in final.mean.items():
        assert last[name] == value


def test_log_schedule_with_steps_per_execution(data):
    model = mlp(steps_per_execution=4)
    cb = klr.LocalRankCallback(data.x_test, schedule="log")
    model.fit(data.x_train, data.y_train, epochs=3, batch_size=32, verbose=0, callbacks=[cb])
    grid = sorted({int(s) for s in np.round(np.logspace(0, math.log10(60), 50))})
    assert len(grid) == 31
    assert measured_steps(cb) == first_seen(grid, 4)


def test_fit_twice_continues_the_steps(data):
    model = mlp()
    cb = klr.LocalRankCallback(data.x_test, measure_on_train_begin=True)
    for _ in range(2):  # 2 epochs x 16 steps per call
        model.fit(data.x_train, data.y_train, epochs=2, batch_size=40, verbose=0,
                  callbacks=[cb])
    assert int(model.optimizer.iterations) == 64
    # Step 32 was measured at the end of the first call: not measured again.
    assert measured_steps(cb) == [0, 16, 32, 48, 64]


def test_step_schedule_fit_twice(data):
    model = mlp()
    cb = klr.LocalRankCallback(data.x_test, schedule=schedules.StepSchedule(12))
    for _ in range(2):
        model.fit(data.x_train, data.y_train, epochs=1, batch_size=40, verbose=0,
                  callbacks=[cb])
    assert measured_steps(cb) == [12, 24]


class Interrupt(Exception):
    pass


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.at = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.at:
            raise Interrupt


@pytest.mark.parametrize("backup_first", [False, True])
def test_backup_and_restore_resume_records_each_step_once(data, tmp_path, backup_first):
    trace = tmp_path / "trace.csv"

    def run(callbacks):
        # A fresh process: new model (other weights), new callbacks, same folders.
        model = mlp(seed=len(callbacks))
        cb = klr.LocalRankCallback(data.x_test, schedule=schedules.StepSchedule(10),
                                   trace_path=trace, measure_on_train_begin=True)
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        ordered = [backup, cb] if backup_first else [cb, backup]
        model.fit(data.x_train, data.y_train, epochs=3, batch_size=32, verbose=0,
                  callbacks=ordered + callbacks)
        return model, cb

    with pytest.raises(Interrupt):
        run([InterruptAt(55)])  # epoch 2; the backup holds the end of epoch 1 (step 40)
    assert sorted(pd.read_csv(trace)["step"].unique()) == [0, 10, 20, 30, 40, 50]
    model, cb = run([])
    assert int(model.optimizer.iterations) == 60
    frame = pd.read_csv(trace)
    assert not frame.duplicated(["step", "layer", "kind"]).any()
    assert sorted(frame["step"].unique()) == [0, 10, 20, 30, 40, 50, 60]
    assert frame.groupby("step")["epoch"].first().tolist() == [-1, 0, 0, 1, 1, 2, 2]
    final = klr.local_rank(model, data.x_test)
    last = frame.query("step == 60").set_index("layer")["mean"]
    for name, value in final.mean.items():
        assert last[name] == value


def test_due_lists_the_crossed_steps():
    assert schedules.StepSchedule(10).due(8, 12) == [10]
    assert schedules.StepSchedule(10).due(10, 19) == []
    assert schedules.StepSchedule(3).due(0, 10) == [3, 6, 9]
    log = schedules.LogSchedule(num=5, total_steps=100)  # steps 1, 3, 10, 32, 100
    assert log.due(0, 4) == [1, 3]
    assert log.due(4, 31) == [10]
    with pytest.raises(TypeError, match="epoch-based"):
        schedules.EpochSchedule().due(0, 1)


def test_log_schedule_grid_follows_the_fit_call():
    log = schedules.LogSchedule(num=5)
    log.resolve(epochs=10, steps_per_epoch=10, initial_epoch=4, initial_step=40)
    assert log.steps == [1, 3, 10, 32, 100]
    log.resolve(epochs=2, steps_per_epoch=16, initial_epoch=0, initial_step=32)  # 2nd fit
    assert log.steps[-1] == 64


def test_subclass_hooks_and_uncompiled_model(data):
    class Steps(ScheduledCallback):
        def __init__(self):
            super().__init__(schedules.StepSchedule(5))
            self.rows = []

        def on_scheduled_step(self, step, epoch, *, initial=False):
            self.rows.append((step, epoch))

    model = mlp(steps_per_execution=3)
    cb = Steps()
    model.fit(data.x_train[:320], data.y_train[:320], epochs=1, batch_size=32, verbose=0,
              callbacks=[cb])
    assert cb.rows == [(6, 0), (10, 0)]  # checks at 3, 6, 9, 10 (last execution is short)
    cb.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    with pytest.raises(ValueError, match="compiled model"):
        _ = cb.global_step
