r"""Benchmark: eigenvalues of large float64 Grams, TensorFlow's kernel vs LAPACK.

The exact path takes singular values from the eigenvalues of a float64 Gram
in the smaller dimension, `min(n_l, n0)` up to 3072 for 32x32x3 inputs (on
dozens of layers of MobileNetV2 or ResNet50, per sample). This script times,
in one process, `tf.linalg.eigvalsh` (the engine's former solver) and
`keras_localrank.matfree.gram_eigenvalues` (LAPACK through NumPy for orders
>= `LAPACK_MIN_ORDER`), both inside a `tf.function` on the same matrices, and
prints the ratio and the largest difference of the eigenvalues.

    python -m experiments.benchmark_eigensolver --orders=1536,3072
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_localrank.matfree import gram_eigenvalues  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("orders", ["1536", "3072"], "Orders of the Gram matrices.")
flags.DEFINE_integer("batch", 1, "Matrices per call.")
flags.DEFINE_integer("repeats", 2, "Timed calls per solver (the best is kept).")


def best_time(fn, x, repeats):
    fn(x)  # trace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(x).numpy()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv):
    del argv
    load = os.getloadavg()
    print(f"eigensolver benchmark; {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    rng = np.random.default_rng(0)
    for order in map(int, FLAGS.orders):
        a = rng.standard_normal((FLAGS.batch, order, order + order // 4))
        gram = tf.constant(a @ np.swapaxes(a, 1, 2))
        baseline = tf.function(tf.linalg.eigvalsh, autograph=False)
        new = tf.function(gram_eigenvalues, autograph=False)
        t_base, e_base = best_time(baseline, gram, FLAGS.repeats)
        t_new, e_new = best_time(new, gram, FLAGS.repeats)
        diff = np.max(np.abs(e_base - e_new)) / np.max(np.abs(e_base))
        print(f"order {order} x {FLAGS.batch}: tf.linalg.eigvalsh {t_base:.2f} s, "
              f"gram_eigenvalues (LAPACK) {t_new:.2f} s, ratio {t_base / t_new:.1f}x, "
              f"max |difference| / max eigenvalue {diff:.1e}")


if __name__ == "__main__":
    app.run(main)
