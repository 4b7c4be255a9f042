r"""Speed-up of a small dynamics sweep on Ray (local workers) against in-process.

Runs the same sweep (the Gaussian-task dynamics study, one sub-run per seed)
twice in one process, each into a fresh run directory: first with the
in-process executor, then with a local Ray instance of `--workers` CPUs (one
task per seed, one CPU and one TensorFlow thread pool each). Prints both wall
times and their ratio, with and without Ray's start-up, and checks that both
give the same local ranks.

    python -m experiments.benchmark_executors --seeds=0,1,2,3 --workers=2

Note the machine's load (`uptime`) with the figure: on a shared machine the
ratio measures the CPU time the sweep got as much as the executor.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402
from experiments.common import numbers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2", "3"], "Seeds: one sub-run (and one Ray task) each.")
flags.DEFINE_integer("workers", 2, "CPUs of the local Ray instance (tasks run at once).")
flags.DEFINE_integer("epochs", 40, "Epochs per seed.")
flags.DEFINE_integer("n_train", 1024, "Training examples.")
flags.DEFINE_string("workdir", None, "Where the two run directories go (default: a temp dir).")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv):
    del argv
    import pandas as pd

    from keras_localrank.executors import RayExecutor
    from keras_localrank.studies import dynamics

    config = dynamics.get_preset(
        "gaussian",
        seeds=numbers("seeds", FLAGS.seeds, int),
        n_train=FLAGS.n_train,
        n_test=256,
        epochs=FLAGS.epochs,
        checkpoint_every=FLAGS.epochs,
        num_measurements=10,
        rank_samples=64,
    )
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="benchmark_executors-")
    print(f"sweep: {len(config.seeds)} seeds x {config.epochs} epochs, n_train={config.n_train}")
    print(f"before: {_uptime()}")

    start = time.perf_counter()
    dynamics.train_and_evaluate(config, os.path.join(root, "inprocess"), plots=False)
    inprocess = time.perf_counter() - start
    print(f"in-process: {inprocess:.1f} s")

    start = time.perf_counter()
    with RayExecutor(num_cpus=FLAGS.workers) as executor:
        executor.start()
        ready = time.perf_counter()
        dynamics.train_and_evaluate(
            config, os.path.join(root, "ray"), plots=False, executor=executor
        )
        done = time.perf_counter()
    on_ray, startup = done - start, ready - start
    print(f"ray, {FLAGS.workers} local workers: {on_ray:.1f} s "
          f"(of which starting Ray {startup:.1f} s)")
    print(f"speed-up: {inprocess / on_ray:.2f}x including Ray's start-up, "
          f"{inprocess / (done - ready):.2f}x without it")
    print(f"after: {_uptime()}")

    a = pd.read_csv(os.path.join(root, "inprocess", "measurements.csv"))
    b = pd.read_csv(os.path.join(root, "ray", "measurements.csv"))
    print(f"same measurements: {a.equals(b)}")
    if FLAGS.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    common.run(main)
