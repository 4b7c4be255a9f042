r"""Benchmark: the cost of counting active units next to local rank.

On the engine's reference workload (784-200x4-10 ReLU MLP, He init, seed 0,
512 Gaussian inputs, all five layers), in one process: a
`LocalRankEstimator` with `count_active=False` (the baseline) and one with
`count_active=True` (the default: active units, dead units and the
active-unit bound, one extra forward pass of the Dense chain per chunk).
Both are traced first; each is then timed `--repeats` times, alternating,
and the medians and their ratio are printed.

    python -m experiments.benchmark_active_units
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_localrank as klr  # noqa: E402
from experiments.common import build_mlp  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 512, "Gaussian inputs.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")


def main(argv):
    del argv
    model = build_mlp(784, [200, 200, 200, 200, 10], seed=0)
    x = np.random.default_rng(0).standard_normal((FLAGS.samples, 784)).astype("float32")
    variants = {
        flag: klr.LocalRankEstimator(model, count_active=flag) for flag in (False, True)
    }
    samples = variants[False].check_samples(x)
    for estimator in variants.values():
        estimator.measure(samples)  # trace
    times = {flag: [] for flag in variants}
    for _ in range(FLAGS.repeats):
        for flag, estimator in variants.items():
            start = time.perf_counter()
            estimator.measure(samples)
            times[flag].append(time.perf_counter() - start)
    base, new = (statistics.median(times[f]) for f in (False, True))
    print(f"load average: {os.getloadavg()}")
    print(f"count_active=False: {base:.3f} s  (median of {FLAGS.repeats})")
    print(f"count_active=True:  {new:.3f} s")
    print(f"ratio True/False:   {new / base:.3f}")


if __name__ == "__main__":
    app.run(main)
