"""`LocalRankCallback` under `tf.distribute.MultiWorkerMirroredStrategy`.

Two worker processes on the loopback (a `TF_CONFIG` with two free local
ports) build the same model under the strategy and train it with the
callback inside `fit`. The reference is the same model trained on one device
in the test's process: the local ranks must be identical, and only the chief
may write the trace, the TensorBoard output and the CSV log.

This file is also the worker: `TF_CONFIG=... python tests/test_multiworker.py
worker <outdir> <result.json>`.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 16


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y


def _train(outdir: str, strategy=None) -> dict:
    """Build, train and measure the model; returns the in-memory results.

    Two workarounds for Keras 3 `fit` under a multi-worker strategy
    (tensorflow/tensorflow#72388), both in the model, not in the library:
    Keras reduces the first batch as one nest of per-replica values, which
    `tf.distribute` cannot do for `(x, y)`, so the labels travel as the last
    input column and the model adds its own loss; and Keras averages each
    logged value over axis 0, which a scalar lacks, so `train_step` logs
    shape-[1] values.
    """
    import keras

    from keras_localrank.callbacks import LocalRankCallback, is_chief

    x, y = _data()
    packed = np.concatenate([x, y[:, None].astype("float32")], axis=1)
    os.makedirs(outdir, exist_ok=True)
    scope = strategy.scope() if strategy is not None else _nullcontext()
    with scope:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((7,))
        h = keras.layers.Dense(8, activation="relu", name="h1")(inputs[:, :6])
        h = keras.layers.Dense(5, activation="relu", name="h2")(h)
        logits = keras.layers.Dense(2, name="out")(h)
        outputs = _CrossEntropy()([logits, inputs[:, 6]])
        model = _model_class()(inputs, outputs)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    callback = LocalRankCallback(
        packed[:24],
        ["h1", "h2"],
        atol=1e-3,
        trace_path=os.path.join(outdir, "trace.csv"),
        log_dir=os.path.join(outdir, "tensorboard"),
        measure_on_train_begin=True,
    )
    callbacks = [callback]
    if is_chief(strategy):
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(outdir, "history.csv")))
    history = model.fit(
        packed, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, callbacks=callbacks, verbose=0
    )
    return {
        "chief": is_chief(strategy),
        "trace": [{k: r[k] for k in ("step", "layer", "kind", "mean")} for r in callback.trace],
        "loss": [float(np.ravel(v)[0]) for v in history.history["loss"]],
        "ranks": {
            k: [float(np.ravel(v)[0]) for v in vs]
            for k, vs in history.history.items() if "rank" in k
        },
    }


def _cross_entropy_layer():
    import keras

    class CrossEntropy(keras.layers.Layer):
        def call(self, inputs):
            logits, labels = inputs
            self.add_loss(
                keras.ops.mean(
                    keras.losses.sparse_categorical_crossentropy(
                        keras.ops.cast(labels, "int32"), logits, from_logits=True
                    )
                )
            )
            return logits

    return CrossEntropy


def _model_class():
    import keras

    class VectorLogs(keras.Model):
        def train_step(self, data):
            logs = super().train_step(data)
            return {k: keras.ops.reshape(v, (1,)) for k, v in logs.items()}

    return VectorLogs


def _CrossEntropy():
    return _cross_entropy_layer()()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _launch(role: str, outdir: str, result: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), role, outdir, result],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_multi_worker_mirrored_strategy_matches_one_device_and_only_the_chief_writes(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = [
        _launch(
            "worker",
            str(tmp_path / f"out{i}"),
            str(tmp_path / f"result{i}.json"),
            {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
        )
        for i in range(2)
    ]
    single = _train(str(tmp_path / "single"))  # one device, here, meanwhile
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    chief, other = (
        json.load(open(tmp_path / name, encoding="utf-8"))
        for name in ("result0.json", "result1.json")
    )
    assert chief["chief"] and not other["chief"] and single["chief"]
    # Every worker measured; the ranks equal the single-device run's, step by step.
    assert len(single["trace"]) == 3 * 2 * 2  # (initial + 2 epochs) x 2 layers x 2 kinds
    assert chief["trace"] == single["trace"] == other["trace"]
    assert chief["ranks"] == single["ranks"]
    np.testing.assert_allclose(chief["loss"], single["loss"], rtol=1e-5)
    # Only the chief wrote the trace, TensorBoard events and the CSV log.
    written = sorted(os.listdir(tmp_path / "out0"))
    assert written == ["history.csv", "tensorboard", "trace.csv"]
    events = os.listdir(tmp_path / "out0" / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert os.listdir(tmp_path / "out1") == []


def _main(role: str, outdir: str, result: str) -> None:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf

    out = _train(outdir, tf.distribute.MultiWorkerMirroredStrategy())
    with open(result, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    _main(*sys.argv[1:4])
