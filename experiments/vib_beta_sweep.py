r"""Sweep the VIB trade-off beta; record information terms and local rank.

Example (offline, an .npz with 10,000 MNIST digits):

    python -m experiments.vib_beta_sweep --data_path=mnist10k.npz \
        --workdir=runs/vib_beta_sweep

Without --data_path MNIST is downloaded by `keras.datasets.mnist`. Run it
again with the same --workdir to resume; finished betas are not retrained.
See `keras_localrank/studies/vib_sweep.py` for the outputs.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags

from experiments import common
from experiments.common import numbers
from keras_localrank.studies import vib_sweep

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/vib_beta_sweep", "Run directory (reuse it to resume).")
flags.DEFINE_enum(
    "dataset", "mnist", ["mnist", "fashion_mnist", "digits", "gaussian"], "Data set."
)
flags.DEFINE_string("data_path", None, "An .npz with x and y read instead of downloading.")
flags.DEFINE_list("betas", None, "Explicit beta values; overrides the log grid.")
flags.DEFINE_float("beta_min", 1e-6, "Smallest beta of the log grid.")
flags.DEFINE_float("beta_max", 10.0, "Largest beta of the log grid.")
flags.DEFINE_integer("num_betas", 15, "Number of beta values in the log grid.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one model per seed and beta.")
flags.DEFINE_enum("preset", "small", ["small", "paper_mnist"], "VIBConfig preset.")
flags.DEFINE_integer("epochs", None, "Override the preset's epochs.")
flags.DEFINE_integer("n_train", 8000, "Training examples kept (0: all).")
flags.DEFINE_integer("n_test", 2000, "Test examples kept (0: all).")
flags.DEFINE_integer("rank_samples", 500, "Test examples the local rank averages over.")
flags.DEFINE_float("robust_atol", 0.1, "Singular-value threshold of the robust local rank.")
common.define_executor_flags()


def config_from_flags() -> vib_sweep.SweepConfig:
    """The `SweepConfig` of the parsed flags."""
    betas = (
        numbers("betas", FLAGS.betas, float)
        if FLAGS.betas
        else vib_sweep.beta_grid(FLAGS.beta_min, FLAGS.beta_max, FLAGS.num_betas)
    )
    return vib_sweep.SweepConfig(
        betas=betas,
        seeds=numbers("seeds", FLAGS.seeds, int),
        dataset=FLAGS.dataset,
        data_path=FLAGS.data_path,
        n_train=FLAGS.n_train or None,
        n_test=FLAGS.n_test or None,
        rank_samples=FLAGS.rank_samples,
        preset=FLAGS.preset,
        overrides={} if FLAGS.epochs is None else {"epochs": FLAGS.epochs},
        robust_atol=FLAGS.robust_atol,
    )


def main(argv):
    del argv
    logging.getLogger(vib_sweep.__name__).setLevel(logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # per-model retracing notes
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    config = config_from_flags()
    with common.executor_from_flags() as executor:
        summary = vib_sweep.train_and_evaluate(
            config,
            FLAGS.workdir,
            extra_files={"flags.txt": FLAGS.flags_into_string()},
            executor=executor,
        )
    print(f"Wrote {FLAGS.workdir}: {summary['num_runs']} runs, "
          f"{summary['wall_seconds_this_call']:.0f}s this call.")
    for t in summary["overall_local_rank_transitions"]:
        print(f"  local-rank transition between beta={t['beta_low']:g} and "
              f"{t['beta_high']:g} (score {t['score']:.2f})")


if __name__ == "__main__":
    common.run(main)
