"""`python -m compress`: compress a trained Keras model and report.

Example:
    python -m compress --model=model.keras --dataset=mnist \
        --data_path=/path/to/mnist10k.npz --budget=0.5 --budget=0.2 \
        --method=all --finetune_epochs=2 --finetune_lr=1e-4 --workdir=runs/compress

Rerunning the same command resumes (finished budgets are kept); another
configuration on the same `--workdir` is refused before anything is written.
Errors (bad flags, unreadable files, a locked or unwritable work directory)
are printed as one line and exit with status 1.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Input .keras model (never modified).")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "digits", "gaussian"], "Data set.")
flags.DEFINE_string("data_path", None, "Local .npz with arrays x and y instead of downloading.")
flags.DEFINE_multi_float(
    "budget", [0.2], "Target fraction(s) of the original cost in (0, 1]; repeat for a sweep."
)
flags.DEFINE_enum(
    "budget_kind", "params", ["params", "macs"], "What --budget is a fraction of."
)
flags.DEFINE_multi_enum(
    "method",
    ["all"],
    ["local_rank", "weight_svd", "tfmot", "local_rank_nofloor", "spatial", "tucker2", "all"],
    "Compression method(s); all = local_rank, weight_svd, tfmot.",
)
flags.DEFINE_integer("finetune_epochs", 0, "Fine-tuning epochs after compression.")
flags.DEFINE_float(
    "finetune_lr", None, "Fine-tuning learning rate (default: a tenth of the model's compiled one)."
)
flags.DEFINE_enum(
    "finetune_schedule", "constant", ["constant", "cosine"],
    "Fine-tuning learning rate: held, or cosine-decayed to 0.",
)
flags.DEFINE_float(
    "distill", 0.0, "Share in [0, 1] of distillation from the input model while fine-tuning."
)
flags.DEFINE_float("distill_temperature", 2.0, "Distillation temperature (> 0).")
flags.DEFINE_float(
    "validation_fraction",
    0.1,
    "Training samples held out to keep the best fine-tuning epoch and drive the allocation.",
)
flags.DEFINE_enum(
    "allocation", "greedy", ["greedy", "energy"], "How local_rank shares the budget by layer."
)
flags.DEFINE_string(
    "workdir", None, "Run directory: report, manifest and compressed models (resumable)."
)
flags.DEFINE_integer("calibration_samples", 1024, "Training samples used to measure.")
flags.DEFINE_integer("n_train", None, "Use at most this many training samples.")
flags.DEFINE_integer("n_test", None, "Use at most this many test samples.")
flags.DEFINE_enum("subspace", "covariance", ["covariance", "jacobian"], "Data-aware subspace.")
flags.DEFINE_float("floor_rtol", 0.1, "Relative tolerance of the local-rank floor.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer(
    "latency_runs", 15, "Timed inference runs per model and batch size (1 and 64)."
)
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_bool("safe_mode", True, "Keras safe_mode: --nosafe_mode loads Lambda layers "
                  "(only for model files you trust).")
flags.DEFINE_list("imports", [], "Modules to import before loading --model (they define "
                  "and register its custom layers).")
flags.mark_flags_as_required(["model", "workdir"])


def main(argv):
    del argv
    from compress.app import CompressionConfig, run
    from keras_localrank.rundir import RunDirectoryError

    config = CompressionConfig.from_mapping(FLAGS)
    try:
        run(config, progress=lambda line: print(line, flush=True))
    except (ValueError, TypeError, RunDirectoryError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except OSError as e:  # a file-system failure while running: name the file
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
