r"""Benchmark: the cost of `LocalRankCallback` during `model.fit`.

Fits the 784-200x4-10 ReLU MLP (He init, seed 0) on MNIST for 20 epochs, in
one process: without the callback, with it at its defaults (end of every
epoch, 256 probe samples), and with `max_overhead=0.1`. Prints the extra wall
time of each, the number of measurements, and the engine-only time of one
measurement (`LocalRankEstimator.measure` on the same probe set, traced
beforehand, on each epoch's weights), so the callback's own overhead per
measurement is visible.

Then the cost of information next to rank: on the same epochs' weights and
probe set (with its labels), one `InformationCallback` measurement (the
pairwise noise bounds on I(X;T) and I(T;Y) at each `--information_sigmas`,
and binning with `--information_bins`) against one local-rank measurement,
and the ratio; the opt-in local Gaussian-channel estimate (its own Jacobians)
is timed separately.

    python -m experiments.benchmark_callback --data_path=/path/to/mnist10k.npz
    python -m experiments.benchmark_callback --nofit_runs --epochs=5   # information cost only
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
from keras_localrank.information_callback import InformationCallback  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", None, "MNIST .npz (x, y); default: keras.datasets.mnist.")
flags.DEFINE_integer("epochs", 20, "Training epochs per run.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.")
flags.DEFINE_float("max_overhead", 0.1, "max_overhead of the third run.")
flags.DEFINE_integer("engine_repeats", 3, "Engine-only runs per epoch's weights (best kept).")
flags.DEFINE_bool("fit_runs", True, "Time the fit runs; False: train once, time measurements only.")
flags.DEFINE_list("information_sigmas", ["0.1", "1.0"], "Noise levels of the information bounds.")
flags.DEFINE_integer("information_bins", 30, "Bins of the binning estimate (0: none).")


class WeightsAtEpochEnd(keras.callbacks.Callback):
    """Keeps each epoch's weights (a copy costs about a millisecond)."""

    def __init__(self):
        super().__init__()
        self.saved = []

    def on_epoch_end(self, epoch, logs=None):
        self.saved.append(self.model.get_weights())


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


def best_of(fn, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return min(runs)


def engine_time(model, probe, saved_weights) -> tuple[float, list[float]]:
    """Mean over the saved weights of one local-rank measurement (best of repeats)."""
    estimator = klr.LocalRankEstimator(model)
    samples = estimator.check_samples(probe)
    estimator.measure(samples)  # trace
    per_epoch = []
    for w in saved_weights:
        model.set_weights(w)
        per_epoch.append(best_of(lambda: estimator.measure(samples), FLAGS.engine_repeats))
    return statistics.mean(per_epoch), per_epoch


def information_cost(model, probe, labels, saved_weights, engine_s) -> None:
    """One information measurement per epoch's weights, next to local rank."""
    sigmas = [float(s) for s in FLAGS.information_sigmas]
    bins = FLAGS.information_bins or None
    configs = (
        (f"bounds, sigma={sigmas}, with labels", dict(sigma=sigmas)),
        (f"+ binning ({bins} bins)", dict(sigma=sigmas, num_bins=bins)),
        ("Gaussian channel only (its own spectra)",
         dict(sigma=sigmas, bounds=False, gaussian_channel=True)),
    )
    print(f"\ninformation next to local rank ({len(probe)} probe samples, "
          f"{len(saved_weights)} epochs' weights, best of {FLAGS.engine_repeats}):")
    print(f"  local rank, one measurement:            {engine_s:.4f} s")
    for label, kwargs in configs:
        if "num_bins" in kwargs and bins is None:
            continue
        cb = InformationCallback(probe, labels, **kwargs)
        cb.set_model(model)
        cb.on_train_begin()
        cb.measure()  # trace
        per_epoch = []
        for w in saved_weights:
            model.set_weights(w)
            per_epoch.append(best_of(cb.measure, FLAGS.engine_repeats))
        cost = statistics.mean(per_epoch)
        print(f"  {label:<38} {cost:.4f} s = {100 * cost / engine_s:5.1f}% of local rank "
              f"({len(cb.keys)} keys)")


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
    if not FLAGS.fit_runs:
        weights = WeightsAtEpochEnd()
        _, model = fit_once(x, y, [weights], FLAGS.epochs, FLAGS.batch_size)
        engine_s, per_epoch = engine_time(model, probe, weights.saved)
        information_cost(model, probe, y[: len(probe)], weights.saved, engine_s)
        return
    # The baseline runs before and after the callback runs; its mean is used,
    # and the spread of the two shows the machine's noise.
    base_1, _ = fit_once(x, y, [], FLAGS.epochs, FLAGS.batch_size)
    default_cb = klr.LocalRankCallback(probe)
    weights = WeightsAtEpochEnd()
    t_default, model = fit_once(x, y, [default_cb, weights], FLAGS.epochs, FLAGS.batch_size)
    capped_cb = klr.LocalRankCallback(probe, max_overhead=FLAGS.max_overhead)
    t_capped, _ = fit_once(x, y, [capped_cb], FLAGS.epochs, FLAGS.batch_size)
    base_2, _ = fit_once(x, y, [], FLAGS.epochs, FLAGS.batch_size)
    base = (base_1 + base_2) / 2

    # Engine-only cost of the *same* 20 measurements: the cost depends on the
    # weights (active ReLU units shrink the factors), so re-measure each
    # epoch's weights, traced beforehand, best of `engine_repeats`.
    engine_s, per_epoch = engine_time(model, probe, weights.saved)

    print(f"\nno callback:              {base:7.2f} s   (runs: {base_1:.2f} s, {base_2:.2f} s)")
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
    print(f"engine only, one measurement: {engine_s:.3f} s (mean over the {len(per_epoch)} "
          f"epochs' weights, {min(per_epoch):.3f}-{max(per_epoch):.3f} s)")
    own = default_cb._measured_seconds / default_cb.measurements
    print(f"callback's own time per measurement (defaults, first one with tracing "
          f"included): {own:.3f} s = {own / engine_s:.2f}x engine")


if __name__ == "__main__":
    app.run(main)
