r"""Local rank over training: a 3x100 ReLU MLP on Gaussian data with k relevant directions.

Labels are the sign pattern of `k` fixed random projections of `x ~ N(0, I_d)`,
so the task needs a k-dimensional feature space. Example (about 1 minute per
seed on 2 CPU cores):

    python -m experiments.gaussian_mlp --workdir=runs/gaussian_mlp --seeds=0,1,2

Run it again with the same --workdir to resume. Outputs: see
`keras_localrank/studies/dynamics.py`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from experiments import common, dynamics_flags

flags.DEFINE_integer("dim", None, "Input dimension d (default 20).")
flags.DEFINE_integer("k", None, "Directions the labels depend on (default 2).")
dynamics_flags.define_flags(workdir="runs/gaussian_mlp", presets={"default": "gaussian"})
FLAGS = flags.FLAGS


def main(argv):
    del argv
    fixed = {name: getattr(FLAGS, name) for name in ("dim", "k")}
    fixed = {name: value for name, value in fixed.items() if value is not None}
    dynamics_flags.run_from_flags(**fixed)


if __name__ == "__main__":
    common.run(main)
