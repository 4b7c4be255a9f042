"""absl flags shared by `gaussian_mlp.py` and `mnist_mlp.py`.

Every flag but `--workdir`, `--preset` and `--seeds` defaults to None: it then
keeps the preset's value (see `keras_localrank.studies.dynamics_config.PRESETS`).
"""

from __future__ import annotations

import logging
import os

from absl import flags

from experiments.common import define_executor_flags, executor_from_flags, numbers
from keras_localrank.studies import dynamics, dynamics_config

FLAGS = flags.FLAGS
_PRESETS: dict[str, str] = {}


def define_flags(*, workdir: str, presets: dict[str, str]) -> None:
    """Define the flags; `presets` maps a flag value to a `PRESETS` name."""
    flags.DEFINE_string("workdir", workdir, "Run directory; reuse it to resume.")
    flags.DEFINE_enum("preset", next(iter(presets)), list(presets), "Named configuration.")
    flags.DEFINE_list("seeds", ["0"], "Seeds: one model per seed (init and data order).")
    flags.DEFINE_string("data_path", None, "An .npz with x and y read instead of downloading.")
    flags.DEFINE_integer("n_train", None, "Training examples.")
    flags.DEFINE_integer("n_test", None, "Test examples.")
    flags.DEFINE_list("hidden", None, "Hidden layer widths, e.g. 100,100,100.")
    flags.DEFINE_float("learning_rate", None, "AdamW learning rate.")
    flags.DEFINE_float("weight_decay", None, "AdamW decoupled weight decay (times the lr).")
    flags.DEFINE_bool("decay_bias", None, "Also decay biases (default: kernels only).")
    flags.DEFINE_float(
        "adam_epsilon", None, "AdamW epsilon (Keras' default 1e-7; the authors' PyTorch 1e-8)."
    )
    flags.DEFINE_integer("batch_size", None, "Batch size.")
    flags.DEFINE_integer("epochs", None, "Epochs.")
    flags.DEFINE_integer("num_measurements", None, "Log-spaced measurement steps.")
    flags.DEFINE_list("atol", None, "Robust local rank thresholds eps, e.g. 0.01,0.1.")
    flags.DEFINE_integer("rank_samples", None, "Inputs the local rank averages over.")
    flags.DEFINE_integer("checkpoint_every", None, "Epochs between checkpoints.")
    flags.DEFINE_integer("verbose", 0, "Keras fit verbosity.")
    flags.DEFINE_integer("data_seed", None, "Seed of the data set / split.")
    flags.DEFINE_enum(
        "loss", None, list(dynamics_config.LOSSES),
        "logits: cross-entropy on logits. double_softmax: the authors' code (softmax "
        "applied twice: a softmax output layer under a logits cross-entropy).",
    )
    flags.DEFINE_enum(
        "input_scaling", None, list(dynamics_config.INPUT_SCALINGS),
        "unit: pixels in [0, 1]. standardize: (x - 0.1307) / 0.3081 (the authors').",
    )
    flags.DEFINE_enum(
        "init", None, list(dynamics_config.INITS),
        "Kernel init: glorot_uniform or normal_fan_in (N(0, 1/fan_in), the authors').",
    )
    flags.DEFINE_enum(
        "rank_on", None, list(dynamics_config.RANK_ON),
        "Average the local rank over --rank_samples training or test inputs.",
    )
    flags.DEFINE_enum(
        "subset", None, list(dynamics_config.SUBSETS),
        "first: the first n_train / n_test examples; random: drawn with --data_seed.",
    )
    flags.DEFINE_enum(
        "grid", None, list(dynamics_config.GRIDS),
        "Measurement steps: round(logspace) or floor (the authors' astype(int)).",
    )
    flags.DEFINE_enum(
        "loop", None, list(dynamics_config.LOOPS),
        "fit: Keras fit. fast: the compiled FastLoop (same steps and data order).",
    )
    flags.DEFINE_integer("steps_per_execution", None, "Steps per compiled call (--loop=fast).")
    flags.DEFINE_bool(
        "information", None,
        "Also estimate I(X;T) (noise-injection bounds) and I(T;Y) of every hidden layer at "
        "the same steps as local rank (default on: a few percent of a rank measurement).",
    )
    flags.DEFINE_list(
        "information_sigma", None,
        "Noise levels sigma of the information estimates (default 0.3,1,3).",
    )
    define_executor_flags()
    _PRESETS.update(presets)


def config_from_flags(**fixed) -> dynamics.DynamicsConfig:
    """The `DynamicsConfig` of the parsed flags (`fixed`: fields set by the script)."""
    overrides = dict(fixed)
    for name in (
        "data_path",
        "n_train",
        "n_test",
        "learning_rate",
        "weight_decay",
        "decay_bias",
        "adam_epsilon",
        "batch_size",
        "epochs",
        "num_measurements",
        "rank_samples",
        "checkpoint_every",
        "data_seed",
        "loss",
        "input_scaling",
        "init",
        "rank_on",
        "subset",
        "grid",
        "loop",
        "steps_per_execution",
        "information",
    ):
        if getattr(FLAGS, name) is not None:
            overrides[name] = getattr(FLAGS, name)
    if FLAGS.hidden is not None:
        overrides["hidden"] = numbers("hidden", FLAGS.hidden, int)
    if FLAGS.atol is not None:
        overrides["atols"] = numbers("atol", FLAGS.atol, float)
    if FLAGS.information_sigma is not None:
        overrides["information_sigmas"] = numbers(
            "information_sigma", FLAGS.information_sigma, float
        )
    overrides["seeds"] = numbers("seeds", FLAGS.seeds, int)
    return dynamics.get_preset(_PRESETS[FLAGS.preset], **overrides)


def run_from_flags(**fixed) -> dict:
    """Resolve the config, run it (the flags go to `flags.txt` once the run
    directory accepts the config), print a summary."""
    logging.getLogger(dynamics.__name__).setLevel(logging.INFO)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)
    config = config_from_flags(**fixed)
    workdir = FLAGS.workdir
    with executor_from_flags() as executor:
        summary = dynamics.train_and_evaluate(
            config,
            workdir,
            verbose=FLAGS.verbose,
            extra_files={"flags.txt": FLAGS.flags_into_string()},
            executor=executor,
        )
    print(f"Wrote {workdir} in {summary['wall_seconds_this_call']:.0f} s.")
    for column in summary["rank_columns"]:
        print(column)
        for layer, kinds in summary["mean_std"]["layers"].items():
            s = kinds[column]
            print(
                f"  {layer}: peak {s['peak']['mean']:.2f} -> final {s['final']['mean']:.2f} "
                f"(drop {100 * s['relative_drop']['mean']:.0f}%, starts at step "
                f"{s['drop_start_step']['mean']})"
            )
    if summary["task_dimension"] is not None:
        print(f"(the labels depend on k = {summary['task_dimension']} input directions)")
    report = os.path.join(workdir, "information_report.txt")
    if os.path.exists(report):
        with open(report, encoding="utf-8") as f:
            print(f.read())
    final = summary["mean_std"]["final"]
    print(
        "final train/test accuracy: "
        f"{final['train_accuracy']['mean']:.3f} / {final['test_accuracy']['mean']:.3f}"
    )
    return summary
