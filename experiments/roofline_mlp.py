r"""Roofline of one training step of the MNIST 784-200x4-10 MLP (batch 64, AdamW).

Measures, in one process, inside XLA-compiled `tf.while_loop`s of `--steps`
iterations (so no Python and no dispatch per iteration):

1. every matrix product of one training step on its own (the forward
   `x @ W`, the weight gradients `h^T @ g` and the input gradients
   `g @ W^T` of every layer but the first), and their sum: the compute floor
   of a step at the throughput this machine reaches on those shapes;
2. a hand-written step (forward, softmax cross-entropy, backward, AdamW with
   the update written out), on random data gathered in-graph: the floor with
   every non-matmul cost of a real step;
3. `FastLoop.run_steps` on the `mnist_authors` model (Keras layers, Keras
   AdamW, the authors' double-softmax loss): what the dynamics study runs;
   and, side by side, its previous loop body, which took the batch indices and
   the padding weights with `tf.slice` at a loop-dependent offset (same
   results; XLA on CPU ran it several times slower).

Wall and CPU (process) time per step are printed, with the projected time of
a 10^6-step run and the machine load. On a shared machine the wall times are
inflated by the other processes; the CPU times much less so.

    python -m experiments.roofline_mlp --steps=2000
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import time

import numpy as np
import tensorflow as tf
from absl import flags

from experiments import common

flags.DEFINE_integer("steps", 2000, "Iterations per timed loop.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0: TensorFlow's default).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
FLAGS = flags.FLAGS

DIMS = (784, 200, 200, 200, 200, 10)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _time(fn, steps: int) -> tuple[float, float]:
    """(wall, cpu) milliseconds per iteration of `fn()` (a loop of `steps`), after a warm-up."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (
        (time.perf_counter() - wall) / steps * 1e3,
        (time.process_time() - cpu) / steps * 1e3,
    )


def matmul_shapes(batch: int) -> list[tuple[str, tuple[int, int, int]]]:
    """Every product `(m, k) @ (k, n)` of one step: `[(name, (m, k, n))]`."""
    shapes = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        shapes.append((f"fwd {i + 1}", (batch, a, b)))  # h @ W
        shapes.append((f"dW {i + 1}", (a, batch, b)))  # h^T @ g
        if i:
            shapes.append((f"dx {i + 1}", (batch, b, a)))  # g @ W^T
    return shapes


def time_matmul(m: int, k: int, n: int, steps: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((m, k)), tf.float32)
    b = tf.constant(rng.standard_normal((k, n)), tf.float32)

    @tf.function(jit_compile=True)
    def loop():
        def body(i, acc):  # the loop-carried input keeps XLA from hoisting the product
            return i + 1, tf.matmul(a + acc[:1, :1] * 0.0, b)

        return tf.while_loop(lambda i, _: i < steps, body, (0, tf.zeros((m, n))))[1]

    return _time(lambda: loop().numpy(), steps)


