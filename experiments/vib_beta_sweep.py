r"""Sweep the VIB trade-off beta; record information terms and local rank.

Example (offline, an .npz with 10,000 MNIST digits):

    python -m experiments.vib_beta_sweep --data_path=mnist10k.npz \
        --workdir=runs/vib_beta_sweep

Without --data_path MNIST is downloaded by `keras.datasets.mnist`. Run it
again with the same --workdir to resume; finished betas are not retrained.
See `keras_localrank/studies/vib_sweep.py` for the outputs.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd
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
flags.DEFINE_float("robust_atol", 0.1, "Robust-rank threshold shown in the plots.")
flags.DEFINE_list("atols", ["0.01", "1"], "Further robust-rank thresholds (same SVDs).")
flags.DEFINE_list(
    "information_sigma", ["0.3", "1", "3"],
    "Noise levels of the I(X;T) / I(T;Y) estimates of the encoder layers (empty: off).",
)
flags.DEFINE_integer("batch_size", None, "Override the preset's batch size.")
flags.DEFINE_float("decay_rate", None, "Override the preset's learning-rate decay factor.")
flags.DEFINE_integer(
    "early_stop_patience", 0,
    "Stop once the training loss has not fallen below (1 - early_stop_min_delta) x "
    "its best for this many epochs (0: train all epochs).",
)
flags.DEFINE_float("early_stop_min_delta", 1e-3, "Relative improvement that counts.")
flags.DEFINE_bool(
    "refine", False,
    "Add a dense beta grid (--per_decade per decade) around the transitions of the "
    "sweep already in --workdir (its results.csv) and train the new betas.",
)
flags.DEFINE_integer("per_decade", 8, "Betas per decade of the refined grid.")
flags.DEFINE_list(
    "refine_columns", None,
    "results.csv columns whose largest drops are refined (default: exact local rank "
    "of the last encoder layer, and accuracy).",
)
flags.DEFINE_integer("refine_top", 1, "Transitions refined per column.")
common.define_executor_flags()


def config_from_flags() -> vib_sweep.SweepConfig:
    """The `SweepConfig` of the parsed flags."""
    betas = (
        numbers("betas", FLAGS.betas, float)
        if FLAGS.betas
        else vib_sweep.beta_grid(FLAGS.beta_min, FLAGS.beta_max, FLAGS.num_betas)
    )
    if FLAGS.refine:
        betas = refined_betas(FLAGS.workdir)
    overrides = {
        key: value
        for key, value in (
            ("epochs", FLAGS.epochs),
            ("batch_size", FLAGS.batch_size),
            ("decay_rate", FLAGS.decay_rate),
        )
        if value is not None
    }
    return vib_sweep.SweepConfig(
        betas=betas,
        seeds=numbers("seeds", FLAGS.seeds, int),
        dataset=FLAGS.dataset,
        data_path=FLAGS.data_path,
        n_train=FLAGS.n_train or None,
        n_test=FLAGS.n_test or None,
        rank_samples=FLAGS.rank_samples,
        preset=FLAGS.preset,
        overrides=overrides,
        robust_atol=FLAGS.robust_atol,
        atols=numbers("atols", FLAGS.atols, float),
        early_stop_patience=FLAGS.early_stop_patience or None,
        early_stop_min_delta=FLAGS.early_stop_min_delta,
        information_sigmas=numbers("information_sigma", FLAGS.information_sigma, float),
    )


def refined_betas(workdir: str) -> tuple[float, ...]:
    """The finished grid of `workdir` plus the refined points around its transitions."""
    path = os.path.join(workdir, "results.csv")
    if not os.path.isfile(path):
        raise ValueError(
            f"Expected a finished sweep in --workdir for --refine. Received: no {path}"
        )
    frame = pd.read_csv(path)
    with open(os.path.join(workdir, "results.json")) as f:
        layers = json.load(f)[0]["layers"]
    columns = FLAGS.refine_columns or vib_sweep.default_refine_columns(layers)
    return vib_sweep.refine_betas(
        frame, columns, per_decade=FLAGS.per_decade, top=FLAGS.refine_top
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
    frame = pd.read_csv(os.path.join(FLAGS.workdir, "results.csv"))
    shown = ["rate", *summary["information_columns"]]
    print(frame.groupby("beta")[shown].mean().to_string(float_format="%.3f"))
    for t in summary["overall_local_rank_transitions"]:
        print(f"  local-rank transition between beta={t['beta_low']:g} and "
              f"{t['beta_high']:g} (score {t['score']:.2f})")


if __name__ == "__main__":
    common.run(main)
