"""LocalRankCallback, the LocalRank metric, RankProbe and the schedules."""

import glob
import math

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from keras.src.utils import python_utils

import keras_localrank as klr
from keras_localrank import schedules


def small_mlp(seed=0, name_prefix="h"):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((20,))]
        + [keras.layers.Dense(24, activation="relu", name=f"{name_prefix}{i}") for i in range(2)]
        + [keras.layers.Dense(4, name=f"{name_prefix}_out")]
    )
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def data():
    return klr.datasets.gaussian_task(n_train=640, n_test=64, dim=20, k=2)


def events(log_dir):
    tags = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


def test_keys_reach_history_csvlogger_and_tensorboard(data, tmp_path):
    model = small_mlp()
    cb = klr.LocalRankCallback(data.x_test, atol=0.05)
    csv = tmp_path / "log.csv"
    history = model.fit(
        data.x_train, data.y_train, epochs=3, batch_size=64, verbose=0,
        callbacks=[cb, keras.callbacks.CSVLogger(str(csv)),
                   keras.callbacks.TensorBoard(str(tmp_path / "tb"))],
    )
    keys = ["local_rank/h0", "local_rank/h1", "local_rank/h_out",
            "robust_local_rank/h0", "robust_local_rank/h1", "robust_local_rank/h_out"]
    assert cb.keys == keys
    for key in keys:
        assert len(history.history[key]) == 3
        assert all(isinstance(v, float) for v in history.history[key])
    logged = pd.read_csv(csv)
    np.testing.assert_allclose(logged["local_rank/h1"], history.history["local_rank/h1"])
    tags = events(tmp_path / "tb")
    assert "epoch_local_rank/h1" in tags and len(tags["epoch_robust_local_rank/h0"]) == 3
    # The last logged value is local_rank on the final weights.
    exact = klr.local_rank(model, data.x_test)
    robust = klr.local_rank(model, data.x_test, atol=0.05)
    for name in ("h0", "h1", "h_out"):
        assert history.history[f"local_rank/{name}"][-1] == exact.mean[name]
        assert history.history[f"robust_local_rank/{name}"][-1] == robust.mean[name]
    assert cb._estimator.trace_count == 1  # traced once, reused at every epoch
    assert python_utils.is_default(cb.on_train_batch_end)  # async dispatch kept


def test_own_tensorboard_output_and_trace(data, tmp_path):
    model = small_mlp()
    cb = klr.LocalRankCallback(
        data.x_test, atol=[0.01, 0.1], schedule=schedules.StepSchedule(5),
        log_dir=tmp_path / "own", trace_path=tmp_path / "trace.json",
        measure_on_train_begin=True,
    )
    model.fit(data.x_train, data.y_train, epochs=2, batch_size=64, verbose=0, callbacks=[cb])
    tags = events(tmp_path / "own")
    steps = [0, 5, 10, 15, 20]
    assert tags["local_rank/h0"] == steps
    assert tags["robust_local_rank@0.01/h1"] == steps
    assert tags["robust_local_rank@0.1_per_sample/h_out"] == steps
    frame = pd.read_json(tmp_path / "trace.json")
    assert sorted(frame["step"].unique()) == steps
    assert set(frame["kind"]) == {"exact", "robust"}
    assert len(frame) == len(steps) * 3 * 3
    assert {"mean", "std", "stderr", "effective_rank", "stable_rank"} <= set(frame)


def test_log_schedule_steps_and_resume_with_initial_epoch(data, tmp_path):
    # logspace(0, 2, 5) = 1, 3.16, 10, 31.6, 100  ->  steps 1, 3, 10, 32, 100
    assert schedules.LogSchedule(num=5, total_steps=100).steps == [1, 3, 10, 32, 100]
    model = small_mlp()
    trace = tmp_path / "trace.csv"
    first = klr.LocalRankCallback(data.x_test, schedule=schedules.LogSchedule(5, 100),
                                  trace_path=trace)
    model.fit(data.x_train, data.y_train, epochs=4, batch_size=64, verbose=0, callbacks=[first])
    assert sorted(pd.read_csv(trace)["step"].unique()) == [1, 3, 10, 32]
    # A new callback on resume: the grid comes from epochs=10 x 10 steps.
    second = klr.LocalRankCallback(data.x_test, schedule="log", trace_path=trace)
    second.schedule = schedules.LogSchedule(num=5)
    model.fit(data.x_train, data.y_train, epochs=10, initial_epoch=4, batch_size=64,
              verbose=0, callbacks=[second])
    frame = pd.read_csv(trace)
    assert sorted(frame["step"].unique()) == [1, 3, 10, 32, 100]
    assert frame[frame.step == 100]["epoch"].unique().tolist() == [9]


