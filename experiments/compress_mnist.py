"""Compress MNIST MLPs with every method over a range of budgets.

Trains a 784-1024-1024-10 ReLU MLP and the paper's 784-200x4-10 MLP on MNIST
(offline: `--data_path=../shared/data/mnist10k.npz`), then runs the
compression app (`compress.app.run`) on each with local rank, weight SVD and
TF-MOT magnitude pruning at every budget, and writes one directory per
model plus `summary.md`/`summary.json` (the target check) in `--workdir`.
The app holds out the last `--validation_fraction` of the training samples
(which the original models were trained on) for its choices: the greedy rank
allocation and the best fine-tuning epoch; the test split decides nothing.

    python -m experiments.compress_mnist --data_path=../shared/data/mnist10k.npz \
        --workdir=runs/compress_mnist
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", None, "Offline .npz with x and y (else keras.datasets).")
flags.DEFINE_string("workdir", "runs/compress_mnist", "Output folder.")
flags.DEFINE_multi_float("budget", [0.5, 0.3, 0.2, 0.1, 0.05, 0.02], "Parameter fractions.")
flags.DEFINE_multi_string("arch", ["1024x2", "200x4"], "Hidden layers: WIDTHxDEPTH.")
flags.DEFINE_integer("epochs", 8, "Training epochs of the original models.")
flags.DEFINE_integer("finetune_epochs", 2, "Fine-tuning epochs after compression.")
flags.DEFINE_float("finetune_lr", None, "Fine-tuning learning rate (default: compiled LR / 10).")
flags.DEFINE_float("validation_fraction", 0.1, "Training samples held out for choices.")
flags.DEFINE_enum("allocation", "greedy", ["greedy", "energy"], "local_rank budget allocation.")
flags.DEFINE_integer("calibration_samples", 1024, "Calibration samples.")
flags.DEFINE_integer("latency_runs", 10, "Timed inference runs per model.")
flags.DEFINE_integer("seed", 0, "Seed.")


@dataclasses.dataclass
class ExperimentConfig:
    """Configuration of `compress_mnist` (see the module docstring)."""

    workdir: str
    data_path: str | None = None
    budgets: Sequence[float] = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
    archs: Sequence[str] = ("1024x2", "200x4")
    methods: Sequence[str] = ("local_rank", "local_rank_nofloor", "weight_svd", "tfmot")
    epochs: int = 8
    finetune_epochs: int = 2
    finetune_lr: float | None = None
    validation_fraction: float = 0.1
    allocation: str = "greedy"
    n_train: int | None = None
    n_test: int | None = None
    calibration_samples: int = 1024
    latency_runs: int = 10
    seed: int = 0
    dataset: str = "mnist"


def _parse_arch(arch: str) -> tuple[int, int]:
    try:
        width, depth = (int(v) for v in arch.lower().split("x"))
    except ValueError:
        raise ValueError(f"Expected `arch` like '1024x2'. Received: arch={arch!r}") from None
    if width < 1 or depth < 1:
        raise ValueError(f"Expected positive width and depth. Received: arch={arch!r}")
    return width, depth


def train_mlp(arch: str, ds, *, epochs: int, seed: int):
    """A ReLU MLP `n0-(width x depth)-classes`, trained with Adam."""
    import keras

    width, depth = _parse_arch(arch)
    keras.utils.set_random_seed(seed)
    layers = [keras.Input(ds.input_shape)]
    layers += [
        keras.layers.Dense(width, activation="relu", name=f"dense_{i + 1}") for i in range(depth)
    ]
    layers.append(keras.layers.Dense(ds.num_classes, activation="softmax", name="output"))
    model = keras.Sequential(layers, name=f"mlp_{arch}")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=128, verbose=0)
    return model


def _target_check(report: dict, budget: float = 0.2) -> dict:
    rows = [r for r in report["rows"] if r.get("status") == "ok"]
    base = report["original"]["accuracy"]
    lr = next((r for r in rows if r["method"] == "local_rank" and r["budget"] == budget), None)
    beats = []
    for r in rows:
        if r["method"] != "local_rank":
            continue
        others = [
            o for o in rows if o["budget"] == r["budget"] and o["method"] in ("weight_svd", "tfmot")
        ]
        beats.append(
            {
                "budget": r["budget"],
                "local_rank": r["accuracy"],
                **{o["method"]: o["accuracy"] for o in others},
                "beats_all": all(r["accuracy"] > o["accuracy"] for o in others),
            }
        )
    return {
        "original_accuracy": base,
        "drop_at_budget_points": None
        if lr is None
        else 100 * (base - lr.get("accuracy_finetuned", lr["accuracy"])),
        "budget": budget,
        "before_finetune": beats,
    }


def compress_mnist(config: ExperimentConfig) -> dict:
    """Train each architecture, compress it with every method, summarise.

    Returns:
        `{arch: {"report": ..., "target": ...}}`; also written to
        `workdir/summary.json` and `workdir/summary.md`.
    """
    from compress.app import CompressionConfig, run
    from keras_localrank import datasets
    from keras_localrank.io import atomic_write_json, atomic_write_text

    ds = datasets.load(
        config.dataset,
        data_path=config.data_path,
        seed=config.seed,
        n_train=config.n_train,
        n_test=config.n_test,
    )
    os.makedirs(config.workdir, exist_ok=True)
    atomic_write_json(os.path.join(config.workdir, "config.json"), dataclasses.asdict(config))
    summary, lines = {}, ["# MNIST compression sweep", ""]
    for arch in config.archs:
        print(f"training {arch}", flush=True)
        model = train_mlp(arch, ds, epochs=config.epochs, seed=config.seed)
        path = os.path.join(config.workdir, f"mlp_{arch}.keras")
        model.save(path)
        report = run(
            CompressionConfig(
                model=path,
                dataset=config.dataset,
                data_path=config.data_path,
                workdir=os.path.join(config.workdir, f"mlp_{arch}"),
                budgets=tuple(config.budgets),
                methods=tuple(config.methods),
                finetune_epochs=config.finetune_epochs,
                finetune_lr=config.finetune_lr,
                validation_fraction=config.validation_fraction,
                allocation=config.allocation,
                calibration_samples=config.calibration_samples,
                n_train=config.n_train,
                n_test=config.n_test,
                latency_runs=config.latency_runs,
                seed=config.seed,
            ),
            progress=lambda line: print(line, flush=True),
        )
        target = _target_check(report)
        summary[arch] = {"report": report, "target": target}
        with open(report["paths"]["markdown"], encoding="utf-8") as f:
            lines += [f"## {arch}", "", f.read(), "", f"Target check: `{target}`", ""]
    atomic_write_json(os.path.join(config.workdir, "summary.json"), summary)
    atomic_write_text(os.path.join(config.workdir, "summary.md"), "\n".join(lines))
    return summary


def main(argv):
    del argv
    compress_mnist(
        ExperimentConfig(
            workdir=FLAGS.workdir,
            data_path=FLAGS.data_path,
            budgets=tuple(FLAGS.budget),
            archs=tuple(FLAGS.arch),
            epochs=FLAGS.epochs,
            finetune_epochs=FLAGS.finetune_epochs,
            finetune_lr=FLAGS.finetune_lr,
            validation_fraction=FLAGS.validation_fraction,
            allocation=FLAGS.allocation,
            calibration_samples=FLAGS.calibration_samples,
            latency_runs=FLAGS.latency_runs,
            seed=FLAGS.seed,
        )
    )


if __name__ == "__main__":
    app.run(main)
