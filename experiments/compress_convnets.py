"""Compress Fashion-MNIST convnets and a small ViT; report accuracy vs MACs and latency.

Trains three classifiers on Fashion-MNIST (`keras.datasets.fashion_mnist`;
offline, put the IDX files in `$KERAS_HOME/datasets/fashion-mnist/`):

1. `cnn`: the keras.io MNIST convnet widened to 64/128 filters
   (Conv 3x3 64 - MaxPool - Conv 3x3 128 - MaxPool - Flatten - Dropout - Dense 10);
2. `resnet`: a small ResNet-20-style net (a 3x3 stem, three stages of
   `--blocks` residual blocks of two 3x3 conv + BatchNorm at 16/32/64
   filters, strided 1x1 shortcuts, global average pooling);
3. `vit`: a Vision Transformer on 7x7 patches (16 tokens, width 64, 4 layers
   of 4-head self-attention and a 128-unit feed-forward layer).

Each trained model goes through the compression app (`compress.app.run`)
with every method at its budget (`--conv_budget` of the MACs for the
convnets, `--vit_budget` of the parameters for the ViT), with fine-tuning.
The run directory is a `RunDirectory`: rerunning the same command resumes
(trained models and finished budgets are kept); a different configuration
is refused. Outputs: `<arch>.keras`, `compress_<arch>/` (the app's report,
plots of accuracy vs parameters / MACs / batch-64 latency), and
`summary.md`/`summary.json` with the targets checked, plus Pareto plots of
all models (`pareto_macs.png`, `pareto_latency.png`).

    export KERAS_HOME=/tmp/kh  # holding datasets/fashion-mnist/ offline
    python -m experiments.compress_convnets --workdir=runs/compress_convnets
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (resumable).")
flags.DEFINE_multi_enum("arch", ["cnn", "resnet", "vit"], ["cnn", "resnet", "vit"], "Models.")
flags.DEFINE_integer("epochs", 3, "Training epochs of the original models.")
flags.DEFINE_float("train_lr", 1e-3, "Adam learning rate of the original models.")
flags.DEFINE_enum(
    "train_schedule",
    "constant",
    ["constant", "cosine"],
    "Learning-rate schedule of the originals: constant, or cosine decay to 0 over `--epochs`.",
)
flags.DEFINE_integer("blocks", 3, "Residual blocks per ResNet stage (3: ResNet-20 style).")
flags.DEFINE_integer("n_train", 20000, "Training samples (of 60,000).")
flags.DEFINE_integer("n_test", 5000, "Test samples (of 10,000).")
flags.DEFINE_multi_float("conv_budget", [0.3], "MACs fractions for the convnets.")
flags.DEFINE_multi_float("vit_budget", [0.5], "Parameter fractions for the ViT.")
flags.DEFINE_multi_string(
    "method",
    ["local_rank", "weight_svd", "tucker2", "tfmot"],
    "Compression methods (see compress.app.METHODS).",
)
flags.DEFINE_integer("finetune_epochs", 2, "Fine-tuning epochs after compression.")
flags.DEFINE_float("finetune_lr", None, "Fine-tuning learning rate (default: the app's).")
flags.DEFINE_enum("finetune_schedule", "constant", ["constant", "cosine"], "Fine-tuning schedule.")
flags.DEFINE_float("distill", 0.0, "Share of distillation from the original while fine-tuning.")
flags.DEFINE_float("distill_temperature", 2.0, "Distillation temperature.")
flags.DEFINE_enum("allocation", "greedy", ["greedy", "energy"], "local_rank budget allocation.")
flags.DEFINE_float(
    "validation_fraction", 0.05, "Training samples the app holds out (<= 0.1, unseen in training)."
)
flags.DEFINE_integer("calibration_samples", 512, "Calibration samples.")
flags.DEFINE_integer("latency_runs", 10, "Timed inference runs per model and batch size.")
flags.DEFINE_integer("seed", 0, "Seed.")

ARCHS = ("cnn", "resnet", "vit")
#: BatchNorm momentum: Keras's 0.99 leaves the moving statistics far from the
#: data after a few hundred steps (the inference-mode accuracy of a 3-epoch
#: ResNet was at chance level), 0.9 tracks them.
BN_MOMENTUM = 0.9
#: Fraction of the training samples (the last ones) the originals never see.
TRAIN_HOLDOUT = 0.1


@dataclasses.dataclass
class ExperimentConfig:
    """Configuration of `compress_convnets` (see the module docstring)."""

    archs: Sequence[str] = ARCHS
    epochs: int = 3
    train_lr: float = 1e-3
    train_schedule: str = "constant"
    blocks: int = 3
    n_train: int | None = 20000
    n_test: int | None = 5000
    conv_budgets: Sequence[float] = (0.3,)
    vit_budgets: Sequence[float] = (0.5,)
    methods: Sequence[str] = ("local_rank", "weight_svd", "tucker2", "tfmot")
    finetune_epochs: int = 2
    finetune_lr: float | None = None
    finetune_schedule: str = "constant"
    distill: float = 0.0
    distill_temperature: float = 2.0
    allocation: str = "greedy"
    validation_fraction: float = 0.05
    calibration_samples: int = 512
    latency_runs: int = 10
    seed: int = 0
    dataset: str = "fashion_mnist"
    batch_size: int = 128


# --- models ------------------------------------------------------------------------------


def build_cnn():
    """The keras.io MNIST convnet, widened to 64/128 filters."""
    import keras

    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(64, 3, activation="relu", name="conv1"),
            L.MaxPooling2D(2),
            L.Conv2D(128, 3, activation="relu", name="conv2"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dropout(0.5),
            L.Dense(10, name="logits"),
        ],
        name="cnn",
    )


def build_resnet(blocks: int = 3):
    """A ResNet-20-style net: 3 stages of `blocks` residual blocks with BatchNorm."""
    import keras

    L = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU()(L.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage}b{block}"
            y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                         name=f"{name}_conv1")(x)
            y = L.ReLU()(L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y))
            y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
            y = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
            if stride != 1 or x.shape[-1] != filters:
                x = L.Conv2D(filters, 1, strides=stride, use_bias=False,
                             name=f"{name}_short")(x)
                x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_short_bn")(x)
            x = L.ReLU()(L.Add()([x, y]))
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet")


def build_vit(*, width: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128):
    """A ViT on 7x7 patches of 28x28 images (16 tokens), stock Keras layers only.

    The learned position embedding is the per-token bias of the patch
    embedding (an `EinsumDense` with bias over tokens and features).
    """
    import keras

    L = keras.layers
    inputs = keras.Input((28, 28, 1))
    x = L.Reshape((4, 7, 4, 7))(inputs)
    x = L.Permute((1, 3, 2, 4))(x)
    x = L.Reshape((16, 49))(x)
    x = L.EinsumDense("abc,cd->abd", output_shape=(16, width), bias_axes="bd", name="embed")(x)
    for i in range(depth):
        y = L.LayerNormalization(epsilon=1e-6, name=f"ln{i}a")(x)
        y = L.MultiHeadAttention(heads, width // heads, name=f"mha{i}")(y, y)
        x = L.Add()([x, y])
        y = L.LayerNormalization(epsilon=1e-6, name=f"ln{i}b")(x)
        y = L.Dense(mlp, activation="gelu", name=f"ffn{i}a")(y)
        y = L.Dense(width, name=f"ffn{i}b")(y)
        x = L.Add()([x, y])
    x = L.LayerNormalization(epsilon=1e-6, name="ln_out")(x)
    x = L.GlobalAveragePooling1D()(x)
    outputs = L.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="vit")


def build(arch: str, config: ExperimentConfig):
    if arch == "cnn":
        return build_cnn()
    if arch == "resnet":
        return build_resnet(config.blocks)
    return build_vit()


def train_learning_rate(config: ExperimentConfig, steps_per_epoch: int):
    """The originals' learning rate: `config.train_lr`, constant or cosine-decayed to 0.

    Args:
        config: the experiment configuration (`train_lr`, `train_schedule`,
            `epochs`).
        steps_per_epoch: optimizer steps per training epoch, >= 1.

    Returns:
        A float, or a `keras.optimizers.schedules.CosineDecay` over
        `epochs * steps_per_epoch` steps.
    """
    import keras

    if config.train_schedule == "constant":
        return config.train_lr
    return keras.optimizers.schedules.CosineDecay(
        config.train_lr, decay_steps=config.epochs * steps_per_epoch
    )


def train(arch: str, config: ExperimentConfig, ds):
    """A freshly trained `arch` model (Adam, logits, `config.epochs` epochs).

    The originals fit the first 90% of the training samples. The last 10%
    are never fitted: the app's validation split is the last
    `validation_fraction` of them, and the samples between (the monitor
    split) score every training epoch (printed as `val_accuracy`), so the
    epoch count can be read off a validation curve the app never uses.
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    model = build(arch, config)
    x = ds.x_train.reshape(-1, 28, 28, 1)
    n_fit = len(x) - int(round(TRAIN_HOLDOUT * len(x)))  # the app's validation stays unseen
    n_app = int(round(config.validation_fraction * len(x)))
    monitor = slice(n_fit, len(x) - n_app)
    steps = -(-n_fit // config.batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(train_learning_rate(config, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    validation = (x[monitor], ds.y_train[monitor]) if monitor.stop > monitor.start else None
    model.fit(x[:n_fit], ds.y_train[:n_fit], epochs=config.epochs,
              batch_size=config.batch_size, validation_data=validation, verbose=2)
    return model


# --- summary -----------------------------------------------------------------------------


def _target(arch: str, report: dict) -> dict:
    """The issue's targets for this model, checked on the report."""
    orig = report["original"]
    out = {}
    for row in report["rows"]:
        if row.get("status") != "ok":
            continue
        acc = row.get("accuracy_finetuned", row.get("accuracy"))
        key = f"{row['method']}@{row['budget']:g}"
        drop = orig["accuracy"] - acc
        if arch == "vit":
            out[key] = {"points_lost": 100 * drop, "target_met": bool(100 * drop <= 1.0)}
        else:
            speedup = orig["latency_ms_b64"] / row["latency_ms_b64"]
            out[key] = {
                "points_lost": 100 * drop,
                "speedup_b64": speedup,
                "target_met": bool(100 * drop <= 0.5 and speedup >= 1.5),
            }
    return out


def pareto_plot(reports: dict, path: str, *, x: str) -> None:
    """Test accuracy (fine-tuned where available) against MACs or latency, all models."""
    from keras_localrank.plotting import new_figure, save_figure

    key, label = {
        "macs": ("macs", "MACs per sample"),
        "latency": ("latency_ms_b64", "CPU latency, batch 64 (ms)"),
    }[x]
    fig, ax = new_figure(figsize=(7, 4.5), dpi=90)
    markers = dict(zip(ARCHS, "os^"))
    for arch, report in reports.items():
        orig = report["original"]
        ax.plot(orig[key], orig["accuracy"], "k" + markers[arch], ms=9, label=f"{arch} original")
        for row in report["rows"]:
            if row.get("status") != "ok":
                continue
            acc = row.get("accuracy_finetuned", row.get("accuracy"))
            ax.plot(row[key], acc, markers[arch], label=f"{arch} {row['method']}", alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("test accuracy (after fine-tuning)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


# --- the study ---------------------------------------------------------------------------


def train_and_evaluate(config: ExperimentConfig, workdir: str) -> dict:
    """Train (or reuse) each model, compress it with every method, summarise.

    Returns:
        `{arch: {"report": ..., "target": ...}}`, also in
        `workdir/summary.json`; `summary.md` and Pareto plots beside it.
    """
    import keras

    from compress.app import CompressionConfig, run
    from keras_localrank import datasets
    from keras_localrank.rundir import RunDirectory

    from keras_localrank.validation import (
        check_choice,
        check_finite_float,
        check_fraction,
        check_int,
        check_positive_int,
    )

    for name in ("epochs", "blocks", "calibration_samples", "latency_runs", "batch_size"):
        check_positive_int(name, getattr(config, name))
    for name in ("n_train", "n_test"):
        if getattr(config, name) is not None:
            check_positive_int(name, getattr(config, name))
    check_int("finetune_epochs", config.finetune_epochs, minimum=0)
    for budget in (*config.conv_budgets, *config.vit_budgets):
        check_fraction("budget", budget)
    check_choice("allocation", config.allocation, ("greedy", "energy"))
    check_choice("train_schedule", config.train_schedule, ("constant", "cosine"))
    check_finite_float("train_lr", config.train_lr, low=0, low_open=True)
    if not 0 < config.validation_fraction <= TRAIN_HOLDOUT:
        raise ValueError(
            f"Expected `validation_fraction` in (0, {TRAIN_HOLDOUT}] (samples the original "
            f"models never saw). Received: validation_fraction={config.validation_fraction!r}"
        )
    for arch in config.archs:
        if arch not in ARCHS:
            raise ValueError(f"Expected `arch` in {ARCHS}. Received: arch={arch!r}")
    # Methods and budgets may be added on a rerun: trained models are kept.
    mutable = ("methods", "conv_budgets", "vit_budgets", "archs")
    with RunDirectory(workdir, dataclasses.asdict(config), mutable_keys=mutable) as run_dir:
        ds = datasets.load(
            config.dataset, seed=config.seed, n_train=config.n_train, n_test=config.n_test
        )
        summary, reports = {}, {}
        lines = ["# Fashion-MNIST: compressing convnets and a ViT", ""]
        for arch in config.archs:
            model_file = f"{arch}.keras"
            if not (run_dir.is_complete(model_file) and run_dir.exists(model_file)):
                print(f"training {arch}", flush=True)
                start = time.perf_counter()
                model = train(arch, config, ds)
                with run_dir.atomic_path(model_file) as tmp:
                    model.save(tmp)
                run_dir.mark_complete(model_file, train_seconds=time.perf_counter() - start)
            else:
                print(f"{arch}: trained in an earlier run (resumed)", flush=True)
            convnet = arch != "vit"
            report = run(
                CompressionConfig.from_mapping(
                    config,
                    model=run_dir.join(model_file),
                    workdir=run_dir.join(f"compress_{arch}"),
                    budgets=tuple(config.conv_budgets if convnet else config.vit_budgets),
                    budget_kind="macs" if convnet else "params",
                ),
                progress=lambda line: print(line, flush=True),
            )
            reports[arch] = report
            target = _target(arch, report)
            summary[arch] = {"report": report, "target": target}
            with open(report["paths"]["markdown"], encoding="utf-8") as f:
                lines += [f"## {arch}", "", f.read(), "", f"Targets: `{target}`", ""]
            keras.backend.clear_session()
        run_dir.write_json("summary.json", summary)
        run_dir.write_text("summary.md", "\n".join(lines))
        pareto_plot(reports, run_dir.join("pareto_macs.png"), x="macs")
        pareto_plot(reports, run_dir.join("pareto_latency.png"), x="latency")
    return summary


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise ValueError("Expected `--workdir`. Received: workdir=None")
    config = ExperimentConfig(
        archs=tuple(FLAGS.arch),
        epochs=FLAGS.epochs,
        train_lr=FLAGS.train_lr,
        train_schedule=FLAGS.train_schedule,
        blocks=FLAGS.blocks,
        n_train=FLAGS.n_train,
        n_test=FLAGS.n_test,
        conv_budgets=tuple(FLAGS.conv_budget),
        vit_budgets=tuple(FLAGS.vit_budget),
        methods=tuple(FLAGS.method),
        finetune_epochs=FLAGS.finetune_epochs,
        finetune_lr=FLAGS.finetune_lr,
        finetune_schedule=FLAGS.finetune_schedule,
        distill=FLAGS.distill,
        distill_temperature=FLAGS.distill_temperature,
        allocation=FLAGS.allocation,
        validation_fraction=FLAGS.validation_fraction,
        calibration_samples=FLAGS.calibration_samples,
        latency_runs=FLAGS.latency_runs,
        seed=FLAGS.seed,
    )
    train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    common.run(main)