def test_every_n_epochs_and_nan_before_first_measurement(data):
    model = small_mlp()
    cb = klr.LocalRankCallback(data.x_test, schedule=schedules.EpochSchedule(2))
    history = model.fit(data.x_train, data.y_train, epochs=4, batch_size=64, verbose=0,
                        callbacks=[cb])
    values = history.history["local_rank/h1"]
    assert math.isnan(values[0]) and values[1] == values[2] and cb.measurements == 2


def test_max_overhead_skips_and_says_so(data, capsys):
    model = small_mlp()
    cb = klr.LocalRankCallback(data.x_test, max_overhead=1e-9, verbose=1)
    history = model.fit(data.x_train, data.y_train, epochs=3, batch_size=64, verbose=0,
                        callbacks=[cb])
    assert cb.measurements == 1 and cb.skipped == 2
    assert history.history["local_rank/skipped"] == [0.0, 1.0, 2.0]
    assert "skipped the measurement" in capsys.readouterr().out


def test_verbose_zero_never_prints(data, capsys):
    model = small_mlp()
    cb = klr.LocalRankCallback(data.x_test, max_overhead=1e-9)
    model.fit(data.x_train, data.y_train, epochs=2, batch_size=64, verbose=0, callbacks=[cb])
    assert capsys.readouterr().out == ""


def test_dataset_probe_is_capped(data):
    ds = tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).batch(16)
    cb = klr.LocalRankCallback(ds, max_samples=40)
    assert len(cb._x) == 40


def test_jit_compile_and_mirrored_strategy_give_the_same_numbers(data):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = small_mlp(seed=3)
    single = small_mlp(seed=3)
    single.set_weights(model.get_weights())
    cb = klr.LocalRankCallback(data.x_test[:32], batch_size=16)
    history = model.fit(data.x_train, data.y_train, epochs=1, batch_size=64, verbose=0,
                        callbacks=[cb])
    assert cb._estimator._strategy is strategy
    expected = klr.local_rank(model, data.x_test[:32])
    single.set_weights(model.get_weights())
    jit = klr.LocalRankCallback(data.x_test[:32], jit_compile=True)
    jit.set_model(single)
    jit.on_train_begin()
    jit_logs = {}
    jit.on_epoch_end(0, jit_logs)
    for name, value in expected.mean.items():
        assert history.history[f"local_rank/{name}"][-1] == value
        assert jit_logs[f"local_rank/{name}"] == value


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": np.full((4, 20), np.nan, np.float32)}, ValueError, "NaN or Inf"),
        ({"x": np.zeros((0, 20), np.float32)}, ValueError, "non-empty"),
        ({"atol": -1.0}, ValueError, "atol=-1"),
        ({"max_overhead": 0}, ValueError, "max_overhead=0"),
        ({"schedule": "sometimes"}, ValueError, "schedule='sometimes'"),
        ({"schedule": 3}, TypeError, "schedule=3"),
        ({"exact": False}, ValueError, "Nothing to log"),
        ({"trace_path": "trace.txt"}, ValueError, "trace.txt"),
        ({"max_samples": 2.5}, TypeError, "max_samples=2.5"),
        ({"max_samples": "3"}, TypeError, "max_samples='3'"),
        ({"max_overhead": "0.1"}, TypeError, "max_overhead='0.1'"),
    ],
)
def test_construction_errors(data, kwargs, error, match):
    kwargs = {"x": data.x_test, **kwargs}
    with pytest.raises(error, match=match):
        klr.LocalRankCallback(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layers": ["nope"]}, "'nope'"),
        ({"schedule": schedules.EpochSchedule(5)}, "never fires"),
        ({"schedule": schedules.StepSchedule(1000)}, "never fires"),
        ({"x": np.ones((4, 7), np.float32)}, r"shape \(4, 7\)"),
    ],
)
def test_errors_at_train_begin_before_any_step(data, kwargs, match):
    model = small_mlp()
    before = [w.copy() for w in model.get_weights()]
    cb = klr.LocalRankCallback(**{"x": data.x_test, **kwargs})
    with pytest.raises(ValueError, match=match):
        model.fit(data.x_train, data.y_train, epochs=2, batch_size=64, verbose=0,
                  callbacks=[cb])
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)  # failed before any training step


