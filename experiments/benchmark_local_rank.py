r"""Benchmark: `klr.local_rank` against `batch_jacobian` + `tf.linalg.matrix_rank`.

The reference workload of DESIGN.md: a 784-200x4-10 ReLU MLP (He init,
seed 0), 512 Gaussian inputs, local rank of all five layers. Both methods run
in this one process, after one warm-up call each (tracing excluded), and the
median of `--repeats` timed runs is reported with the ratio. Ranks must be
identical. `--trained` also measures a network trained on real digits (low
ranks). Peak memory is the largest resident-set growth seen while a method runs.
`--convnet` also measures the keras.io "Simple MNIST convnet" (2 Conv2D +
MaxPool + Dense, random weights) on `--conv_samples` inputs: the baseline is
`batch_jacobian` of every pre-activation + `tf.linalg.matrix_rank`, against
the matrix-free exact engine (per-layer method printed).

    python -m experiments.benchmark_local_rank
    python -m experiments.benchmark_local_rank --trained \
        --data_path=/path/to/mnist10k.npz
    python -m experiments.benchmark_local_rank --convnet --conv_samples=32
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_localrank as klr  # noqa: E402
from experiments.common import PeakRSS, build_mlp  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 512, "Number of input samples.")
flags.DEFINE_list("widths", ["200", "200", "200", "200", "10"], "Layer widths.")
flags.DEFINE_integer("input_dim", 784, "Input dimension n0.")
flags.DEFINE_integer("repeats", 3, "Timed runs per method (median reported).")
flags.DEFINE_bool("trained", False, "Also benchmark a trained network (low ranks).")
flags.DEFINE_string("data_path", None, "npz (x, y) for --trained; default: a Gaussian task.")
flags.DEFINE_integer("train_epochs", 30, "Epochs for --trained.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the inputs.")
flags.DEFINE_bool("convnet", False, "Also benchmark the Simple MNIST convnet.")
flags.DEFINE_integer("conv_samples", 32, "Inputs for --convnet.")
flags.DEFINE_bool("skip_mlp", False, "Skip the MLP workload.")


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


def tap_baseline_fn(model: keras.Model):
    """`batch_jacobian` of every measured pre-activation + `tf.linalg.matrix_rank`
    (any layer type: the pre-activation is the layer's own call without its
    activation)."""
    from keras_localrank.taps import preactivation, select_taps, tap_inputs_model

    taps = select_taps(model).taps
    inner = tap_inputs_model(model, taps)

    @tf.function
    def ranks(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            inputs = inner(x)
            pre = [
                tf.reshape(preactivation(t.layer, h), [tf.shape(x)[0], -1])
                for t, h in zip(taps, inputs)
            ]
        batch = tf.shape(x)[0]
        return [
            tf.linalg.matrix_rank(tf.reshape(tape.batch_jacobian(p, x), [batch, t.units, -1]))
            for p, t in zip(pre, taps)
        ]

    return lambda x: [r.numpy() for r in ranks(tf.constant(x))]


def simple_mnist_convnet(seed: int) -> keras.Model:
    """keras.io "Simple MNIST convnet" (without dropout), random weights."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def compare_convnet(samples: int, repeats: int, seed: int) -> float:
    model = simple_mnist_convnet(seed)
    x = np.random.default_rng(seed).random((samples, 28, 28, 1)).astype("float32")
    estimator = klr.LocalRankEstimator(model)
    t_klr, m_klr, result = timed(lambda: estimator(x)[0], repeats)
    baseline = tap_baseline_fn(model)
    t_base, m_base, base_ranks = timed(lambda: baseline(x), max(1, repeats - 2))
    names = [info.name for info in estimator.layer_infos]
    identical = all(
        np.array_equal(result.per_sample[n], r) for n, r in zip(names, base_ranks)
    )
    print(f"\n== Simple MNIST convnet (random weights): {samples} inputs, layers {names}")
    methods = {i.name: f"{i.method}/{i.mode}/k={i.directions}" for i in estimator.layer_infos}
    print("methods:", methods)
    print(f"batch {estimator.batch_size}, directions in flight {estimator.directions_in_flight}, "
          f"budgeted peak {estimator.estimated_peak_bytes / 2**20:.0f} MiB")
    print("local rank per layer:", {n: round(v, 2) for n, v in result.mean.items()})
    print(f"baseline batch_jacobian+matrix_rank: {t_base:8.3f} s   peak RSS +{m_base:7.1f} MiB")
    print(f"keras_localrank:                     {t_klr:8.3f} s   peak RSS +{m_klr:7.1f} MiB")
    print(f"speed-up: {t_base / t_klr:.2f}x   identical ranks: {identical}")
    return t_base / t_klr


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
    if FLAGS.convnet:
        compare_convnet(FLAGS.conv_samples, FLAGS.repeats, FLAGS.seed)
    if FLAGS.skip_mlp:
        return
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
