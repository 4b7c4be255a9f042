r"""Benchmark: the cost of `LocalRankCallback` during `model.fit`.

Fits the 784-200x4-10 ReLU MLP (He init, seed 0) on MNIST for 20 epochs, in
one process: without the callback, with it at its defaults (end of every
epoch, 256 probe samples), and with `max_overhead=0.1`. Prints the extra wall
time of each, the number of measurements, and the engine-only time of one
measurement (`LocalRankEstimator.measure` on the same probe set, traced
beforehand), so the callback's own overhead per measurement is visible.

    python -m experiments.benchmark_callback --data_path=../shared/data/mnist10k.npz
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_localrank as klr  # noqa: E402
from experiments.common import build_mlp  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", None, "MNIST .npz (x, y); default: keras.datasets.mnist.")
flags.DEFINE_integer("epochs", 20, "Training epochs per run.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.")
flags.DEFINE_float("max_overhead", 0.1, "max_overhead of the third run.")
flags.DEFINE_integer("engine_repeats", 5, "Timed engine-only measurements (median).")


def fit_once(x, y, callbacks, epochs, batch_size) -> tuple[float, keras.Model]:
    model = build_mlp(784, [200, 200, 200, 200, 10], seed=0)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start, model


def main(argv):
    del argv
    if FLAGS.data_path:
        ds = klr.datasets.load_npz(FLAGS.data_path, test_fraction=0.0001)
    else:
        ds = klr.datasets.load("mnist")
    x, y = ds.x_train, ds.y_train
    probe = x[: klr.callbacks.DEFAULT_MAX_SAMPLES]
    print(f"MLP 784-200x4-10, {len(x)} training digits, {FLAGS.epochs} epochs, "
          f"batch {FLAGS.batch_size}, probe {len(probe)} samples")

    fit_once(x[:640], y[:640], [], 1, FLAGS.batch_size)  # warm up TF itself
    base, _ = fit_once(x, y, [], FLAGS.epochs, FLAGS.batch_size)
    default_cb = klr.LocalRankCallback(probe)
    t_default, model = fit_once(x, y, [default_cb], FLAGS.epochs, FLAGS.batch_size)
    capped_cb = klr.LocalRankCallback(probe, max_overhead=FLAGS.max_overhead)
    t_capped, _ = fit_once(x, y, [capped_cb], FLAGS.epochs, FLAGS.batch_size)

    estimator = klr.LocalRankEstimator(model)
    samples = estimator.check_samples(probe)
    estimator.measure(samples)  # trace
    engine = []
    for _ in range(FLAGS.engine_repeats):
        start = time.perf_counter()
        estimator.measure(samples)
        engine.append(time.perf_counter() - start)
    engine_s = statistics.median(engine)

    print(f"\nno callback:              {base:7.2f} s")
    for label, total, cb in (
        ("callback (defaults)", t_default, default_cb),
        (f"max_overhead={FLAGS.max_overhead:g}", t_capped, capped_cb),
    ):
        extra = total - base
        n = cb.measurements
        per = extra / n if n else float("nan")
        print(f"{label:<25} {total:7.2f} s   extra {extra:6.2f} s ({100 * extra / base:5.1f}%)"
              f"   measurements {n:2d} (skipped {cb.skipped:2d})   extra/measurement "
              f"{per:.3f} s = {per / engine_s:.2f}x engine")
    print(f"engine only, one measurement: {engine_s:.3f} s (median of {len(engine)})")
    print(f"callback's own time in measurements (defaults): "
          f"{default_cb._measured_seconds / default_cb.measurements:.3f} s each")


if __name__ == "__main__":
    app.run(main)
