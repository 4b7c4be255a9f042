r"""Sweep the VIB trade-off beta; record information terms and local rank.

Example (offline, the bundled 10,000 MNIST digits):

    python -m experiments.vib_beta_sweep --data_path=../shared/data/mnist10k.npz \
        --workdir=runs/vib_beta_sweep

Run it again with the same --workdir to resume; finished betas are not
retrained. See `experiments/vib_sweep_lib.py` for the outputs.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from experiments.vib_sweep_lib import SweepConfig, beta_grid, run_sweep

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


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"Expected numbers in --betas. Received: {text!r}") from None


def main(argv):
    del argv
    logging.getLogger("experiments.vib_sweep_lib").setLevel(logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # per-model retracing notes
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    betas = (
        tuple(_float(b) for b in FLAGS.betas)
        if FLAGS.betas
        else beta_grid(FLAGS.beta_min, FLAGS.beta_max, FLAGS.num_betas)
    )
    config = SweepConfig(
        betas=betas,
        seeds=tuple(int(s) for s in FLAGS.seeds),
        dataset=FLAGS.dataset,
        data_path=FLAGS.data_path,
        n_train=FLAGS.n_train or None,
        n_test=FLAGS.n_test or None,
        rank_samples=FLAGS.rank_samples,
        preset=FLAGS.preset,
        overrides={} if FLAGS.epochs is None else {"epochs": FLAGS.epochs},
        robust_atol=FLAGS.robust_atol,
    )
    summary = run_sweep(config, FLAGS.workdir)
    print(f"Wrote {FLAGS.workdir}: {summary['num_runs']} runs, "
          f"{summary['wall_seconds_this_call']:.0f}s this call.")
    for t in summary["overall_local_rank_transitions"]:
        print(f"  local-rank transition between beta={t['beta_low']:g} and "
              f"{t['beta_high']:g} (score {t['score']:.2f})")


if __name__ == "__main__":
    app.run(main)