def test_metric_in_a_gradient_tape_loop(data):
    model = small_mlp(seed=1)
    metric = klr.metrics.LocalRank(model, "h1")
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        metric.update_state(x)
        return loss

    for start in range(0, 256, 64):
        train_step(data.x_train[start:start + 64], data.y_train[start:start + 64])
    assert 0 < float(metric.result()) <= 20
    metric.reset_state()
    assert float(metric.result()) == 0
    metric.update_state(data.x_test[:32])
    metric.update_state(data.x_test[32:])
    expected = klr.local_rank(model, data.x_test, layers=["h1"]).mean["h1"]
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    assert metric.name == "local_rank/h1"
    assert klr.metrics.LocalRank(model, "h1", atol=0.1).name == "robust_local_rank/h1"


def test_metric_passed_to_compile_says_to_use_the_callback(data):
    # Keras calls compiled metrics with (y_true, y_pred); the metric needs the
    # inputs. It failed with "got multiple values for argument 'sample_weight'".
    model = small_mlp()
    model.compile("adam", "sparse_categorical_crossentropy",
                  metrics=[klr.metrics.LocalRank(model, "h1")])
    with pytest.raises(TypeError, match="LocalRankCallback"):
        model.fit(data.x_train[:64], data.y_train[:64], epochs=1, verbose=0)


def test_rank_probe_measures_any_tensor_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((10,))
    low = keras.layers.Dense(3, name="low")(inp)  # linear, width 3
    normed = keras.layers.BatchNormalization(name="bn")(low)
    probe_bn = klr.RankProbe(name="probe_bn")(normed)  # rank 3 by construction
    cancel = keras.layers.Dense(10, use_bias=False, name="cancel")
    residual = keras.layers.Add()([inp, cancel(inp)])
    probe_res = klr.RankProbe(name="probe_res")(residual)  # x - x = 0: rank 0
    out = keras.layers.Dense(2, name="out")(keras.layers.Concatenate()([probe_bn, probe_res]))
    model = keras.Model(inp, out)
    cancel.kernel.assign(-np.eye(10, dtype="float32"))
    x = np.random.default_rng(0).standard_normal((16, 10)).astype("float32")
    result = klr.local_rank(model, x)
    np.testing.assert_array_equal(result.per_sample["probe_bn"], 3)
    np.testing.assert_array_equal(result.per_sample["probe_res"], 0)
    classes = {info.name: info.class_name for info in result.layers}
    assert classes["probe_bn"] == "RankProbe"
    path = tmp_path / "probe.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("probe_bn"), klr.RankProbe)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    again = klr.local_rank(loaded, x)
    for name in result.per_sample:
        np.testing.assert_array_equal(again.per_sample[name], result.per_sample[name])
    assert klr.RankProbe.from_config(loaded.get_layer("probe_res").get_config()).name == "probe_res"


def test_schedules_serialise_and_validate():
    for schedule in (schedules.EpochSchedule(3), schedules.StepSchedule(7),
                     schedules.LogSchedule(20, 1000)):
        copy = type(schedule).from_config(schedule.get_config())
        assert copy.get_config() == schedule.get_config()
    with pytest.raises(ValueError, match="every=0"):
        schedules.EpochSchedule(0)
    with pytest.raises(ValueError, match="num=-2"):
        schedules.LogSchedule(-2)