def time_raw_step(batch: int, steps: int) -> tuple[float, float]:
    """A hand-written training step with AdamW, in one compiled while_loop."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((1000, DIMS[0])), tf.float32)
    y = tf.constant(rng.integers(0, DIMS[-1], 1000), tf.int32)
    kernels = [
        tf.Variable((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32))
        for a, b in zip(DIMS[:-1], DIMS[1:])
    ]
    biases = [tf.Variable(np.zeros(b, np.float32)) for b in DIMS[1:]]
    params = kernels + biases
    m = [tf.Variable(tf.zeros_like(p)) for p in params]
    v = [tf.Variable(tf.zeros_like(p)) for p in params]
    lr, wd, b1, b2, eps = 1e-4, 0.01, 0.9, 0.999, 1e-7

    def step(i):
        idx = tf.random.stateless_uniform([batch], [0, i], 0, 1000, tf.int32)
        xb, yb = tf.gather(x, idx), tf.gather(y, idx)
        with tf.GradientTape() as tape:
            h = xb
            for j in range(len(kernels)):
                h = tf.matmul(h, kernels[j]) + biases[j]
                if j < len(kernels) - 1:
                    h = tf.nn.relu(h)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, h))
        grads = tape.gradient(loss, params)
        t = tf.cast(i + 1, tf.float32)
        alpha = lr * tf.sqrt(1 - b2**t) / (1 - b1**t)
        for j, (p, g) in enumerate(zip(params, grads)):
            if j < len(kernels):
                p.assign_sub(p * lr * wd)
            m[j].assign_add((g - m[j]) * (1 - b1))
            v[j].assign_add((g * g - v[j]) * (1 - b2))
            p.assign_sub(m[j] * alpha / (tf.sqrt(v[j]) + eps))
        return loss

    @tf.function(jit_compile=True)
    def loop():
        return tf.while_loop(lambda i, _: i < steps, lambda i, _: (i + 1, step(i)), (0, 0.0))[1]

    return _time(lambda: loop().numpy(), steps)


def _sliced_fast_loop():
    """`FastLoop` with its previous loop body (`tf.slice` at loop-dependent offsets)."""
    from keras_localrank.studies.fast_loop import FastLoop

    class SlicedFastLoop(FastLoop):
        def _run_fn(self, orders, first_epoch, start, count):
            model, optimizer = self.model, self.model.optimizer
            variables = model.trainable_variables
            spe, bs = self.steps_per_epoch, self.batch_size
            padded = tf.constant(np.arange(spe * bs) < self.n, tf.float32)

            def body(i, loss):
                step = start + i
                row = step // spe - first_epoch
                offset = (step % spe) * bs
                idx = tf.slice(orders, [row, offset], [1, bs])[0]
                weights = tf.slice(padded, [offset], [bs])
                xb, yb = tf.gather(self._x, idx), tf.gather(self._y, idx)
                with tf.GradientTape() as tape:
                    outputs = model(xb, training=True)
                    per_example = tf.cast(self._loss_fn(yb, outputs), tf.float32)
                    loss = tf.reduce_sum(per_example * weights) / tf.reduce_sum(weights)
                grads = tape.gradient(loss, variables)
                optimizer.apply(grads, variables)
                return i + 1, loss

            return tf.while_loop(
                lambda i, _: i < count,
                body,
                (tf.constant(0, tf.int64), tf.constant(0.0, tf.float32)),
            )[1]

    return SlicedFastLoop


def time_fast_loop(batch: int, steps: int, sliced: bool = False) -> tuple[float, float, list]:
    """`FastLoop.run_steps` on the `mnist_authors` model and loss (random data):
    (wall, cpu) ms per step and the final weights."""
    from keras_localrank.studies import dynamics, mlp
    from keras_localrank.studies.fast_loop import FastLoop

    if sliced:
        FastLoop = _sliced_fast_loop()  # noqa: N806

    config = dynamics.get_preset("mnist_authors", batch_size=batch, steps_per_execution=steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, DIMS[0])).astype(np.float32)
    y = rng.integers(0, DIMS[-1], 1000)
    model = mlp.build_mlp(DIMS[0], DIMS[-1], DIMS[1:-1], init=config.init)
    mlp.compile_mlp(model, config)
    loop = FastLoop(model, x, y, loss_fn=mlp.loss_function(config), batch_size=batch, seed=0,
                    steps_per_execution=steps)
    return (*_time(lambda: loop.run_steps(steps), steps), model.get_weights())


def main(argv):
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    steps, batch = FLAGS.steps, FLAGS.batch_size
    print(f"uptime before: {_uptime()}")
    print(f"{steps} iterations per loop, batch {batch}, threads {FLAGS.threads or 'default'}")
    floor_wall = floor_cpu = flops = 0.0
    for name, (m, k, n) in matmul_shapes(batch):
        wall, cpu = time_matmul(m, k, n, steps)
        floor_wall += wall
        floor_cpu += cpu
        flops += 2 * m * k * n
        print(f"  {name:>6} ({m:4d} x {k:4d}) @ ({k:4d} x {n:4d}): {wall * 1e3:7.1f} us wall "
              f"{cpu * 1e3:7.1f} us cpu  {2 * m * k * n / wall / 1e6:6.1f} GFLOP/s wall")
    print(f"matmuls of one step: {flops / 1e6:.1f} MFLOP")
    rows = [("matmul floor (sum of the above)", floor_wall, floor_cpu)]
    rows.append(("hand-written step + AdamW", *time_raw_step(batch, steps)))
    *fast, weights = time_fast_loop(batch, steps)
    *sliced, sliced_weights = time_fast_loop(batch, steps, sliced=True)
    rows.append(("FastLoop (Keras model, AdamW)", *fast))
    rows.append(("FastLoop, previous tf.slice body", *sliced))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(weights, sliced_weights))
    print(f"{'':34s} {'ms/step wall':>12s} {'ms/step cpu':>12s} {'10^6 steps (wall)':>18s}")
    for name, wall, cpu in rows:
        print(f"{name:34s} {wall:12.3f} {cpu:12.3f} {wall * 1e3 / 60:15.1f} min")
    print(f"FastLoop / floor: {rows[2][1] / rows[0][1]:.2f}x wall, "
          f"{rows[2][2] / rows[0][2]:.2f}x cpu; FastLoop / hand-written: "
          f"{rows[2][1] / rows[1][1]:.2f}x wall, {rows[2][2] / rows[1][2]:.2f}x cpu")
    print(f"previous / new FastLoop body: {rows[3][1] / rows[2][1]:.2f}x wall, "
          f"{rows[3][2] / rows[2][2]:.2f}x cpu; max |weights difference| {diff:.3g}")
    print(f"uptime after: {_uptime()}")


if __name__ == "__main__":
    common.run(main)
