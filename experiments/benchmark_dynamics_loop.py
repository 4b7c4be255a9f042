r"""Benchmark: the training-dynamics study with Keras `fit` vs the compiled `FastLoop`.

Runs `keras_localrank.studies.dynamics.train_and_evaluate` twice in one
process on the same config (a preset of `studies.dynamics_config.PRESETS`
cut to `--epochs`), once with `loop="fit"` and once with `loop="fast"`, and
prints the wall time of each, the ratio, steps per second, and the largest
difference between the two runs' measurements (same seed, same data order).
Example (offline MNIST):

    python -m experiments.benchmark_dynamics_loop \
        --data_path=/path/to/mnist10k.npz --epochs=625

The machine load matters (`uptime` is printed): on a shared machine both
loops slow down, not necessarily by the same factor.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import subprocess
import tempfile
import time

import numpy as np
import pandas as pd
from absl import flags

from experiments import common
from keras_localrank.studies import dynamics

flags.DEFINE_enum("preset", "mnist_authors", sorted(dynamics.PRESETS), "Config preset.")
flags.DEFINE_string("data_path", None, "An .npz with x and y (offline MNIST).")
flags.DEFINE_integer("epochs", 625, "Epochs of each run (16 steps each for MNIST 1,000).")
flags.DEFINE_integer("num_measurements", 10, "Log-spaced measurements in each run.")
flags.DEFINE_integer("steps_per_execution", 1024, "Steps per compiled call (fast loop).")
flags.DEFINE_integer("seed", 0, "Model seed.")
FLAGS = flags.FLAGS


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv):
    del argv
    base = dynamics.get_preset(
        FLAGS.preset,
        data_path=FLAGS.data_path,
        epochs=FLAGS.epochs,
        num_measurements=FLAGS.num_measurements,
        checkpoint_every=FLAGS.epochs,
        seeds=(FLAGS.seed,),
        steps_per_execution=FLAGS.steps_per_execution,
    )
    print(f"uptime before: {_uptime()}")
    print(f"config: preset={FLAGS.preset}, {base.total_steps} steps, "
          f"{len(dynamics.measurement_steps(base))} measurements")
    seconds, cpu, frames = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for loop in ("fit", "fast"):
            config = dataclasses.replace(base, loop=loop)
            workdir = os.path.join(tmp, loop)
            start, cpu_start = time.perf_counter(), time.process_time()
            dynamics.train_and_evaluate(config, workdir, plots=False)
            seconds[loop] = time.perf_counter() - start
            cpu[loop] = time.process_time() - cpu_start
            frames[loop] = pd.read_csv(os.path.join(workdir, "measurements.csv"))
            print(f"{loop:>4}: {seconds[loop]:8.1f} s wall, {cpu[loop]:8.1f} s cpu  "
                  f"({seconds[loop] / base.total_steps * 1e3:6.2f} ms/step wall incl. "
                  f"compilation and measurements)")
    a, b = frames["fit"], frames["fast"]
    same_steps = a["step"].tolist() == b["step"].tolist()
    numeric = [c for c in a.columns if c not in ("step", "epoch", "layer", "seed")]
    diff = np.abs(a[numeric].to_numpy() - b[numeric].to_numpy()).max(axis=0) if same_steps else None
    print(f"ratio fit / fast: {seconds['fit'] / seconds['fast']:.2f}x wall, "
          f"{cpu['fit'] / cpu['fast']:.2f}x cpu")
    print(f"same measurement steps: {same_steps}")
    if diff is not None:
        for column, d in zip(numeric, diff):
            print(f"  max |fit - fast| {column}: {d:.3g}")
    print(f"uptime after: {_uptime()}")


if __name__ == "__main__":
    common.run(main)
