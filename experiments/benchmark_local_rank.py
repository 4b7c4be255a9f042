r"""Benchmark: `klr.local_rank` against `batch_jacobian` + `tf.linalg.matrix_rank`.

The reference workload of DESIGN.md: a 784-200x4-10 ReLU MLP (He init,
seed 0), 512 Gaussian inputs, local rank of all five layers. Both methods run
in this one process, after one warm-up call each (tracing excluded), and the
median of `--repeats` timed runs is reported with the ratio. Ranks must be
identical. `--trained` also measures a network trained on real digits (low
ranks). Peak memory is the largest resident-set growth seen while a method runs.

    python -m experiments.benchmark_local_rank
    python -m experiments.benchmark_local_rank --trained \
        --data_path=../shared/data/mnist10k.npz
"""

from __future__ import annotations

import os
import statistics
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_localrank as klr  # noqa: E402
from experiments.common import build_mlp  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 512, "Number of input samples.")
flags.DEFINE_list("widths", ["200", "200", "200", "200", "10"], "Layer widths.")
flags.DEFINE_integer("input_dim", 784, "Input dimension n0.")
flags.DEFINE_integer("repeats", 3, "Timed runs per method (median reported).")
flags.DEFINE_bool("trained", False, "Also benchmark a trained network (low ranks).")
flags.DEFINE_string("data_path", None, "npz (x, y) for --trained; default: a Gaussian task.")
flags.DEFINE_integer("train_epochs", 30, "Epochs for --trained.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the inputs.")


def baseline_fn(model: keras.Model):
    """`batch_jacobian` of every Dense pre-activation + `tf.linalg.matrix_rank`."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    inner = keras.Model(model.inputs[0], [layer.input for layer in dense])

    @tf.function
    def ranks(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            inputs = inner(x)
            pre = [tf.matmul(h, layer.kernel) + layer.bias for h, layer in zip(inputs, dense)]
        return [tf.linalg.matrix_rank(tape.batch_jacobian(p, x)) for p in pre]

    return lambda x: [r.numpy() for r in ranks(tf.constant(x))]


def torch_fn(model: keras.Model):
    """The paper authors' method, when PyTorch is installed: per-sample
    `torch.func.vmap(jacfwd)` of every pre-activation + `torch.linalg.matrix_rank`,
    on the same weights. Returns None without torch."""
    try:
        import torch
    except ImportError:
        return None
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    weights = [
        (torch.from_numpy(np.asarray(d.kernel)), torch.from_numpy(np.asarray(d.bias)))
        for d in dense
    ]
    acts = [d.activation is keras.activations.relu for d in dense]

    def preacts(x):
        out, h = [], x
        for (w, b), relu in zip(weights, acts):
            p = h @ w + b
            out.append(p)
            h = torch.relu(p) if relu else p
        return tuple(out)

    jac = torch.func.vmap(torch.func.jacfwd(preacts))

    def ranks(x):
        with torch.no_grad():
            return [torch.linalg.matrix_rank(j).numpy() for j in jac(torch.from_numpy(x))]

    return ranks


class PeakRSS:
    """Largest resident-set growth (MiB) while the context is active."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 2**20

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, repeats: int):
    """Median time after a warm-up call (tracing excluded from the time; the
    peak-memory window includes it, so buffers allocated then are counted)."""
    times, out = [], None
    with PeakRSS() as mem:
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), mem.growth_mib, out


def compare(model: keras.Model, x: np.ndarray, repeats: int, label: str) -> float:
    """Time both methods on `model`, check identical ranks, print, return the ratio."""
    baseline = baseline_fn(model)
    estimator = klr.LocalRankEstimator(model)
    # The project runs first so its memory window sees no buffers the
    # baseline left behind in the allocator.
    t_klr, m_klr, results = timed(lambda: estimator(x)[0], repeats)
    t_base, m_base, base_ranks = timed(lambda: baseline(x), repeats)
    names = [info.name for info in estimator.layer_infos]
    identical = all(
        np.array_equal(results.per_sample[n], r) for n, r in zip(names, base_ranks)
    )
    print(f"\n== {label}: {len(x)} samples, layers {names}")
    print("local rank per layer:", {n: round(v, 2) for n, v in results.mean.items()})
    print(f"baseline batch_jacobian+matrix_rank: {t_base:8.3f} s   peak RSS +{m_base:7.1f} MiB")
    print(f"keras_localrank ({estimator.layer_infos[0].method:>8}):      {t_klr:8.3f} s   "
          f"peak RSS +{m_klr:7.1f} MiB")
    print(f"speed-up: {t_base / t_klr:.2f}x   identical ranks: {identical}")
    if not identical:
        raise SystemExit("ranks differ between the baseline and keras_localrank")
    torch_ranks = torch_fn(model)
    if torch_ranks is not None:
        t_torch, m_torch, ranks_t = timed(lambda: torch_ranks(x), repeats)
        same = all(np.array_equal(results.per_sample[n], r) for n, r in zip(names, ranks_t))
        print(f"torch vmap(jacfwd)+matrix_rank:      {t_torch:8.3f} s   peak RSS +"
              f"{m_torch:7.1f} MiB   speed-up {t_torch / t_klr:.2f}x   identical ranks: {same}")
    return t_base / t_klr


def main(argv):
    del argv
    widths = [int(w) for w in FLAGS.widths]
    model = build_mlp(FLAGS.input_dim, widths, FLAGS.seed)
    x = klr.datasets.gaussian(FLAGS.samples, FLAGS.input_dim, seed=FLAGS.seed)
    compare(model, x, FLAGS.repeats, "random init (He, seed 0), Gaussian inputs")
    if FLAGS.trained:
        if FLAGS.data_path:
            ds = klr.datasets.load_npz(FLAGS.data_path)
        else:
            ds = klr.datasets.gaussian_task(n_train=4000, dim=FLAGS.input_dim, k=3)
        model.compile(
            keras.optimizers.AdamW(1e-3, weight_decay=0.1),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(ds.x_train, ds.y_train, epochs=FLAGS.train_epochs, batch_size=64, verbose=0)
        acc = model.evaluate(ds.x_test, ds.y_test, verbose=0)[1]
        compare(
            model, ds.x_test[: FLAGS.samples], FLAGS.repeats,
            f"trained {FLAGS.train_epochs} epochs (test accuracy {acc:.3f}), test inputs",
        )


if __name__ == "__main__":
    app.run(main)
